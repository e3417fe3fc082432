"""The notes a run's trace carries where it differs from what the maps or guidance assume, each naming its cause
and the fix (nothing fails silently). Text only: the session finds the causes while it samples."""

from .report import shown_number
from .settings import QUALITY_COLLAPSES_AT

__all__ = ["NOT_FINITE", "emphasis_note", "gate_note", "kernel_note", "quality_note", "skipped_steps_note",
           "unevaluated_steps_note", "unweighted_note"]

# Where NaN or inf in a run came from, most certain first: the correction, skipped where it is not finite, never is.
NOT_FINITE = {
    "given": "the latent_image input holds NaN or inf values (a VAE Encode that overflowed in fp16, e.g.): the maps "
             "and the output are NaN whatever BiasMap does, as with ComfyUI's KSampler; run the VAE in fp32 or bf16 "
             "(ComfyUI's --fp32-vae or --bf16-vae), or check the node that made the latent",
    "made": "the model's prediction held NaN or inf values (the U-Net overflowed, e.g. in fp16, or the cfg is not a "
            "number): the maps and the output of the steps after it are NaN whatever BiasMap does; sample in fp32 or "
            "bf16, and check the cfg",
    "handed": "the sampler handed the model a latent holding NaN or inf values (a sampler step can make one by itself, "
              "e.g. a multistep sampler over custom sigmas with a repeated σ; the stock sampler does the same): the "
              "maps and the output of the steps after it are NaN whatever BiasMap does; check the sigmas and the "
              "sampler",
    "last step": "the sampler's last step made the output latent NaN or inf (custom sigmas that repeat a σ or do not "
                 "fall, e.g.; the stock sampler does the same): check the sigmas and the sampler",
}


def emphasis_note(weighted: list[tuple[str, float]]) -> str | None:
    """The attribution prompt's emphasis (``weighted_parts``): pasted with the generation prompt, most often, it makes
    maps of other embeddings than the words'."""
    if not weighted:
        return None
    parts = ", ".join(f"{text[:60]!r}{'…' if len(text) > 60 else ''} ×{weight:g}" for text, weight in weighted[:3])
    return (f"the attribution prompt weights {parts}{' and more' if len(weighted) > 3 else ''} (ComfyUI's emphasis): "
            f"its encoding scales those words' embeddings, so their maps and the IoU move with the weight; for maps "
            f"as the paper measures them, type the attribution prompt without weights")


def quality_note(scale: float) -> str | None:
    """The paper's λ sweep: most of the reduction at λ 100, image quality collapsing from λ 400 on. Noted, not refused:
    another model or fewer stages may bear more."""
    if scale < QUALITY_COLLAPSES_AT:
        return None
    return (f"λ {shown_number(scale)} is at or above {QUALITY_COLLAPSES_AT}, from which the paper finds image quality "
            f"collapses on SD 1.5 (FID above 100); λ 100 keeps most of the reduction")


def gate_note(counts: dict[str, int]) -> str | None:
    """Guided (evaluation, image) pairs the skip gate left unguided (``counts``: BiasMapTrace.guidance_counts): the
    node shows the count alone, and the gate's rule is an advanced input's tooltip."""
    skipped = counts.get("skipped_gate", 0)
    if not skipped:
        return None
    guided = sum(n for status, n in counts.items() if status != "not_guided")
    return (f"the gate left {skipped} of {guided} guided (evaluation, image) pair(s) unguided: the gradient's norm "
            f"‖∇_z E‖ reached 1 there, where the reference skips a step (gate skip); set the gate to clip to guide "
            f"them with the gradient scaled to norm 1 (λ does not change the norm)")


def kernel_note(apart: tuple[str, str] | None) -> str | None:
    """A guided run whose SDPA attention rounds otherwise than ComfyUI's kernel (``apart``: that kernel and the
    compute dtype): measured on the CPU in bf16, up to ±0.003 IoU an image, against 0.017 from λ 100."""
    if apart is None:
        return None
    kernel, dtype = apart
    return (f"the guided passes run attention in PyTorch's SDPA (it has a backward), ComfyUI here in its {kernel} "
            f"kernel: in {dtype} the two round otherwise, which moves each image's IoU by a few thousandths apart "
            f"from guidance (noise, not bias, in an audit's reductions); for λ = 0 and guided runs that differ in λ "
            f"alone, start ComfyUI with --use-pytorch-cross-attention")


def unweighted_note(where: str | None, recorded: str) -> str | None:
    """The recorded conditioning (``recorded``: which prompt and branch) weighing nothing on ``where`` ("all" of an
    image or "part" of one, :meth:`TraceRecorder.unweighted`): its maps are 0 there."""
    if where == "all":
        return (f"the conditioning whose maps are recorded ({recorded}) weighed nothing on the image on some steps "
                f"(strength 0, or an empty Conditioning (Set Mask) mask): its maps are 0 there, with no IoU to measure "
                f"and no gradient to guide; record the other branch (the branch input), or give that conditioning "
                f"weight")
    if where == "part":
        return (f"the conditioning whose maps are recorded ({recorded}) weighs nothing on part of the image (a "
                f"Conditioning (Set Mask) mask that leaves it out): its maps are 0 there, so both concepts' top pixels "
                f"fall inside the mask and the IoU measures that part alone; record the other branch (the branch "
                f"input), or mask the other prompt instead")
    return None


def skipped_steps_note(steps: list[int]) -> str | None:
    """Steps whose evaluations another node answered without the U-Net (a cache)."""
    if not steps:
        return None
    return (f"the U-Net did not run for BiasMap in evaluations of sampler step(s) {', '.join(map(str, steps))}: "
            f"another node answered them without it (a cache such as EasyCache or LazyCache reusing an earlier "
            f"output), so they have no maps and were not guided; bypass that node for maps and guidance at every step")


def unevaluated_steps_note(steps: list[int]) -> str | None:
    """Steps the sampler reported without calling the model at all (it reused an earlier output)."""
    if not steps:
        return None
    return (f"the sampler reported step(s) {', '.join(map(str, steps))} without evaluating the model (it reused an "
            f"earlier output), so they have no maps and were not guided; choose another sampler for maps and guidance "
            f"at every step")
