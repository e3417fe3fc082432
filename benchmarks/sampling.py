"""Plain vs recording vs guided sampling on a random full-size SD1.5 checkpoint: seconds per step and peak memory.

Every size runs the modes side by side, interleaved within each repeat, and reports medians and ratios against the
stock KSampler (``nodes.common_ksampler``) of the same repeat. On the CPU the guided pass uses other kernels than
ComfyUI's defaults: PyTorch's SDPA attention (ComfyUI's CPU default is sub-quadratic attention) and the direct
convolution on grids of ≤ 8×8. The ``*_matched`` modes repeat the comparison with those kernels everywhere, so their
ratios show what guidance itself adds, and the others what a user sees. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sampling.py [--sizes 256 512] [--steps 4] [--repeats 3]
        [--checkpoint random_sd15.safetensors] [--out results.json]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from timing import median_seconds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
import comfy_models  # noqa: E402  (before ComfyUI: its root has a `tests` package of its own)

PROMPT = "A photo of the face of a doctor and gender"
MODES = {  # name → (BiasMap settings or None for the stock KSampler, kernels: ComfyUI's or the guided pass's)
    "plain": (None, "comfy"),
    "recording": ({"scale": 0.0}, "comfy"),
    "guided_all": ({"scale": 100.0}, "comfy"),
    "guided_down_1": ({"scale": 100.0, "guided_stages": ("down_1",)}, "comfy"),
    # Like for like on the CPU, where the guided pass's kernels are not ComfyUI's: what guidance itself adds.
    "plain_matched": (None, "matched"),
    "guided_all_matched": ({"scale": 100.0}, "matched"),
    "guided_down_1_matched": ({"scale": 100.0, "guided_stages": ("down_1",)}, "matched"),
}


class PeakMemory:
    """Peak device memory (CUDA allocator) or peak RSS (CPU, sampled every 5 ms), in MiB: in all and above entry."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc, self.base, self.peak, self.running = psutil.Process(), None, 0, True
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self.running = False
            self.thread.join()
            self.total = max(self.peak, self.proc.memory_info().rss) / 2 ** 20
        self.mib = self.total - self.base / 2 ** 20


def run_mode(name, model, clip, pos, neg, latent, steps, device):
    """One sampling run; → (seconds per step, peak extra MiB, peak total MiB, trace MiB, setup seconds)."""
    import nodes
    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import sample_with_scheduler, start_session

    from biasmap_engine.host.small_grid_conv import SmallGridConvolution

    settings, kernels = MODES[name]
    if kernels == "matched":
        model = with_sdpa_attention(model)
    trace_mib = setup = 0.0
    with PeakMemory(device) as mem, (SmallGridConvolution() if kernels == "matched" else contextlib.nullcontext()):
        start = time.perf_counter()
        if settings is None:
            out = nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)[0]
        else:  # the node's whole work: encoding the attribution prompt (setup), sampling, building the trace
            session = start_session(model, clip, PROMPT, ["gender"], ["doctor"], BiasMapSettings(**settings))
            setup = time.perf_counter() - start
            out, trace = sample_with_scheduler(session, model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
            trace_mib = sum(m.numel() * m.element_size() for m in trace.maps.values()) / 2 ** 20
        out["samples"].sum().item()  # wait for the device
        seconds = time.perf_counter() - start
    return seconds / steps, mem.mib, mem.total, trace_mib, setup


def seconds_per_step(engine, settings, model, clip, pos, neg, latent, steps):
    """Seconds per step of one run as the node makes it (attribution encoding and trace included), or of the stock
    KSampler (``settings`` None); ``engine`` is a ``(biasmap_engine, biasmap_engine.host)`` pair, of any checkout."""
    import nodes

    start = time.perf_counter()
    if settings is None:
        out = nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)[0]
    else:
        module, host = engine
        session = host.start_session(model, clip, PROMPT, ["gender"], ["doctor"], module.BiasMapSettings(**settings))
        out, _ = host.sample_with_scheduler(session, model, 0, steps, 7.0, "euler", "normal", pos, neg, latent)
    out["samples"].sum().item()  # wait for the device
    return (time.perf_counter() - start) / steps


def baseline(mode):
    """The stock run a mode is compared with: the same kernels everywhere."""
    return "plain_matched" if MODES[mode][1] == "matched" else "plain"


def load_random_sd15(path):
    """(MODEL, CLIP) of the random full-size SD1.5 checkpoint at ``path``, written first if missing."""
    import comfy.sd

    if not os.path.exists(path):
        print(f"writing a random full-size SD1.5 checkpoint to {path}", flush=True)
        # Under another name until whole: a process stopped while writing (a benchmark's time limit) leaves no half
        # file for the next one to load.
        partial = f"{path}.{os.getpid()}.partial"
        comfy_models.write_random_sd15_checkpoint(partial, "full", with_vae=False)
        os.replace(partial, path)
    with torch.inference_mode():  # as ComfyUI's loader node runs
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    return model, clip


def sdpa_attention(_func, *args, **kwargs):
    """An ``optimized_attention_override`` running ComfyUI's PyTorch SDPA path, the guided pass's kernel."""
    import comfy.ldm.modules.attention as attention

    return attention.attention_pytorch(*args, **kwargs)


def with_sdpa_attention(model):
    """A clone whose attention is ComfyUI's PyTorch SDPA path, as with ``--use-pytorch-cross-attention``."""
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa_attention
    return clone


def energy_share(device, batch=1, grid=64, tokens=12, repeats=5):
    """Seconds of soft top-k + SoftIoU (forward + backward, paper mode) on one evaluation's maps."""
    from biasmap_engine import entanglement_energy

    with torch.inference_mode(False), torch.enable_grad():
        maps = (torch.rand(batch, tokens, grid, grid, device=device) * 40).requires_grad_(True)
        return median_seconds(lambda: torch.autograd.grad(entanglement_energy(maps, [([8], [6])]).sum(), maps),
                              repeats, device=device.type)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--out")
    args = parser.parse_args()

    root = comfy_models.boot_comfy()
    # This checkout, not an installed copy of the pack; after ComfyUI's root, whose `nodes` must win over `nodes/`.
    sys.path.insert(sys.path.index(root) + 1, str(REPO))
    import comfy.model_management as mm

    device = mm.get_torch_device()
    rows = []
    model, clip = load_random_sd15(args.checkpoint)
    with torch.inference_mode():
        pos, neg = comfy_models.paper_prompts(clip)
        for size in args.sizes:
            latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
            run_mode("plain", model, clip, pos, neg, latent, 1, device)  # warm-up: model load, kernels
            modes = [m for m in MODES if MODES[m][1] == "comfy" or device.type == "cpu"]  # GPU: the same kernels
            results = {name: [] for name in modes}
            for _ in range(args.repeats):
                for name in modes:
                    results[name].append(run_mode(name, model, clip, pos, neg, latent, args.steps, device))
            for name, runs in results.items():
                plain = [r[0] for r in results[baseline(name)]]
                rows.append({"size": size, "mode": name, "baseline": baseline(name),
                             "s_per_step": statistics.median(r[0] for r in runs),
                             "ratio": statistics.median(r[0] / p for r, p in zip(runs, plain)),
                             "peak_extra_mib": statistics.median(r[1] for r in runs),
                             "peak_total_mib": statistics.median(r[2] for r in runs),
                             "trace_mib": runs[-1][3], "setup_s": statistics.median(r[4] for r in runs)})
            guided = next(r for r in rows if r["size"] == size and r["mode"] == "guided_all")
            guided["energy_share"] = energy_share(device, grid=size // 8) / guided["s_per_step"]
            print(json.dumps(rows[-len(modes):]), flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, random full-size SD1.5 ({args.steps} steps, euler, cfg 7, batch 1), "
          f"median of {args.repeats}\n")
    print("| size | mode | s/step | × baseline | baseline | of which setup (s) | peak memory, MiB (× baseline) "
          "| above the loaded model, MiB | trace (MiB) |")
    print("|---|---|--:|--:|---|--:|--:|--:|--:|")
    plain = {(r["size"], r["mode"]): r for r in rows}
    for r in rows:
        ratio = r["peak_total_mib"] / plain[r["size"], r["baseline"]]["peak_total_mib"]
        print(f"| {r['size']}² | {r['mode']} | {r['s_per_step']:.3f} | {r['ratio']:.2f} | {r['baseline']} "
              f"| {r['setup_s']:.3f} | {r['peak_total_mib']:.0f} ({ratio:.2f}×) | {r['peak_extra_mib']:.0f} "
              f"| {r['trace_mib']:.1f} |")
    for r in rows:
        if "energy_share" in r:
            print(f"\nsoft top-k + SoftIoU at {r['size']}²: {100 * r['energy_share']:.1f} % of a guided step")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
