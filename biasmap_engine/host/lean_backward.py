"""Keep less for a guided pass's backward: SiLU, gelu and group norm outputs as recipes, run again when needed.

Autograd keeps every activation an operator's backward reads until the backward runs. Three kinds of them are cheap
to compute again from tensors that autograd keeps anyway, and they are a third of what a 512² SD1.5 pass keeps
(docs/benchmarks.md):
- SiLU outputs (the ResBlocks' convolution inputs), from the SiLU's input, which its own backward keeps;
- GEGLU's gelu(gate), kept by the product x·gelu(gate), from gate, which gelu's backward keeps;
- group norm outputs (the SiLUs' inputs), from the norm's input, which its own backward keeps.
Inside :class:`LeanBackward` they are kept as recipes (the producing node of the graph) and run again, elementwise,
when the backward reads them. The kernels and inputs are the same, so the gradient is bit-identical.

A group norm's backward keeps its weight but not its bias and eps, so only the outputs of the modules passed in are
recomputed, with the module's bias and eps, when the norm ran on the module's own weight and bias, or on copies
that ComfyUI cast or patched on the fly (manual cast, low VRAM) and that ``casts`` (cast_weights.CastCopies) noted.
Any other group norm's output is kept. The weight copies themselves are kept as ``casts``' recipes.

Everything else is kept as autograd keeps it, with the two guarantees that hooks would otherwise drop: a tensor is
kept detached, so a node keeping its own output (a group norm its mean, SDPA its output) makes no reference cycle
that would outlive the pass where the backward does not reach; and an in-place change after it was kept raises, as
autograd's own check does.
"""

import torch
import torch.nn.functional as F

__all__ = ["CopiedSaves", "LeanBackward"]


def _node_type(op, *args):
    with torch.inference_mode(False), torch.enable_grad():  # this module may be imported inside either
        return type(op(torch.zeros(1, 1, 2, requires_grad=True), *args).grad_fn)


_SILU, _GELU, _GROUP_NORM = _node_type(F.silu), _node_type(F.gelu), _node_type(F.group_norm, 1)


class LeanBackward(torch.autograd.graph.saved_tensors_hooks):
    """Within it, autograd keeps SiLU, gelu and ``group_norms``' outputs as recipes instead of tensors, and the weight
    copies that ``casts`` (a cast_weights.CastCopies, entered for the same forward) noted."""

    def __init__(self, group_norms=(), casts=None):
        # Read on entry to each pass: ComfyUI may swap a weight tensor (a LoRA patch) between runs.
        self._norms = {m.weight.data_ptr(): m for m in group_norms if m.weight is not None}
        self._norm_modules = set(map(id, group_norms))
        self._casts = casts or None
        super().__init__(self._pack, _unpack)

    def _pack(self, tensor):
        node = tensor.grad_fn
        if node is None:  # the latent, a weight or its copy, or a tensor made without autograd: no node to keep
            recipe = self._casts.recipe(tensor) if self._casts is not None else None
            return _Kept(tensor) if recipe is None else recipe
        kind = type(node)
        # Only an output as its node made it: not a group norm's mean or rstd (outputs 1 and 2), nor one changed in
        # place since (e.g. under no_grad), which the recipe would not reproduce.
        if tensor.output_nr == 0 and tensor._version == 0:
            if kind is _SILU or kind is _GELU:
                return _Recipe(kind, node)
            if kind is _GROUP_NORM:
                weight = node._saved_weight
                norm = self._norms.get(weight.data_ptr()) if weight is not None else None
                if norm is not None and norm.weight is weight and _own_bias(norm):
                    return _Recipe(kind, node, (norm.bias, norm.eps))  # read as the norm just ran
                cast = self._cast_norm(weight)
                if cast is not None:
                    return _Recipe(kind, node, cast)
        # Detached: the node may be keeping its own output, and the tensor's grad_fn would then hold the node.
        return _Kept(tensor.detach())

    def _cast_norm(self, weight):
        """(bias, eps) of the group norm that ran on ``weight``, a copy ``casts`` noted, with its bias cast again."""
        if self._casts is None or weight is None:
            return None
        norm = self._casts.layer_of(weight)
        if norm is None or id(norm) not in self._norm_modules:
            return None
        return self._casts.norm_bias(norm, weight), norm.eps


class CopiedSaves(torch.autograd.graph.saved_tensors_hooks):
    """Within it, autograd keeps a copy of each activation it saves: for code that changes them in place after use.

    ComfyUI's FreeU V2 patch, for one, multiplies half of ``h``'s channels by a map computed from ``h`` and writes the
    product back into ``h``: the product's backward reads the values from before that write, which only a copy holds.
    """

    def __init__(self):
        super().__init__(_pack_copy, _unpack)


def _pack_copy(tensor):
    # The latent, weights and constants are no activation: kept as LeanBackward keeps them, version-checked.
    return _Kept(tensor) if tensor.grad_fn is None else tensor.detach().clone()


def _own_bias(norm) -> bool:
    """Whether ``norm``, which ran on its own weight, ran on its own bias too: ComfyUI copies a casting layer's bias
    only to patch it on the fly or to bring it to the weight's dtype and device (the input's)."""
    bias = norm.bias
    return not getattr(norm, "bias_function", None) and (
        bias is None or (bias.dtype == norm.weight.dtype and bias.device == norm.weight.device))


class _Recipe:
    """The output of ``node`` (of type ``kind``), computed again from what the node itself keeps.

    The node's backward runs after every reader of its output (they come later in the forward), so its saved
    tensors are still there when a reader's backward asks for the recipe. A group norm's output is kept once
    computed: its reader, a SiLU, is read twice, by its own backward and by the recipe of its output (the
    convolution's input), one right after the other; the value goes with the SiLU's saved tensors.
    """

    __slots__ = ("kind", "node", "norm", "value")

    def __init__(self, kind, node, norm=None):
        self.kind, self.node, self.norm, self.value = kind, node, norm, None


class _Kept(tuple):
    """(tensor, its version when kept): a detached tensor shares the version counter, so later changes show."""

    def __new__(cls, tensor):
        return super().__new__(cls, (tensor, tensor._version))


def _unpack(packed):
    if isinstance(packed, torch.Tensor):  # a copy (CopiedSaves)
        return packed
    if callable(packed):  # a weight copy's recipe (CastCopies.recipe)
        return packed()
    if isinstance(packed, _Kept):
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                               f"operation: a {list(tensor.shape)} tensor is at version {tensor._version}; expected "
                               f"version {version} instead (BiasMap's guided pass keeps it for the backward): a node "
                               f"or patch changes U-Net activations in place; bypass it, or set the guidance scale "
                               f"to 0 (its author can make it change a copy)")
        return tensor
    node = packed.node
    with torch.no_grad():
        if packed.kind is _SILU:
            return F.silu(node._saved_self)
        if packed.kind is _GELU:
            return F.gelu(node._saved_self, approximate=node._saved_approximate)
        if packed.value is None:
            packed.value = F.group_norm(node._saved_input, node._saved_group, node._saved_weight, *packed.norm)
        return packed.value
