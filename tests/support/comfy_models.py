"""Random-weight ComfyUI models for tests and benchmarks (no weights, no network).

Every model is built from ComfyUI's own classes (``comfy.supported_models``, ``comfy.sd.CLIP``,
``comfy.model_patcher.ModelPatcher``), so hooks, samplers and nodes see exactly what they would see with a real
checkpoint, only smaller and with random weights. Builders work both inside ``torch.inference_mode()`` (as ComfyUI
runs graphs; the weights are then inference tensors, like loader-created ones) and outside it.

Call :func:`boot_comfy` (or set ``COMFYUI_PATH``) before anything else. Import this module *before* booting:
ComfyUI's root holds its own ``tests`` and ``nodes`` packages, which shadow same-named packages once it is first
on ``sys.path``.
"""

from __future__ import annotations

import os
import sys

import torch

# Keys every SD-family UNet config needs; the per-model dicts below only say what differs.
_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False,
}

# Two levels with one cross-attention block each: stages down x1, down x1/2, mid, up x1/2, up x1.
_TINY_SD_LEVELS = {
    "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "adm_in_channels": None,
}

_TINY_SD15_UNET = {**_TINY_SD_LEVELS, "model_channels": 32, "context_dim": 768, "use_linear_in_transformer": False}

# num_head_channels is fixed at 64 by SD20, so the channels must be a multiple of 64.
_TINY_SD2_UNET = {**_TINY_SD_LEVELS, "model_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True}

# Like SDXL: no cross-attention at x1, depth-2 transformers at x1/2 and x1/4 and in the middle block.
_TINY_SDXL_UNET = {
    "model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 2],
    "transformer_depth_output": [0, 0, 2, 2, 2, 2], "transformer_depth_middle": 2, "context_dim": 2048,
    "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential",
}

# SD15 detection (comfy/model_detection.py) only looks at model_channels 320 and context_dim 768 (plus flags), and
# reads the depth from the state dict, so one level with one attention block is still "SD15".
_SD15_CHECKPOINT_UNETS = {
    "tiny": {"channel_mult": [1], "num_res_blocks": [1], "transformer_depth": [1],
             "transformer_depth_output": [1, 1], "transformer_depth_middle": 1},
    "full": {"channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1},
}

# The SD1.x/SD2.x VAE config ComfyUI assumes for first_stage_model weights (comfy/sd.py, VAE.__init__).
_SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# Text encoders keep their hidden size (it is the UNet's context width) and vocabulary (the real tokenizers are
# used); only depth and MLP width shrink. Encoders read at the penultimate layer assert more than 2 layers.
_TINY_TE = {"num_hidden_layers": 2, "intermediate_size": 512}
_TINY_TE_PENULTIMATE = {"num_hidden_layers": 3, "intermediate_size": 512}

_TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],
}


def boot_comfy(comfy_path: str | None = None) -> str:
    """Make ComfyUI importable and import ``comfy``; return the ComfyUI root. Idempotent.

    The root is ``comfy_path``, else the ``COMFYUI_PATH`` environment variable. Without CUDA,
    ``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` is first imported (that import
    probes CUDA otherwise). Raises RuntimeError if no valid root is given, or if ``comfy`` was already
    imported from a different root.
    """
    path = comfy_path or os.environ.get("COMFYUI_PATH")
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        root = os.path.dirname(os.path.abspath(list(loaded.__path__)[0]))  # comfy/ is a namespace package
        if path and os.path.realpath(path) != os.path.realpath(root):
            raise RuntimeError(f"comfy is already imported from {root}, not from {path}")
    else:
        if not path or not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
            raise RuntimeError(
                f"ComfyUI not found at {path!r}: pass comfy_path or set COMFYUI_PATH to a ComfyUI checkout "
                "(the folder holding main.py and comfy/)")
        root = os.path.abspath(path)
        if root not in sys.path:
            sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        from comfy.cli_args import args
        args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401
    return root


def init_random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter of ``module`` in place, deterministically from ``seed``.

    Weights with two or more dimensions get normal(0, 0.02), other 1-D weights (norm scales) 1, biases 0;
    0-D parameters (e.g. CLIP's logit_scale) keep their constructor value. ComfyUI's ops skip initialisation,
    so without this the weights are whatever ``torch.empty`` returned. Numbers are drawn on the CPU, so the
    result does not depend on the parameters' device or dtype. Works on inference tensors too.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            value = torch.zeros(param.shape)
        elif param.dim() >= 2:
            value = torch.randn(param.shape, generator=generator) * 0.02
        elif param.dim() == 1:
            value = torch.ones(param.shape)
        else:
            continue
        # Inference tensors may only be written in inference mode, normal ones outside it.
        with torch.inference_mode(param.is_inference()), torch.no_grad():
            param.copy_(value)


def _model_patcher(config, seed, dtype, device, model_type=None, compute_dtype=None):
    """Random-weight BaseModel for a ``comfy.supported_models`` config, wrapped the way ComfyUI's loader does."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    config.set_inference_dtype(dtype, compute_dtype)
    if model_type is None:
        base_model = config.get_model({})
    else:
        base_model = comfy.model_base.BaseModel(config, model_type=model_type)
    init_random_(base_model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=device or mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _clip(clip_target, te_configs, seed, dtype, device):
    """A real ``comfy.sd.CLIP`` (real tokenizer) whose text encoders are shrunk by ``te_configs`` and random."""
    import comfy.sd
    model_options = {"dtype": dtype, **te_configs}
    if device is not None:
        model_options.update(load_device=device, offload_device=device, initial_device=device)
    clip = comfy.sd.CLIP(clip_target, model_options=model_options)
    init_random_(clip.cond_stage_model, seed)
    return clip


def tiny_sd15(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              in_channels: int = 4, compute_dtype: torch.dtype | None = None):
    """SD1.5-shaped (EPS, 8 heads, 768-d context) tiny UNet and a 2-layer CLIP-L with the SD1 tokenizer.

    Cross-attention sits at latent scales x1 (input 1, output 2-3), x1/2 (input 3, output 0-1) and in the
    middle block. ``device`` overrides ComfyUI's load device for both models (default: its own choice);
    ``in_channels=9`` makes an inpainting model (latent, mask and masked image), as ComfyUI detects one;
    ``compute_dtype`` other than ``dtype`` stores the U-Net's weights in ``dtype`` and computes in ``compute_dtype``
    (ComfyUI's manual cast, as for fp8 weights; the CLIP stays in ``dtype``). Returns ``(ModelPatcher,
    comfy.sd.CLIP)``.
    """
    boot_comfy()
    import comfy.supported_models
    config = comfy.supported_models.SD15({**_UNET_COMMON, **_TINY_SD15_UNET, "in_channels": in_channels})
    clip = _clip(config.clip_target(), {"clip_l_model_config": _TINY_TE}, seed, dtype, device)
    return _model_patcher(config, seed, dtype, device, compute_dtype=compute_dtype), clip


def tiny_sd15_fp8_quantized(seed: int = 0):
    """:func:`tiny_sd15`'s model as a quantized checkpoint loads (comfy_quant scaled fp8 on every Linear, ComfyUI's
    MixedPrecisionOps), built as on a GPU with fp8 compute (``--supports-fp8-compute``): its layers quantize their
    inputs too. Returns ``(ModelPatcher, comfy.sd.CLIP)``."""
    import json

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    plain, clip = tiny_sd15(seed)
    weights = plain.model.diffusion_model.state_dict()
    linear = {n for n, m in plain.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8 = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    quantized = {}
    for key, value in weights.items():
        layer = key.rsplit(".", 1)[0]
        if layer in linear and key.endswith(".weight"):
            quantized |= {key: value.to(torch.float8_e4m3fn), f"{layer}.weight_scale": torch.tensor(1.0),
                          f"{layer}.comfy_quant": fp8}
        else:
            quantized[key] = value
    config = comfy.supported_models.SD15({**_UNET_COMMON, **_TINY_SD15_UNET})
    config.set_inference_dtype(torch.float32, None)
    config.quant_config = {"mixed_ops": True}
    fp8_compute, mm.SUPPORT_FP8_OPS = mm.SUPPORT_FP8_OPS, True  # read when the model's layers are built
    try:
        base_model = config.get_model({})
        base_model.diffusion_model.load_state_dict(quantized, strict=False)
    finally:
        mm.SUPPORT_FP8_OPS = fp8_compute
    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), clip


def skeleton_sd15(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                  compute_dtype: torch.dtype | None = None):
    """SD1.5's whole block structure (4 levels, 2 res blocks each, 16 cross-attention layers, 8 heads, 768-d context)
    at 32 channels, and a 2-layer CLIP-L: every layer, hook and operator of a real SD1.5 step with little arithmetic,
    so a step's time is its Python and per-operator overhead, what bounds a GPU at SD sizes. ``compute_dtype`` as in
    :func:`tiny_sd15`.

    Returns ``(ModelPatcher, comfy.sd.CLIP)``.
    """
    boot_comfy()
    import comfy.supported_models
    config = comfy.supported_models.SD15({**_UNET_COMMON, **_SD15_CHECKPOINT_UNETS["full"], "model_channels": 32,
                                          "context_dim": 768, "use_linear_in_transformer": False,
                                          "adm_in_channels": None})
    clip = _clip(config.clip_target(), {"clip_l_model_config": _TINY_TE}, seed, dtype, device)
    return _model_patcher(config, seed, dtype, device, compute_dtype=compute_dtype), clip


def tiny_sd2v(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """SD2.x-768-v-shaped tiny model: V_PREDICTION, linear projections, 64-d heads, 1024-d context.

    Same block layout as :func:`tiny_sd15` (1 head at x1, 2 at x1/2), plus the real SD2 CLIP-H wrapper
    (tokenizer key ``"h"``, penultimate layer) shrunk to 3 layers. Returns ``(ModelPatcher, comfy.sd.CLIP)``.
    """
    boot_comfy()
    import comfy.model_base
    import comfy.supported_models
    config = comfy.supported_models.SD20({**_UNET_COMMON, **_TINY_SD2_UNET})
    clip = _clip(config.clip_target(), {"clip_h_model_config": _TINY_TE_PENULTIMATE}, seed, dtype, device)
    v_prediction = comfy.model_base.ModelType.V_PREDICTION
    return _model_patcher(config, seed, dtype, device, model_type=v_prediction), clip


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """SDXL-shaped tiny model: 2048-d context, pooled-text ``y`` (adm 2816), no cross-attention at x1.

    Depth-2 transformers at x1/2 (input 3, output 2-3), x1/4 (input 5, output 0-1) and in the middle block.
    The CLIP is the real SDXL pair (tokenizer keys ``"l"`` and ``"g"``) with both encoders shrunk to 3 layers;
    CLIPTextEncode's pooled output feeds the UNet's ``y``. Returns ``(ModelPatcher, comfy.sd.CLIP)``.
    """
    boot_comfy()
    import comfy.supported_models
    config = comfy.supported_models.SDXL({**_UNET_COMMON, **_TINY_SDXL_UNET})
    te_configs = {"clip_l_model_config": _TINY_TE_PENULTIMATE, "clip_g_model_config": _TINY_TE_PENULTIMATE}
    clip = _clip(config.clip_target(), te_configs, seed, dtype, device)
    return _model_patcher(config, seed, dtype, device), clip


def tiny_dit(seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """A tiny random Flux-dev-shaped DiT (no U-Net cross-attention, so attn2 patches never fire).

    ``model.model.model_config`` is ``comfy.supported_models.Flux`` and ``model.model.model_type`` is
    ``ModelType.FLUX``. Meant for "unsupported model" checks; no text encoder is built. Returns a ModelPatcher.
    """
    boot_comfy()
    import comfy.supported_models
    return _model_patcher(comfy.supported_models.Flux(_TINY_FLUX), seed, dtype, device)


def paper_prompts(clip) -> tuple[list, list]:
    """Positive and negative CONDITIONING of the paper's prompt ("A photo of the face of a doctor", empty negative)."""
    return (clip.encode_from_tokens_scheduled(clip.tokenize("A photo of the face of a doctor")),
            clip.encode_from_tokens_scheduled(clip.tokenize("")))


def write_random_sd15_checkpoint(path: str, size: str = "tiny", with_vae: bool = False, seed: int = 0,
                                 dtype: torch.dtype = torch.float16) -> str:
    """Write a random checkpoint that ComfyUI's loaders detect as SD15; return ``path``.

    ``size="full"`` is the real SD1.5 UNet (859.5M parameters); ``"tiny"`` the smallest UNet still detected as
    SD15 (320 channels, one level; 25.8M). The CLIP-L text encoder (123M) and the optional VAE (83.7M) are full
    size, because ComfyUI builds them from fixed configs. Keys use the original LDM prefixes
    (``model.diffusion_model.``, ``cond_stage_model.transformer.text_model.``, ``first_stage_model.``), saved
    with safetensors. Without a VAE, ComfyUI logs "No VAE weights detected" and VAEDecode fails.
    """
    if size not in _SD15_CHECKPOINT_UNETS:
        raise ValueError(f"size must be one of {sorted(_SD15_CHECKPOINT_UNETS)}, not {size!r}")
    boot_comfy()
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    from safetensors.torch import save_file

    config = comfy.supported_models.SD15({**_UNET_COMMON, "model_channels": 320, "context_dim": 768,
                                          "use_linear_in_transformer": False, "adm_in_channels": None,
                                          **_SD15_CHECKPOINT_UNETS[size]})
    config.set_inference_dtype(dtype, None)
    parts = [(config.get_model({}).diffusion_model, config.process_unet_state_dict_for_saving),
             (comfy.sd1_clip.SD1ClipModel(dtype=dtype), config.process_clip_state_dict_for_saving)]
    if with_vae:
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=_SD_VAE_DDCONFIG, embed_dim=4).to(dtype)
        parts.append((vae, config.process_vae_state_dict_for_saving))
    state_dict = {}
    for index, (module, to_checkpoint_keys) in enumerate(parts):
        init_random_(module, seed + index)
        state_dict.update(to_checkpoint_keys(module.state_dict()))
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, path)
    return path
