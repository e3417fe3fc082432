"""Audit Log: a trace's entanglement figures appended to a CSV, one row per image and concept pair.

Queue the same graph over many seeds (the seed's "increment" control with a batch count) or prompts, and one file
gathers the audit, with each run's prompt id, seed, sampler, settings and attribution prompt on every row.
"""

import logging
import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..biasmap_engine import (OlderFileError, append_csv, audit_rows, check_appendable, csv_text, is_reductions_table,
                              logged_before, read_csv, reductions_report, split_concepts, write_csv)
from ..biasmap_engine.host import CUSTOM_SIGMAS
from .common import (ADVANCED, CATEGORY, FIRST_STEP, LAST_STEP, Trace, mask_size, plain_errors, show_on_node,
                     step_inputs, step_window)
from .concepts import check_apart, check_listed_once, check_stood_for, require
from .output_files import name_in, output_path

__all__ = ["BiasMapAuditLog"]


class BiasMapAuditLog(io.ComfyNode):
    """Append IoU, mBIoU, BIoU per stage and guidance counts of a trace to a CSV in the output folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapAuditLog",
            display_name="BiasMap Audit Log",
            category=CATEGORY,
            description="Appends one CSV row per image and (demographic, semantic) pair of a trace: IoU, mBIoU, BIoU "
                        "per stage, guidance counts, and the run's ComfyUI prompt id, seed, steps, cfg, sampler, "
                        "attribution prompt and every guidance setting. Queue many seeds (or prompts: BiasMap Audit "
                        "Prompts) to audit a model into one file; once it also holds the same seeds at λ = 0, the "
                        "summary gives the paper's reductions per profession.",
            inputs=[
                Trace.Input("trace", tooltip="From a BiasMap Guided KSampler or Load Trace."),
                io.String.Input("filename", default="biasmap/audit",
                                tooltip="CSV path inside the output folder (.csv is added; empty: biasmap/audit); rows "
                                        "are appended, the header is written once."),
                io.String.Input("label", default="",
                                tooltip="Free text for this run's rows, e.g. a condition name, or a prompt made "
                                        "while the graph runs (a wildcard node's), which the generation_prompt "
                                        "column cannot read (link the text node to it). The summary does not "
                                        "pair rows by label: log each such prompt to a file of its own."),
                io.String.Input("concept_a", default="",
                                tooltip="Demographic word(s), comma-separated; empty = every demographic concept of "
                                        "the trace. Every pair with concept_b gets its rows."),
                io.String.Input("concept_b", default="",
                                tooltip="Semantic word(s), comma-separated; empty = every semantic concept of the "
                                        "trace."),
                io.Float.Input("q", default=0.70, min=0.01, max=0.99, step=0.01, extra_dict=ADVANCED,
                               tooltip="Masks keep pixels above this quantile (paper: 0.70)."),
                io.Combo.Input("resolution", options=["image", "latent"], default="image", extra_dict=ADVANCED,
                               tooltip="Threshold at image size (the reference) or at latent size."),
                # Optional and last: prompts saved before them (API format) run as they did, with every step.
                *step_inputs(optional=True),
            ],
            # Where the rows went and the file's figures are written on the node; with the rows, an output.
            outputs=[io.String.Output("rows", tooltip="The rows appended, as CSV lines."),
                     io.String.Output("summary", tooltip="Where the rows went and how many, any column the file "
                                                         "lacks, the paper's reductions over the file (guided runs "
                                                         "against the same seeds at λ = 0; until both are logged, "
                                                         "each profession's means; the reductions also as a table "
                                                         "beside the file, …_reductions.csv), then the rows (link "
                                                         "Preview as Text to read it).")],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],  # to write on the node where the rows went and the file's figures
        )

    @classmethod
    def validate_inputs(cls, filename=None, concept_a=None, concept_b=None):
        # Before the graph runs, so the queue shows it at once. ComfyUI still runs the graph's other outputs (a Save
        # Image): where they are, the samplers run; this node does not.
        try:
            path = _csv_path(filename or "")
        except ValueError as err:
            return str(err)
        try:
            if filename is not None:  # None: linked, known when the node runs (append_csv checks the file then)
                check_appendable(path)  # a file that could take no rows, found before the run samples for it
        except ValueError as err:
            return str(err).replace(path, _shown(path))
        ok = check_listed_once(concept_a=concept_a, concept_b=concept_b)
        return ok if ok is not True else check_apart(concept_a, concept_b)

    @classmethod
    @plain_errors
    def execute(cls, trace, filename, label, concept_a, concept_b, q, resolution, first_step=FIRST_STEP,
                last_step=LAST_STEP) -> io.NodeOutput:
        path = _csv_path(filename)
        require(check_listed_once(concept_a=concept_a, concept_b=concept_b))  # linked lists are known now
        require(check_apart(concept_a, concept_b))
        demographic = split_concepts(concept_a) or trace.demographic
        semantic = split_concepts(concept_b) or trace.semantic
        size = mask_size(trace, resolution)
        pairs = [(a, b) for a in demographic for b in semantic]
        check_stood_for(trace, pairs, concept_a, concept_b, every=True)
        window = step_window(trace, first_step, last_step)
        rows = audit_rows(trace, q, pairs, size, label, window)
        shown = _shown(path)
        # What a file started before these columns cannot say of its rows: they are of every step, at image size, on
        # a schedule its scheduler column names, without a noise mask, from an empty latent.
        needed = ((("sigmas",) if trace.run.get("scheduler") == CUSTOM_SIGMAS else ())
                  + (("first_step", "last_step") if window else ())
                  + (("mask_size",) if resolution == "latent" else ())
                  + tuple(name for name in ("noise_mask", "start_latent") if trace.run.get(name)))
        try:
            written = append_csv(path, rows, needed)
        except OlderFileError as err:  # or measure as the file's rows were, where that can be chosen here
            instead = [fix for columns, fix in ((("first_step", "last_step"), "set first_step to 0 and last_step to "
                                                                              "10000 to measure every step"),
                                                (("mask_size",), "set resolution to image"))
                       if set(columns) & set(err.lost)]
            raise ValueError(str(err).replace(path, shown)
                             + (f", or, to add to it, {' and '.join(instead)}" if instead else "")) from err
        except ValueError as err:
            raise ValueError(str(err).replace(path, shown)) from err
        except OSError as err:  # none of the rows is in (append_csv): said with the file's place and what to do
            raise ValueError(f"{shown} could not take the rows ({err.strerror or err}): free disk space, close it "
                             f"where it is open (a spreadsheet on Windows locks it), make it writable, or give the "
                             f"audit another file name") from err
        text = csv_text(written)
        message = f"{len(rows)} row(s) appended to {shown}"
        own = [c for c in written[0] if c not in rows[0]]
        if own:  # notes a researcher typed in a spreadsheet
            message += (f"\nthe file's own column(s) {', '.join(own)}, which BiasMap does not write, are left blank "
                        f"in these rows")
        left_out = [c for c in rows[0] if c not in written[0]]
        if left_out:  # the output shows what the file holds, and why a column is missing from it
            message += (f"\nwithout the column(s) {', '.join(left_out)}: the file was started before BiasMap wrote "
                        f"them; give the audit a new file name to have them")
            logging.warning("BiasMap: %s", message)
        else:
            logging.info("BiasMap: %s", message)
        # The file's figures so far, on the page without a notebook: the paper's reductions once it holds guided runs
        # and their λ = 0 runs, each profession's means until then.
        try:
            size = os.path.getsize(path)  # as read: a table of these rows is written only while the file is so
            file_rows = read_csv(path)
            figures, table = reductions_report(file_rows)
            figures = _repeat_said(written, file_rows) + figures
        except Exception as err:  # the rows are in: failing now would have the run queued again append them twice
            figures, size = f"the file's figures so far could not be read: {str(err).replace(path, shown)}", None
            # A fault of BiasMap's own keeps its traceback in the console.
            logging.warning("BiasMap: %s", figures, exc_info=not isinstance(err, (ValueError, OSError)))
        if size is not None:
            try:
                figures += _table_written(table, path, shown, size)
            except Exception as err:  # noqa: BLE001 (as above: the rows are in, and the figures shown)
                figures += f"\nthe reductions as a table were not written: {str(err).replace(path, shown)}"
                logging.warning("BiasMap: the reductions table of %s", shown, exc_info=True)
        show_on_node(cls, f"{message}\n{figures}")  # the summary less the rows, which its output has
        summary = f"{message}\n{figures}\n{text}"
        return io.NodeOutput(text, summary, ui=ui.PreviewText(summary))


def _repeat_said(written: list[dict], file_rows: list[dict]) -> str:
    """A line saying that the rows log an image the file held already, and why that happens; '' where they do not."""
    repeat = logged_before(written, file_rows)
    if repeat is None:
        return ""
    row, times = repeat
    return (f"these rows log an image the file held already ({times}× before: seed {row.get('seed', '')}, "
            f"{row.get('semantic', '')}, λ {row.get('guidance_scale', '')}, the same prompt and settings), which the "
            f"figures count once: a run repeated makes the same image. To add images, advance the seed (control after "
            f"generate: increment); in an audit over prompts, let Audit Prompts run (to pause it, mute it rather than "
            f"bypass it: bypassed, the sampler runs on the values last stored in it)\n")


def _table_written(table: list[dict] | None, path: str, shown: str, size: int) -> str:
    """The file's reductions ``table`` beside it (``…_reductions.csv``, for a spreadsheet's charts), replaced after
    every run; → the summary's line saying where, or why not. Nothing until the file holds guided runs and their
    λ = 0 runs (``table`` None: the summary then says what to log)."""
    target = path[:-len(".csv")] + "_reductions.csv"
    named = shown[:-len(".csv")] + "_reductions.csv"
    try:
        if table is None:  # none now (the summary says why): a table of earlier runs is not left unsaid
            try:
                stale = is_reductions_table(target)
            except OSError:  # none of ours there (none, or a folder so named)
                stale = False
            return f"\n{named} holds the reductions of an earlier run, not of the file as it is now" if stale else ""
        if not _replaceable(target):  # an audit named so: never written over
            return (f"\nthe reductions as a table were not written: {named} holds other rows (another audit's?); "
                    f"give this audit another file name to have them")
        if not write_csv(target, table, unless_grown=(path, size)):
            return (f"\nthe reductions as a table: {named} is left to the run that appended to the file since "
                    f"(another ComfyUI logging into it)")
    except OSError as err:
        # On Windows a file open in a spreadsheet cannot be replaced; elsewhere only the folder's permissions refuse.
        hint = ((" (close it where it is open)" if os.name == "nt" else " (check the folder's permissions)")
                if isinstance(err, PermissionError) else "")
        return f"\nthe reductions as a table were not written to {named}: {err.strerror or err}{hint}"
    return f"\nthe reductions as a table, for a spreadsheet: {named}"


def _replaceable(path: str) -> bool:
    """Whether ``path`` is free for a reductions table: absent, blank (a byte-order mark alone, say), or one already."""
    if not os.path.exists(path):
        return True
    if os.path.getsize(path) <= 64:  # a larger file is no blank one BiasMap would write over
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            if not f.read().strip("\ufeff \r\n"):
                return True
    return is_reductions_table(path)


def _shown(path: str) -> str:
    """The audit file's path as messages name it: inside ComfyUI's output folder."""
    return "output/" + name_in(path, folder_paths.get_output_directory())


def _csv_path(filename: str) -> str:
    """``filename``.csv inside the output folder (empty: biasmap/audit)."""
    variable = re.search(r"%[\w:.-]+%", filename)
    if variable:  # Save Trace's and ComfyUI's savers fill these in; an audit appends every run to one named file
        raise ValueError(f"the audit file '{filename}' holds {variable.group()}, which Audit Log does not fill in: it "
                         f"appends every run to the one file it names, so type that name, e.g. biasmap/audit")
    path = output_path(filename.strip() or "biasmap/audit", "audit file", "biasmap/audit")
    return path if path.lower().endswith(".csv") else path + ".csv"
