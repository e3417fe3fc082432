"""Inputs and validation shared by the BiasMap nodes."""

import functools
import logging
import os
import re

import folder_paths
from comfy_api.latest import io

from ..biasmap_engine import (BRANCHES, GATES, MODES, BiasMapSettings, clip_words, listed_twice, listed_words,
                              parse_stages, split_concepts, typed_concepts)
from ..biasmap_engine.host import SIGMA_CAP, prompt_text_words
from .prompt_graph import WordsAsked

__all__ = ["ADVANCED", "CATEGORY", "Trace", "absent_from", "check_concepts", "check_images", "check_listed_once",
           "check_single", "check_stage_names", "check_words_asked", "concept_inputs", "first_concept",
           "guidance_inputs", "inside", "mask_size", "name_in", "one_concept", "output_path", "plain_errors",
           "require", "settings_from", "stages_in", "step_inputs", "step_window"]

Trace = io.Custom("BIASMAP_TRACE")
CATEGORY = "BiasMap"
ADVANCED = {"advanced": True}  # shown under the node's advanced inputs by frontends that support it

_DEFAULT_ATTRIBUTION = "A photo of the face of a doctor and gender"


def concept_inputs() -> list:
    """The attribution prompt and the two concept lists."""
    return [
        io.String.Input("attribution_prompt", default=_DEFAULT_ATTRIBUTION, multiline=True,
                        tooltip="Text whose words get maps (OVAM): usually the generation prompt plus the demographic "
                                "word. Words need not be in the generation prompt. Encoded with the CLIP input."),
        io.String.Input("demographic", default="gender",
                        tooltip="Demographic concept word(s), comma-separated; each must occur in the attribution "
                                "prompt (paper: 'gender' or 'race')."),
        io.String.Input("semantic", default="doctor",
                        tooltip="Semantic concept word(s), comma-separated; each must occur in the attribution "
                                "prompt (paper: the profession)."),
    ]


def guidance_inputs() -> list:
    """λ plus the secondary knobs of BiasMap §5 (defaults = its configuration, arXiv 2509.13496)."""
    return [
        # ComfyUI's frontend rounds a FLOAT to its step's decimals unless told a finer round: λ 12.5 would be 13.
        io.Float.Input("guidance_scale", default=100.0, min=0.0, max=10000.0, step=0.5, round=0.01,
                       tooltip="λ. 0 records maps only and samples exactly like the stock sampler; the paper uses "
                               "100 (≥ 400 degrades image quality)."),
        io.Combo.Input("branch", options=list(BRANCHES), default="uncond", extra_dict=ADVANCED,
                       tooltip="CFG branch whose queries build the maps (the reference uses the unconditional one; "
                               "with cfg 1 the conditional one is used and the trace says so)."),
        io.Boolean.Input("include_middle", default=False, extra_dict=ADVANCED,
                         tooltip="Also record the middle block (OVAM leaves it out); with guided_stages 'all', it is "
                                 "guided too."),
        io.Combo.Input("soft_topk", options=list(MODES), default="paper", extra_dict=ADVANCED,
                       tooltip="paper: the reference's row-wise 20-step Sinkhorn. exact: one converged global "
                               "soft top-k per map with an implicit gradient."),
        io.Float.Input("q", default=0.70, min=0.01, max=0.99, step=0.01, extra_dict=ADVANCED,
                       tooltip="Quantile of the masks: the energy's soft top-k keeps the top 1 − q (paper 0.70). At "
                               "least 0.01, since a soft top-k that keeps every pixel has no gradient. With "
                               "soft_topk paper, which keeps pixels of each row, at most 1 − 1/W for the largest "
                               "attention grid's width W (0.98 for SD 1.5 at 512², SDXL at 1024²)."),
        io.Float.Input("gamma", default=0.01, min=0.0001, max=10.0, step=0.001, round=0.0001, extra_dict=ADVANCED,
                       tooltip="Entropic regulariser γ of the soft top-k (paper 0.01)."),
        io.Combo.Input("gate", options=list(GATES), default="skip", extra_dict=ADVANCED,
                       tooltip="skip: like the reference, no correction on a step where ‖∇_z E‖ ≥ 1. clip: "
                               "rescale the gradient to norm 1 instead. Both are counted in the trace."),
        io.String.Input("guided_stages", default="all", extra_dict=ADVANCED,
                        tooltip="Stages whose maps form the energy: 'all', or e.g. 'down_1, up_1' (where the paper "
                                "finds bias concentrates) or 'down_1' (cheapest backward); on SDXL, which has no "
                                "cross-attention at the latent's grid, 'down_2, up_2' and 'down_2'."),
        io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, extra_dict=ADVANCED,
                       tooltip="Guide from this point of the model's noise range, like ComfyUI's start_percent "
                               "(0 = pure noise, 1 = clean): not a fraction of the steps run, so with denoise < 1 "
                               "or split sigmas the run starts partway in. The trace says if no step was guided. "
                               f"Steps at σ above {SIGMA_CAP:.1f} (zero-terminal-SNR or EDM schedules, custom "
                               f"sigmas that high) are never guided."),
        io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, extra_dict=ADVANCED,
                       tooltip="Guide until this point of the model's noise range, like ComfyUI's end_percent "
                               "(1 = clean). Must be above start."),
    ]


def settings_from(kwargs: dict) -> BiasMapSettings:
    """Node inputs → engine settings."""
    return BiasMapSettings(scale=kwargs["guidance_scale"], branch=kwargs["branch"],
                           include_middle=kwargs["include_middle"], mode=kwargs["soft_topk"],
                           keep=round(1.0 - kwargs["q"], 6),  # 0.3, not 1 − 0.7 = 0.30000000000000004 in the CSV
                           gamma=kwargs["gamma"], gate=kwargs["gate"],
                           guided_stages=_tuple_or_none(stages_in("guided_stages", kwargs["guided_stages"])),
                           start=kwargs["start"], end=kwargs["end"])


def check_concepts(attribution_prompt, demographic, semantic) -> bool | str:
    """Validation before the graph runs: both concept lists non-empty and made of words of the attribution prompt.

    The prompt's words are the installed CLIP tokenizer's, as the run's tokens are: its text clean-up depends on the
    installed transformers and ftfy (see tokenizer_words).
    """
    if attribution_prompt is None:  # linked from another node: checked by BPE lookup at run time
        return True
    marker = next((m for m in ("<|endoftext|>", "<|startoftext|>") if m in attribution_prompt), None)  # as CLIP
    if marker:  # CLIP's own marker: the text's words after it are no words of the encoded prompt
        return f"the attribution prompt holds {marker}, CLIP's marker of the text's end or start: remove it"
    try:
        words = prompt_text_words(attribution_prompt)
    except ValueError as err:
        return str(err)
    shown = listed_words(words)
    if not shown:
        return (f"the attribution prompt {attribution_prompt!r} has no words: type the text whose words get maps, "
                f"e.g. '{_DEFAULT_ATTRIBUTION}'")
    lists = {}
    for label, value in (("demographic", demographic), ("semantic", semantic)):
        if value is None:
            continue
        concepts = lists[label] = split_concepts(value)
        if not concepts:
            return (f"the {label} concept list is empty; type at least one word of the attribution prompt "
                    f"({shown})")
        missing = _absent(concepts, words)
        if missing:
            # "\(" is a bracket the prompt spells; the hint is for a missing concept that was typed with brackets.
            bracketed = {concept for typed, concept in typed_concepts(value) if "(" in typed}
            escaped = "\\(" in attribution_prompt and bool(bracketed & set(missing))
            return (f"{label} concept(s) {', '.join(missing)} not in the attribution prompt "
                    f"'{attribution_prompt}'; its words are: {shown}. Add the word to the "
                    f"attribution prompt or choose one of these."
                    + (" The prompt escapes its brackets, \\( and \\): a concept typed with brackets is read "
                       "without them, as ComfyUI reads emphasis, unless they are escaped there too."
                       if escaped else "") + _why_absent(missing, attribution_prompt))
    return _check_distinct(lists, words)


def check_words_asked(asked: list[WordsAsked], attribution_prompt: str) -> None:
    """Before a sampler samples: the words that the nodes reading its trace ask for (``prompt_graph.words_asked_of``)
    are words of its attribution prompt. Those nodes run after the sampler, and cannot see the prompt before it runs:
    a typo there would cost the whole run."""
    try:
        words = prompt_text_words(attribution_prompt)  # once, for every node that asks
    except ValueError:  # a prompt ComfyUI's tokenizer would refuse: the sampler's own check of it says so
        return
    for words_asked in asked:
        missing = _absent(split_concepts(words_asked.text), words)
        if missing:
            node, name, stands_for = words_asked.node, words_asked.input, words_asked.stands_for
            fix = (f"type in {name} a word of both prompts" if stands_for else f"correct {name} there")
            raise ValueError(f"{node} (node {words_asked.node_id}) asks for {name} {', '.join(map(repr, missing))}"
                             + (f" ({stands_for})" if stands_for else "")
                             + f", which is not a word of this sampler's attribution prompt {attribution_prompt!r} "
                             f"(its words: {listed_words(words)}): {fix}, or add "
                             f"the word to the attribution prompt. Checked before sampling, so that the run is not "
                             f"lost to it.{_why_absent(missing, attribution_prompt)}")


def _why_absent(missing: list[str], prompt: str) -> str:
    """Why words that the prompt seems to hold are not its words, where a typing habit explains it; else ''."""
    hints = []
    if any(re.search(f"['‘’]{re.escape(word)}", prompt, re.IGNORECASE) for word in missing):  # ftfy straightens ‘’
        hints.append("The prompt puts the word after an apostrophe ('doctor'): CLIP reads 'd, 's, 't, 'm, 're, 've "
                     "and 'll as contractions there, so 'doctor is 'd + octor; remove the single quotes around it.")
    names = [name.lower() for name in re.findall(r"embedding:([^\s,()]+)", prompt, re.IGNORECASE)]
    if any(word.lower().removeprefix("embedding:") in name for word in missing for name in names):
        hints.append("A textual-inversion embedding (embedding:name) is no word of the prompt and has no map by name.")
    return "".join(" " + hint for hint in hints)


def absent_from(concepts: list[str], text: str) -> list[str]:
    """The concepts that are not words of ``text`` (a ComfyUI prompt), as the run looks them up."""
    try:
        return _absent(concepts, prompt_text_words(text))
    except ValueError:  # a prompt ComfyUI's tokenizer would refuse: not this check's to judge
        return []


def _absent(concepts: list[str], words: list[str]) -> list[str]:
    """The concepts that are not words of the prompt's ``words``."""
    return [c for c in concepts if not _covered(c, words)]


def _covered(concept: str, words: list[str]) -> set[int]:
    """Indices of the prompt's ``words`` (the installed tokenizer's) that the occurrences of ``concept`` cover
    (consecutive words: a multi-word concept is looked up as a phrase), with the concept split as every lookup in the
    tokens splits it (find_word_positions: the sampler's, and the map nodes' in its trace)."""
    forms = {tuple(clip_words(concept, split_ideographs=split)) for split in (False, True)}
    return {i + j for part in forms if part for i in range(len(words) - len(part) + 1)
            if tuple(words[i:i + len(part)]) == part for j in range(len(part))}


def _check_distinct(lists: dict, words: list[str]) -> bool | str:
    """No concept listed twice, and no demographic and semantic concept on the same words of the prompt (the run
    checks the tokens again)."""
    for label, concepts in lists.items():
        twice = next(iter(listed_twice(concepts)), None)
        if twice is not None:
            return f"the {label} concept '{twice}' is listed twice: list each concept once"
    for a in lists.get("demographic", []):
        for b in lists.get("semantic", []):
            if _covered(a, words) & _covered(b, words):
                return (f"the demographic concept '{a}' and the semantic concept '{b}' share words of the attribution "
                        f"prompt, and a concept's overlap with itself is 1 whatever the image: give them words that "
                        f"do not overlap")
    return True


def check_listed_once(**inputs) -> bool | str:
    """Validation (and run-time check) of comma-separated word inputs: no word twice, as CLIP reads it (lower case),
    which would log or measure the same pair twice."""
    for name, text in inputs.items():
        twice = next(iter(listed_twice(split_concepts(text or ""))), None)
        if twice is not None:
            return f"{name}: '{twice}' is listed twice (CLIP reads capitals as lower case): list each word once"
    return True


def check_stage_names(name: str, text) -> bool | str:
    """Validation before the graph runs: the stage ids in input ``name`` (a linked input is left to run time).

    ComfyUI shows a failure on every input that ``validate_inputs`` takes, so the message names its own.
    """
    try:
        stages_in(name, text or "all")
    except ValueError as err:
        return str(err)
    return True


def stages_in(name: str, text: str) -> list[str] | None:
    """The stage ids typed in input ``name``; a typo is refused naming the input (the sampler has three strings)."""
    try:
        return parse_stages(text)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def plain_errors(execute):
    """``execute`` raising BiasMap's own errors as ValueError: ComfyUI names an error's type by its module, which
    for a custom node is the path of its folder, and would show that before the message."""

    @functools.wraps(execute)
    def wrapper(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except ValueError as err:
            if type(err) is ValueError:
                raise
            raise ValueError(str(err)) from err

    return wrapper


def _tuple_or_none(stages):
    return tuple(stages) if stages is not None else None


def step_inputs() -> list:
    """First and last sampler step whose maps are summed (advanced)."""
    return [io.Int.Input("first_step", default=0, min=0, max=10000, extra_dict=ADVANCED,
                         tooltip="First sampler step whose maps are summed, counting from 0 (the first step)."),
            io.Int.Input("last_step", default=10000, min=0, max=10000, extra_dict=ADVANCED,
                         tooltip="Last sampler step whose maps are summed, counting from 0 (values past the end "
                                 "mean the end: of 20 steps, the last is 19).")]


def step_window(trace, first_step: int, last_step: int):
    """Node step inputs → the trace's inclusive window; None when it covers every step (the common case)."""
    last = trace.num_steps - 1
    if first_step > min(last_step, last):
        raise ValueError(f"first_step {first_step} is after last_step {last_step}: set it to at most {last_step}"
                         if first_step > last_step else
                         f"first_step {first_step} is past this trace's last step, {last}: set first_step to at most "
                         f"{last}")
    if first_step <= 0 and last_step >= last:
        return None
    return first_step, min(last_step, last)


def mask_size(trace, resolution: str) -> tuple[int, int]:
    """Where masks are thresholded: at image size (the reference) or at the latent's."""
    return trace.image_size if resolution == "image" else tuple(trace.latent_shape[2:])


def check_single(fix: str, **inputs) -> bool | str:
    """Validation (and run-time check) of inputs that take one concept each: a comma-separated list, which the
    sampler's concept inputs take, would be looked up as one phrase, commas and all, and measured without a word."""
    for name, text in inputs.items():
        words = split_concepts(text) if text is not None else []
        if len(words) > 1:
            return f"{name} holds several concepts ({', '.join(words)}) but takes one: {fix}"
    return True


def require(verdict: bool | str) -> None:
    """A validation's verdict (``check_single``, ``check_listed_once``) at run time, where a linked input's text is
    known: its message raised."""
    if verdict is not True:
        raise ValueError(verdict)


def one_concept(text: str) -> str:
    """The concept typed in an input that takes one (see check_single), as the sampler's lists take their words
    (without the sentence marks around it: 'doctor,' is 'doctor'); '' when none is typed."""
    return next(iter(split_concepts(text)), "")


def first_concept(concepts: list[str], label: str, input_name: str) -> str:
    """What an empty concept input ``input_name`` stands for: the trace's first ``label`` concept."""
    if not concepts:
        raise ValueError(f"the trace has no {label} concept, which an empty '{input_name}' stands for: type a word "
                         f"of its attribution prompt in '{input_name}'")
    return concepts[0]


def output_path(name: str, what: str, example: str) -> str:
    """``name`` as a path inside ComfyUI's output folder; a path that leaves it is refused, as ComfyUI's savers refuse
    it, but with a message that says what to type."""
    # A folder ("biasmap/"), or a name Windows trims to nothing, would write a hidden ".csv"; ".csv" would be one too.
    last = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .")
    if not last or last.startswith("."):
        raise ValueError(f"the {what} '{name}' names no file (a folder, or a name that is empty or starts with a dot): "
                         f"add a file name, e.g. {example}")
    problem = _unportable(name)
    if problem:
        raise ValueError(f"the {what} '{name}' {problem}, e.g. {example}")
    output_dir = os.path.abspath(folder_paths.get_output_directory())
    path = os.path.abspath(os.path.join(output_dir, name))
    if not inside(path, output_dir):
        raise ValueError(f"the {what} '{name}' would be written outside ComfyUI's output folder: give a path inside "
                         f"it, e.g. {example}")
    return path


# Names no file can have on Windows (devices), with any extension; and a name's length in bytes that leaves room for
# Save Trace's counter and extension within the 255 bytes of a file name.
_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?", re.IGNORECASE)
_LONGEST_NAME = 200


def _unportable(name: str) -> str | None:
    """Why ``name`` is no file name on some system, or None: a workflow is shared, and a name that fails only when the
    node runs costs the run. Outside an absolute path's start (a drive, C:), as Windows reads it."""
    parts = re.split(r"[/\\]", os.path.splitdrive(name)[1] if os.name == "nt" else name)
    if any(ord(c) < 32 or c in '<>:"|?*' for part in parts for c in part):
        return ("holds a character that file names cannot hold on every system (<>:\"|?* or a control character): "
                "use letters, digits, - and _")
    if any(_DEVICES.fullmatch(part.rstrip(" .")) for part in parts):
        return "names a Windows device (CON, NUL, AUX, PRN, COM1, LPT1…), where nothing is saved: choose another name"
    if any(len(part.encode()) > _LONGEST_NAME for part in parts):
        return f"has a folder or file name longer than {_LONGEST_NAME} bytes: shorten it"
    return None


def name_in(path: str, folder: str) -> str:
    """A file's name as the user sees it: its path from ``folder``, with "/" on every system (not the server's own
    path)."""
    return os.path.relpath(path, folder).replace(os.sep, "/")


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies in the folder ``root`` (both absolute and normalised; in the system's case: on Windows,
    BiasMap/trace is in biasmap)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath((path, root)) == root
    except ValueError:  # Windows: another drive
        return False


def check_images(image, trace, node: str) -> str | None:
    """An IMAGE input to draw on: one picture, or one per latent of the trace; one of another shape is stretched to
    it, which a console warning says (a crop puts the maps off their places), and so does the text returned."""
    if image is None:
        return None
    if image.shape[0] not in (1, trace.num_images):
        raise ValueError(f"the image input holds {image.shape[0]} pictures but the trace comes from "
                         f"{trace.num_images} latent(s): connect the images decoded from the trace's latents (one "
                         f"per latent), or a single picture")
    (height, width), (decoded_h, decoded_w) = image.shape[1:3], trace.image_size
    if abs(height * decoded_w / (width * decoded_h) - 1) <= 0.01:
        return None
    stretched = (f"the image is {width}×{height}, a shape other than the decoded latent's ({decoded_w}×{decoded_h}): "
                 f"the maps are stretched onto it, which puts them off their places if it was cropped; connect the "
                 f"image decoded from the latent (scaled is fine)")
    logging.warning("BiasMap %s: %s", node, stretched)
    return stretched
