"""Two versions of the pack side by side in one process: seconds per step of each mode, interleaved per repeat.

On a launch-bound GPU, and on shared machines, step times drift between processes by more than the difference
between two versions of the pack. Here this checkout and another one (e.g. a ``git worktree`` of an older commit)
run in one process on one loaded model, alternating which goes first, each repeat against its own stock KSampler
run. ``--skeleton`` runs SD1.5's layer structure at 32 channels on a 64² image instead (``comfy_models.skeleton_sd15``,
as ``host_overhead.py`` does): a step's time is then Python and dispatch, what bounds a GPU at SD sizes; with
``--weight-dtype float16`` its weights are stored in fp16 and computed in fp32, so ComfyUI casts them as layers run and
guided passes cast them again (``cast_weights.py``). Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/ab_sampling.py OTHER_CHECKOUT [--size 512] [--steps 20]
        [--repeats 7] [--checkpoint random_sd15.safetensors] [--skeleton [--weight-dtype float16]]
"""

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import sampling  # this folder: the modes, one timed run and the checkpoint writer

REPO = Path(__file__).resolve().parents[1]


def load_engine(checkout: Path, name: str):
    """A checkout's ``biasmap_engine`` imported under ``name``; → (engine, engine.host)."""
    root = checkout / "biasmap_engine"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, importlib.import_module(f"{name}.host")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--skeleton", action="store_true", help="SD1.5's layers at 32 channels, 64² (host cost)")
    parser.add_argument("--weight-dtype", default="float32",
                        help="the skeleton's weights stored in this dtype and computed in fp32 (ComfyUI casts them)")
    args = parser.parse_args()
    if args.skeleton:
        args.size = 64

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))
    engines = {"this": load_engine(REPO, "biasmap_engine"), "other": load_engine(args.other.resolve(), "biasmap_other")}
    modes = [m for m, (settings, kernels) in sampling.MODES.items() if settings is not None and kernels == "comfy"]
    plains, ratios = [], {(mode, version): [] for mode in modes for version in engines}
    if args.skeleton:
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False  # a bar's redraw is a visible share of a ~30 ms step
        with torch.inference_mode():
            model, clip = sampling.comfy_models.skeleton_sd15(0, getattr(torch, args.weight_dtype),
                                                              compute_dtype=torch.float32)
    else:
        model, clip = sampling.load_random_sd15(args.checkpoint)
    with torch.inference_mode():
        pos, neg = sampling.comfy_models.paper_prompts(clip)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        run = lambda version, settings, steps: sampling.seconds_per_step(engines[version], settings, model, clip,
                                                                         pos, neg, latent, steps)
        for version in engines:  # warm-up: model load, kernels, autotuning
            run(version, sampling.MODES["guided_all"][0], 1)
        for repeat in range(args.repeats):
            plains.append(run("this", None, args.steps))
            order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
            for mode in modes:
                for version in order:
                    ratios[mode, version].append(run(version, sampling.MODES[mode][0], args.steps) / plains[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    what = (f"SD1.5's layer structure at 32 channels, stored in {args.weight_dtype}" if args.skeleton
            else "random full-size SD1.5")
    commits = {name: subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "?" for name, path in (("this", REPO),
                                                                                        ("other", args.other))}
    print(f"\n{device}, torch {torch.__version__}, {what} at {args.size}² ({args.steps} steps, euler, "
          f"cfg 7, batch 1); this checkout ({commits['this']}, and what is not committed) vs {args.other} "
          f"({commits['other']}); medians of {args.repeats} interleaved repeats\n")
    print(f"stock KSampler: {statistics.median(plains) * 1e3:.1f} ms/step (median)\n")
    print("| mode | this × stock | other × stock | this / other |")
    print("|---|--:|--:|--:|")
    for mode in modes:
        this, other = ratios[mode, "this"], ratios[mode, "other"]
        print(f"| {mode} | {statistics.median(this):.2f} | {statistics.median(other):.2f} "
              f"| {statistics.median(a / b for a, b in zip(this, other)):.2f} |")


if __name__ == "__main__":
    main()
