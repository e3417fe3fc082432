"""Where a sampling step's time goes, per mode: kernel launches, host synchronisations and the costliest operators.

On a GPU at SD sizes a step is bound by kernel launches and Python, not arithmetic, so the count of launches per
step and any host synchronisation inside the step loop explain the ratios ``sampling.py`` reports. Runs the same
modes on the same random full-size SD1.5 checkpoint; on CUDA the synchronisations are found with PyTorch's sync
debug mode and reported with the line of Python that caused them. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/profile_step.py [--size 512] [--steps 2] [--rows 25]
        [--modes plain recording guided_all guided_down_1] [--sources aten::copy_ …] [--checkpoint …]
        [--out profile.txt]

``--sources`` lists, for each named operator, where its calls per step come from: the innermost Python frames
outside PyTorch, or the autograd engine's backward pass when no Python frame is on the stack.
"""

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import sampling  # this folder: the modes and one run of each

REPO = Path(__file__).resolve().parents[1]


def launches(prof) -> int:
    """CUDA kernel launches (and copies) the host issued during ``prof``."""
    return sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key or "Memcpy" in e.key)


def sources(prof, op, steps, top=8) -> list[str]:
    """Calls of ``op`` per step, grouped by the innermost two Python frames outside PyTorch."""
    where = collections.Counter()
    for event in prof.events():
        if event.name == op:
            frames = [f.split("/")[-1] for f in event.stack if "torch/" not in f and "<built-in" not in f][:2]
            where[" <- ".join(frames) or "(autograd backward)"] += 1
    return [f"{op} {n / steps:.0f}/step from {place}" for place, n in where.most_common(top)]


def syncs(run, device) -> collections.Counter:
    """Host synchronisations during ``run()``, counted by the Python line that triggered them (CUDA only)."""
    if device.type != "cuda":
        return collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--modes", nargs="+", default=["plain", "recording", "guided_all", "guided_down_1"])
    parser.add_argument("--sources", nargs="*", default=[])
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--out")
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))
    import comfy.model_management as mm

    device = mm.get_torch_device()
    lines = []
    model, clip = sampling.load_random_sd15(args.checkpoint)
    with torch.inference_mode():
        pos, neg = sampling.comfy_models.paper_prompts(clip)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

        def run(mode):
            return sampling.run_mode(mode, model, clip, pos, neg, latent, args.steps, device)

        for mode in args.modes:
            run(mode)  # warm-up: model load, kernels, autotuning
            start = time.perf_counter()
            run(mode)
            wall = (time.perf_counter() - start) / args.steps
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            # Python frames reach the events only in verbose mode.
            verbose = torch._C._profiler._ExperimentalConfig(verbose=True)
            with profile(activities=activities, with_stack=bool(args.sources), experimental_config=verbose) as prof:
                run(mode)
            sync_lines = syncs(lambda: run(mode), device)
            summary = [f"## {mode}: {wall * 1e3:.1f} ms/step, {launches(prof) / args.steps:.0f} launches/step, "
                       f"{sum(sync_lines.values()) / args.steps:.1f} host syncs/step"]
            summary += [f"sync at {where}: {n}" for where, n in sync_lines.most_common(12)]
            summary += [line for op in args.sources for line in sources(prof, op, args.steps)]
            print("\n".join(summary), flush=True)
            lines += summary + [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                          max_name_column_width=48)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = f"{name}, torch {torch.__version__}, {args.size}², {args.steps} steps, euler, cfg 7, batch 1"
    text = "\n\n".join([header] + lines)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
