"""A backward through convolutions and linear layers for only the batch rows that receive a gradient.

A guided CFG evaluation runs its branches as one batch, but the energy reads one branch's maps, so the gradient that
reaches every other row is exactly zero. Autograd would still compute those rows' input gradients at every layer,
doubling the backward of a two-branch batch. Inside :class:`RowSparseBackward`, ``conv2d`` and ``linear`` (the
weight-heavy operations of a U-Net) compute their input gradient only for the rows whose incoming gradient is not all
zero, which gives exactly autograd's result. Their forward still runs once for the whole batch, reading each weight
once, which separate per-branch passes cannot do. Finding those rows reads the gradient on the host: meant for CPUs.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RowSparseBackward"]


def _live_rows(grad: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of ``grad`` that hold a non-zero, or None when every row does."""
    live = grad.flatten(1).ne(0).any(1)
    return None if bool(live.all()) else live.nonzero().squeeze(1)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.config = x.shape, stride, padding, dilation, groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.config
        rows = _live_rows(grad)
        if rows is None:
            return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups), *[None] * 6
        grad_x = grad.new_zeros(shape)
        if rows.numel():
            grad_x[rows] = torch.nn.grad.conv2d_input((rows.numel(), *shape[1:]), weight, grad[rows], stride, padding,
                                                      dilation, groups)
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
        if rows.numel():
            grad_x[rows] = grad[rows] @ weight
        return grad_x, None, None


def _conv2d_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _linear_args(input, weight, bias=None):
    return input, weight, bias


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


def _input_grad_only(x, weight, bias) -> bool:
    return (torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad))
