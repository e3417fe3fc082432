"""How a guided U-Net pass runs inside ComfyUI: its attention kernel, other nodes' patches, offloaded weights, running
out of memory.

Model options are never changed in place: each helper returns new options for the one pass, so the sampler's own
passes keep ComfyUI's choices.
"""

import contextlib
import functools

import torch

from .lean_backward import CopiedSaves
from .unet import dtype_name, precision

__all__ = ["attention_rounding_apart", "differentiable_quantized", "offload_streams_wait", "out_of_memory",
           "out_of_memory_explained", "patch_modules", "quantized_layers", "with_patches_on_copies",
           "with_sdpa_attention"]

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: the CUDA name only


def out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an accelerator running out of memory: CUDA's own error type, or the plain RuntimeError that
    other backends (Apple's MPS: "MPS backend out of memory") raise."""
    return isinstance(err, _OUT_OF_MEMORY) or "out of memory" in str(err)


@contextlib.contextmanager
def out_of_memory_explained():
    """Running out of GPU memory in a guided pass of one CFG branch, re-raised with what to change.

    Raised as torch's OutOfMemoryError whatever the backend, so ComfyUI shows its out-of-memory tips too.
    """
    try:
        yield
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        raise _OUT_OF_MEMORY(
            "BiasMap guidance ran out of GPU memory even with the maps' CFG branch alone under autograd (the "
            "backward needs that branch's U-Net activations): guide fewer stages (the first down stage alone keeps the "
            "least: set guided_stages to 'down_1', or 'down_2' on SDXL), lower the resolution or batch size, or set "
            "the guidance scale to 0 to record maps only") from err


def offload_streams_wait(device: torch.device) -> None:
    """ComfyUI's weight-offload streams wait for the work queued on ``device`` so far: call after a backward.

    A partly loaded model (low VRAM) copies weights to the GPU on offload streams, each copy in memory of that stream,
    and has the stream wait for the forward that used it. A guided pass keeps the copies for its backward, which
    reads them later: once freed, their memory could take the next step's copies before that backward has read it.
    Queued waits only, no synchronisation with the host.
    """
    import comfy.model_management

    streams = comfy.model_management.STREAMS.get(device, ())
    current = comfy.model_management.current_stream(device) if streams else None
    for stream in streams if current is not None else ():
        stream.wait_stream(current)


def attention_rounding_apart(model_patcher) -> tuple[str, str] | None:
    """(ComfyUI's attention kernel, the compute dtype) where a guided pass's SDPA rounds otherwise than the stock
    passes (a model computing in fp16 or bf16 on another kernel), or None."""
    import comfy.ldm.modules.attention as attention

    _, compute = precision(model_patcher)
    options = model_patcher.model_options.get("transformer_options", {})
    if (compute not in (torch.float16, torch.bfloat16) or "optimized_attention_override" in options
            or attention.optimized_attention is attention.attention_pytorch):
        return None
    kernel = getattr(attention.optimized_attention, "__name__", "another")
    return kernel.removeprefix("attention_"), dtype_name(compute)


def with_sdpa_attention(model_options, everywhere=False):
    """Model options whose attention, where autograd records it (or ``everywhere``), is PyTorch's SDPA (fused, with
    its own backward).

    Otherwise attention that no gradient flows through (the other CFG branch, layers after a truncation) keeps
    ComfyUI's choice. Another node's ``optimized_attention_override`` is left alone: it owns that slot.
    """
    import comfy.ldm.modules.attention as attention

    options = model_options.get("transformer_options", {})
    if "optimized_attention_override" in options:
        return model_options

    def sdpa(func, q, k, v, *args, **kwargs):
        if everywhere or (torch.is_grad_enabled() and q.requires_grad):
            return attention.attention_pytorch(q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)

    return {**model_options, "transformer_options": {**options, "optimized_attention_override": sdpa}}


def with_patches_on_copies(model_options):
    """Model options whose U-Net patches (the lists in ``transformer_options["patches"]``: FreeU's, HyperTile's, …;
    not those ComfyUI adds during sampling, such as GLIGEN's or hooks') run inside
    :class:`CopiedSaves`, so that a patch changing in place the activations it computed with (FreeU V2) leaves
    autograd what it needs for the backward.
    """
    options = model_options.get("transformer_options", {})
    patches = options.get("patches")
    if not patches:
        return model_options
    wrapped = {name: [_keeping_copies(p) if callable(p) else p for p in fns] if isinstance(fns, list) else fns
               for name, fns in patches.items()}
    return {**model_options, "transformer_options": {**options, "patches": wrapped}}


def _keeping_copies(patch):
    def run(*args, **kwargs):
        with CopiedSaves():
            return patch(*args, **kwargs)

    return run


def quantized_layers(modules) -> list[torch.nn.Module]:
    """Of ``modules``, the layers of a quantized checkpoint (ComfyUI's MixedPrecisionOps: scaled fp8 and the like,
    ``layout_type``)."""
    return [m for m in modules if getattr(m, "layout_type", None) is not None]


@contextlib.contextmanager
def differentiable_quantized(layers: list[torch.nn.Module]):
    """Quantized layers computing on their dequantized weights, for one guided pass.

    Where the GPU has fp8 compute, such a layer quantizes its input too, outside autograd: the queries that the energy
    is differentiated through would carry no gradient. ComfyUI's own full-precision path (``_full_precision_mm``)
    dequantizes the weight instead; the sampler's other passes keep the fast one, so λ = 0 stays as it was.
    """
    before = [m._full_precision_mm for m in layers]
    for m in layers:
        m._full_precision_mm = True
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m._full_precision_mm = value


def patch_modules(model_options: dict) -> list[torch.nn.Module]:
    """The modules that other nodes' U-Net patches hold: a hypernetwork's layers (HypernetworkLoader), an adapter's.

    ComfyUI loads them in inference mode like the model's weights, and in a guided pass they run on tensors that need
    gradients, where autograd cannot save an inference weight; they are swapped as the U-Net's are. Found through the
    patch objects, their attributes and closures, a few levels deep (a hypernetwork patch holds a dict of module lists).
    """
    options = model_options.get("transformer_options", {})
    patches = [p for found in options.get("patches", {}).values() for p in found]
    patches += [p for replaces in options.get("patches_replace", {}).values() for p in replaces.values()]
    found, seen = [], set()
    for patch in patches:
        _collect_modules(patch, 3, found, seen)
    return found


def _collect_modules(obj, depth: int, found: list, seen: set) -> None:
    if id(obj) in seen or isinstance(obj, (torch.Tensor, type, str, bytes, int, float)) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        found.append(obj)
        return
    if depth == 0:
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif isinstance(obj, functools.partial):
        children = [obj.func, *obj.args, *obj.keywords.values()]
    elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method: its object
        children = [obj.__self__]
    elif callable(obj) and hasattr(obj, "__code__"):  # a function: what its closure holds
        children = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        _collect_modules(child, depth - 1, found, seen)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not yet assigned
        return False
    return True
