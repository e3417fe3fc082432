"""What autograd keeps for a guided U-Net pass, with and without ``LeanBackward``, and what it costs in time.

The latent is the only leaf that takes a gradient, as in the guided pass (PyTorch SDPA attention); the tensors
autograd keeps until the backward are counted once per storage, weights left out. Batch 2 is one CFG batch (a GPU's
guided pass), batch 1 one branch (a CPU's). On CUDA also the pass's peak allocated memory above the loaded model.
Time: forward + backward with ``LeanBackward`` against without, the two alternating (median of the ratios). The last
row runs SD1.5's layer structure at 32 channels (``comfy_models.skeleton_sd15``), where a pass costs its Python and
per-operator dispatch, what bounds a GPU at SD sizes: there the difference in milliseconds is the host cost of the
hooks and the recomputation. Runs on ComfyUI's device, in its dtype for the model there. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/lean_backward.py [--sizes 256 512] [--pairs 5]
"""

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import median_ratio

import sampling  # this folder: the checkpoint and the SDPA override (it puts tests/support on the path)

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--pairs", type=int, default=5, help="alternating pairs for the time ratio")
    parser.add_argument("--skeleton-pairs", type=int, default=41)
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.model_management as mm

    from biasmap_engine.host import deinference_
    from biasmap_engine.host import lean_backward
    from biasmap_engine.host.lean_backward import LeanBackward

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    options = {"optimized_attention_override": sampling.sdpa_attention}

    class Pass:
        """Forward + backward of one U-Net on ``device``, plain or lean, counting what autograd keeps."""

        def __init__(self, model, clip):
            # Loaded in inference mode as ComfyUI's sampler loads it: a model made in inference mode and moved to
            # the GPU outside it keeps weights without version counters, which neither autograd nor ComfyUI's own
            # inference-mode sampling can use (both fail on them; tried on a CPU with a dtype round trip).
            with torch.inference_mode():
                context = clip.encode_from_tokens_scheduled(clip.tokenize("A photo of a doctor"))[0][0]
                mm.load_models_gpu([model])
            self.unet = model.model.diffusion_model
            deinference_(self.unet)
            self.dtype = model.model.get_dtype()
            self.context = context.to(device, self.dtype)
            self.norms = [m for m in self.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
            self.weights = {p.untyped_storage().data_ptr() for p in self.unet.parameters()}

        def run(self, batch, latent, lean, kept=None):
            hooks = LeanBackward(self.norms) if lean else torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                                                  lambda t: t)
            if kept is not None:  # count what the chosen hooks keep as tensors, by the operator that made them
                pack = hooks.pack_hook

                def counted(tensor):
                    packed = pack(tensor)
                    if isinstance(packed, torch.Tensor) or isinstance(packed, lean_backward._Kept):
                        node = (tensor if tensor._base is None else tensor._base).grad_fn
                        kept[tensor.untyped_storage().data_ptr()] = (tensor.untyped_storage().nbytes(),
                                                                     type(node).__name__ if node else "leaf")
                    return packed
                hooks.pack_hook = counted
            x = torch.randn(batch, 4, latent, latent, device=device, dtype=self.dtype, requires_grad=True)
            with torch.enable_grad():
                with hooks:
                    out = self.unet(x, torch.full((batch,), 500.0, device=device), self.context.repeat(batch, 1, 1),
                                    transformer_options=dict(options))
                torch.autograd.grad(out, x, torch.ones_like(out))
            if cuda:
                torch.cuda.synchronize()

        def kept(self, batch, latent, lean):
            """(MiB kept, {producing operator: share}, peak MiB allocated above the model or None off CUDA)."""
            kept = {}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            self.run(batch, latent, lean, kept)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
            kept = [value for ptr, value in kept.items() if ptr not in self.weights]
            total = sum(n for n, _ in kept)
            shares = collections.Counter()
            for n, producer in kept:
                shares[producer] += n / total
            return total / 2**20, shares, peak

    def mib(value):
        return f"{value:.0f} MiB" if value is not None else ""

    model, clip = sampling.load_random_sd15(args.checkpoint)
    full = Pass(model, clip)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, random SD1.5 U-Nets in {full.dtype}\n")
    print("| model, size | batch | kept, plain | kept, lean | lean ÷ plain | peak above the model, plain / lean "
          "| fwd + bwd time, lean ÷ plain |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for size in args.sizes:
        for batch in (1, 2):
            plain, by_producer, plain_peak = full.kept(batch, size // 8, False)
            lean, _, lean_peak = full.kept(batch, size // 8, True)
            ratio = median_ratio(lambda: full.run(batch, size // 8, True), lambda: full.run(batch, size // 8, False),
                                 args.pairs)
            peaks = f"{mib(plain_peak)} / {mib(lean_peak)}" if cuda else ""
            print(f"| full, {size}² | {batch} | {mib(plain)} | {mib(lean)} | {lean / plain:.2f} | {peaks} "
                  f"| {ratio:.2f}× |", flush=True)
    del model, clip, full
    mm.unload_all_models()

    with torch.inference_mode():  # built as ComfyUI's loaders build models
        skeleton = sampling.comfy_models.skeleton_sd15(0, device=device)
    skeleton = Pass(*skeleton)
    for _ in range(3):
        skeleton.run(2, 8, True), skeleton.run(2, 8, False)
    extra, plain_times = [], []
    for i in range(args.skeleton_pairs):
        times = {}
        for lean in ((True, False) if i % 2 == 0 else (False, True)):
            start = time.perf_counter()
            skeleton.run(2, 8, lean)
            times[lean] = time.perf_counter() - start
        extra.append(times[True] - times[False])
        plain_times.append(times[False])
    plain_pass, added = statistics.median(plain_times), statistics.median(extra)
    print(f"| skeleton (32 channels), 64² | 2 | | | | | {(plain_pass + added) / plain_pass:.2f}×: "
          f"{added * 1e3:+.2f} ms on {plain_pass * 1e3:.1f} ms |")
    shares = ", ".join(f"{name} {share:.0%}" for name, share in by_producer.most_common())
    print(f"\nKept by plain autograd at {size}², batch 2, by the operator that made it: {shares}")


if __name__ == "__main__":
    main()
