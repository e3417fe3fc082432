"""PyTorch's direct convolution for CPU feature maps of at most 8×8, where oneDNN's batch-1 kernels are slow.

On the CPU the guided pass runs each CFG branch at batch 1, so that the backward covers one branch only. At U-Net
levels of 8×8 and 4×4 with 1280–2560 channels, oneDNN (PyTorch's default CPU convolution) then takes up to 4× the
time of PyTorch's direct im2col + GEMM kernel, forward and backward (measured in docs/benchmarks.md: a
2560→1280 3×3 convolution at 4×4 takes 42 ms against 9 ms). Larger grids are left to oneDNN, which wins there.
Values agree to float rounding; the mode is entered only for guided passes, so λ = 0 keeps ComfyUI's kernels.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["SmallGridConvolution"]

_SMALL_GRID_PIXELS = 64  # 8×8: the largest grid where the direct kernel won at every measured channel count


class SmallGridConvolution(TorchFunctionMode):
    """Routes plain fp32 CPU ``conv2d`` calls on grids of ≤ 64 pixels to ``aten.thnn_conv2d`` (direct kernel)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            direct = _direct_conv2d(*args, **kwargs)
            if direct is not None:
                return direct
        return func(*args, **kwargs)


def _direct_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002 (F.conv2d)
    """The direct kernel's result, or None where it does not apply (GPU, large grid, grouped, dilated, …)."""
    if (input.device.type != "cpu" or input.dtype != torch.float32 or input.dim() != 4 or groups != 1
            or input.shape[-1] * input.shape[-2] > _SMALL_GRID_PIXELS or isinstance(padding, str)
            or _pair(dilation) != [1, 1]):
        return None
    return torch.ops.aten.thnn_conv2d(input, weight, list(weight.shape[-2:]), bias, _pair(stride), _pair(padding))


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)
