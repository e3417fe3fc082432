"""The Entanglement IoU report: per-image IoU, block-wise IoU, the token pieces used and the guidance accounting."""

import functools
import math

import torch

from .stages import stage_label
from .tokens import concept_key, one_line, readable, require_distinct_concepts
from .trace import NOT_FINITE_CAUSE, BiasMapTrace, mean_biou

__all__ = ["EntanglementResult", "figure", "guidance_line", "measure_entanglement", "percent_change", "shown_number"]


class EntanglementResult:
    """IoU (with its masks), BIoU and mBIoU of two concepts in a trace, with a human-readable report (written when
    first read: an audit of many runs reads the figures only)."""

    def __init__(self, trace: BiasMapTrace, word_a: str, word_b: str, q: float = 0.7, size=None, steps=None):
        # A concept's overlap with itself is 1 whatever the image: refused here, for notebooks as for the nodes.
        require_distinct_concepts([word_a], [word_b], {w: trace.positions(w) for w in (word_a, word_b)})
        self.word_a, self.word_b, self.q = word_a, word_b, q
        size = trace.image_size if size is None else (size, size) if isinstance(size, int) else tuple(size)
        self.ious, self.masks = trace.iou_and_masks(word_a, word_b, q, steps=steps, size=size)  # masks [B, H, W]
        self.block_ious = trace.block_ious(word_a, word_b, q, steps=steps, size=size)
        self.mbiou = mean_biou(self.block_ious)
        self.pieces = {w: _readable_pieces([trace.tokens[p] for p in trace.positions(w)]) for w in (word_a, word_b)}
        self.steps = trace.step_window(steps)  # as the report says it: None for every step
        self._trace = trace

    @property
    def headline(self) -> str:
        """The means over the batch, as the report's figures begin."""
        return f"mIoU {_mean(self.ious)} · mBIoU {_mean(self.mbiou)}"

    @functools.cached_property
    def report(self) -> str:
        trace = self._trace
        h, w = self.masks[0].shape[-2:]
        window = "" if self.steps is None else f", steps {self.steps[0]}–{self.steps[1]} of 0–{trace.num_steps - 1}"
        lines = [f"BiasMap entanglement of '{self.word_a}' and '{self.word_b}' "
                 # Sizes as ComfyUI gives them: W×H.
                 f"(top {round((1 - self.q) * 100)} % masks at {w}×{h}{window}, {trace.model_family})",
                 _run_line(trace)]
        # The attribution prompt, whose words the maps are of: a generation prompt changed alone shows beside it.
        for key, name in (("model", "model"), ("generation_prompt", "prompt"), ("negative_prompt", "negative"),
                          ("attribution_prompt", "attribution prompt")):
            if trace.run.get(key):  # read from the graph where it is typed
                lines.append(f"{name}: {one_line(trace.run[key])}")
        lines.append(self.headline)
        drawn_apart = bool(trace.run.get("batch_index"))  # the seed's noises the images got are not 0, 1, …
        for i, value in enumerate(self.ious.tolist()):
            blocks = ", ".join(f"{stage_label(s)} {figure(v[i], 3)}" for s, v in self.block_ious.items())
            image = f"image {i} (noise {trace.noise_index(i)} of the seed)" if drawn_apart else f"image {i}"
            lines.append(f"{image}: IoU {figure(value, 4)} · mBIoU {figure(self.mbiou[i], 4)} · BIoU {blocks}")
        for word, pieces in self.pieces.items():
            lines.append(f"tokens of '{word}': {' '.join(pieces)}")
        if guidance := guidance_line(trace):
            lines.append(guidance)
        positions = trace.positions(self.word_a) + trace.positions(self.word_b)
        unreadable = [i for i, finite in enumerate(trace.finite(positions, steps=self.steps).tolist()) if not finite]
        if unreadable:
            lines.append(f"image(s) {', '.join(map(str, unreadable))}: their maps hold NaN or inf values "
                         f"({NOT_FINITE_CAUSE}), so their IoU is n/a where those maps count")
        figures = torch.stack([self.ious.cpu(), *(b.cpu() for b in self.block_ious.values())])
        flat = [i for i, unmeasured in enumerate(figures.isnan().any(0).tolist()) if unmeasured and i not in unreadable]
        if flat:
            lines.append(f"image(s) {', '.join(map(str, flat))}: n/a where a word's map is flat there (one value "
                         f"everywhere: a stage of one pixel, or a stage Kohya Deep Shrink moved to another grid on "
                         f"those steps), which has no top {1 - self.q:.0%} to compare")
        lines += [f"note: {n}" for n in trace.notes]
        return "\n".join(lines)

    def against(self, baseline: "EntanglementResult") -> str:
        """Report lines of the change from ``baseline`` (the same words in another run, e.g. the same seed at λ = 0)
        to these figures, and :meth:`baseline_notes`."""
        lines = [f"against the baseline ({_run_line(baseline._trace).removeprefix('run: ')}): "
                 f"{self.change_from(baseline)}"]
        if len(self.ious) == len(baseline.ious) > 1:
            lines.append("IoU per image: " + ", ".join(f"image {i} {_percent(b, a)}" for i, (b, a) in
                                                        enumerate(zip(baseline.ious.tolist(), self.ious.tolist()))))
        return "\n".join(lines + [f"note: {note}" for note in self.baseline_notes(baseline)])

    def baseline_notes(self, baseline: "EntanglementResult") -> list[str]:
        """Why the change from ``baseline`` may not be guidance's: a baseline guided where this run is not (links
        swapped), one guided as this run was (or both at λ = 0), and whatever else differs between the two runs. Two
        runs guided otherwise (another λ, soft top-k, stages, concepts) compare guidance settings: no note."""
        _check_same_words(self, baseline)
        trace, other = self._trace, baseline._trace
        before, after = other.settings.get("scale"), trace.settings.get("scale")
        # What guides besides λ, also the maps' branch and the concepts guided against: runs at one λ > 0 that differ
        # there compare guidance settings.
        guided_alike = (all(other.settings.get(key) == trace.settings.get(key)
                            for key in _GUIDANCE_SETTINGS + _SAME_MAPS)
                        and (not after or _guided_against(other) == _guided_against(trace)))
        # A field one of the two traces lacks (made in a notebook, or by an earlier version) is not known to differ.
        differing = [name if key == "sigmas" else  # a schedule: too long to quote
                     f"{name} ({_shown(other.run[key])}, this run {_shown(trace.run[key])})"
                     for key, name in _SAME_PICTURE
                     if key in other.run and key in trace.run and other.run[key] != trace.run[key]]
        differing += [f"{name} ({_shown(b)}, this run {_shown(a)})" for name, b, a in (
            ("model family", other.model_family, trace.model_family),
            *((key, other.settings.get(key, "n/a"), trace.settings.get(key, "n/a")) for key in _SAME_MAPS),
            ("stages", " ".join(other.stages), " ".join(trace.stages)),
            ("images", other.num_images, trace.num_images), ("size", _size(other.image_size), _size(trace.image_size)),
            # Images of one seed drawn apart (Repeat Latent Batch); for batches of other sizes, "images" says it.
            *([("the seed's noises", _noises(other), _noises(trace))] if other.num_images == trace.num_images else []),
            ("noise mask", _noise_masks(other), _noise_masks(trace)),
            # img2img from another image, a second pass after another first pass (traces before it do not say).
            *([("start latent", _start_latents(other), _start_latents(trace))]
              if "start_latent" in other.run and "start_latent" in trace.run else []),
            ("masks", _size(baseline.masks[0].shape[-2:]), _size(self.masks[0].shape[-2:])), ("q", baseline.q, self.q),
            ("steps measured", _window(baseline), _window(self)))
            if b != a]
        differing += [f"tokens of '{w}' ({' '.join(before)}, this run {' '.join(after)})"
                      for w, before, after in zip(self.pieces, baseline.pieces.values(), self.pieces.values())
                      if before != after]
        if before is not None and after is not None and before == after and (not after or guided_alike):
            # A trace made in a notebook may not say its λ.
            if differing:  # e.g. second passes at λ = 0 after a guided and an unguided first pass
                return [f"the baseline has this run's λ ({_shown(after)}) and differs in " + "; ".join(differing)
                        + ": the change is of those, not of guidance in this run (compare runs that differ only in λ)"]
            return [f"the baseline has this run's λ ({_shown(after)}), so nothing of the change is guidance's "
                    f"(connect the trace of the same seed at λ = 0 as the baseline, and a guided run's as the trace)"]
        notes = []
        if before and after is not None and not after:
            notes.append(f"the baseline was guided (λ {_shown(before)}) and this run not: connect the trace of the "
                         f"same seed at λ = 0 as the baseline (if the two traces are swapped, swap their links)")
        if differing:  # the change is then not guidance alone
            notes.append("the baseline differs in " + "; ".join(differing) + ": the change is not guidance's alone "
                         "(compare runs that differ only in λ)")
        return notes

    def change_from(self, baseline: "EntanglementResult") -> str:
        """The means' change from ``baseline``'s: mIoU a → b (−40.0 %) · mBIoU the same way."""
        _check_same_words(self, baseline)
        return f"mIoU {_change(baseline.ious, self.ious)} · mBIoU {_change(baseline.mbiou, self.mbiou)}"


def guidance_line(trace: BiasMapTrace) -> str | None:
    """What guidance did over the run's (evaluation, image) pairs, counted by outcome; None for a trace without
    guidance accounting."""
    counts = trace.guidance_counts()
    if any(v for k, v in counts.items() if k != "not_guided"):
        total = sum(counts.values())
        return "guidance over (evaluation, image) pairs: " + ", ".join(
            f"{k.replace('_', ' ')} {v}/{total}" for k, v in counts.items() if v)
    if counts and trace.settings.get("scale", 0):
        scale = shown_number(trace.settings["scale"], exact=True)
        return f"no evaluation was guided although λ = {scale} (see the notes)"
    return "no guidance applied (λ = 0): recording only" if counts else None


def measure_entanglement(trace: BiasMapTrace, word_a: str, word_b: str, q: float = 0.7, size=None,
                         steps=None) -> EntanglementResult:
    """IoU (per image), BIoU per stage, mBIoU and the report for two words of a trace, with masks at ``size``
    (default: the image's, as the reference)."""
    return EntanglementResult(trace, word_a, word_b, q, size=size, steps=steps)


# What two runs must share for their figures to be of one picture, as the report names it.
_SAME_PICTURE = (("seed", "seed"), ("steps", "steps"), ("sampler", "sampler"), ("scheduler", "scheduler"),
                 ("sigmas", "the sampler's sigmas"), ("add_noise", "add_noise"), ("cfg", "cfg"), ("denoise", "denoise"),
                 ("model", "model"), ("precision", "precision"), ("generation_prompt", "prompt"),
                 ("negative_prompt", "negative"), ("attribution_prompt", "attribution prompt"))


# What guides besides λ: two runs at one λ > 0 that differ in these differ by guidance.
_GUIDANCE_SETTINGS = ("mode", "keep", "gamma", "iters", "gate", "guided_stages", "start", "end")

# The recording settings two runs must share for their maps to be of one kind (the stages, the CFG branch).
_SAME_MAPS = ("include_middle", "branch")


def _change(before: torch.Tensor, after: torch.Tensor) -> str:
    """Two runs' means over their images that have a figure, and the relative change between them."""
    b, a = float(before.nanmean()), float(after.nanmean())
    return f"{figure(b, 4)} → {figure(a, 4)} ({_percent(b, a)})"


def _percent(before: float, after: float) -> str:
    """The relative change: −40.0 % is 40 % less overlap; n/a without a figure or an overlap to change."""
    return percent_change((before - after) / before if before > 0 else math.nan)


def _readable_pieces(tokens: list[str]) -> list[str]:
    """A word's BPE pieces in plain text; pieces that split a character's bytes (an emoji, CJK), which read as no
    text alone, shown as the word they spell and their count: ``医生</w> (4 pieces)``."""
    pieces = [readable(token) for token in tokens]
    split = any(piece == token and not token.isascii() for piece, token in zip(pieces, tokens))
    return [f"{readable(''.join(tokens))} ({len(tokens)} pieces)"] if split else pieces


def _check_same_words(result: EntanglementResult, baseline: EntanglementResult) -> None:
    """Refuse a baseline of other words: its change would be of other maps (words compared as CLIP reads them)."""
    words = [concept_key(w) for w in (result.word_a, result.word_b)]
    if [concept_key(w) for w in (baseline.word_a, baseline.word_b)] != words:
        raise ValueError(f"the baseline measures '{baseline.word_a}' and '{baseline.word_b}', this result "
                         f"'{result.word_a}' and '{result.word_b}': measure the same two words in both "
                         f"(measure_entanglement(baseline_trace, '{result.word_a}', '{result.word_b}'))")


def _size(hw) -> str:
    """W×H of an (h, w): a trace's images, a result's masks."""
    h, w = hw
    return f"{w}×{h}"


def _window(result: "EntanglementResult") -> str:
    """The steps a result's maps are of."""
    return "all" if result.steps is None else f"{result.steps[0]}–{result.steps[1]}"


def _mean(values: torch.Tensor) -> str:
    """The mean over the images that have a figure, saying how many those are when some have none (n/a)."""
    measured = int(values.isfinite().sum())
    if measured == len(values):
        return f"{values.mean():.4f} over {measured} image(s)"
    return f"{figure(values.nanmean(), 4)} over {measured} of {len(values)} image(s) (n/a: no maps to threshold)"


def figure(value, digits: int) -> str:
    """A figure as the reports and the audit summary write it; n/a where there was nothing to measure (NaN)."""
    value = float(value)
    return f"{value:.{digits}f}" if value == value else "n/a"


def shown_number(value: bool | int | float, exact: bool = False) -> str:
    """A setting's value as a name or a summary shows it: on or off; a number short where that reads back as it (100,
    0.7), else with the digits that tell it apart (λ 100.0001 is not λ 100; a seed of 2⁶⁴ − 1 is not 1.84467e+19): up
    to the 15 a decimal keeps through a float for a name, so that a strength typed 0.7 and stored with the page's
    rounding (0.7000000000000001) names one model; ``exact``, every digit, where two values shown must not read as
    one (a summary's groups, a report's differences)."""
    if isinstance(value, bool):  # an int too, which would read 1
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value)) if exact else f"{value:.15g}"


def percent_change(reduction: float) -> str:
    """A relative reduction as the change it is: 0.4 → −40.0 %; n/a where nothing was paired or overlapped."""
    if not math.isfinite(reduction):
        return "n/a"
    change = round(-100 * reduction, 1)
    return f"{change:+.1f} %".replace("-", "−") if change else "0.0 %"


def _shown(value) -> str:
    if value == "":  # not named: a merged model, a prompt made while the graph ran, a run without a graph
        return "—"
    return shown_number(value, exact=True) if isinstance(value, (int, float)) else one_line(str(value))


def _noises(trace: BiasMapTrace) -> str:
    """Which of the seed's noises the images got, in order (Latent From Batch, Repeat Latent Batch)."""
    return " ".join(str(trace.noise_index(i)) for i in range(trace.num_images))


def _guided_against(trace: BiasMapTrace) -> tuple[list[str], list[str]]:
    """The concept lists as guidance reads them: in any order, each as CLIP reads it (concept_key)."""
    return tuple(sorted(map(concept_key, concepts)) for concepts in (trace.demographic, trace.semantic))


def _start_latents(trace: BiasMapTrace) -> str:
    """The fingerprint of the latent each image was sampled from, one per image where they differ; "empty"."""
    return _per_image(trace, "start_latent", "empty")


def _noise_masks(trace: BiasMapTrace) -> str:
    """The noise mask the images were sampled under (inpainting), one per image where they differ; "none"."""
    return _per_image(trace, "noise_mask", "none")


def _per_image(trace: BiasMapTrace, field: str, blank: str) -> str:
    """A run field of one text per image, once where every image's is the same (``blank`` for '' or none)."""
    texts = [text or blank for text in trace.run.get(field) or [""]]
    return " / ".join(texts) if len(set(texts)) > 1 else texts[0]


def _run_line(trace: BiasMapTrace) -> str:
    """How the run was made, so that two reports side by side (λ = 0 and λ = 100) say which is which."""
    run, settings = trace.run, trace.settings  # a trace made in a notebook may hold only some of these
    parts = [f"seed {run['seed']}" if "seed" in run else None,
             # The seed then seeds nothing (an ancestral or SDE sampler's own noise comes from 0, as under
             # SamplerCustomAdvanced): it names the image, as noise_seed was given.
             "add_noise off" if run.get("add_noise") is False else None,
             "/".join(one_line(str(run[k])) for k in ("sampler", "scheduler") if k in run) or None,
             f"{run['steps']} step{'s' * (run['steps'] != 1)}" if "steps" in run else None,
             f"denoise {_shown(run['denoise'])}" if run.get("denoise", 1) != 1 else None,
             f"noise mask {_noise_masks(trace)}" if run.get("noise_mask") else None,
             f"start latent {_start_latents(trace)}" if run.get("start_latent") else None,
             f"cfg {_shown(run['cfg'])}" if "cfg" in run else None,
             f"λ {_shown(settings['scale'])}" if "scale" in settings else None,
             f"guided stages {' '.join(settings.get('guided_stages') or ['all'])}" if settings.get("scale") else None]
    return "run: " + " · ".join(p for p in parts if p) if any(parts) else "run: not recorded in this trace"
