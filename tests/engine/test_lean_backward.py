import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from biasmap_engine.host import lean_backward
from biasmap_engine.host.lean_backward import LeanBackward


class ResBlockAndGeglu(torch.nn.Module):
    """A U-Net ResBlock half (group norm → SiLU → convolution) and a GEGLU, with frozen weights, as in a guided pass.

    ``seen`` holds weak references to the activations that the lean backward should not keep.
    """

    def __init__(self, channels=16, approximate="none"):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.norm = torch.nn.GroupNorm(4, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = torch.nn.Linear(channels, 4 * channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.requires_grad_(False)
        self.approximate = approximate
        self.seen = {}

    def forward(self, x, norm=None):
        n = (norm or self.norm)(x)
        s = F.silu(n)
        h = self.conv(s)
        a, gate = self.proj(h.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        g = F.gelu(gate, approximate=self.approximate)
        self.seen = {"group norm": weakref.ref(n), "silu": weakref.ref(s), "gelu": weakref.ref(g)}
        return (a * g).square().mean() + h.square().mean()


class Spied(LeanBackward):
    """LeanBackward listing the operators whose outputs it keeps as recipes."""

    def __init__(self, group_norms=()):
        super().__init__(group_norms)
        self.recomputed = set()

    def _pack(self, tensor):
        packed = super()._pack(tensor)
        if isinstance(packed, lean_backward._Recipe):
            self.recomputed.add(type(tensor.grad_fn).__name__)
        return packed


def input_gradient(net, x, hooks=None, **kwargs):
    """(∇_x, which of ``net.seen`` autograd still holds after the forward)."""
    x = x.clone().requires_grad_(True)
    with hooks if hooks is not None else torch.enable_grad():
        y = net(x, **kwargs)
    kept = {name: ref() is not None for name, ref in net.seen.items()}
    return torch.autograd.grad(y, x)[0], kept


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_recomputed_activations_give_the_bit_identical_input_gradient(approximate, device, monkeypatch):
    # Two plain backwards on CUDA may otherwise pick different convolution kernels.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    net = ResBlockAndGeglu(approximate=approximate).to(device)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    plain, kept = input_gradient(net, x)
    assert all(kept.values())  # plain autograd keeps them all for the backward
    lean, kept = input_gradient(net, x, LeanBackward([net.norm]))
    assert torch.equal(lean, plain)
    assert not any(kept.values())


def group_norm_sharing_the_weight_storage(norm):
    """A second module on the same weight storage with its own bias, as Control-LoRA builds from the U-Net's."""
    other = torch.nn.GroupNorm(norm.num_groups, norm.num_channels)
    other.weight = torch.nn.Parameter(norm.weight.data)
    other.bias = torch.nn.Parameter(norm.bias.data + 1.0)
    return other.requires_grad_(False)


class BiasPatchedOnTheFly(torch.nn.GroupNorm):
    """A group norm the way ComfyUI runs one with a bias patch applied per call (``bias_function``)."""

    bias_function = [lambda bias: bias + 1.0]

    def forward(self, x):
        bias = self.bias
        for patch in self.bias_function:
            bias = patch(bias)
        return F.group_norm(x, self.num_groups, self.weight, bias, self.eps)


@pytest.mark.parametrize("case", ["not passed in", "another module on the same weight storage",
                                  "bias patched on the fly"])
def test_a_group_norm_whose_bias_is_not_known_keeps_its_output(case):
    net = ResBlockAndGeglu()
    x = torch.randn(2, 16, 8, 8)
    norm = {"not passed in": net.norm,
            "another module on the same weight storage": group_norm_sharing_the_weight_storage(net.norm),
            "bias patched on the fly": BiasPatchedOnTheFly(4, 16).requires_grad_(False)}[case]
    passed_in = [] if case == "not passed in" else [net.norm if case.startswith("another") else norm]
    plain, _ = input_gradient(net, x, norm=norm)
    hooks = Spied(passed_in)
    lean, _ = input_gradient(net, x, hooks, norm=norm)
    assert torch.equal(lean, plain)
    assert hooks.recomputed == {"SiluBackward0", "GeluBackward0"}


def test_a_bias_swapped_between_forward_and_backward_does_not_change_the_gradient():
    # ComfyUI may re-patch weights between runs; the recipe uses the bias the norm ran with.
    net = ResBlockAndGeglu()
    x = torch.randn(2, 16, 8, 8)
    plain, _ = input_gradient(net, x)
    xi = x.clone().requires_grad_(True)
    with LeanBackward([net.norm]):
        y = net(xi)
    bias = net.norm.bias
    net.norm.bias = torch.nn.Parameter(bias + 1.0, requires_grad=False)
    try:
        assert torch.equal(torch.autograd.grad(y, xi)[0], plain)
    finally:
        net.norm.bias = bias


def live_tensors():
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())  # type(): no __class__ lookups


def test_nothing_of_a_pass_outlives_it_where_the_backward_does_not_reach():
    # As a guided pass records the U-Net's tail after the last guided layer, which the energy does not depend on.
    net = ResBlockAndGeglu()

    def guided_pass():
        x = torch.randn(2, 16, 8, 8, requires_grad=True)
        with LeanBackward([net.norm]):
            head = F.silu(net.norm(x * 2.0))
            tail = F.group_norm(net.conv(head), 4)  # keeps its own mean and rstd; never differentiated
            attention = F.scaled_dot_product_attention(*[tail.flatten(2)] * 3)  # keeps its own output
        torch.autograd.grad(head.square().sum(), x)
        return attention.sum().item()

    guided_pass()
    before = live_tensors()
    for _ in range(3):
        guided_pass()
    assert live_tensors() == before


def test_an_activation_changed_in_place_after_it_was_kept_raises_as_autograd_does():
    x = torch.randn(4, requires_grad=True)
    with LeanBackward():
        h = x * 2.0
        y = (h * h).sum()  # keeps h
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, x)


def test_an_output_changed_in_place_before_it_was_kept_is_kept_as_changed():
    def gradient(hooks):
        x = torch.linspace(-2, 2, 5, requires_grad=True)
        with hooks:
            s = F.silu(x * 1.0)
            with torch.no_grad():
                s.mul_(3.0)  # the recipe, silu(x), would no longer give s
            y = (s * s).sum()
        return torch.autograd.grad(y, x)[0]

    assert torch.equal(gradient(LeanBackward()), gradient(torch.enable_grad()))


def test_the_recomputed_operators_are_recognised_inside_inference_mode():
    with torch.inference_mode():
        assert lean_backward._node_type(F.silu) is lean_backward._SILU
        assert lean_backward._node_type(F.group_norm, 1) is lean_backward._GROUP_NORM
    assert lean_backward._SILU.__name__ == "SiluBackward0"
