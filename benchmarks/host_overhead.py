"""Host overhead per sampling step: stock vs recording vs guided on SD1.5's layer structure at 32 channels.

On a GPU at SD sizes a step is bound by the host (Python and one dispatch per operator), not by arithmetic, so what
BiasMap adds there is its extra operators and Python. This runs SD1.5's every block and hook with little arithmetic
(``comfy_models.skeleton_sd15``, 64² image) on the CPU, the modes interleaved in each repeat, and reports the
milliseconds each mode adds to a stock KSampler step (median of the per-repeat differences). It is a proxy: on a
CPU the guided pass with all stages runs the two CFG branches as separate passes, where a GPU runs one batch.
``--cprofile MODE`` also lists where that mode's Python time goes. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/host_overhead.py [--steps 10] [--repeats 9] [--cprofile recording]
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
import comfy_models  # noqa: E402  (before ComfyUI: its root has a `tests` package of its own)

MODES = {"plain": None, "recording": {"scale": 0.0}, "guided_all": {"scale": 100.0},
         "guided_down_1": {"scale": 100.0, "guided_stages": ("down_1",)}}


def run(mode, model, clip, prompts, steps) -> float:
    """Seconds per step of one run, the node's whole work included (attribution encoding, trace)."""
    import nodes

    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import sample_with_scheduler, start_session

    pos, neg = prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    start = time.perf_counter()
    if MODES[mode] is None:
        nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
    else:
        session = start_session(model, clip, "A photo of the face of a doctor and gender", ["gender"], ["doctor"],
                                BiasMapSettings(**MODES[mode]))
        sample_with_scheduler(session, model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cprofile", choices=list(MODES))
    args = parser.parse_args()

    root = comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    times = {mode: [] for mode in MODES}
    with torch.inference_mode():
        model, clip = comfy_models.skeleton_sd15(0)
        prompts = comfy_models.paper_prompts(clip)
        for mode in MODES:  # warm-up
            run(mode, model, clip, prompts, 2)
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                times[mode].append(run(mode, model, clip, prompts, args.steps))
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.runcall(run, args.cprofile, model, clip, prompts, args.steps)
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, SD1.5 layer structure at 32 channels, "
          f"64² image, {args.steps} steps, euler, cfg 7; medians of {args.repeats} interleaved repeats\n")
    print("| mode | ms/step | ms/step over stock |")
    print("|---|--:|--:|")
    for mode, runs in times.items():
        extra = statistics.median(t - p for t, p in zip(runs, times["plain"]))
        print(f"| {mode} | {statistics.median(runs) * 1e3:.2f} | {extra * 1e3:+.2f} |")
    if args.cprofile:
        print(f"\n{args.cprofile}, cumulative time of BiasMap's functions over one run:\n")
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats("biasmap_engine", 25)


if __name__ == "__main__":
    main()
