import pytest
import torch

from biasmap_engine.host.small_grid_conv import SmallGridConvolution


def conv_and_input(grid, channels=16, batch=2, **conv_args):
    gen = torch.Generator().manual_seed(grid)
    conv = torch.nn.Conv2d(channels, 8, 3, **conv_args)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    return conv.requires_grad_(False), torch.randn(batch, channels, grid, grid, generator=gen).requires_grad_(True)


@pytest.mark.parametrize("grid, padding, stride", [(8, 1, 1), (4, 0, 1), (8, 1, 2), (3, (1, 0), 1)])
def test_grids_up_to_8x8_run_the_direct_kernel_with_the_same_values_and_input_gradient(grid, padding, stride):
    conv, x = conv_and_input(grid, padding=padding, stride=stride)
    with SmallGridConvolution():
        y = conv(x)
    assert type(y.grad_fn).__name__ == "SlowConv2DBackward0"
    expected = conv(x)
    # Float rounding only: the two kernels sum in different orders.
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    (got,) = torch.autograd.grad(y.square().sum(), x)
    (want,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("case", ["9x9 grid", "dilated", "grouped", "float64", "same padding"])
def test_other_convolutions_keep_pytorchs_choice_bit_for_bit(case):
    args = {"dilated": {"dilation": 2, "padding": 2}, "grouped": {"groups": 2, "padding": 1},
            "same padding": {"padding": "same"}}.get(case, {"padding": 1})
    conv, x = conv_and_input(9 if case == "9x9 grid" else 8, **args)
    if case == "float64":
        conv, x = conv.double(), x.double()
    with SmallGridConvolution():
        y = conv(x)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    assert torch.equal(y, conv(x))


def test_keyword_calls_are_routed_too():
    conv, x = conv_and_input(4, padding=1)
    with SmallGridConvolution():
        y = torch.nn.functional.conv2d(input=x, weight=conv.weight, bias=conv.bias, padding=1)
    assert type(y.grad_fn).__name__ == "SlowConv2DBackward0"
    expected = conv(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
