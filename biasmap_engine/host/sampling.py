"""Sampling entry points: ComfyUI's own KSampler and custom-sampler paths, run on a BiasMap-patched clone."""

import hashlib
import inspect

import torch

from ..report import shown_number
from ..settings import BiasMapSettings
from ..version import pack_version
from .attribution import encode_attribution
from .server import executing_context
from .session import BiasMapSession
from .unet import dtype_name, precision

__all__ = ["CUSTOM_SIGMAS", "interrupted", "sample_with_sampler", "sample_with_scheduler", "sampler_names",
           "scheduler_names", "start_session"]

CUSTOM_SIGMAS = "custom sigmas"  # the scheduler of a run on SIGMAS not named in the graph (the rows' sigmas have it)


def start_session(model, clip, attribution_prompt: str, demographic: list[str], semantic: list[str],
                  settings: BiasMapSettings) -> BiasMapSession:
    """Encode the attribution prompt with ``clip`` and prepare a session (refusals happen here, before sampling)."""
    embeddings, tokens = encode_attribution(clip, attribution_prompt)
    return BiasMapSession(model, embeddings, tokens, demographic, semantic, settings, attribution_prompt)


def sample_with_scheduler(session: BiasMapSession, model, seed, steps, cfg, sampler_name, scheduler, positive,
                          negative, latent, denoise=1.0):
    """What the stock KSampler node runs (``nodes.common_ksampler``), on the patched clone; → (LATENT, trace)."""
    import nodes

    _check_batch(latent)
    session.given_latent(latent["samples"])
    start = _start_latents(latent)
    if denoise <= 0:
        raise ValueError("denoise 0 leaves the latent as it is: the model is never evaluated, so there are no maps to "
                         "record or guide; set denoise above 0")

    (out,) = nodes.common_ksampler(session.patch(model), seed, steps, cfg, sampler_name, scheduler, positive,
                                   negative, latent, denoise=denoise)
    return out, session.finish(out["samples"], **_identity(model), seed=seed, steps=steps, cfg=cfg,
                               sampler=sampler_name, scheduler=scheduler, denoise=denoise, add_noise=True,
                               batch_index=latent.get("batch_index"), noise_mask=_noise_masks(latent),
                               start_latent=start)


def sample_with_sampler(session: BiasMapSession, model, noise_seed, cfg, sampler, sigmas, positive, negative,
                        latent, add_noise: bool = True):
    """What SamplerCustomAdvanced runs with a CFGGuider, on the patched clone; → (LATENT, trace).

    ``add_noise`` off is its DisableNoise: the latent is denoised as it is (the second half of split sigmas).
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview
    from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, Noise_RandomNoise  # RandomNoise, DisableNoise

    _check_batch(latent)
    session.given_latent(latent["samples"])
    start = _start_latents(latent)
    if sigmas.shape[-1] < 2:
        # SamplerCustomAdvanced hands on a latent of no σ or of σ 0 as it is, and one of a σ above 0 noised: a trace
        # of no maps would stop every node reading it, so this sampler refuses, saying what the split meant.
        if sigmas.shape[-1] == 1 and float(sigmas[0]) > 0:  # once, before sampling: no round trip in the step loop
            fix = ("SplitSigmas at step 0 leaves high_sigmas so, which only noise the latent: split at a later step, "
                   "or sample the whole schedule here")
        else:
            fix = ("BasicScheduler at denoise 0 gives none, SplitSigmas at the last step leaves low_sigmas one σ of "
                   "0: connect a schedule of at least two sigmas, or bypass this sampler, which then has nothing to "
                   "denoise")
        raise ValueError(f"{sigmas.shape[-1]} sigma(s) make no sampling step, so there are no maps to record or "
                         f"guide ({fix})")
    session.window.widen_for(sigmas)
    patched = session.patch(model)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    latent = latent.copy()
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    latent["samples"] = latent_image
    noise = Noise_RandomNoise(noise_seed) if add_noise else Noise_EmptyNoise()
    callback = latent_preview.prepare_callback(patched, sigmas.shape[-1] - 1, {})
    # The sampler's own noise (ancestral, SDE) is seeded with the noise's seed, as SamplerCustomAdvanced does:
    # DisableNoise's is 0, whatever noise_seed says.
    samples = guider.sample(noise.generate_noise(latent), latent_image, sampler, sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed)
    latent["samples"] = samples.to(comfy.model_management.intermediate_device())
    # The seed recorded is noise_seed as given, also where it seeds nothing (add_noise off): the rows name the image by
    # it, and DisableNoise's 0 would make every continued latent one image to an audit.
    return latent, session.finish(latent["samples"], **_identity(model), seed=noise_seed, steps=sigmas.shape[-1] - 1,
                                  cfg=cfg, sampler=_sampler_name(sampler), scheduler=CUSTOM_SIGMAS,
                                  add_noise=add_noise, batch_index=latent.get("batch_index"),
                                  noise_mask=_noise_masks(latent), start_latent=start)


def _check_batch(latent: dict) -> None:
    """A latent of no image (a batch sliced empty) has nothing to sample: said so, where ComfyUI fails on an index."""
    if latent["samples"].shape[0] == 0:
        raise ValueError("the latent holds no image (a batch of 0, e.g. from Latent From Batch past its end): connect "
                         "a latent with at least one image")


def _start_latents(latent: dict) -> list[str] | None:
    """Per image, a fingerprint of the latent it is sampled from ('' for an empty one, Empty Latent Image's zeros);
    None where every image's is empty. Two img2img runs of one seed from two source images, or two second passes
    (hires fix) after first passes that differ, are other images, which an audit would otherwise pair as one, and a
    report compare as runs that differ in λ alone. Read once, before sampling: the values as numbers, not their
    dtype."""
    images = latent["samples"].reshape(latent["samples"].shape[0], -1).float().cpu()
    described = [_fingerprint(image) if bool(image.any()) else "" for image in images]
    return described if any(described) else None


def _noise_masks(latent: dict) -> list[str] | None:
    """Per image, the noise mask it was sampled under (inpainting: Set Latent Noise Mask, InpaintModelConditioning),
    as the share of the latent it lets the sampler change and a fingerprint telling masks of one share apart ('' for
    a mask that changes all of it, which samples as none does); None where no image has one. An inpainted image is not
    the seed's text-to-image one, which an audit would otherwise pair it with. Read once, after sampling."""
    mask = latent.get("noise_mask")
    if mask is None:
        return None
    masks = mask.reshape(-1, mask.shape[-2] * mask.shape[-1]).float().cpu()  # as ComfyUI reads its images
    images = latent["samples"].shape[0]
    described = [_described(m) for m in masks[:images]]  # each mask once, however many images it is repeated over
    per_image = [described[i % len(described)] for i in range(images)]  # as ComfyUI repeats them over the batch
    return per_image if any(per_image) else None


def _described(mask) -> str:
    if bool((mask == 1).all()):
        return ""
    return f"{100 * float(mask.mean()):.1f} % ({_fingerprint(mask)})"


def _fingerprint(values) -> str:
    """Eight hex digits of a CPU tensor's values: two masks or latents alike only if their bytes are."""
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()[:8]


def _sampler_name(sampler) -> str:
    """A SAMPLER's name as KSampler gives it, found through its function and inpainting options (a SAMPLER carries no
    name; KSamplerSelect's ddim is euler's function with random inpainting noise), then the options that a sampler node
    sets otherwise than the function's defaults, which make another image (SamplerEulerAncestral at eta 0:
    ``euler_ancestral (eta 0)``); dpm_fast and dpm_adaptive are made anew each time, known by name."""
    import comfy.samplers

    function = getattr(sampler, "sampler_function", None)
    inpainting = getattr(sampler, "inpaint_options", None) or {}
    known = {name: comfy.samplers.sampler_object(name) for name in comfy.samplers.KSampler.SAMPLERS}
    named = [name for name, other in known.items() if other.sampler_function is function]
    name = next((n for n in named if (known[n].inpaint_options or {}) == inpainting), named[0] if named else None)
    if name is None:
        name = getattr(function, "__name__", type(sampler).__name__).removeprefix("sample_").removesuffix("_function")
    # A wrapper that passes its options on (dpm_adaptive's) declares no defaults: k-diffusion's function does.
    defaults = _defaults(function) or _defaults(getattr(comfy.samplers.k_diffusion_sampling, f"sample_{name}", None))
    options = [f"{key} {_option(value)}" for key, value in (getattr(sampler, "extra_options", None) or {}).items()
               if key not in defaults or not _equal(value, defaults[key])]
    return f"{name} ({', '.join(options)})" if options else name


def _defaults(function) -> dict:
    """The default of each keyword a sampler function takes; {} where it has no signature to read."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _equal(value, default) -> bool:
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values, or values that do not compare
        return False


def _option(value) -> str:
    """A sampler option as a name shows it: a number, a word; a function by the values it holds (ER-SDE's noise
    scaler holds its eta, SA-Solver's tau its eta and σ range), else 'custom' (a tensor, a function of none)."""
    if isinstance(value, float):
        return shown_number(value)
    if isinstance(value, (bool, int, str)) or value is None:
        return str(value)
    code, cells = getattr(value, "__code__", None), getattr(value, "__closure__", None) or ()
    held = [f"{name} {_option(contents)}" for name, contents in zip(code.co_freevars if code else (), map(_held, cells))
            if isinstance(contents, (bool, int, float, str))]
    return f"[{', '.join(held)}]" if held else "custom"


def _held(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a variable the function reads that was never set
        return None


def _identity(model) -> dict:
    """Which run made a trace: ComfyUI's prompt id (empty outside its executor) and the UTC time it finished, so
    rows of one run can be told apart from a cached trace logged again; the model's precision, which no graph
    names where startup flags set it (--fp16-unet); and the environment that computed it."""
    from datetime import datetime, timezone

    context = executing_context()
    return {"prompt_id": context.prompt_id if context is not None else "",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "precision": _precision(model),
            "environment": _environment(model)}


def _precision(model) -> str:
    """How the U-Net's weights are stored and computed: ``fp16``, or ``fp8_e4m3fn weights, bf16 compute``."""
    weights, compute = precision(model)
    if compute == weights:
        return dtype_name(weights)
    return f"{dtype_name(weights)} weights, {dtype_name(compute)} compute"


def _environment(model) -> str:
    """The versions, device and attention kernel a run was computed with, e.g. ``BiasMap 0.1.0 · ComfyUI 0.8.0 · torch
    2.14.1+cpu · CPU, 2 threads · pytorch attention``: each may move an IoU in its last digits (a CPU's thread count
    changes its sums' order), so an audit can say which machine made a row that does not reproduce."""
    import comfy.ldm.modules.attention as attention

    try:
        from comfyui_version import __version__ as comfyui
    except ImportError:  # a ComfyUI checkout older than the file
        comfyui = "unknown"
    device = torch.device(model.load_device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        where = f"CPU, {torch.get_num_threads()} threads"
    else:
        where = device.type
    kernel = getattr(attention.optimized_attention, "__name__", "another").removeprefix("attention_")
    return f"BiasMap {pack_version()} · ComfyUI {comfyui} · torch {torch.__version__} · {where} · {kernel} attention"


def interrupted(err: BaseException) -> bool:
    """Whether ``err`` is ComfyUI's interrupt (the page's Cancel, ``POST /interrupt``)."""
    import comfy.model_management

    return isinstance(err, comfy.model_management.InterruptProcessingException)


def sampler_names() -> list[str]:
    """ComfyUI's k-sampler names, for the node's sampler input."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    """ComfyUI's scheduler names, for the node's scheduler input."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
