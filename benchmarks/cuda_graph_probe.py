"""Would a CUDA graph meet the GPU time targets? One sampler evaluation per mode, eager against replayed as a graph.

On an H200 at 512² a stock step takes ~27 ms of which its kernels run ~12 ms, and a guided step (all stages) ~97 ms
of which they run ~29 ms (docs/results/h200-profile-512-run5.txt): both are bound by the host's launches. Replaying
the evaluation's kernels from a captured graph removes that host time. This probe measures what is left: one model
evaluation at the first σ of a schedule, as the sampler makes it (CFG, BiasMap's wrappers, the guided pass and its
backward, the update), timed eagerly and, on CUDA, captured once (``torch.cuda.graph``, after warm-up on a side
stream) and replayed. It also reports where an eager evaluation first synchronises with the host (a synchronisation
stops a capture; not every call a capture refuses is one), the graph pool's size, and how far a replay's output is
from an eager one's on the same input, beside how far two eager evaluations are apart (attention's backward need not
be deterministic).

A replay runs kernels only: BiasMap's Python bookkeeping (the trace, the guidance counts) is not redone, so a replayed
evaluation's maps and counts are not recorded. What this measures is the time a graph-based guided pass could reach,
not a product path. Each mode runs in a process of its own, since a failed capture can leave PyTorch's allocator
(and the rest of a process) in a state that would distort the next mode's figures. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cuda_graph_probe.py [--size 512] [--repeats 20]
        [--modes plain recording guided_down_1 guided_all] [--checkpoint …] [--skeleton] [--budget-s 240]
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import sampling  # this folder: the modes, the random checkpoint
from timing import median_seconds

REPO = Path(__file__).resolve().parents[1]
_ROW = "PROBE ROW "  # how a mode's process hands its figures back
_SMALLEST_SHARE_S = 30.0  # a mode's process: start, ComfyUI, the checkpoint and the evaluations, on an H200


class _Probed(Exception):
    """Raised by the probe once it has measured, so that the run ends there: a trace of the probe's evaluations,
    some of them begun inside a failed capture and never ended, is not one to build."""


def median_ms(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, each waited for on CUDA (the callers warm up)."""
    return median_seconds(fn, repeats, warmup=0, device="cuda" if cuda else "cpu") * 1e3


def described(err: BaseException) -> str:
    """The error that started ``err``'s chain (a failed capture raises again when it ends), with the first line of
    code outside PyTorch where it was raised."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}{where}: {(str(err).splitlines() or [''])[0][:160]}"


def first_sync(evaluate) -> str:
    """Where an eager evaluation first synchronises with the host (CUDA's sync debug mode), or "none"."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        evaluate()
        return "none"
    except RuntimeError as err:
        return described(err)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a − b| over the largest |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def free_memory_as_first_asked():
    """ComfyUI's ``get_free_memory`` answering each question as it first did: each evaluation asks it how many CFG
    entries to batch, and on CUDA it asks the driver (``cudaMemGetInfo``), a call that a stream capture may refuse.
    Asked first in the warm-ups, which ask what the capture asks (a question first asked in the capture would still
    reach the driver: relaxed mode lets it); host-side bookkeeping that a replay would not redo anyway."""
    import comfy.model_management as mm

    asked, first = mm.get_free_memory, {}

    def as_first_asked(dev=None, torch_free_too=False):
        key = (str(dev), torch_free_too)
        if key not in first:
            first[key] = asked(dev, torch_free_too)
        return first[key]

    mm.get_free_memory = as_first_asked
    try:
        yield
    finally:
        mm.get_free_memory = asked


def graphed(evaluate, repeats: int) -> dict:
    """Capture ``evaluate`` (three warm-ups on a side stream first, as PyTorch's whole-network example does) and time
    its replays; → replay ms, the graph pool's MiB, how far a replay's output is from the last eager one's.

    The capture is in CUDA's relaxed mode, which refuses what cannot be captured (a synchronisation) but not the
    driver calls PyTorch's default mode refuses as potentially unsafe: a call ComfyUI makes that way would then run at
    capture only, so the replay's output is compared with an eager one's.
    """
    with free_memory_as_first_asked():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                evaluate()
        torch.cuda.current_stream().wait_stream(side)
        eager_out = evaluate().clone()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as the capture does when it starts: what it reserves after is the graph's pool
        reserved = torch.cuda.memory_reserved()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, capture_error_mode="relaxed"):
                static_out = evaluate()
        finally:  # a capture that fails leaves its own stream current
            torch.cuda.set_stream(stream)
    pool_mib = (torch.cuda.memory_reserved() - reserved) / 2 ** 20
    graph.replay()
    torch.cuda.synchronize()
    difference = relative_difference(static_out, eager_out)
    return {"replay_ms": median_ms(graph.replay, repeats, cuda=True), "pool_mib": pool_mib,
            "replay_difference": difference}


def probe_sampler(results: dict, repeats: int, cuda: bool):
    """A KSAMPLER function that probes the model at the schedule's first σ, then ends the run (:class:`_Probed`)."""

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        static_x, sigma = x.clone(), sigmas[0] * x.new_ones([x.shape[0]])

        def evaluate():
            return model(static_x, sigma, **extra_args)

        first = evaluate().clone()  # also the warm-up of the eager timing
        results["eager_difference"] = relative_difference(evaluate(), first)
        results["eager_ms"] = median_ms(evaluate, repeats, cuda)
        if cuda:
            results["first_sync"] = first_sync(evaluate)
            try:
                results.update(graphed(evaluate, repeats))
            except Exception as err:  # noqa: BLE001 (the probe reports why a capture failed, whatever it was)
                results["capture_error"] = described(err)
        raise _Probed

    return probe


def run_mode(mode, model, clip, pos, neg, latent, sigmas, repeats, cuda) -> dict:
    """Probe one of ``sampling.MODES`` ("comfy" kernels): the stock CFG guider or a BiasMap session's."""
    import comfy.samplers
    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import sample_with_sampler, start_session

    settings, _ = sampling.MODES[mode]
    results = {}
    sampler = comfy.samplers.KSAMPLER(probe_sampler(results, repeats, cuda))
    try:
        if settings is None:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(pos, neg)
            guider.set_cfg(7.0)
            guider.sample(torch.randn_like(latent["samples"]), latent["samples"], sampler, sigmas, seed=0)
        else:
            session = start_session(model, clip, sampling.PROMPT, ["gender"], ["doctor"],
                                    BiasMapSettings(**settings))
            sample_with_sampler(session, model, 0, 7.0, sampler, sigmas, pos, neg, latent)
    except _Probed:
        pass
    except Exception as err:  # noqa: BLE001 (what was measured before the error is still reported)
        results["error"] = described(err)
    return results


def probe_one(args) -> None:
    """This process's mode: its figures as one JSON line on stdout."""
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
    with torch.inference_mode():  # as ComfyUI's executor runs a node
        pos, neg = sampling.comfy_models.paper_prompts(clip)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)[:2]
        row = run_mode(args.one, model, clip, pos, neg, latent, sigmas, args.repeats, cuda)
    row["device"] = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    row["torch"] = torch.__version__
    print("\n" + _ROW + json.dumps(row), flush=True)  # on a line of its own, whatever was printed before


def probe_apart(mode: str, args, seconds: float) -> dict:
    """``mode`` probed in a process of its own, given at most ``seconds``."""
    command = [sys.executable, __file__, "--one", mode, "--size", str(args.size), "--repeats", str(args.repeats),
               "--checkpoint", args.checkpoint] + (["--skeleton"] if args.skeleton else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=seconds)
    except subprocess.TimeoutExpired as timed_out:  # its output is bytes, whatever text says
        return {"error": f"no answer within {seconds:.0f} s; last said: {_last_line(timed_out.stderr)}"}
    rows = [line[len(_ROW):] for line in done.stdout.splitlines() if line.startswith(_ROW)]
    try:
        return json.loads(rows[-1])
    except (IndexError, ValueError):
        return {"error": f"exit {done.returncode}: {_last_line(done.stderr)}"}


def _last_line(output) -> str:
    """The last line of a process's output that says something."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    lines = [line for line in (output or "").splitlines() if line.strip()]
    return lines[-1][:160] if lines else "nothing"


def table(rows: dict, args) -> str:
    """The figures as a Markdown table, against the stock evaluation's eager time."""
    first = next((row for row in rows.values() if "device" in row), {})
    what = "SD1.5's layer structure at 32 channels" if args.skeleton else "random full-size SD1.5"
    lines = [f"{first.get('device', '?')}, torch {first.get('torch', '?')}, {what} at {args.size}², one evaluation at "
             f"the first σ of 20 (normal), cfg 7, batch 1; medians of {args.repeats}, each mode in a process of its "
             f"own", "",
             "| mode | eager ms | × stock eager | replayed ms | × stock eager | graph pool MiB | replay vs eager | "
             "eager vs eager | first host sync |", "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    plain = rows.get("plain", {}).get("eager_ms")

    def cell(row, key, form):
        return format(row[key], form) if key in row else ""

    for mode, row in rows.items():
        ratio = lambda key: f"{row[key] / plain:.2f}" if key in row and plain else ""  # noqa: E731
        lines.append(f"| {mode} | {cell(row, 'eager_ms', '.1f')} | {ratio('eager_ms')} | "
                     f"{cell(row, 'replay_ms', '.1f')} | {ratio('replay_ms')} | {cell(row, 'pool_mib', '.0f')} | "
                     f"{cell(row, 'replay_difference', '.1e')} | {cell(row, 'eager_difference', '.1e')} | "
                     f"{row.get('first_sync', 'needs CUDA' if 'eager_ms' in row else '')} |")
    for mode, row in rows.items():
        lines += [f"{mode}: {key.replace('_', ' ')}: {row[key]}" for key in ("capture_error", "error") if key in row]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["plain", "recording", "guided_down_1", "guided_all"])
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--skeleton", action="store_true", help="SD1.5's layers at 32 channels (host cost only)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="all modes' time together, at most")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the mode of a probing process
    args = parser.parse_args()
    if args.one:
        probe_one(args)
        return
    start, rows = time.perf_counter(), {}
    for i, mode in enumerate(args.modes):
        left, after = args.budget_s - (time.perf_counter() - start), len(args.modes) - i - 1
        # An even share at least, and what the modes after it will not need at their smallest share.
        seconds = max(left / (after + 1), left - _SMALLEST_SHARE_S * after)
        rows[mode] = probe_apart(mode, args, seconds) if seconds > 5 else {"error": "no time left"}
        print(f"{mode}: {rows[mode]}", flush=True)
    print("\n" + table(rows, args))


if __name__ == "__main__":
    main()
