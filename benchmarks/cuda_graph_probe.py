"""Would a CUDA graph meet the GPU time targets? One sampler evaluation per mode, eager against replayed as a graph.

On an H200 at 512² a stock step takes ~27 ms of which its kernels run ~12 ms, and a guided step (all stages) ~97 ms
of which they run ~29 ms (docs/results/h200-profile-512-run5.txt): both are bound by the host's launches. Replaying
the evaluation's kernels from a captured graph removes that host time. This probe measures what is left: one model
evaluation at the first σ of a schedule, as the sampler makes it (CFG, BiasMap's wrappers, the guided pass and its
backward, the update), timed eagerly and, on CUDA, captured once (``torch.cuda.graph``, after warm-up on a side
stream) and replayed. It also reports the host synchronisations an eager evaluation makes (any of them stops a
capture) and how far a replay's output is from the eager one's on the same input.

A replay runs kernels only: BiasMap's Python bookkeeping (the trace, the guidance counts) is not redone, so a replayed
evaluation's maps and counts are not recorded. What this measures is the time a graph-based guided pass could reach,
not a product path. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cuda_graph_probe.py [--size 512] [--repeats 20]
        [--modes plain recording guided_all guided_down_1] [--checkpoint …] [--skeleton]
"""

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import sampling  # this folder: the modes, the random checkpoint

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, each waited for on CUDA."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def first_sync(evaluate) -> str:
    """Where an eager evaluation first synchronises with the host (CUDA's sync debug mode), or "none"."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        evaluate()
        return "none"
    except RuntimeError as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return f"{where} ({str(err).splitlines()[0][:80]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graphed(evaluate, eager_out: torch.Tensor, repeats: int) -> dict:
    """Capture ``evaluate`` (three warm-ups on a side stream first, as PyTorch's whole-network example does) and time
    its replays; → replay ms, the graph pool's MiB, the replay's largest difference from ``eager_out``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            evaluate()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = evaluate()
    pool_mib = (torch.cuda.memory_reserved() - reserved) / 2 ** 20
    graph.replay()
    torch.cuda.synchronize()
    scale = eager_out.abs().max().clamp_min(1e-30)
    difference = ((static_out - eager_out).abs().max() / scale).item()
    replay_ms = median_ms(graph.replay, repeats, cuda=True)
    del graph
    return {"replay_ms": replay_ms, "pool_mib": pool_mib, "relative_difference": difference}


def probe_sampler(results: dict, repeats: int, cuda: bool):
    """A KSAMPLER function that probes the model at the schedule's first σ and leaves the latent as it is."""

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        static_x, sigma = x.clone(), sigmas[0] * x.new_ones([x.shape[0]])

        def evaluate():
            return model(static_x, sigma, **extra_args)

        eager_out = evaluate().clone()  # also the warm-up of the eager timing
        results["eager_ms"] = median_ms(evaluate, repeats, cuda)
        if cuda:
            results["first_sync"] = first_sync(evaluate)
            try:
                results.update(graphed(evaluate, eager_out, repeats))
            except Exception as err:  # noqa: BLE001 (the probe reports why a capture failed, whatever it was)
                results["capture_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return x

    return probe


def run_mode(mode, model, clip, pos, neg, latent, sigmas, repeats, cuda) -> dict:
    """Probe one of ``sampling.MODES`` ("comfy" kernels): the stock CFG guider or a BiasMap session's."""
    import comfy.samplers
    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import sample_with_sampler, start_session

    settings, _ = sampling.MODES[mode]
    results = {}
    sampler = comfy.samplers.KSAMPLER(probe_sampler(results, repeats, cuda))
    if settings is None:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(7.0)
        guider.sample(torch.randn_like(latent["samples"]), latent["samples"], sampler, sigmas, seed=0)
    else:
        session = start_session(model, clip, sampling.PROMPT, ["gender"], ["doctor"], BiasMapSettings(**settings))
        sample_with_sampler(session, model, 0, 7.0, sampler, sigmas, pos, neg, latent)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["plain", "recording", "guided_down_1", "guided_all"])
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--skeleton", action="store_true", help="SD1.5's layers at 32 channels (host cost only)")
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))
    import comfy.model_management as mm
    import comfy.samplers

    cuda = mm.get_torch_device().type == "cuda"
    if args.skeleton:
        with torch.inference_mode():
            model, clip = sampling.comfy_models.skeleton_sd15(0)
    else:
        model, clip = sampling.load_random_sd15(args.checkpoint)
    rows = {}
    with torch.inference_mode():  # as ComfyUI's executor runs a node
        pos, neg = sampling.comfy_models.paper_prompts(clip)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[:2]
        for mode in args.modes:
            try:
                rows[mode] = run_mode(mode, model, clip, pos, neg, latent, sigmas, args.repeats, cuda)
            except Exception as err:  # noqa: BLE001 (a mode that fails is reported; the others still run)
                rows[mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            print(f"{mode}: {rows[mode]}", flush=True)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    what = "SD1.5's layer structure at 32 channels" if args.skeleton else "random full-size SD1.5"
    print(f"\n{name}, torch {torch.__version__}, {what} at {args.size}², one evaluation at the first σ of 20 "
          f"(normal), cfg 7, batch 1; medians of {args.repeats}\n")
    plain = rows.get("plain", {}).get("eager_ms")
    print("| mode | eager ms | × stock eager | replayed ms | × stock eager | graph pool MiB | replay vs eager | "
          "first host sync |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    for mode, row in rows.items():
        eager, replay = row.get("eager_ms"), row.get("replay_ms")
        ratio = lambda ms: f"{ms / plain:.2f}" if ms and plain else ""  # noqa: E731
        cells = [f"{eager:.1f}" if eager else "", ratio(eager), f"{replay:.1f}" if replay else "", ratio(replay),
                 f"{row['pool_mib']:.0f}" if "pool_mib" in row else "",
                 f"{row['relative_difference']:.1e}" if "relative_difference" in row else "",
                 row.get("first_sync", "needs CUDA")]
        print(f"| {mode} | " + " | ".join(cells) + " |")
        for key in ("capture_error", "error"):
            if key in row:
                print(f"  {mode}: {key.replace('_', ' ')}: {row[key]}")


if __name__ == "__main__":
    main()
