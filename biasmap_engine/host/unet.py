"""What the pack needs to know about a ComfyUI model: its family, its cross-attention layers, its weights."""

import torch

from ..stages import stage_id

__all__ = ["UnsupportedModelError", "block_stages", "cross_attention_layers", "deinference_", "dtype_name",
           "model_family", "precision", "require_guidable", "require_unet", "weight_slots"]


class UnsupportedModelError(ValueError):
    """A model BiasMap cannot hook (no U-Net cross-attention) or cannot guide (sampling whose noise is not
    variance-preserving: flow matching, unscaled input, EDM with σ_data ≠ 1)."""


def model_family(model_patcher) -> str:
    """The model's ComfyUI config name, e.g. ``SD15``, ``SD20``, ``SDXL``, ``Flux``."""
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model).__name__


def precision(model_patcher) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes the U-Net's weights are stored in and computed in (ComfyUI casts them as layers run where the two
    differ: fp8 or fp16 weights computed in bf16 or fp32)."""
    weights = model_patcher.model.get_dtype()
    return weights, getattr(model_patcher.model, "manual_cast_dtype", None) or weights


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as ComfyUI's options name it: fp16, bf16, fp8_e4m3fn."""
    return str(dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")


def cross_attention_layers(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Every U-Net ``attn2`` module keyed as ComfyUI's patches see it: (block, block id, depth index)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    groups = [("input", i, b) for i, b in enumerate(getattr(diffusion_model, "input_blocks", []))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", 0, diffusion_model.middle_block))
    groups += [("output", i, b) for i, b in enumerate(getattr(diffusion_model, "output_blocks", []))]
    layers = {}
    for name, number, block in groups:
        for module in block.modules():
            if isinstance(module, SpatialTransformer):
                for depth, transformer in enumerate(module.transformer_blocks):
                    attn2 = getattr(transformer, "attn2", None)
                    if attn2 is not None and not getattr(transformer, "switch_temporal_ca_to_sa", False):
                        layers[(name, number, depth)] = attn2
    return layers


def _input_block_levels(diffusion_model) -> list[int]:
    """Resolution divisor of each input block (1, 2, 4, …), counted from the downsampling blocks before it."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    levels, divisor = [], 1
    for block in diffusion_model.input_blocks:
        if any(isinstance(m, Downsample) for m in block.modules()):
            divisor *= 2
        levels.append(divisor)
    return levels


def block_stages(diffusion_model, layers) -> dict[tuple[str, int, int], str]:
    """Each layer's stage as the U-Net is built (``down_2`` for an input block at half the latent's size), whatever
    grid a node such as Kohya Deep Shrink makes it run at on some steps."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    levels = {("input", n): d for n, d in enumerate(_input_block_levels(diffusion_model))}
    divisor = levels[("input", len(diffusion_model.input_blocks) - 1)]
    levels[("middle", 0)] = divisor
    for n, block in enumerate(diffusion_model.output_blocks):
        levels[("output", n)] = divisor
        if any(isinstance(m, Upsample) for m in block.modules()):
            divisor //= 2
    return {layer: stage_id(layer, levels[layer[:2]]) for layer in layers}


def require_unet(model_patcher) -> dict[tuple[str, int, int], torch.nn.Module]:
    """The cross-attention layers, or a refusal that names the model family."""
    layers = cross_attention_layers(model_patcher.model.diffusion_model)
    if not layers:
        raise UnsupportedModelError(
            f"BiasMap needs a U-Net with text cross-attention (SD 1.x, SD 2.x, SDXL); this model is "
            f"{model_family(model_patcher)}, which has none (DiT models such as Flux and SD3 mix text and image "
            f"tokens in joint attention). Load an SD 1.x/2.x/SDXL checkpoint.")
    return layers


def require_guidable(model_patcher) -> None:
    """Refuse guidance where the σ-space update is not the paper's ε-space one: sampling whose noise is not
    ComfyUI's variance-preserving form (x = x₀ + σ·n, the U-Net fed x/√(σ²+1)), as with flow matching.

    The sampling in use is read, not the checkpoint's type: ModelSamplingSD3, AuraFlow or Continuous EDM patch it in.
    Within that form any prediction (ε, v, x₀, LCM) works, since the update acts on the denoised it implies.
    """
    import comfy.model_sampling as ms

    sampling = model_patcher.get_model_object("model_sampling")
    sigma_data = float(getattr(sampling, "sigma_data", 1.0))
    if not isinstance(sampling, ms.EPS):
        cause = "its noise is not added as x₀ + σ·n (flow matching mixes (1 − σ)·x₀ + σ·n)"
    elif type(sampling).calculate_input is not ms.EPS.calculate_input:
        cause = "the U-Net gets its input unscaled, not x/√(σ² + 1)"
    elif sigma_data != 1.0:
        cause = f"its σ_data is {sigma_data:g} (EDM), not 1"
    else:
        return
    kind = next((k.__name__ for k in type(sampling).__mro__ if k.__module__ == ms.__name__ and k.__name__.isupper()),
                type(sampling).__name__)
    fix = ("remove the model-sampling node that sets it, or set the guidance scale to 0 to record maps only"
           if "model_sampling" in model_patcher.object_patches else "set the guidance scale to 0 to record maps only")
    raise UnsupportedModelError(
        f"BiasMap guidance is defined for sampling with variance-preserving noise (ε, v, x₀ or LCM prediction); this "
        f"{model_family(model_patcher)} model samples as {kind}, and {cause}, so the σ-space update is not the "
        f"paper's: {fix}.")


def weight_slots(module: torch.nn.Module) -> list[tuple[dict, str, bool]]:
    """Where ``module`` and its submodules hold tensors: (the ``_parameters`` or ``_buffers`` dict, name, is a
    parameter). Walking the module tree is most of :func:`deinference_`'s cost; the slots stay as long as no module
    is added or replaced, while the tensors in them may change (ComfyUI re-creates patched weights)."""
    return [(tensors, name, tensors is mod._parameters) for mod in module.modules()
            for tensors in (mod._parameters, mod._buffers) for name in tensors]


def deinference_(module: torch.nn.Module, slots: list[tuple[dict, str, bool]] | None = None) -> None:
    """Swap inference-mode weights for ordinary tensors of the same values, so autograd may save them.

    ComfyUI loads models inside ``torch.inference_mode()``; such tensors cannot be saved for backward. Swapping once
    (and again only for weights that ComfyUI re-creates, e.g. on LoRA re-patching) avoids copying every weight on
    every forward, which a weight wrapper would do during ordinary sampling too. Values are unchanged. ``slots``
    (:func:`weight_slots` of ``module``, kept by the caller while the module's structure stays) spares the walk.

    Pinned host weights are left alone: ComfyUI pins the weights it offloads when VRAM is short (lowvram), copies
    them to the GPU on every forward (so autograd saves the copy, never them), and later unpins them by address; a
    swapped tensor would make that unpinning fail and leave freed memory registered with CUDA.
    """
    with torch.inference_mode(False):
        for tensors, name, is_parameter in weight_slots(module) if slots is None else slots:
            tensor = tensors[name]
            if tensor is not None and tensor.is_inference() and not _pinned(tensor):
                tensors[name] = (torch.nn.Parameter(tensor.clone(), requires_grad=False) if is_parameter
                                 else tensor.clone())


def _pinned(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and torch.cuda.is_available() and tensor.is_pinned()
