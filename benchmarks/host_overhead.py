"""Host overhead per sampling step: stock vs recording vs guided on SD1.5's layer structure at 32 channels.

On a GPU at SD sizes a step is bound by the host (Python and one dispatch per operator), not by arithmetic, so what
BiasMap adds there is its extra operators and Python. This runs SD1.5's every block and hook with little arithmetic
(``comfy_models.skeleton_sd15``, 64² image) on the CPU, the modes interleaved in each repeat, and reports the
milliseconds each mode adds to a stock KSampler step (median of the per-repeat differences). It is a proxy: on a
CPU the guided pass with all stages runs the two CFG branches as separate passes, where a GPU runs one batch.
``--batched`` runs guided evaluations as a GPU does (one batch of both CFG branches with autograd), so the figures
stand for a GPU's host cost. ``--cprofile MODE`` also lists where that mode's Python time goes. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/host_overhead.py [--steps 10] [--repeats 9] [--batched]
        [--cprofile recording]
"""

import argparse
import cProfile
import pstats
import statistics
import sys

import torch

import sampling  # this folder: the modes and one timed run (it puts tests/support on the path)

MODES = [mode for mode, (settings, kernels) in sampling.MODES.items() if kernels == "comfy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cprofile", choices=MODES)
    parser.add_argument("--batched", action="store_true", help="one CFG batch per guided evaluation, as on a GPU")
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(sampling.REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.utils

    import biasmap_engine
    import biasmap_engine.host

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.batched:
        biasmap_engine.host.session._branches_apart = lambda device: False
    engine = (biasmap_engine, biasmap_engine.host)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(mode, steps):
        return sampling.seconds_per_step(engine, sampling.MODES[mode][0], model, clip, *prompts, latent, steps)

    times = {mode: [] for mode in MODES}
    with torch.inference_mode():
        model, clip = sampling.comfy_models.skeleton_sd15(0)
        prompts = sampling.comfy_models.paper_prompts(clip)
        for mode in MODES:  # warm-up
            run(mode, 2)
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                times[mode].append(run(mode, args.steps))
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.runcall(run, args.cprofile, args.steps)
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, SD1.5 layer structure at 32 channels, "
          f"64² image, {args.steps} steps, euler, cfg 7; medians of {args.repeats} interleaved repeats"
          f"{'; guided evaluations as one CFG batch (a GPU' + chr(39) + 's rule)' if args.batched else ''}\n")
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
