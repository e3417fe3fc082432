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

    def forward(self, x, norm_weight=None):
        n = F.group_norm(x, 4, self.norm.weight if norm_weight is None else norm_weight, self.norm.bias,
                         self.norm.eps)
        s = F.silu(n)
        h = self.conv(s)
        a, gate = self.proj(h.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        g = F.gelu(gate, approximate=self.approximate)
        self.seen = {"group norm": weakref.ref(n), "silu": weakref.ref(s), "gelu": weakref.ref(g)}
        return (a * g).square().mean() + h.square().mean()


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


def test_a_group_norm_not_passed_in_keeps_its_output():
    net = ResBlockAndGeglu()
    x = torch.randn(2, 16, 8, 8)
    plain, _ = input_gradient(net, x)
    lean, kept = input_gradient(net, x, LeanBackward())
    assert torch.equal(lean, plain)
    assert kept == {"group norm": True, "silu": False, "gelu": False}


def test_a_group_norm_run_on_another_weight_than_its_modules_keeps_its_output():
    # ComfyUI may run a norm on a cast or patched copy of the module's weight: the module's bias and eps may not hold.
    net = ResBlockAndGeglu()
    x = torch.randn(2, 16, 8, 8)
    copy = net.norm.weight.clone()
    plain, _ = input_gradient(net, x, norm_weight=copy)
    lean, kept = input_gradient(net, x, LeanBackward([net.norm]), norm_weight=copy)
    assert torch.equal(lean, plain)
    assert kept["group norm"] and not kept["silu"]


def test_the_recomputed_operators_are_recognised_when_first_imported_inside_inference_mode():
    with torch.inference_mode():
        assert lean_backward._node_type(F.silu) is lean_backward._SILU
        assert lean_backward._node_type(F.group_norm, 1) is lean_backward._GROUP_NORM
    assert lean_backward._SILU.__name__ == "SiluBackward0"


class BiasPatchedOnTheFly(torch.nn.GroupNorm):
    """A group norm the way ComfyUI runs one with a bias patch applied per call (``bias_function``)."""

    bias_function = [lambda bias: bias + 1.0]

    def forward(self, x):
        bias = self.bias
        for patch in self.bias_function:
            bias = patch(bias)
        return F.group_norm(x, self.num_groups, self.weight, bias, self.eps)


def test_a_group_norm_run_on_a_bias_patched_on_the_fly_keeps_its_output():
    norm = BiasPatchedOnTheFly(4, 16).requires_grad_(False)
    x = torch.randn(2, 16, 8, 8)

    def gradient(hooks):
        xi = x.clone().requires_grad_(True)
        with hooks:
            n = norm(xi)
            y = F.silu(n).square().mean()
        ref = weakref.ref(n)
        del n
        kept = ref() is not None
        return torch.autograd.grad(y, xi)[0], kept

    plain, _ = gradient(torch.enable_grad())
    lean, kept = gradient(LeanBackward([norm]))
    assert kept
    assert torch.equal(lean, plain)
