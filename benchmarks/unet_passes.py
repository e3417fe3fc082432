"""The U-Net passes a guided CPU step is made of, timed bare: the floor under ``benchmarks/sampling.py``'s figures.

A guided step with all stages on the CPU runs the other CFG branch forward at batch 1, the maps' branch forward at
batch 1 with autograd, and one backward to the latent; the stock KSampler runs one batch-2 forward. This times those
passes on the bare U-Net (no BiasMap hooks, no sampler), with the guided pass's kernels everywhere (PyTorch SDPA,
the direct convolution on grids of ≤ 8×8), so the ratio is what the arithmetic alone costs; the last column times
the other branch's forward with ComfyUI's own attention kernel (sub-quadratic on a CPU) against SDPA, the two
alternating, since their difference at 256² is within the drift between repeats. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/unet_passes.py [--sizes 256 512] [--repeats 3] [--pairs 9]
"""

import argparse
import sys
from pathlib import Path

import torch
from timing import median_ratio, median_seconds

import sampling  # this folder: the checkpoint and the SDPA override (it puts tests/support on the path)

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=9, help="alternating pairs for the attention kernels' ratio")
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))  # this checkout, after ComfyUI's `nodes`
    from biasmap_engine.host import deinference_
    from biasmap_engine.host.small_grid_conv import SmallGridConvolution

    model, clip = sampling.load_random_sd15(args.checkpoint)
    with torch.inference_mode():
        context = clip.encode_from_tokens_scheduled(clip.tokenize("A photo of the face of a doctor"))[0][0]
    unet = model.model.diffusion_model
    deinference_(unet)
    options = {"optimized_attention_override": sampling.sdpa_attention}

    def forward(batch, size, attention_options=options):
        x = torch.randn(batch, 4, size // 8, size // 8)
        with torch.no_grad():
            unet(x, torch.full((batch,), 500.0), context.repeat(batch, 1, 1),
                 transformer_options=dict(attention_options))

    def forward_backward(size):
        x = torch.randn(1, 4, size // 8, size // 8, requires_grad=True)
        with torch.enable_grad():
            out = unet(x, torch.full((1,), 500.0), context.clone(), transformer_options=dict(options))
            torch.autograd.grad(out, x, torch.ones_like(out))

    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, random full-size SD1.5 U-Net, "
          f"median of {args.repeats}\n")
    print("| size | batch-2 forward (stock) | batch-1 forward | batch-1 forward + backward | guided passes ÷ stock "
          "| batch-1 forward, ComfyUI's attention ÷ SDPA (interleaved) |")
    print("|---|--:|--:|--:|--:|--:|")
    with SmallGridConvolution():
        for size in args.sizes:
            stock = median_seconds(lambda: forward(2, size), args.repeats)
            other = median_seconds(lambda: forward(1, size), args.repeats)
            guided = median_seconds(lambda: forward_backward(size), args.repeats)
            host = median_ratio(lambda: forward(1, size, {}), lambda: forward(1, size), args.pairs)
            print(f"| {size}² | {stock:.3f} s | {other:.3f} s | {guided:.3f} s | {(other + guided) / stock:.2f} "
                  f"| {host:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
