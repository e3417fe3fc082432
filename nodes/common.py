"""Inputs and checks the BiasMap nodes share: the trace type, guidance settings, stages, steps and images (the
concept inputs are in concepts.py, the files the nodes write in output_files.py)."""

import functools
import html
import logging
import re

from comfy_api.latest import io

from ..biasmap_engine import BRANCHES, GATES, MODES, BiasMapSettings, parse_stages
from ..biasmap_engine.host import SIGMA_CAP, executing_context, interrupted, prompt_server

__all__ = ["ADVANCED", "CATEGORY", "FIRST_STEP", "LAST_STEP", "Trace", "check_images", "check_stage_names",
           "check_step_windows", "guidance_inputs", "mask_size", "plain_errors", "rgb", "settings_from",
           "show_on_node", "stages_in", "step_inputs", "step_window", "where_hidden", "window_text"]

Trace = io.Custom("BIASMAP_TRACE")
CATEGORY = "BiasMap"
ADVANCED = {"advanced": True}  # shown under the node's advanced inputs by frontends that support it


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
                       tooltip="Entropic regulariser γ of the soft top-k (paper 0.01): larger is softer. From "
                               "about 0.1 the soft masks flatten toward the kept fraction everywhere, and the "
                               "gradient, so the guidance, fades (still counted as applied)."),
        io.Combo.Input("gate", options=list(GATES), default="skip", extra_dict=ADVANCED,
                       tooltip="skip: like the reference, no correction of an image at a model evaluation where its "
                               "‖∇_z E‖ ≥ 1. clip: rescale its gradient to norm 1 instead. Both are counted in the "
                               "trace."),
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
    for a custom node is the path of its folder, and would show that before the message. The message replaces the
    node's text, which would otherwise still tell of the run before; so does a word on any other stop (an interrupt,
    memory run out), which ComfyUI reports as it is."""

    @functools.wraps(execute)
    def wrapper(node, *args, **kwargs):
        try:
            return execute(node, *args, **kwargs)
        except ValueError as err:
            message = f"{err}{where_hidden(node, str(err))}"
            show_on_node(node, f"stopped: {message}")
            if type(err) is ValueError and message == str(err):
                raise
            raise ValueError(message) from err
        except Exception as err:
            show_on_node(node, "stopped: interrupted" if interrupted(err) else f"stopped: {type(err).__name__}: {err}")
            raise

    return wrapper


def where_hidden(node, message: str) -> str:
    """A note on where to find the advanced inputs that ``message`` names: a frontend that hides them (ComfyUI v0.8.0's
    shows them) does so until asked, and a workflow shared with settings its user never saw would otherwise ask to
    change an input no one can find."""
    names = [spec.id for spec in node.define_schema().inputs
             if spec.extra_dict.get("advanced") and re.search(_named(spec.id), message)]
    if not names:
        return ""
    named = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    several = len(names) > 1
    what = "are advanced inputs" if several else "is an advanced input"
    return f" ({named} {what}: {_show_advanced('the node', several)})"


def _show_advanced(node: str, several: bool) -> str:
    return f"if {node} hides {'them' if several else 'it'}, right-click {node} and choose Show Advanced"


def _named(name: str) -> str:
    """A pattern for input ``name`` as messages name an input: "first_step 5 …" (a name no sentence holds), or a
    plain word such as start, end or q where it reads as one: "start=0.5", "start < end", "q must …", "set q to …",
    "stages: …" opening a message; not "the prompt's end" nor "the guided stages"."""
    word = re.escape(name)
    if "_" in name:
        return rf"(?<![\w-]){word}(?![\w-])"
    return rf"^{word}:|\b(?:set|choose) {word}\b|(?<![\w'-]){word}(?=\s*(?:=|<|≤|must\b))"


def show_on_node(node, text: str) -> None:
    """``text`` in a box on the node on ComfyUI's page, as Get Image Size shows a size: the page shows no console, and
    a STRING output only where Preview as Text is connected. Each run's text replaces the last one's, so a node sends
    one every run (the page ignores an empty text)."""
    hidden = node.hidden  # None where execute is called outside ComfyUI's executor
    server = prompt_server()
    if server is not None and hidden is not None and hidden.unique_id is not None:
        text = _with_list_items(hidden.unique_id, text)
        # The page puts the text into the node as HTML: a concept typed as <b>nurse</b> is shown, not obeyed.
        server.send_progress_text(html.escape(text, quote=False), hidden.unique_id, server.client_id)


_LIST_TEXTS: dict = {}  # node id → (prompt id, the texts of its list items run so far)


def _with_list_items(node_id, text: str) -> str:
    """``text`` with those of the node's earlier items of a list input: ComfyUI runs a node once per item (Rebatch
    Latents' batches), and each text replaces the last on the page, where the last batch's mIoU alone would read as the
    run's. One item's text is sent as it is."""
    context = executing_context()
    if context is None or not context.list_index:  # outside the executor, or a list's first item (or no list)
        _LIST_TEXTS[node_id] = (context and context.prompt_id, [text])
        return text
    prompt_id, texts = _LIST_TEXTS.get(node_id, (None, []))
    texts = (texts if prompt_id == context.prompt_id else [])[:context.list_index] + [text]
    _LIST_TEXTS[node_id] = (context.prompt_id, texts)
    return "\n\n".join(f"list item {i + 1}:\n{item}" for i, item in enumerate(texts)) if len(texts) > 1 else text


def window_text(trace, steps) -> str:
    """The steps a node's maps are of, as its text on the page says them."""
    if steps is None:
        return "all steps"
    first, last = steps
    shown = f"step {first}" if first == last else f"steps {first}–{last}"
    return f"{shown} of 0–{trace.num_steps - 1}"


def _tuple_or_none(stages):
    return tuple(stages) if stages is not None else None


FIRST_STEP, LAST_STEP = 0, 10000  # every step: the step inputs' defaults


def step_inputs(optional: bool = False) -> list:
    """First and last sampler step whose maps are summed (advanced); ``optional`` for a node that had none at first,
    so that a prompt saved before them (API format, which has no defaults) still runs it."""
    return [io.Int.Input("first_step", default=FIRST_STEP, min=0, max=10000, optional=optional, extra_dict=ADVANCED,
                         tooltip="First sampler step whose maps are summed, counting from 0 (the first step)."),
            io.Int.Input("last_step", default=LAST_STEP, min=0, max=10000, optional=optional, extra_dict=ADVANCED,
                         tooltip="Last sampler step whose maps are summed, counting from 0 (values past the end "
                                 "mean the end: of 20 steps, the last is 19).")]


def step_window(trace, first_step: int, last_step: int):
    """Node step inputs → the trace's inclusive window; None when it covers every step (the common case)."""
    last = trace.num_steps - 1
    if first_step > min(last_step, last):
        raise ValueError(_steps_swapped(first_step, last_step) if first_step > last_step else
                         _past_last(first_step, last))
    return trace.step_window((first_step, last_step))


def check_step_windows(windows, last: int | None = None) -> None:
    """Before a sampler samples: no node that reads its trace measures a window that ends before it starts, or that
    starts after the ``last`` step the sampler will run (``prompt_graph.step_windows_of``). That node runs after the
    sampler, which the mistake would cost."""
    for window in windows:
        first_step, last_step = window.first_step, window.last_step
        wrong = (_steps_swapped(first_step, last_step) if first_step > last_step else
                 _past_last(first_step, last, "this sampler's") if last is not None and first_step > last else None)
        if wrong:
            raise ValueError(f"{window.node} (node {window.node_id}): {wrong} (advanced inputs of that node: "
                             f"{_show_advanced('it', True)}). Checked before sampling, so that the run is not lost to "
                             f"it.")


def _steps_swapped(first_step: int, last_step: int) -> str:
    return f"first_step {first_step} is after last_step {last_step}: set it to at most {last_step}"


def _past_last(first_step: int, last: int, whose: str = "this trace's") -> str:
    return f"first_step {first_step} is past {whose} last step, {last}: set first_step to at most {last}"


def mask_size(trace, resolution: str) -> tuple[int, int]:
    """Where masks are thresholded: at image size (the reference) or at the latent's."""
    return trace.image_size if resolution == "image" else tuple(trace.latent_shape[2:])


def check_images(image, trace, node: str) -> str | None:
    """An IMAGE input to draw on: one picture, or one per latent of the trace. What may mislead is said by a console
    warning and by the text returned: one picture under the maps of several latents, and a picture of another shape,
    stretched to it (a crop puts the maps off their places)."""
    if image is None:
        return None
    if image.shape[0] not in (1, trace.num_images):
        raise ValueError(f"the image input holds {image.shape[0]} pictures but the trace comes from "
                         f"{trace.num_images} latent(s): connect the images decoded from the trace's latents (one "
                         f"per latent), or a single picture")
    notes = []
    if image.shape[0] < trace.num_images:  # e.g. Image From Batch: the others' maps drawn on another image
        notes.append(f"one picture is drawn under the maps of each of the trace's {trace.num_images} latents: "
                     f"connect the images decoded from them all to see each under its own")
    (height, width), (decoded_h, decoded_w) = image.shape[1:3], trace.image_size
    if abs(height * decoded_w / (width * decoded_h) - 1) > 0.01:
        notes.append(f"the image is {width}×{height}, a shape other than the decoded latent's "
                     f"({decoded_w}×{decoded_h}): the maps are stretched onto it, which puts them off their places if "
                     f"it was cropped; connect the image decoded from the latent (scaled is fine)")
    for note in notes:
        logging.warning("BiasMap %s: %s", node, note)
    return "; ".join(notes) or None


def rgb(image):
    """An IMAGE to draw on as RGB: alpha dropped (RGBA), grey repeated (an image of one channel, or grey and alpha,
    as some nodes make masks into images); None stays None."""
    if image is None or image.shape[-1] == 3:
        return image
    return image[..., :3] if image.shape[-1] > 3 else image[..., :1].expand(*image.shape[:-1], 3)
