"""Benchmark biasmap_engine.soft_masks.soft_topk: time per call and how far Σ S is from k (BiasMap §4)."""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: biasmap_engine, not the ComfyUI package

from biasmap_engine.soft_masks import soft_iou, soft_topk  # noqa: E402

SIZES = (64, 96, 128)
MODES = ("paper", "exact")
PEAKS = (1.0, 10.0, 40.0, 120.0)  # OVAM maps sum softmaxes over 8 heads × 16 layers: values in 0–128
ITERS = (20, 100)
BATCH = 2
KEEP = 0.3
TIMING_PEAK = 40.0


def ovam_like(size: int, peak: float, device: str) -> torch.Tensor:
    """Batch of smooth, non-negative, blob-shaped maps with maximum ``peak``, like summed cross-attention maps."""
    noise = torch.rand(BATCH, 1, 6, 6, generator=torch.Generator().manual_seed(size))
    blobs = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp_min(0) ** 3
    blobs = blobs / blobs.amax(dim=(-2, -1), keepdim=True)
    return (peak * blobs[:, 0]).to(device)


def time_mode(size: int, mode: str, device: str, repeats: int) -> dict:
    """Forward (no grad) and forward+backward (∂ SoftIoU(S₀, S₁) / ∂ maps) milliseconds per call."""
    maps = ovam_like(size, TIMING_PEAK, device).requires_grad_()

    def forward():
        with torch.no_grad():
            soft_topk(maps, keep=KEEP, mode=mode)

    def forward_backward():
        s = soft_topk(maps, keep=KEEP, mode=mode)
        torch.autograd.grad(soft_iou(s[0], s[1]), maps)

    return {"size": size, "mode": mode, "forward_ms": 1e3 * median_seconds(forward, repeats, 2, device),
            "forward_backward_ms": 1e3 * median_seconds(forward_backward, repeats, 2, device)}


def deviation(size: int, peak: float, device: str) -> dict:
    """|Σ S − k_total| / k_total for paper mode (per-row k, each iteration count) and exact mode (per-map k)."""
    maps = ovam_like(size, peak, device)
    row_k = BATCH * size * int(size * KEEP)
    map_k = BATCH * int(size * size * KEEP)

    def rel(mode: str, k_total: int, **kwargs) -> float:
        with torch.no_grad():
            total = soft_topk(maps, keep=KEEP, mode=mode, **kwargs).double().sum().item()
        return abs(total - k_total) / k_total

    row = {"size": size, "peak": peak}
    row.update({f"paper_{it}": rel("paper", row_k, iters=it) for it in ITERS})
    row["exact"] = rel("exact", map_k)
    return row


def environment(device: str, repeats: int) -> dict:
    """Device name, torch version and thread count as torch reports them."""
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats}


def markdown(env: dict, timings: list, deviations: list) -> str:
    """README-ready Markdown: a header line, the timing table and the Σ S deviation table."""
    lines = [f"**soft_topk** on {env['device']}, torch {env['torch']}, threads {env['threads']}; batch {BATCH}, "
             f"keep {KEEP}, γ 0.01; median of {env['repeats']} runs after warm-up, maps peaking at {TIMING_PEAK:g}.",
             "", "| map | mode | forward (ms) | forward + backward (ms) |", "|---|---|--:|--:|"]
    lines += [f"| {t['size']}×{t['size']} | {t['mode']} | {t['forward_ms']:.2f} | {t['forward_backward_ms']:.2f} |"
              for t in timings]
    lines += ["", f"Relative deviation |Σ S − k| / k (paper: k = rows · ⌊{KEEP}·W⌋; exact: k = maps · ⌊{KEEP}·H·W⌋).",
              "",
              "| map | max value | " + " | ".join(f"paper, {it} iters" for it in ITERS) + " | exact |",
              "|---|--:|" + "--:|" * (len(ITERS) + 1)]
    lines += [f"| {d['size']}×{d['size']} | {d['peak']:g} | "
              + " | ".join(f"{d[f'paper_{it}']:.2e}" for it in ITERS) + f" | {d['exact']:.2e} |" for d in deviations]
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, run both benchmarks, print Markdown and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    env = environment(args.device, args.repeats)
    timings = [time_mode(size, mode, args.device, args.repeats) for size in SIZES for mode in MODES]
    deviations = [deviation(size, peak, args.device) for size in SIZES for peak in PEAKS]
    print(markdown(env, timings, deviations))
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "timing": timings, "deviation": deviations}, indent=2))


if __name__ == "__main__":
    main()
