"""Kernel-running operators per sampling step, by phase of the guided step, on SD1.5's layer structure at 32 channels.

A GPU at SD sizes is bound by kernel launches (docs/benchmarks.md), so the operators a step dispatches stand for its
time there. This counts, on the CPU, the aten operators that run a kernel (views, allocations and other metadata
operators left out; an operator counted once, not its inner calls), per step of each mode, and splits a BiasMap
step by phase: the U-Net's forward, the maps' capture, the energy (soft top-k and SoftIoU), the gradient (autograd's
backward), the activations LeanBackward computes again in it, and the CFG update with the guidance step. Guided
evaluations run as one CFG batch, as on a GPU. Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/op_phases.py [--steps 2] [--detail PHASE]
"""

import argparse
import collections
import functools
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import sampling  # this folder: the modes and the prompts (it puts tests/support on the path)

# Operators that run no kernel of their own (views, allocation, metadata).
_NO_KERNEL = {f"aten::{name}" for name in (
    "empty", "empty_like", "empty_strided", "view", "view_as", "reshape", "_reshape_alias", "_unsafe_view",
    "as_strided", "t", "transpose", "permute", "expand", "expand_as", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "unsqueeze", "squeeze", "unsqueeze_", "squeeze_", "flatten", "unflatten",
    "movedim", "diagonal", "detach", "alias", "resolve_conj", "resolve_neg", "lift_fresh", "contiguous", "to",
    "_to_copy", "type_as", "result_type", "is_nonzero", "item", "_local_scalar_dense", "requires_grad_",
    "_has_compatible_shallow_copy_type", "set_")}


def kernel_ops_by_phase(prof, phases, detail: str | None = None) -> collections.Counter:
    """Kernel-running aten operators (the innermost such call of each nest), by the innermost phase around them; or,
    with ``detail``, those of that phase by operator name."""
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in _NO_KERNEL:
            continue
        if any(c.name.startswith("aten::") and c.name not in _NO_KERNEL for c in event.cpu_children):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in phases:
            parent = parent.cpu_parent
        phase = parent.name if parent is not None else "sampler"
        if detail is None:
            counts[phase] += 1
        elif phase == detail:
            counts[event.name] += 1
    return counts


def labelled(owner, name: str, phase: str) -> None:
    """Wrap ``owner.name`` in a profiler range called ``phase``."""
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(phase):
            return function(*args, **kwargs)

    setattr(owner, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--detail", metavar="PHASE", help="also list this phase's operators by name, per step "
                                                          "(e.g. 'energy (soft top-k, SoftIoU)')")
    args = parser.parse_args()

    root = sampling.comfy_models.boot_comfy()
    sys.path.insert(sys.path.index(root) + 1, str(sampling.REPO))  # this checkout, after ComfyUI's `nodes`
    import comfy.utils
    import nodes

    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import (capture, guided_backward, lean_backward, sample_with_scheduler, session,
                                     start_session)

    comfy.utils.PROGRESS_BAR_ENABLED = False
    session._branches_apart = lambda device: False  # one CFG batch per guided evaluation, as on a GPU
    phases = {  # innermost wins: the capture runs inside the U-Net's forward, the forward inside the update
        "update (CFG + guidance step)": [(session.BiasMapSession, "_predict_noise")],
        "U-Net forward": [(session.BiasMapSession, "_diffusion_model")],
        "capture": [(capture.BranchCapture, "observe"), (capture.BranchCapture, "flush")],
        "gradient (backward)": [(guided_backward.GuidedBackward, "_energy_gradient")],
        "energy (soft top-k, SoftIoU)": [(guided_backward.GuidedBackward, "_energy")],
        "recomputed in the backward": [(lean_backward, "_unpack")],
    }
    for phase, targets in phases.items():
        for owner, name in targets:
            labelled(owner, name, phase)

    with torch.inference_mode():
        model, clip = sampling.comfy_models.skeleton_sd15(0)
        pos, neg = sampling.comfy_models.paper_prompts(clip)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(settings):
        with torch.inference_mode():
            if settings is None:
                return nodes.common_ksampler(model, 0, args.steps, 7.0, "euler", "normal", pos, neg, latent)
            biasmap = start_session(model, clip, sampling.PROMPT, ["gender"], ["doctor"], BiasMapSettings(**settings))
            return sample_with_scheduler(biasmap, model, 0, args.steps, 7.0, "euler", "normal", pos, neg, latent)

    print(f"CPU, torch {torch.__version__}, SD1.5 layer structure at 32 channels, 64² image, euler, cfg 7, "
          f"{args.steps} steps; kernel-running operators per step (the run's setup included, spread over the steps)\n")
    for mode in ("plain", "recording", "guided_all", "guided_down_1"):
        settings = sampling.MODES[mode][0]
        run(settings)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(settings)
        counts = kernel_ops_by_phase(prof, phases)
        parts = ", ".join(f"{phase} {n / args.steps:.0f}" for phase, n in counts.most_common())
        print(f"- {mode}: **{sum(counts.values()) / args.steps:.0f}** ({parts})")
        named = kernel_ops_by_phase(prof, phases, args.detail) if args.detail else None
        if named:
            print(f"  - {args.detail}: "
                  + ", ".join(f"{name[6:]} {n / args.steps:g}" for name, n in named.most_common()))


if __name__ == "__main__":
    main()
