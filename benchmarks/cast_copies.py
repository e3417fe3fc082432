"""Weight copies a guided pass keeps for its backward where ComfyUI casts weights as layers run, kept or cast again.

A model whose weights are stored in another dtype than it computes in (manual cast: fp16 or fp8 weights computed in fp32
on a CPU, fp8 in fp16 or bf16 on a GPU) or that is partly loaded (low VRAM) computes each layer with a copy of its
weight. ``cast_weights.CastCopies`` keeps those copies for the backward as recipes, cast again when read. This loads the
random full-size SD1.5 checkpoint with its weights stored in ``--weight-dtype`` and runs guided steps (all stages, batch
1) with the copies kept (as autograd would) and cast again, whatever ``worth_casting_again`` would pick (it says last
what it picks here): the bytes of weight copies and of activations a guided pass keeps for its backward (on CUDA also
the peak memory of a guided run), and seconds per step of the stock KSampler, the guided sampler without ``CastCopies``
(as before it) and with it, side by side (medians of interleaved repeats), on the same model. ``--skeleton`` runs
SD1.5's layer structure at 32 channels instead (``comfy_models.skeleton_sd15``, its weights stored in
``--weight-dtype`` and computed in fp32), each guided evaluation one batch of both CFG branches as on a GPU: a step's
Python and per-operator cost, what the casts cost a launch-bound GPU. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cast_copies.py [--sizes 256 512] [--weight-dtype float16]
        [--skeleton --sizes 64 --steps 10 --repeats 15]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import sampling  # this folder: the checkpoint and the prompts (it puts tests/support on the path)

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--weight-dtype", default="float16", help="float16, bfloat16 or float8_e4m3fn")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    parser.add_argument("--skeleton", action="store_true", help="SD1.5's layers at 32 channels, batched as a GPU")
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import nodes

    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import cast_weights, guided_backward, lean_backward, sample_with_scheduler, start_session
    from biasmap_engine.host import session as host_session

    comfy.utils.PROGRESS_BAR_ENABLED = False
    with torch.inference_mode():
        if args.skeleton:
            host_session._branches_apart = lambda device: False  # one batched CFG pass with autograd, as on a GPU
            model, clip = sampling.comfy_models.skeleton_sd15(0, getattr(torch, args.weight_dtype),
                                                              compute_dtype=torch.float32)
        else:
            sampling.load_random_sd15(args.checkpoint)  # written if missing
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
                args.checkpoint, output_vae=False, output_clip=True,
                model_options={"dtype": getattr(torch, args.weight_dtype)})
        pos, neg = (clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in ("A photo of the face of a doctor", ""))
    computes_in = model.model.manual_cast_dtype or model.model.get_dtype()
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    passes = []  # each guided pass's {storage: (bytes, "weight copies" or "activations")}

    class Counted(lean_backward.LeanBackward):
        def __init__(self, *args):
            super().__init__(*args)
            passes.append({})

        def _pack(self, tensor):
            packed = super()._pack(tensor)
            if isinstance(packed, lean_backward._Kept):
                base = tensor if tensor._base is None else tensor._base
                kind = ("activations" if tensor.grad_fn is not None else
                        "weight copies" if self._casts is not None and self._casts.layer_of(base) is not None else None)
                if kind:
                    storage = tensor.untyped_storage()
                    passes[-1][storage.data_ptr()] = (storage.nbytes(), kind)
            return packed

    guided_backward.LeanBackward = Counted
    recipe, layers = cast_weights.CastCopies.recipe, guided_backward.cast_layers
    guided_backward.worth_casting_again = lambda *args: True  # both measured; what the rule picks is printed last

    def run(cast_again, size, counting=False):
        """Seconds per step and, ``counting``, MiB kept a pass: the stock KSampler (``cast_again`` None), guided
        without CastCopies (False; counting: with its notes but no recipes) or with it (True)."""
        cast_weights.CastCopies.recipe = recipe if cast_again or not counting else (lambda self, tensor: None)
        guided_backward.cast_layers = layers if cast_again or counting else (lambda *args: [])
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        passes.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        if cast_again is None:
            out = nodes.common_ksampler(model, 0, args.steps, 7.0, "euler", "normal", pos, neg, latent)[0]
        else:
            session = start_session(model, clip, sampling.PROMPT, ["gender"], ["doctor"], BiasMapSettings(scale=100.0))
            out, _ = sample_with_scheduler(session, model, 0, args.steps, 7.0, "euler", "normal", pos, neg, latent)
        out["samples"].sum().item()  # wait for the device
        seconds = (time.perf_counter() - start) / args.steps
        mib = {kind: statistics.median(sum(n for n, k in kept.values() if k == kind) / 2 ** 20 for kept in passes)
               for kind in ("weight copies", "activations")} if counting else None
        if counting and cuda:
            mib["peak"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return seconds, mib

    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    model_name = "SD1.5's layers at 32 channels, batched as a GPU," if args.skeleton else "random full-size SD1.5"
    print(f"{where}, torch {torch.__version__}; {model_name} stored in {args.weight_dtype}, computed in "
          f"{str(computes_in).removeprefix('torch.')}; euler, cfg 7, {args.steps} steps, guided all stages, λ 100; "
          f"medians of {args.repeats} interleaved repeats\n")
    unit, scale = ("ms", 1e3) if args.skeleton else ("s", 1.0)
    print(f"| size | kept a pass: weight copies, kept → cast again | activations | {unit}/step: stock | guided, before "
          "| guided, cast again | cast again ÷ before |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for size in args.sizes:
        kept_mib = {variant: run(variant, size, counting=True)[1] for variant in (False, True)}  # also a warm-up
        peaks = (f"; peak above the loaded model {kept_mib[False]['peak']:.0f} → {kept_mib[True]['peak']:.0f} MiB"
                 if cuda else "")
        times = {None: [], False: [], True: []}
        for i in range(args.repeats):
            for variant in ((None, False, True) if i % 2 == 0 else (True, False, None)):
                times[variant].append(run(variant, size)[0])
        s = {variant: statistics.median(t) * scale for variant, t in times.items()}
        print(f"| {size}² | {kept_mib[False]['weight copies']:.0f} → {kept_mib[True]['weight copies']:.0f} MiB "
              f"| {kept_mib[True]['activations']:.0f} MiB{peaks} | {s[None]:.2f} | {s[False]:.2f} ({s[False] / s[None]:.2f}×) "
              f"| {s[True]:.2f} ({s[True] / s[None]:.2f}×) | {s[True] / s[False]:.2f}× |", flush=True)
    with torch.inference_mode():
        mm.load_models_gpu([model])
    cast = layers(model.model.diffusion_model, computes_in, device)
    picked = "cast again" if cast_weights.worth_casting_again(cast, computes_in, device) else "kept"
    print(f"\nworth_casting_again on this machine, the model loaded: {picked} "
          f"({sum(m.weight.numel() for m in cast) * computes_in.itemsize / 2 ** 20:.0f} MiB of copies, "
          f"{mm.get_free_memory(device) / 2 ** 20:.0f} MiB free)")


if __name__ == "__main__":
    main()
