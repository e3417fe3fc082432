"""What a trace file may hold, checked before any of it is used: a trace shared by someone else is untrusted input.

:meth:`BiasMapTrace.load` reads a JSON description and tensors. These checks refuse, naming the field, a description
of the wrong types, tensors of the wrong kind or shape, and a latent size its maps do not have: the nodes draw and
measure at the latent's image size, so a 3 KB file naming a 100 000² latent would have them allocate gigabytes.
Each check returns the problem as text (None when there is none); ``load`` makes it a TraceFormatError, ``save``
(which refuses to write what ``load`` would refuse) a ValueError. What no check of types can see, numbers changed
after saving (a disk, a copy or a download that altered bytes: NaN maps, a step 16711681), the checksum of the
tensors that ``save`` writes into the description tells.
"""

import hashlib

import torch

from .guidance import STATUS
from .settings import SETTING_NAMES, BiasMapSettings
from .stages import STAGE_ORDER, stage_grid

__all__ = ["MAX_IMAGE_PIXELS", "MAX_LATENT_SIDE", "description_problem", "is_list_of", "size_problem",
           "tensors_problem", "tensors_sha256"]

MAX_LATENT_SIDE = 2048  # the largest side ComfyUI's image nodes make (MAX_RESOLUTION, 16384 px), in latent pixels
# The most pixels a trace's images may hold together: the nodes measure at image size, a few bytes a pixel per map
# (about 6 GB at this many), so a small file of a large latent's coarse maps, batched, would take all memory. 16 times
# a batch of 16 at 1024², or 256 images of 1024².
MAX_IMAGE_PIXELS = 2 ** 28
_TEXT_LISTS = ("tokens", "demographic", "semantic", "notes")
_GUIDANCE_KINDS = {"energy": "floating", "grad_norm": "floating", "status": "integer"}
# What maps and sigmas are saved in (maps in half precision on request): float8 has no arithmetic to sum or
# resample maps with.
_MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The run's fields the samplers write, by kind: an audit file keeps them in its rows, whose summaries read them back.
_RUN_TEXTS = ("prompt_id", "time", "sampler", "scheduler", "generation_prompt", "negative_prompt", "model",
              "attribution_prompt", "precision", "environment")
_RUN_NUMBERS = ("cfg", "denoise")
_LARGEST_SEED = 0xFFFFFFFFFFFFFFFF  # a KSampler's


def size_problem(shape: list[int]) -> str | None:
    """What makes a latent of ``shape`` ([B, C, H, W]) too large for a trace file, or None."""
    if max(shape[2:]) > MAX_LATENT_SIDE:
        return (f"its latent of {shape[3]}×{shape[2]} is larger than ComfyUI's image nodes make (sides up to "
                f"{MAX_LATENT_SIDE}, 16384 px)")
    pixels = shape[0] * shape[2] * shape[3] * 64
    if pixels > MAX_IMAGE_PIXELS:
        return (f"its {shape[0]} image(s) of {shape[3] * 8}×{shape[2] * 8} are {pixels:,} pixels, more than the "
                f"{MAX_IMAGE_PIXELS:,} BiasMap measures at image size (256 images of 1024²): sample in batches of "
                f"fewer images")
    return None


def description_problem(meta: dict) -> str | None:
    """What is wrong with a trace's JSON description (its types and the latent's size), or None."""
    for name in _TEXT_LISTS:
        if not is_list_of(meta.get(name), str):
            return f"its {name} is not a list of texts"
    if not isinstance(meta.get("model_family"), str):
        return "its model_family is not a text"
    shape = meta.get("latent_shape")
    if not (is_list_of(shape, int) and len(shape) == 4 and min(shape) >= 1):
        return f"its latent_shape {shape!r} is not a latent's [B, C, H, W] (four whole numbers of at least 1)"
    problem = size_problem(shape)
    if problem:
        return problem
    run = meta.get("run", {})
    if not isinstance(run, dict):
        return "its run is not a table of the run's fields"
    problem = _run_fields_problem(run)
    if problem:
        return problem
    if run.get("batch_index") is not None and not (is_list_of(run["batch_index"], int)
                                                   and len(run["batch_index"]) == shape[0]):
        return f"its run's batch_index is not one whole number per image ({shape[0]})"
    for name in ("noise_mask", "start_latent"):
        if run.get(name) is not None and not (is_list_of(run[name], str) and len(run[name]) == shape[0]):
            return f"its run's {name} is not one text per image ({shape[0]})"
    if "sigmas" in run and not is_list_of(run["sigmas"], (int, float)):
        return "its run's sigmas are not a list of numbers"
    return _settings_problem(meta.get("settings"))


def _run_fields_problem(run: dict) -> str | None:
    """What is wrong with the kinds of a run's fields (a seed that is no whole number of ComfyUI's would make every
    summary of an audit file it is logged into refuse the file), or None."""
    if "seed" in run and not (_is_whole(run["seed"]) and 0 <= run["seed"] <= _LARGEST_SEED):
        return f"its run's seed {run['seed']!r:.40} is not a whole number from 0 to {_LARGEST_SEED}"
    if "steps" in run and not (_is_whole(run["steps"]) and run["steps"] >= 0):
        return f"its run's steps {run['steps']!r:.40} are not a whole number of 0 or more"
    if "add_noise" in run and not isinstance(run["add_noise"], bool):
        return "its run's add_noise is not true or false"
    kinds = [(name, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
             for name in _RUN_NUMBERS] + [(name, "a text", lambda v: isinstance(v, str)) for name in _RUN_TEXTS]
    return next((f"its run's {name} is not {kind}" for name, kind, fits in kinds
                 if name in run and not fits(run[name])), None)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tensors_problem(maps: dict, sigmas, steps, guidance: dict, latent_shape: list[int]) -> str | None:
    """What is wrong with a trace's tensors for its (checked) latent_shape, or None; their counts along evaluations,
    images and tokens are :class:`BiasMapTrace`'s own check."""
    if not maps:
        return "it holds no maps"
    for stage, stage_maps in maps.items():
        if stage not in STAGE_ORDER:
            return f"it holds maps of a stage '{stage}', which no BiasMap records"
        if stage_maps.dtype not in _MAP_DTYPES or stage_maps.dim() != 5:
            return (f"its maps of stage {stage} are not [evaluations, images, tokens, h, w] numbers of 16 bits or more "
                    f"(they are {stage_maps.dtype}, {list(stage_maps.shape)})")
        grid = stage_grid(stage, latent_shape[2:])
        if tuple(stage_maps.shape[-2:]) != grid:
            return (f"its maps of stage {stage} are {stage_maps.shape[-1]}×{stage_maps.shape[-2]}, where a "
                    f"{latent_shape[3]}×{latent_shape[2]} latent's are {grid[1]}×{grid[0]} (as in traces of runs "
                    f"with Kohya Deep Shrink that BiasMap saved before 2026-11-29, which kept the grids layers ran "
                    f"at: sample such a run again to measure it)")
    if sigmas.dim() != 1 or sigmas.dtype not in _MAP_DTYPES:
        return "its sigmas are not one number per evaluation"
    if steps.dim() != 1 or _number_kind(steps) != "integer" or bool((steps < 0).any()):
        return "its steps are not one step number (0 or more) per evaluation"
    for name, tensor in guidance.items():
        if name not in _GUIDANCE_KINDS:
            return f"its guidance holds '{name}', which is not the energy, gradient norm or status BiasMap records"
        if _number_kind(tensor) != _GUIDANCE_KINDS[name]:
            return f"its guidance {name} is not {_GUIDANCE_KINDS[name]} numbers"
        if tuple(tensor.shape) != (len(sigmas), latent_shape[0]):
            return f"its guidance {name} is not [evaluations {len(sigmas)}, images {latent_shape[0]}]"
    if "status" in guidance and not bool(torch.isin(guidance["status"], torch.tensor(list(STATUS.values()))).all()):
        return "its guidance status holds codes no BiasMap writes"
    return None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a trace file's tensors as saved (names, dtypes, shapes and bytes, in name order), as hex."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _settings_problem(settings) -> str | None:
    if not isinstance(settings, dict):
        return "its settings are not a table of BiasMap's settings"
    unknown = [key for key in settings if key not in SETTING_NAMES]
    if unknown:
        return f"its settings hold {', '.join(map(repr, unknown))}, which are not BiasMap settings"
    stages = settings.get("guided_stages")
    if stages is not None and not is_list_of(stages, str):
        return "its settings' guided_stages are not a list of stage names"
    try:
        BiasMapSettings(**{**settings, "guided_stages": tuple(stages) if stages else None})
    except (TypeError, ValueError) as err:
        return f"its settings are not BiasMap settings ({err})"
    return None


def is_list_of(value, kind) -> bool:
    """A JSON list of ``kind`` (whole numbers: not true/false)."""
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _number_kind(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return "floating"
    return "integer" if tensor.dtype != torch.bool and not tensor.is_complex() else "other"
