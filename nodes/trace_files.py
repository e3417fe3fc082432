"""Save Trace and Load Trace: BiasMap traces as files, to share a run's maps or analyse them later (in ComfyUI or in
Python with ``BiasMapTrace.load``), as ComfyUI's Save Latent and Load Latent do for latents."""

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import uuid

import folder_paths
from comfy_api.latest import io, ui

from ..biasmap_engine import BiasMapTrace, TraceFormatError, TraceHeader, file_on_the_way
from ..biasmap_engine.host import metadata_disabled
from .common import CATEGORY, Trace, plain_errors
from .output_files import inside, name_in, output_path

__all__ = ["BiasMapLoadTrace", "BiasMapSaveTrace", "listed_traces", "trace_file_header"]

_EXTENSION = ".safetensors"
_SAVED = "biasmap"  # Save Trace's default folder in the output folder, the one Load Trace lists from there


class BiasMapSaveTrace(io.ComfyNode):
    """Write a trace to ComfyUI's output folder as .safetensors with JSON metadata (never pickle)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapSaveTrace",
            display_name="BiasMap Save Trace",
            category=CATEGORY,
            description="Saves a BiasMap trace (maps of every step and stage, concepts, σ, settings, seed and the "
                        "guidance accounting) to the output folder as .safetensors with the workflow in its "
                        "metadata. Load it with BiasMap Load Trace, or in Python with BiasMapTrace.load.",
            inputs=[Trace.Input("trace", tooltip="From a BiasMap Guided KSampler or Load Trace."),
                    io.String.Input("filename_prefix", default=f"{_SAVED}/trace",
                                    tooltip=f"Path inside the output folder, starting with {_SAVED}/ (the folder "
                                            f"where Load Trace lists traces); a counter and .safetensors are added "
                                            f"(trace.safetensors saves trace_00001_.safetensors). "
                                            f"%width% and %height% (the image's), %year%, %month%, %day%, %hour%, "
                                            f"%minute% and %second% are filled in, as by ComfyUI's Save Image.")],
            # ComfyUI's frontend shows text only on Preview as Text: the name is an output to link there.
            outputs=[io.String.Output("trace_file", tooltip=f"The file written, named as Load Trace lists it (it "
                                                            f"lists those under output/{_SAVED}/; connect Preview "
                                                            f"as Text to read the name, then choose it in Load "
                                                            f"Trace: ComfyUI links no text to a list's input).")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        if filename_prefix is None:  # linked: checked when the node runs
            return True
        try:
            _save_path(filename_prefix)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    @plain_errors
    def execute(cls, trace, filename_prefix) -> io.NodeOutput:
        # Checked here, as ComfyUI's own refusal of a path outside the output folder speaks of an image; and the path
        # as checked is the one written, relative, with the system's separators.
        output_dir = folder_paths.get_output_directory()
        prefix = os.path.relpath(_save_path(filename_prefix), os.path.abspath(output_dir))
        height, width = trace.image_size
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, output_dir, width, height)
        metadata = {}
        if not metadata_disabled():  # as ComfyUI's savers: the workflow that made it, unless turned off
            if cls.hidden.prompt is not None:
                metadata["prompt"] = json.dumps(cls.hidden.prompt)
            for key, value in (cls.hidden.extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        # Written beside the name it claims, then moved onto it whole: Load Trace never lists a partial trace.
        file = _claim(folder, name, counter)
        part = os.path.join(folder, f".{file}.part")
        try:
            with contextlib.suppress(FileNotFoundError):  # a link left at that name would be written through
                os.remove(part)
            trace.save(part, metadata)
            os.replace(part, os.path.join(folder, file))
        except BaseException:
            for path in (part, os.path.join(folder, file)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            raise
        # As Load Trace lists it, also for a prefix typed as an absolute path inside the folder.
        shown = name_in(os.path.join(folder, file), output_dir) + " [output]"
        logging.info("BiasMap: trace saved to %s", os.path.join(folder, file))
        return io.NodeOutput(shown, ui=ui.PreviewText(f"saved {shown}"))


def _save_path(prefix: str) -> str:
    """Save Trace's ``prefix`` as a path in the output folder's ``biasmap/``, the folder Load Trace lists there."""
    if re.search(r"%date:[^%]*%", prefix):
        raise ValueError(f"the trace '{prefix}' holds %date:…%, which ComfyUI's page fills in for its own save nodes "
                         f"only: type the date's parts as %year%, %month% and %day% (%hour%, %minute%, %second%), "
                         f"e.g. {_SAVED}/%year%-%month%-%day%/trace")
    path = output_path(prefix, "trace", f"{_SAVED}/trace")
    if not inside(os.path.dirname(path), _saved_folder()):
        # The prefix as a place in the output folder (typed whole, with . and .. or with backslashes), without an
        # output/ or a biasmap/ in another case that it may already start with.
        relative = os.path.relpath(path, folder_paths.get_output_directory()).replace("\\", "/")
        parts = [part for part in posixpath.normpath(relative).split("/") if part not in (".", "..")]
        for folder in ("output", _SAVED):
            parts = parts[1:] if parts and parts[0].lower() == folder else parts
        example = "/".join(parts)
        bare = not example  # the folder alone, in any case
        fix = f"add a file name after {_SAVED}/" if bare else f"start the prefix with {_SAVED}/"
        raise ValueError(f"the trace '{prefix}' would be saved outside output/{_SAVED}/, where Load Trace does not "
                         f"list it: {fix}, e.g. {_SAVED}/{'trace' if bare else example}")
    on_the_way = file_on_the_way(path)
    if on_the_way is not None:
        raise ValueError(f"the trace '{prefix}' cannot be saved: '{on_the_way}' on its way is a file, not a folder; "
                         f"give another prefix, or move that file")
    # A prefix typed as a file's name: the counter goes before its extension, not after (trace.safetensors_00001_).
    named = path.rstrip(" ")  # as pasted, with a space after it, which would end up before the counter (trace _00001_)
    return named[:-len(_EXTENSION)] if named.lower().endswith(_EXTENSION) else named


def _written(path: str) -> bool:
    """Not a name another Save Trace has claimed (empty) and is still writing."""
    try:
        return os.path.getsize(path) > 0
    except OSError:  # removed meanwhile
        return False


def _claim(folder: str, name: str, counter: int) -> str:
    """The first free ``name_NNNNN_.safetensors`` from ``counter`` on, created empty to claim it: ComfyUI instances
    sharing an output folder (one per GPU) see the same files and so get the same counter."""
    while True:
        file = f"{name}_{counter:05}_{_EXTENSION}"
        try:
            with open(os.path.join(folder, file), "xb"):
                return file
        except FileExistsError:
            counter += 1


class BiasMapLoadTrace(io.ComfyNode):
    """Read a trace saved by Save Trace (or ``BiasMapTrace.save``) from the input or output folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapLoadTrace",
            display_name="BiasMap Load Trace",
            category=CATEGORY,
            description="Loads a BiasMap trace saved by BiasMap Save Trace (output folder) or shared with you (put it "
                        "in the input folder), to render its maps and measure entanglement again without sampling.",
            # With no trace yet, one empty choice: the frontend leaves an empty list's input out of the prompt, and
            # ComfyUI's "Required input is missing" would stand for this node's own message.
            inputs=[io.Combo.Input("trace_file", options=listed_traces() or [""],
                                   tooltip=f"Traces in the input folder (read to their header: models and files "
                                           f"with a damaged header are left out) and every .safetensors in the "
                                           f"output folder's {_SAVED}/, where Save Trace writes (marked [output]). "
                                           f"Press R in the page to list one saved since it opened.")],
            outputs=[Trace.Output("trace", tooltip="The saved trace, as the sampler gave it.")],
        )

    @classmethod
    def validate_inputs(cls, trace_file=None):
        # Taking trace_file here turns off ComfyUI's check that it is one of the listed files: this is that check.
        # A linked name (None here) is checked when the node runs.
        if trace_file is not None and _trace_path(trace_file) is None:
            return _missing(trace_file)
        return True

    @classmethod
    def fingerprint_inputs(cls, trace_file=None):
        # The content, as Load Latent's: a file replaced by another with the same time (unzipped, cp -p) is read
        # again. A linked name is not known yet: a value new every time runs the node every time (a string, since
        # ComfyUI keeps it in the prompt that savers write as JSON, where NaN is not valid).
        path = _trace_path(trace_file) if trace_file is not None else None
        if path is None:
            return f"not known before the run: {uuid.uuid4()}"
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    @plain_errors
    def execute(cls, trace_file=None) -> io.NodeOutput:
        path = _trace_path(trace_file) if trace_file else None
        if path is None:
            raise ValueError(_missing(trace_file))
        try:
            trace = BiasMapTrace.load(path)
        except ValueError as err:  # named as listed, not by the server's own path
            problem = (err.problem if isinstance(err, TraceFormatError) else str(err)).replace(path, trace_file)
            raise ValueError(problem + (". Choose a file saved by BiasMap Save Trace."
                                        if isinstance(err, TraceFormatError) else "")) from err
        return io.NodeOutput(trace)


def listed_traces() -> list[str]:
    """The traces under the input folder, then the .safetensors files under the output folder's ``biasmap/``,
    annotated ``[output]`` (ComfyUI's convention for files that Load nodes read from the output folder).

    ComfyUI builds the schema for every /object_info and every validation, so the walk stays out of the rest of the
    output folder, which may hold many thousands of images. The input folder's .safetensors are read to their header,
    to leave models out; Save Trace's folder (an audit's thousands of traces) holds traces.
    """
    output = folder_paths.get_output_directory()
    found = []
    for folder, under, note, listed in ((folder_paths.get_input_directory(), "", "", BiasMapTrace.is_trace_file),
                                        (output, _SAVED, " [output]", _written)):
        names = []
        for root, _, files in os.walk(os.path.join(folder, under)):  # links not followed: a loop would never end
            names += [name_in(os.path.join(root, f), folder)
                      for f in files if f.endswith(_EXTENSION) and listed(os.path.join(root, f))]
        found += [name + note for name in sorted(names)]
    return found


def trace_file_header(trace_file: str) -> TraceHeader | None:
    """The tokens and concepts of the trace that Load Trace's ``trace_file`` names, read from its header; None where
    it names no readable trace (Load Trace's own message then says why)."""
    path = _trace_path(trace_file)
    return BiasMapTrace.header_of(path) if path is not None else None


def _trace_path(trace_file: str) -> str | None:
    """The file that ``trace_file`` names, if it is one (not a folder) in the input folder or under the output folder's
    ``biasmap/``, as listed; else None. The path is normalised as text, as ComfyUI's loaders take names (a link placed
    there is read, like Load Latent's), and that normalised path is the one read: ``..`` never passes through a
    linked folder to somewhere else."""
    path = os.path.abspath(folder_paths.get_annotated_filepath(trace_file))
    roots = [os.path.abspath(folder_paths.get_input_directory()), _saved_folder()]
    return path if os.path.isfile(path) and any(inside(path, root) for root in roots) else None


def _saved_folder() -> str:
    """The output folder's ``biasmap/``: where Save Trace writes and Load Trace lists from the output folder."""
    return os.path.abspath(os.path.join(folder_paths.get_output_directory(), _SAVED))


def _missing(trace_file: str | None) -> str:
    missing = (f"no trace file '{trace_file}' in the input folder or under output/{_SAVED}/" if trace_file else
               "no trace file chosen (the list is empty until a trace is saved)")
    return (f"{missing}: save one with BiasMap Save Trace, or put the file in ComfyUI's input folder, then press R in "
            f"the page to list it")
