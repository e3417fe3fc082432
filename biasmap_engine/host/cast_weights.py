"""Weight copies that ComfyUI makes as a layer runs, kept for a guided pass's backward as recipes: cast again there.

ComfyUI computes with a copy of a layer's weight where the weight is stored in another dtype than the model computes
in (fp8 or fp16 weights computed in bf16 or fp32: manual cast), where it lives off the GPU (a model partly loaded
when VRAM is short: each such layer is copied to the GPU as it runs) and where a LoRA is patched on the fly (low
VRAM). The copy goes as the layer returns, so such a model needs VRAM for a few layers' weights at a time. In a
guided pass autograd keeps each copy for the backward (a linear's or a convolution's input gradient reads its
weight): through the whole U-Net, a copy of every such weight at once, the model loaded in full after all and in
its compute dtype (twice the bytes of fp8 weights computed in bf16).

Within :class:`CastCopies` each such layer notes the copy it computes with (a function appended to its
``weight_function``, which ComfyUI applies to the copy last), and :meth:`CastCopies.recipe` turns a kept copy into
a recipe that the backward runs: ComfyUI's own ``cast_bias_weight`` on the same stored weight, or where that would
only convert it, the conversion alone; the same values either way.
Only layers whose weight functions are ComfyUI's low-VRAM LoRA patches (deterministic, dtype-keeping) or none; a
copy made through another node's weight function, or a quantized layer's (MixedPrecisionOps), is kept as autograd
keeps it. The price is the cast again: a copy to the GPU of a low-VRAM layer (in the backward on the compute stream,
not overlapped as the forward's offload streams are) and its LoRA patch computed again, and on a GPU the launches of
every cast: :func:`worth_casting_again` weighs that against the memory free.
"""

import functools
import math
import weakref

import torch

__all__ = ["CastCopies", "cast_layers", "worth_casting_again"]


def cast_layers(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Module]:
    """The layers of ``module`` that ComfyUI runs on a copy of their weight that :class:`CastCopies` can cast again,
    for a model computing in ``dtype`` on ``device``.

    Read once a run, after ComfyUI loaded the model: it sets a layer's casting (manual cast, low VRAM) when loading.
    A casting layer whose weight is already in ``dtype`` on ``device`` computes on the weight itself: noting it would
    only make ComfyUI copy it (a weight function makes it copy).
    """
    from comfy.model_patcher import LowVramPatch

    return [m for m in module.modules()
            if getattr(m, "weight", None) is not None and hasattr(m, "weight_function")
            and getattr(m, "layout_type", None) is None  # quantized: its own weight class and kernels
            and not hasattr(m, "cast_bias_weight")  # its own cast (GGUF's layers), which may skip weight functions
            and (getattr(m, "comfy_cast_weights", False) or m.weight_function or m.bias_function)
            and (m.weight_function or m.weight.dtype != dtype or m.weight.device != device)
            and all(isinstance(f, LowVramPatch) for f in (*m.weight_function, *m.bias_function))]


def worth_casting_again(layers: list[torch.nn.Module], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a guided pass through the whole U-Net should cast ``layers``' weights again in its backward rather
    than keep the copies they compute with in ``dtype``.

    On a CPU always: there casting again took less time than keeping the copies (0.71× a guided step of an fp16
    SD1.5 computed in fp32 at 256²). On a GPU, where kernel launches bound a step, only where the copies would take
    more than half of the memory free now (the other half is for the pass's activations): on an H200, casting an fp8
    SD1.5's copies again at 512² took 1.38× the time of a guided step to keep 1549 MiB fewer (one measurement,
    docs/benchmarks.md), which low VRAM needs and 139 GiB do not. Counted by shape: a packed weight's elements are
    not its values.
    """
    if device.type == "cpu":
        return True
    import comfy.model_management

    copies = sum(math.prod(m.weight.shape) for m in layers) * dtype.itemsize
    return copies > comfy.model_management.get_free_memory(device) / 2


class CastCopies:
    """While entered (a guided pass's forward), the weight copies that ``layers`` compute with are noted, so that
    autograd may keep them as recipes (:meth:`recipe`), and a group norm's output too (:meth:`layer_of`,
    :meth:`norm_bias`)."""

    def __init__(self, layers: list[torch.nn.Module]):
        self._layers = list(dict.fromkeys(layers))  # once each, or a second note would be restored last
        self._made: dict[int, tuple] = {}  # id(copy) → (weak reference to it, its layer)
        self._own: list = []  # each layer's own weight_function, or None where it used its class's

    def __bool__(self) -> bool:
        return bool(self._layers)

    # Set in the layers' __dict__ directly: what nn.Module's __setattr__ and __delattr__ end up doing for a list,
    # without their checks, on each of a U-Net's few hundred layers twice a guided pass.
    def __enter__(self):
        self._own = [m.__dict__.get("weight_function") for m in self._layers]
        for m in self._layers:
            # A new list: ComfyUI's class default is one list shared by every layer.
            m.__dict__["weight_function"] = [*m.weight_function, functools.partial(self._note, m)]
        return self

    def __exit__(self, *exc) -> None:
        for m, own in zip(reversed(self._layers), reversed(self._own)):
            if own is None:
                m.__dict__.pop("weight_function", None)  # gone already if something else removed it meanwhile
            else:
                m.__dict__["weight_function"] = own
        self._made.clear()

    def _note(self, layer, weight):
        self._made[id(weight)] = (weakref.ref(weight), layer)
        return weight

    def layer_of(self, copy: torch.Tensor) -> torch.nn.Module | None:
        """The layer that computed with ``copy``, if noted in this pass."""
        made = self._made.get(id(copy))
        return made[1] if made is not None and made[0]() is copy else None

    def recipe(self, tensor: torch.Tensor):
        """``tensor`` (a noted copy of a matrix or kernel, or a view of one) as a recipe, or None."""
        base = tensor if tensor._base is None else tensor._base
        layer = self.layer_of(base) if base.dim() >= 2 else None  # a norm's weight is too small to bother
        if layer is None:
            return None
        view = None if tensor is base else (tensor.size(), tensor.stride(), tensor.storage_offset())
        return _CastAgain(layer, base, view)

    @staticmethod
    def norm_bias(norm: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """The bias that ``norm`` ran with beside ``weight``, its noted weight copy: cast again (a small vector)."""
        bias = norm.bias
        if bias is None:
            return None
        if not norm.bias_function and bias.device == weight.device:  # as _cast_weight: the conversion alone
            return bias.to(weight.dtype)
        return _cast(norm, weight.dtype, weight.device)[1]


def _cast(layer, dtype, device):
    import comfy.ops

    with torch.no_grad():
        return comfy.ops.cast_bias_weight(layer, None, dtype, device, bias_dtype=dtype)


def _cast_weight(layer, dtype, device) -> torch.Tensor:
    """``layer``'s weight as ComfyUI's ``cast_bias_weight`` gives it. Where that is a conversion on the device (no
    weight function: manual cast of a loaded layer), the conversion alone: none of that function's Python and no
    bias cast, which a launch-bound GPU pays for each layer of a backward."""
    weight = layer.weight
    if not layer.weight_function and weight.device == device:
        return weight.to(dtype)
    return _cast(layer, dtype, device)[0]


class _CastAgain:
    """A layer's weight copy, cast again when the backward reads it, laid out as the forward's copy was (or the view
    of it that autograd kept)."""

    __slots__ = ("layer", "dtype", "device", "layout", "view")

    def __init__(self, layer, copy: torch.Tensor, view):
        self.layer, self.dtype, self.device, self.view = layer, copy.dtype, copy.device, view
        self.layout = (copy.size(), copy.stride(), copy.storage_offset())

    def __call__(self) -> torch.Tensor:
        weight = _cast_weight(self.layer, self.dtype, self.device)
        size, stride, offset = self.layout
        if weight.stride() != stride:  # the stored weight itself, as the forward's note made ComfyUI copy it
            weight = torch.empty_strided(size, stride, dtype=self.dtype, device=self.device).copy_(weight)
            offset = 0
        if self.view is None:
            return weight
        view_size, view_stride, view_offset = self.view
        return weight.as_strided(view_size, view_stride, weight.storage_offset() + view_offset - offset)
