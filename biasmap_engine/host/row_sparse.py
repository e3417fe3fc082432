"""A CPU backward through convolutions and linear layers for only the batch rows that receive a gradient.

A guided CFG evaluation runs both branches as one batch, but the energy reads one branch's maps, so the gradient that
reaches the other branch's rows is exactly zero. Autograd would still compute those rows' input gradients at every
layer, doubling the backward of a two-branch batch. Inside :class:`RowSparseBackward`, ``conv2d`` and ``linear`` (the
weight-heavy operations of a U-Net) compute their input gradient only for the rows whose incoming gradient is not all
zero, which is exactly autograd's result. Their forward still runs once for the whole batch, so the CFG batch costs
one forward plus one branch's backward; they keep no activation for the backward, only the (frozen) weight.

The rows' convolution gradient on grids of ≤ 8×8 goes to PyTorch's direct kernel, as the forward does there
(small_grid_conv.py): at batch 1 oneDNN takes 2–4× its time on those grids. Finding the live rows reads the gradient
on the host, so this is for CPUs.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .small_grid_conv import SMALL_GRID_PIXELS, _pair

__all__ = ["RowSparseBackward"]


class RowSparseBackward(TorchFunctionMode):
    """Context in which ``conv2d``/``linear`` skip the input gradient of rows whose incoming gradient is zero.

    Applies where only the input needs a gradient (frozen weights, as in sampling); anything else runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _conv2d_args(*args, **kwargs)
            if _input_grad_only(x, weight, bias) and not isinstance(padding, str):
                return _Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
        elif func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if _input_grad_only(x, weight, bias):
                return _Linear.apply(x, weight, bias)
        return func(*args, **kwargs)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.config = x.shape, _pair(stride), _pair(padding), _pair(dilation), groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.config
        rows = _live_rows(grad)
        if rows is None:
            return _conv2d_input(shape, weight, grad, stride, padding, dilation, groups), *[None] * 6
        grad_x = grad.new_zeros(shape)
        if rows:  # [] when no row is live
            part = grad[rows]
            grad_x[rows] = _conv2d_input((part.shape[0], *shape[1:]), weight, part, stride, padding, dilation, groups)
        return grad_x, *[None] * 6


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = _live_rows(grad)
        if rows is None:
            return grad @ weight, None, None
        grad_x = grad.new_zeros(*grad.shape[:-1], weight.shape[1])
        if rows:  # [] when no row is live
            grad_x[rows] = grad[rows] @ weight
        return grad_x, None, None


def _conv2d_input(shape, weight, grad, stride, padding, dilation, groups):
    """∂conv2d/∂input; on small fp32 CPU grids through the direct kernel, which reads the input's shape only."""
    if (grad.device.type == "cpu" and grad.dtype == torch.float32 and groups == 1 and dilation == [1, 1]
            and shape[-1] * shape[-2] <= SMALL_GRID_PIXELS):
        shape_only = grad.new_zeros(()).expand(shape)
        return torch.ops.aten._slow_conv2d_backward.output_mask(
            grad.contiguous(), shape_only, weight, list(weight.shape[-2:]), stride, padding, [True, False, False])[0]
    return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)


def _live_rows(grad: torch.Tensor) -> slice | list[int] | None:
    """The rows of ``grad`` that hold a non-zero (NaN included), or None when every row does.

    A contiguous run of rows, the usual case (one CFG branch), comes back as a slice: indexing with it is a view.
    """
    live = [i for i, peak in enumerate(grad.flatten(1).abs().amax(1).tolist()) if peak != 0]  # NaN ≠ 0: kept
    if len(live) == grad.shape[0]:
        return None
    if live and live[-1] - live[0] == len(live) - 1:
        return slice(live[0], live[-1] + 1)
    return live


def _input_grad_only(x, weight, bias) -> bool:
    return (isinstance(x, torch.Tensor) and x.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and torch.is_grad_enabled())


def _conv2d_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002 (F.conv2d)
    return input, weight, bias, stride, padding, dilation, groups


def _linear_args(input, weight, bias=None):  # noqa: A002 (F.linear)
    return input, weight, bias
