"""What the samplers read from the graph ComfyUI runs (its API prompt, the hidden ``prompt`` input), for audits: the
typed prompts, the checkpoint and LoRAs, the scheduler behind SIGMAS. A sampler gets conditioning, a model and sigmas,
not the text and file names that made them; where a node on the way makes them while the graph runs, they stay ''."""

from typing import NamedTuple

from ..biasmap_engine import audit_run, split_concepts, typed_concepts, typed_form
from ..biasmap_engine.report import shown_number

__all__ = ["StepsAsked", "WordsAsked", "attribution_clip_apart", "generation_prompt", "graph_run", "loaded_traces_of",
           "step_windows_of", "words_asked_of"]

# How ComfyUI's core nodes make or pass on a conditioning, for generation_prompt: the input holding the typed text, or
# per output slot the conditioning input it passes on. Other nodes' outputs are made while the graph runs: not read.
_TEXT_INPUT = {"CLIPTextEncode": "text", "CLIPTextEncodeSDXLRefiner": "text", "PrimitiveString": "value",
               "PrimitiveStringMultiline": "value"}
_PASSED_ON = {
    **dict.fromkeys(("ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength",
                     "ConditioningSetMask", "ConditioningSetTimestepRange", "ControlNetApply", "StyleModelApply",
                     "unCLIPConditioning"), ("conditioning",)),
    "GLIGENTextBoxApply": ("conditioning_to",),
    "ControlNetApplyAdvanced": ("positive", "negative"),
    "InpaintModelConditioning": ("positive", "negative"),
}
# Where a MODEL comes from: the loaders' file inputs; (file, strength) inputs of the nodes that apply a file on the way.
# Any other node with a ``model`` input passes that model on, patched in a way the graph does not name: it is named by
# its class (FreeU_V2, a custom LoRA stack), so two audited models differ in the column wherever they may differ.
_LOADED_FROM = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name",
                "unCLIPCheckpointLoader": "ckpt_name", "ImageOnlyCheckpointLoader": "ckpt_name",
                "UNETLoader": "unet_name", "DiffusersLoader": "model_path"}
# A loader's option that changes the weights it loads (fp8 moves the IoU more than λ 100 does on random weights): named
# beside the file where it is not the default.
_LOADED_AS = {"UNETLoader": "weight_dtype"}
_MODEL_FILES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
_APPLIED = {"LoraLoader": ("lora_name", "strength_model"), "LoraLoaderModelOnly": ("lora_name", "strength_model"),
            "HypernetworkLoader": ("hypernetwork_name", "strength")}


# The nodes that look words up in a trace, by their word inputs, and the inputs that take a trace; a sampler's trace is
# its output slot 1 (guided_ksampler's outputs: latent, trace).
_WORD_INPUTS = {"BiasMapAttributionMap": ("Attribution Map", ("word",)),
                "BiasMapEntanglementIoU": ("Entanglement IoU", ("concept_a", "concept_b")),
                "BiasMapAuditLog": ("Audit Log", ("concept_a", "concept_b"))}
_TRACE_INPUTS = ("trace", "baseline")
_TRACE_SLOT = 1
# What an empty word input stands for: the first concept of this list of the trace at the node's "trace" input
# (Entanglement IoU's, also for its baseline), or every concept of it (Audit Log's).
_EMPTY_MEANS = {"concept_a": "demographic", "concept_b": "semantic"}
_EMPTY_TAKES_EVERY = {"BiasMapEntanglementIoU": False, "BiasMapAuditLog": True}
_SAMPLERS = ("BiasMapGuidedKSampler", "BiasMapGuidedKSamplerAdvanced")


class WordsAsked(NamedTuple):
    """Words typed into one word input of a node that reads a sampler's trace."""
    node: str  # the node's name, with its title where the user gave it one (the page shows titles, not ids)
    node_id: str
    input: str
    text: str
    stands_for: str  # what the text stands for where the input was left empty; '' where it was typed


class StepsAsked(NamedTuple):
    """The step window typed into a node that reads a sampler's trace."""
    node: str
    node_id: str
    first_step: int
    last_step: int


def words_asked_of(prompt: dict | None, node_id, outputs: list | None = None,
                   own: dict[str, list[str]] | None = None, loaded: dict | None = None) -> list[WordsAsked]:
    """The words typed into the nodes that read node ``node_id``'s trace directly, one WordsAsked for each word input
    holding text (a linked one is made while the graph runs: not read).
    An empty input of a node that reads this trace as its baseline stands for the first concept of the other trace's
    sampler, where that sampler's list is typed: that word, and "the first demographic concept of its trace input".
    With ``own``, the sampler's concept lists ({"demographic": […], "semantic": […]}), an empty concept input of a
    node that reads this trace as its trace stands for them too (its first concept, or every one for Audit Log): for
    the check that a node's two concepts do not share words.
    With ``outputs``, the output nodes queued (``queued_outputs``), only the nodes ComfyUI runs for them: those and
    what they read.
    With ``loaded``, by node id the trace file chosen in Load Trace at the other trace input of a node reading this
    trace and that file's header (``loaded_traces_of``, ``TraceHeader``), an empty input of a node reading this trace
    as its baseline and that file as its trace stands for the file's first concept."""
    asked = []
    for other, node, shown, reading in _readers(prompt, node_id, outputs):
        inputs = node["inputs"]
        for name in _WORD_INPUTS[node["class_type"]][1]:
            text = inputs.get(name)
            if isinstance(text, str) and split_concepts(text):
                asked.append(WordsAsked(shown, other, name, text, ""))
            elif isinstance(text, str) and "trace" in reading and own and name in _EMPTY_MEANS:
                every = _EMPTY_TAKES_EVERY[node["class_type"]]
                concepts = own[_EMPTY_MEANS[name]][slice(None) if every else slice(1)]
                if concepts:
                    stands_for = (f"{'every' if every else 'the first'} {_EMPTY_MEANS[name]} concept of this "
                                  f"sampler, as {name} is empty")
                    asked.append(WordsAsked(shown, other, name, ", ".join(concepts), stands_for))
            elif isinstance(text, str) and reading == {"baseline"}:  # empty: the trace input's concept
                first, whose = _typed_first_concept(prompt, inputs.get("trace"), _EMPTY_MEANS[name]), "its trace input"
                if not first and other in (loaded or {}):
                    file, header = loaded[other]
                    # Stored as read, brackets and all: typed again, so that the lookup does not read them as emphasis.
                    first = typed_form(next(iter(getattr(header, _EMPTY_MEANS[name])), ""))
                    whose = f"its trace input, the trace '{file}' from Load Trace"
                if first:
                    stands_for = f"the first {_EMPTY_MEANS[name]} concept of {whose}, as {name} is empty"
                    asked.append(WordsAsked(shown, other, name, first, stands_for))
    return asked


def step_windows_of(prompt: dict | None, node_id, outputs: list | None = None) -> list[StepsAsked]:
    """The step windows typed into the nodes that read node ``node_id``'s trace directly (``outputs`` as for
    ``words_asked_of``); a linked or missing step input is not read."""
    windows = []
    for other, node, shown, _ in _readers(prompt, node_id, outputs):
        first, last = (node["inputs"].get(name) for name in ("first_step", "last_step"))
        if all(isinstance(step, int) and not isinstance(step, bool) for step in (first, last)):
            windows.append(StepsAsked(shown, other, first, last))
    return windows


def loaded_traces_of(prompt: dict | None, node_id, outputs: list | None = None) -> dict[str, str]:
    """By node id, the trace file chosen in a Load Trace linked straight to the other trace input (baseline, or
    trace) of each node that reads node ``node_id``'s trace at one of them (``outputs`` as for ``words_asked_of``):
    known when queued, so that the words that node measures in both can be looked up there before this sampler
    samples."""
    files = {}
    for other, node, _, reading in _readers(prompt, node_id, outputs):
        if len(reading) == 1:
            (other_input,) = set(_TRACE_INPUTS) - reading
            kind, inputs = _linked(prompt, node["inputs"].get(other_input))
            if kind == "BiasMapLoadTrace" and isinstance(inputs.get("trace_file"), str):
                files[other] = inputs["trace_file"]
    return files


def _readers(prompt: dict | None, node_id, outputs: list | None):
    """(id, node, name shown, trace inputs linked to it) of each node of the graph that looks words up in node
    ``node_id``'s trace, reading it directly; with ``outputs``, only those that ComfyUI runs for them."""
    runs = _read_by(prompt, outputs) if outputs is not None else None
    for other, node in (prompt or {}).items():
        if runs is not None and str(other) not in runs or node.get("class_type") not in _WORD_INPUTS:
            continue
        inputs = node.get("inputs", {})
        reading = {t for t in _TRACE_INPUTS if _is_link(inputs.get(t)) and str(inputs[t][0]) == str(node_id)
                   and inputs[t][1] == _TRACE_SLOT}
        if reading:
            shown = _WORD_INPUTS[node["class_type"]][0]
            title = (node.get("_meta") or {}).get("title")
            if isinstance(title, str) and title.strip() not in ("", f"BiasMap {shown}"):  # not the node's own name
                shown = f'{shown} "{title.strip()}"'
            yield str(other), {**node, "inputs": inputs}, shown, reading


def _typed_first_concept(prompt: dict | None, link, list_name: str) -> str:
    """The first concept of the list ``list_name`` (demographic, semantic) typed into the BiasMap sampler whose trace
    ``link`` is; '' where it is not typed there (linked, or the trace comes from Load Trace)."""
    kind, inputs = _linked(prompt, link)
    if kind not in _SAMPLERS or link[1] != _TRACE_SLOT or not isinstance(inputs.get(list_name), str):
        return ""
    # As typed: the words asked are parsed again, and a parsed "person (elderly)" would lose its brackets as emphasis.
    return next((typed for typed, _ in typed_concepts(inputs[list_name])), "")


def _read_by(prompt: dict | None, outputs: list) -> set[str]:
    """The ids of nodes ``outputs`` and of every node they read, directly or not."""
    seen, todo = set(), [str(node_id) for node_id in outputs]
    while todo:
        node_id = todo.pop()
        if node_id not in seen:
            seen.add(node_id)
            todo += [str(value[0]) for value in _inputs(prompt, node_id).values() if _is_link(value)]
    return seen


def graph_run(prompt: dict | None, node_id) -> dict:
    """The run's fields the graph holds: generation and negative prompt, model (with its text encoders where they are
    not the checkpoint's own, unchanged); for a sampler fed by BasicScheduler directly, its scheduler and denoise (the
    SIGMAS carry neither)."""
    model = _model(prompt, node_id)
    run = {"generation_prompt": generation_prompt(prompt, node_id),
           "negative_prompt": generation_prompt(prompt, node_id, "negative"),
           "model": model + _text_encoders(prompt, node_id) if model else ""}
    kind, inputs = _linked(prompt, _inputs(prompt, node_id).get("sigmas"))
    if kind == "BasicScheduler" and isinstance(inputs.get("scheduler"), str):
        run["scheduler"] = inputs["scheduler"]
        if isinstance(inputs.get("denoise"), (int, float)):
            run["denoise"] = inputs["denoise"]
    return run


def generation_prompt(prompt: dict | None, node_id, input_name: str = "positive") -> str:
    """The text typed for the conditioning at input ``input_name`` of node ``node_id``: through CLIP Text Encode
    (SDXL's: text_g, then text_l where it differs, as 'text_g | text_l'), string primitives and the core nodes that
    pass one conditioning on. '' where it is no one typed text: combined conditioning, or text another node makes
    while the graph runs (a wildcard node's template is not the prompt it made)."""
    return _typed_text(prompt, _inputs(prompt, node_id).get(input_name))


def _typed_text(prompt: dict | None, link) -> str:
    """The text a conditioning or string input holds, followed back through the graph (see generation_prompt)."""
    for _ in range(len(prompt or {})):  # each node once at most, in a graph without cycles
        if not _is_link(link):
            break
        kind, inputs = _linked(prompt, link)
        if kind == "CLIPTextEncodeSDXL":  # the model reads both encoders' texts: '' where one is made while it runs
            texts = [(_typed_text(prompt, inputs.get(name)), _is_link(inputs.get(name)))
                     for name in ("text_g", "text_l")]
            if any(linked and not text for text, linked in texts):
                return ""
            return " | ".join(dict.fromkeys(text for text, _ in texts if text))
        if kind in _TEXT_INPUT:
            link = inputs.get(_TEXT_INPUT[kind])
        elif kind == "BiasMapAuditPrompts" and link[1] == 0:  # its prompt output, a function of typed inputs
            return _planned_prompt(inputs)
        elif kind in _PASSED_ON and link[1] < len(_PASSED_ON[kind]):
            link = inputs.get(_PASSED_ON[kind][link[1]])
        else:
            return ""
    return link if isinstance(link, str) else ""


def _planned_prompt(inputs: dict) -> str:
    """The prompt an Audit Prompts node makes of its inputs; '' where one is linked (or the run is out of its plan,
    which the node refuses)."""
    if any(_is_link(value) for value in inputs.values()):
        return ""
    try:
        return audit_run(**inputs).prompt
    except (TypeError, ValueError):  # an input missing (a workflow of another version) or out of the plan
        return ""


def _model(prompt: dict | None, node_id) -> str:
    """The file node ``node_id``'s MODEL is loaded from, then what was applied on the way in that order: files with
    their strength, other nodes by class (``v1-5.safetensors + detail.safetensors (0.8) + FreeU_V2``); '' where the
    model does not come from one loader (a merge of two)."""
    return _chain(prompt, _inputs(prompt, node_id).get("model"), "model", _model_applied, _model_loaded)


def _model_applied(kind: str, inputs: dict) -> str:
    """A node on the way from the loader: a file with its strength, or the node's class with the values typed into it
    (RescaleCFG at 0.7 and at 0 make other images, which an audit must not pair as one)."""
    if kind in _APPLIED:
        name, strength = (inputs.get(key) for key in _APPLIED[kind])
        return f"{name if isinstance(name, str) else kind}{_strength(strength)}"
    # A value linked from another node is not known here: named as linked, as a LoRA's linked strength is.
    typed = [f"{key} {'linked' if _is_link(value) else _typed_value(value)}" for key, value in inputs.items()
             if key != "model" and (_is_link(value) or isinstance(value, (bool, int, float, str)))]
    return f"{kind} ({', '.join(typed)})" if typed else kind


def _typed_value(value) -> str:
    return shown_number(value) if isinstance(value, (bool, float)) else str(value)


def _model_loaded(kind: str, inputs: dict) -> str:
    option = inputs.get(_LOADED_AS.get(kind))
    loaded_as = f" ({option})" if isinstance(option, str) and option != "default" else ""
    name = _model_file(kind, inputs)
    return name + loaded_as if name else ""


def _model_file(kind: str, inputs: dict) -> str:
    if kind in _LOADED_FROM:
        name = inputs.get(_LOADED_FROM[kind])
        return name if isinstance(name, str) else ""
    return _loaded(kind, inputs)


def _text_encoders(prompt: dict | None, node_id) -> str:
    """' · clip: …' naming the CLIP that encoded the positive prompt, then the negative prompt's and the sampler's own
    (the attribution prompt's) where they are others, as _clip names them; '' where each is the model's checkpoint's,
    unchanged, or not named (combined conditioning). A LoRA's CLIP strength, CLIP Set Last Layer or hooks change the
    picture and the maps as the model's own LoRAs do: runs that differ there are not paired."""
    clips = _clips(prompt, node_id)
    own = _chain(prompt, _inputs(prompt, node_id).get("model"), "model", lambda *_: "", _model_file)  # the file alone
    if set(clips.values()) <= {own, ""}:
        return ""
    first = clips["clip"]
    return " · " + ", ".join(f"{what}: {clip}" for what, clip in clips.items()
                             if clip and (what == "clip" or clip != first))


def attribution_clip_apart(prompt: dict | None, node_id) -> tuple[str, str] | None:
    """The sampler's own CLIP (which encodes the attribution prompt) and the one that encoded its positive prompt, as
    _clip names them, where they differ (a LoRA or CLIP Set Last Layer added before CLIP Text Encode alone); None
    where they are one or either is not named."""
    clips = _clips(prompt, node_id)
    own, encoded = clips["attribution clip"], clips["clip"]
    return (own, encoded) if own and encoded and own != encoded else None


def _clips(prompt: dict | None, node_id) -> dict[str, str]:
    """The CLIPs of a sampler, as _clip names them: the positive prompt's encoder's, the negative's, its own."""
    inputs = _inputs(prompt, node_id)
    return {"clip": _clip(prompt, _encoder_clip(prompt, inputs.get("positive"))),
            "negative clip": _clip(prompt, _encoder_clip(prompt, inputs.get("negative"))),
            "attribution clip": _clip(prompt, inputs.get("clip"))}


def _encoder_clip(prompt: dict | None, link):
    """The ``clip`` input of the text encoder behind a conditioning input, followed back as generation_prompt follows
    it; None where it is no one encoder's."""
    for _ in range(len(prompt or {})):
        if not _is_link(link):
            break
        kind, inputs = _linked(prompt, link)
        if kind in ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner"):
            return inputs.get("clip")
        if kind not in _PASSED_ON or link[1] >= len(_PASSED_ON[kind]):
            break
        link = inputs.get(_PASSED_ON[kind][link[1]])
    return None


def _clip(prompt: dict | None, link) -> str:
    """The CLIP at ``link`` as _model names a MODEL: the file it is loaded from, then what was applied on the way
    (``v1-5.safetensors + detail.safetensors (0.8) + last layer -2 + SetClipHooks``: a LoRA with its CLIP strength,
    unless 0, CLIP Set Last Layer's layer, any other node that passes a ``clip`` on by its class); '' where none is
    linked."""
    return _chain(prompt, link, "clip", _clip_applied, _clip_loaded)


def _clip_applied(kind: str, inputs: dict) -> str:
    if kind == "LoraLoader":
        name, strength = inputs.get("lora_name"), inputs.get("strength_clip")
        # ComfyUI applies nothing to the CLIP at strength 0
        return f"{name if isinstance(name, str) else kind}{_strength(strength)}" if strength != 0 else ""
    if kind == "CLIPSetLastLayer":
        layer = inputs.get("stop_at_clip_layer")
        return f"last layer {layer if isinstance(layer, int) else '(linked)'}"
    return kind


def _clip_loaded(kind: str, inputs: dict) -> str:
    """A checkpoint's CLIP named as its model is, so that the two compare; a merge by its class."""
    name = inputs.get(_LOADED_FROM[kind]) if kind in _LOADED_FROM else None
    return name if isinstance(name, str) else _loaded(kind, inputs) or kind


def _chain(prompt: dict | None, link, through: str, applied_as, loaded_as) -> str:
    """A MODEL or CLIP named by the node that makes it, ``loaded_as(kind, inputs)``, then by each node on the way to
    ``link`` that passes one on through its input ``through``, ``applied_as(kind, inputs)`` ('' for one that applies
    nothing); '' where nothing is linked or ``loaded_as`` names no one source."""
    applied = []
    for _ in range(len(prompt or {})):  # each node once at most, in a graph without cycles
        kind, inputs = _linked(prompt, link)
        if kind is None:
            break
        if through not in inputs:
            loaded = loaded_as(kind, inputs)
            return " + ".join([loaded, *filter(None, reversed(applied))]) if loaded else ""
        applied.append(applied_as(kind, inputs))
        link = inputs[through]
    return ""


def _strength(strength) -> str:
    """A file's strength as the model's name shows it: nothing at 1."""
    if strength == 1:
        return ""
    return f" ({shown_number(strength)})" if isinstance(strength, (int, float)) else " (linked strength)"


def _loaded(kind: str, inputs: dict) -> str:
    """A loader this module does not know (GGUF, a custom one), named by the files it reads, or by its class; '' for
    a node that makes its MODEL of others (a merge: linked inputs), which no one name tells apart."""
    if any(_is_link(value) for value in inputs.values()):
        return ""
    files = [v for v in inputs.values() if isinstance(v, str) and v.lower().endswith(_MODEL_FILES)]
    return " ".join(files) or kind


def _inputs(prompt: dict | None, node_id) -> dict:
    return ((prompt or {}).get(str(node_id)) or {}).get("inputs", {})  # ComfyUI's ids are strings; ints work too


def _linked(prompt: dict | None, link) -> tuple[str | None, dict]:
    """The class and inputs of the node a link ``[node_id, output_slot]`` comes from."""
    if not _is_link(link):
        return None, {}
    node = (prompt or {}).get(str(link[0])) or {}
    return node.get("class_type"), node.get("inputs", {})


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2
