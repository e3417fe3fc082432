"""What autograd still holds when a guided step's backward starts: the U-Net's output detached (now) or not.

The gradient comes from the captured queries, never from the U-Net's output, so since 2026-11-28 a
``DIFFUSION_MODEL`` wrapper detaches the output of a guided pass: the layers after the last captured query are freed
as the forward ends instead of living through the backward. This runs one guided step (all stages, batch 1) of a
random full-size SD1.5 both ways and sums the distinct storages of the activations autograd kept that are still
alive when the energy is computed, just before the backward. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/kept_at_backward.py [--sizes 256 512]
"""

import argparse
import gc
import sys
import weakref
from pathlib import Path

import torch

import sampling  # this folder: the checkpoint and one timed run (it puts tests/support on the path)

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--checkpoint", default=str(REPO / "benchmarks" / "random_sd15_full.safetensors"))
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.utils

    import biasmap_engine
    import biasmap_engine.host
    from biasmap_engine.host import guided_backward, lean_backward, session

    comfy.utils.PROGRESS_BAR_ENABLED = False
    kept = []  # weak references to the detached activations packed in the current pass

    class Counted(lean_backward.LeanBackward):
        def _pack(self, tensor):
            packed = super()._pack(tensor)
            if isinstance(packed, lean_backward._Kept) and tensor.grad_fn is not None:
                kept.append(weakref.ref(packed[0]))
            return packed

    alive_mib = []
    energy = guided_backward.GuidedBackward._energy

    def measured_energy(self, maps):
        gc.collect()
        alive = [t for t in (ref() for ref in kept) if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}  # views share one
        alive_mib.append(sum(storages.values()) / 2**20)
        kept.clear()
        return energy(self, maps)

    guided_backward.LeanBackward = Counted
    guided_backward.GuidedBackward._energy = measured_energy
    detached = session.BiasMapSession._diffusion_model

    def not_detached(self, executor, *args, **kwargs):
        """The innermost wrapper as it is (input handed back, the U-Net's run noted) but for the output's detach."""
        self.backward.active = False  # read there only for the detach
        try:
            return detached(self, executor, *args, **kwargs)
        finally:
            self.backward.active = True

    arrangements = {"output detached (now)": detached, "output not detached (before)": not_detached}
    model, clip = sampling.load_random_sd15(args.checkpoint)
    with torch.inference_mode():
        pos, neg = sampling.comfy_models.paper_prompts(clip)
    engine = (biasmap_engine, biasmap_engine.host)
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, random full-size SD1.5, fp32, one "
          f"guided step (all stages, batch 1), MiB of activations alive when the backward starts\n")
    print("| size | " + " | ".join(arrangements) + " | now ÷ before |")
    print("|---|--:|--:|--:|")
    for size in args.sizes:
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        mib = []
        for wrapper in arrangements.values():
            session.BiasMapSession._diffusion_model = wrapper
            alive_mib.clear()
            with torch.inference_mode():
                sampling.seconds_per_step(engine, sampling.MODES["guided_all"][0], model, clip, pos, neg, latent, 1)
            mib.append(alive_mib[0])
        print(f"| {size}² | {mib[0]:.0f} | {mib[1]:.0f} | {mib[0] / mib[1]:.3f} |", flush=True)
    session.BiasMapSession._diffusion_model = detached


if __name__ == "__main__":
    main()
