"""PyTorch's default CPU convolution (oneDNN) vs its direct kernel on SD1.5's 3×3 shapes: milliseconds, medians.

Backs the grid limit in ``biasmap_engine/host/small_grid_conv.py``. Forward without autograd, and forward + input
gradient (weights frozen, as in the guided pass), at batch 1 (the guided CPU passes) and batch 2 (the stock CFG
batch). Usage: ``python benchmarks/small_grid_conv.py [--repeats 7]``
"""

import argparse
import sys
from pathlib import Path

import torch
from timing import median_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biasmap_engine.host.small_grid_conv import SmallGridConvolution  # noqa: E402

# (in channels, out channels, grid): the U-Net's 3×3 convolutions at 256² (grids 32…4) and 512² (64…8).
SHAPES = [(1280, 1280, 4), (2560, 1280, 4), (1280, 1280, 8), (1920, 1280, 8), (2560, 1280, 8), (1280, 1280, 16),
          (1920, 640, 16), (1280, 640, 16), (640, 640, 16), (320, 320, 32)]


def measure(conv, x, direct, repeats):
    """(forward, forward + input gradient) in ms; ``direct`` forces the direct kernel at any grid size."""
    def run(grad):
        with torch.set_grad_enabled(grad):
            xi = x.requires_grad_(grad)
            y = (torch.ops.aten.thnn_conv2d(xi, conv.weight, [3, 3], conv.bias, [1, 1], [1, 1]) if direct
                 else conv(xi))
            if grad:
                torch.autograd.grad(y, xi, torch.ones_like(y))
    return 1000 * median_seconds(lambda: run(False), repeats), 1000 * median_seconds(lambda: run(True), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32, median of {args.repeats}\n")
    print("| in → out, grid | batch | default fwd | direct fwd | default fwd + bwd | direct fwd + bwd "
          "| guided pass uses |")
    print("|---|--:|--:|--:|--:|--:|---|")
    for c_in, c_out, grid in SHAPES:
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).requires_grad_(False)
        for batch in (1, 2):
            x = torch.randn(batch, c_in, grid, grid)
            default = measure(conv, x, direct=False, repeats=args.repeats)
            direct = measure(conv, x, direct=True, repeats=args.repeats)
            with SmallGridConvolution():
                routed = type(conv(x.requires_grad_(True)).grad_fn).__name__ == "SlowConv2DBackward0"
            print(f"| {c_in} → {c_out}, {grid}×{grid} | {batch} | {default[0]:.1f} | {direct[0]:.1f} "
                  f"| {default[1]:.1f} | {direct[1]:.1f} | {'direct' if routed else 'default'} |", flush=True)


if __name__ == "__main__":
    main()
