"""BiasMapTrace: attribution maps recorded along a sampling trajectory, as a value object.

A trace keeps, per U-Net stage, the head- and layer-summed token maps of every recorded model evaluation
(``[evaluations, images, tokens, h, w]``), with the σ and step of each evaluation, the attribution prompt's tokens,
the concepts, the model family, the settings and the guidance accounting. Any stage/step window can be rendered or
measured afterwards. Traces save to ``.safetensors`` (tensors) with JSON metadata; no pickle is involved.
"""

import json
import operator
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .guidance import STATUS
from .masks import hard_mask, iou
from .ovam import largest_grid, resampled, sum_upsampled, varies
from .stages import STAGE_ORDER, parse_stages, stage_label
from .tokens import find_word_positions
from .trace_schema import description_problem, is_list_of, size_problem, tensors_problem, tensors_sha256

__all__ = ["BiasMapTrace", "TraceFormatError", "TraceHeader", "NOT_FINITE_CAUSE", "mean_biou"]

# Why an image's maps hold NaN or inf, and what to do: said wherever such an image is named.
NOT_FINITE_CAUSE = ("the model's output overflowed, e.g. in fp16: sample them again in fp32 or bf16; or the sampler's "
                    "latent was already NaN, see the trace's notes")

_FORMAT = "biasmap_trace"
_VERSION = 1


class TraceHeader(NamedTuple):
    """What a trace file's header says of its words: the attribution prompt's tokens and the concept lists."""

    tokens: list[str]
    demographic: list[str]
    semantic: list[str]


class TraceFormatError(ValueError):
    """A file that is not a BiasMap trace, or a damaged one; ``problem`` says which, the message adds the fix."""

    def __init__(self, problem: str):
        super().__init__(problem)  # args: the problem alone, so a copy or pickle makes the same error
        self.problem = problem

    def __str__(self):
        return f"{self.problem}. Load a file written by BiasMapTrace.save."


@dataclass
class BiasMapTrace:
    """Recorded attribution maps of one sampling run, with everything needed to analyse them later."""

    maps: dict[str, torch.Tensor]  # stage id → [E, B, N, h, w]
    tokens: list[str]  # attribution prompt tokens, start and end markers included
    sigmas: torch.Tensor  # [E] σ of each recorded evaluation
    steps: torch.Tensor  # [E] sampler step index of each evaluation
    latent_shape: list[int]  # [B, C, H, W]
    demographic: list[str] = field(default_factory=list)
    semantic: list[str] = field(default_factory=list)
    model_family: str = ""
    settings: dict = field(default_factory=dict)
    guidance: dict[str, torch.Tensor] = field(default_factory=dict)  # energy, grad_norm [E, B]; status [E, B] int8
    notes: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)  # how it was sampled: seed, steps, cfg, sampler, …, attribution prompt

    def __post_init__(self):
        """Refuse fields that disagree, so a trace built by hand fails here rather than deep inside a measure."""
        evaluations, images = len(self.sigmas), self.latent_shape[0] if self.latent_shape else None
        if self.maps and images is None:
            raise ValueError("the trace has maps but no latent_shape: give the latent's [B, C, H, W]")
        if len(self.steps) != evaluations:
            raise ValueError(f"the trace has {evaluations} σ but {len(self.steps)} step labels: one each per "
                             f"evaluation")
        for stage, maps in self.maps.items():
            expected = (evaluations, images if images is not None else maps.shape[1], len(self.tokens))
            if maps.dim() != 5 or tuple(maps.shape[:3]) != expected:
                raise ValueError(f"the maps of stage {stage} are {tuple(maps.shape)}, where this trace needs "
                                 f"[evaluations {expected[0]}, images {expected[1]}, tokens {expected[2]}, h, w]")

    def __repr__(self) -> str:
        """A summary, not every map value: ComfyUI's Preview as Text shows a trace as this text."""
        concepts = ", ".join(self.demographic) + " × " + ", ".join(self.semantic)
        return (f"BiasMapTrace({self.num_images} image(s), {self.num_steps} step(s), {len(self.sigmas)} evaluation(s), "
                f"stages {' '.join(self.stages)}, concepts {concepts}, {len(self.tokens)} tokens, "
                f"model {self.model_family or '?'})")

    @property
    def stages(self) -> list[str]:
        """Recorded stage ids in U-Net order (any id this version does not know comes last, never dropped)."""
        return sorted(self.maps, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))

    @property
    def num_images(self) -> int:
        return self.latent_shape[0] if self.latent_shape else 0

    @property
    def num_steps(self) -> int:
        return int(self.steps.max()) + 1 if self.steps.numel() else 0

    def step_window(self, steps) -> tuple[int, int] | None:
        """``steps`` (one step, or an inclusive (first, last) pair) as the part of this trace's steps it covers: None
        for every step, else a pair within 0 … num_steps − 1 (``(0, 9)`` of a 2-step run is every step), as the
        nodes' step inputs read; ``steps`` None is every step."""
        if steps is None:
            return None
        first, last = _step_window(steps)
        if first > min(last, self.num_steps - 1):  # no step of this trace: as given, for the refusal to name
            return first, last
        first, last = max(first, 0), min(last, self.num_steps - 1)
        return None if first == 0 and last == self.num_steps - 1 else (first, last)

    def noise_index(self, image: int) -> int:
        """Which of the seed's noises image ``image`` got: ComfyUI draws them by the latent's batch_index (Latent From
        Batch, Repeat Latent Batch), so seed and image number alone would not sample it again."""
        self._check_image(image)
        batch_index = self.run.get("batch_index")
        return batch_index[image] if batch_index else image

    def _check_image(self, image: int) -> None:
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} is not one of this trace's {self.num_images} (0 to "
                             f"{self.num_images - 1})")

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixel size of the decoded image (SD-family VAEs scale the latent by 8)."""
        return self.latent_shape[2] * 8, self.latent_shape[3] * 8

    def positions(self, word: str) -> list[int]:
        """Token positions of a word (all its BPE pieces) in the attribution prompt."""
        fix = ("Pick one of these, or sample again with it added to the sampler's attribution prompt: a trace has "
               "maps of its words only")
        return find_word_positions(self.tokens, word, fix)

    def token_maps(self, stages=None, steps=None, size=None, tokens=None) -> torch.Tensor:
        """``[B, N, H, W]``: maps summed over the chosen evaluations and stages, at ``size`` (default: the largest
        attention grid of the trace).

        As OVAM aggregates: every stage upsampled bilinearly to the largest attention grid and summed; that sum is
        upsampled once more to ``size`` (two bilinear steps are not one). ``tokens`` (positions) restricts N to those
        tokens before anything is upsampled. Here and in the measures below, ``stages`` are ids or labels (a list, or
        text as the nodes take it: ``"down_1, up×1"``), ``steps`` one step or an inclusive (first, last) pair, and
        ``size`` (H, W) or one side of a square.
        """
        chosen = self._evaluations(steps)
        stages = self._check_stages(stages)
        # Summed and resampled in fp32 at least: maps a notebook saved in half precision keep their figures (bf16 sums
        # of steps round the maps to a few distinct values, which the quantile masks then tie on).
        per_stage = [self.maps[s][chosen].sum(dim=0, dtype=torch.promote_types(self.maps[s].dtype, torch.float32))
                     for s in stages]
        if tokens is not None:
            per_stage = [m[:, tokens] for m in per_stage]
        largest = largest_grid(self.maps.values())
        total = sum_upsampled(per_stage, largest)
        size = (size, size) if isinstance(size, int) else size  # (H, W), or one side of a square
        return total if size is None else resampled(total, tuple(size))

    def concept_map(self, word: str, stages=None, steps=None, size=None) -> torch.Tensor:
        """``[B, H, W]`` attribution map of a word (mean over its pieces)."""
        return self.token_maps(stages, steps, size, tokens=self.positions(word)).mean(dim=1)

    def _word_maps(self, word_a: str, word_b: str, stages, steps, size) -> tuple[torch.Tensor, torch.Tensor]:
        """The two words' maps ``[B, H, W]``, from one aggregation."""
        a, b = self.positions(word_a), self.positions(word_b)
        maps = self.token_maps(stages, steps, size, tokens=a + b)
        return maps[:, :len(a)].mean(dim=1), maps[:, len(a):].mean(dim=1)

    def measurable(self, word_a: str, word_b: str, stages=None, steps=None) -> torch.Tensor:
        """Per image, whether the two words have maps to threshold in the window: every value finite (:meth:`finite`)
        and not all zero (a stage that Kohya Deep Shrink moved to another grid on those steps)."""
        maps = self._values(self.positions(word_a) + self.positions(word_b), stages, steps)
        return torch.stack([m.isfinite().all(1) for m in maps]).all(0) & torch.stack([m.any(1) for m in maps]).any(0)

    def finite(self, positions: list[int], stages=None, steps=None) -> torch.Tensor:
        """Per image, whether every map value of the tokens at ``positions`` in the window is finite (see
        :data:`NOT_FINITE_CAUSE`)."""
        return torch.stack([m.isfinite().all(1) for m in self._values(positions, stages, steps)]).all(0)

    def _values(self, positions, stages, steps) -> list[torch.Tensor]:
        """Per stage, ``[B, values]``: the maps of the tokens at ``positions`` in the window, image by image."""
        chosen = self._evaluations(steps)
        return [self.maps[s][chosen][:, :, positions].transpose(0, 1).flatten(1) for s in self._check_stages(stages)]

    def iou(self, word_a: str, word_b: str, q: float = 0.7, stages=None, steps=None, size=None) -> torch.Tensor:
        """Per-image IoU of the two words' top-(1−q) masks; NaN for an image without maps to threshold
        (:meth:`measurable`) or where a word's map is flat (one value everywhere, as a stage of one pixel: nothing
        lies above its quantile), rather than the 0 of an empty mask, which would read as no overlap at all."""
        return self.iou_and_masks(word_a, word_b, q, stages, steps, size)[0]

    def iou_and_masks(self, word_a: str, word_b: str, q: float = 0.7, stages=None, steps=None, size=None):
        """:meth:`iou`, with the two masks it thresholded (for a picture)."""
        _check_q(q)
        maps = self._word_maps(word_a, word_b, stages, steps, size)
        masks = tuple(hard_mask(m, q) for m in maps)
        overlap = iou(*masks)
        measured = self.measurable(word_a, word_b, stages, steps).to(overlap.device)
        for m in maps:  # a flat map has no top (1 − q) to compare
            measured &= varies(m.flatten(-2).amin(-1), m.flatten(-2).amax(-1)).to(overlap.device)
        return overlap.where(measured, torch.nan), masks

    def block_ious(self, word_a: str, word_b: str, q: float = 0.7, steps=None, size=None) -> dict[str, torch.Tensor]:
        """BIoU: per stage, the per-image IoU of masks built from that stage's layers only (NaN where it has none)."""
        return {s: self.iou(word_a, word_b, q, [s], steps, size) for s in self.stages}

    def mbiou(self, word_a: str, word_b: str, q: float = 0.7, steps=None, size=None) -> torch.Tensor:
        """mBIoU: per image, the mean of BIoU over the stages that have maps."""
        return mean_biou(self.block_ious(word_a, word_b, q, steps, size))

    def guidance_counts(self, image: int | None = None) -> dict[str, int]:
        """How many (evaluation, image) pairs were applied, clipped, skipped by the gate, non-finite, not guided; of
        one image's evaluations with ``image``. Empty for a trace without guidance accounting."""
        status = self.guidance.get("status")
        if image is not None:
            self._check_image(image)
        if status is not None and image is not None:
            status = status[:, image]
        if status is None:
            return {}
        return {name: int((status == code).sum()) for name, code in STATUS.items()}

    def save(self, path: str, metadata: dict[str, str] | None = None) -> None:
        """Write the trace as ``.safetensors``: tensors plus a JSON description in the metadata (and ``metadata``'s
        entries, e.g. the workflow that made it, as ComfyUI's savers add). A trace :meth:`load` would refuse (one
        built by hand with fields BiasMap does not record) is refused here, before anything is written."""
        tensors = {f"maps.{s}": m for s, m in self.maps.items()} | {"sigmas": self.sigmas, "steps": self.steps}
        tensors = {k: v.detach().cpu().contiguous() for k, v in
                   (tensors | {f"guidance.{k}": v for k, v in self.guidance.items()}).items()}
        description = json.dumps({"format": _FORMAT, "version": _VERSION, "tokens": self.tokens,
                                  "latent_shape": self.latent_shape, "demographic": self.demographic,
                                  "semantic": self.semantic, "model_family": self.model_family,
                                  "settings": self.settings, "notes": self.notes, "run": self.run,
                                  "sha256": tensors_sha256(tensors)})
        too_large = size_problem(list(self.latent_shape))
        if too_large:  # recorded as the sampler records it: the fix is the batch's size
            raise ValueError(f"this trace is too large for a file Load Trace reads: {too_large}, and save each "
                             f"batch's trace")
        problem = description_problem(json.loads(description)) or tensors_problem(
            self.maps, self.sigmas, self.steps, self.guidance, list(self.latent_shape))
        if problem:
            raise ValueError(f"this trace cannot be saved as a file Load Trace reads: {problem}. Set that field as "
                             f"BiasMap's sampler records it")
        data = safetensors_bytes(tensors, metadata={**(metadata or {}), _FORMAT: description})
        # Written as an ordinary file: safetensors' own writer makes it readable by its owner alone.
        with open(path, "wb") as f:
            f.write(data)

    @staticmethod
    def is_trace_file(path: str) -> bool:
        """Whether ``path`` holds a trace (written by :meth:`save`), from its header alone: a model is not one."""
        try:
            with safe_open(path, framework="pt") as f:
                return _FORMAT in (f.metadata() or {})
        except (SafetensorError, OSError):
            return False

    @staticmethod
    def header_of(path: str) -> "TraceHeader | None":
        """The attribution prompt's tokens and the concepts of the trace at ``path``, from its header alone (for a
        check before sampling); None where it is no readable trace, which :meth:`load` then says why."""
        try:
            with safe_open(path, framework="pt") as f:
                description = json.loads(f.metadata()[_FORMAT])
            version = description["version"]
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError):
            return None
        readable = type(version) is int and 1 <= version <= _VERSION  # a later BiasMap's: load says to update
        if not readable or any(not is_list_of(description.get(name), str) for name in TraceHeader._fields):
            return None
        return TraceHeader(*(description[name] for name in TraceHeader._fields))

    @classmethod
    def load(cls, path: str) -> "BiasMapTrace":
        """Read a trace written by :meth:`save`; any other file, or a damaged one, raises TraceFormatError (one of
        a later BiasMap a ValueError)."""
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(_FORMAT)
            tensors = load_file(path) if raw else {}
        except FileNotFoundError:
            raise  # not a damaged trace: no file at all
        except (SafetensorError, OSError) as err:
            if os.path.isdir(path):
                raise TraceFormatError(f"{path} is a folder: give the path of a trace file in it") from err
            raise TraceFormatError(f"{path} is not a readable .safetensors file ({err}): it may be cut short (a "
                                   f"download or copy that did not finish) or not a BiasMap trace at all") from err
        if not raw:
            raise TraceFormatError(f"{path} is a .safetensors file but not a BiasMap trace (no '{_FORMAT}' metadata); "
                                   f"it may be a model checkpoint")
        try:
            meta = json.loads(raw)
            version = meta.get("version")
            if meta.get("format") != _FORMAT or type(version) is not int or version < 1:  # true/false are no version
                raise TypeError(f"format {meta.get('format')!r}, version {version!r}")
            if version > _VERSION:  # a trace, but of a later BiasMap: not a TraceFormatError
                raise ValueError(f"{path} is a version {version} BiasMap trace, and this BiasMap reads versions up "
                                 f"to {_VERSION}: update BiasMap to read it")
            fields = dict(maps={k[5:]: v for k, v in tensors.items() if k.startswith("maps.")},
                          tokens=meta["tokens"], sigmas=tensors["sigmas"], steps=tensors["steps"],
                          latent_shape=meta["latent_shape"], demographic=meta["demographic"],
                          semantic=meta["semantic"], model_family=meta["model_family"], settings=meta["settings"],
                          notes=meta["notes"], run=meta.get("run", {}),  # absent from traces saved before it was kept
                          guidance={k[9:]: v for k, v in tensors.items() if k.startswith("guidance.")})
        except (json.JSONDecodeError, RecursionError, KeyError, AttributeError, TypeError) as err:
            missing = f"no {err}" if isinstance(err, KeyError) else str(err) or type(err).__name__
            raise TraceFormatError(f"{path} is marked as a BiasMap trace, but its description is damaged or "
                                   f"incomplete ({missing})") from err
        # Types and sizes before anything is built of them: a trace from someone else is untrusted input.
        problem = description_problem(meta) or tensors_problem(
            fields["maps"], fields["sigmas"], fields["steps"], fields["guidance"], fields["latent_shape"])
        if problem:
            raise TraceFormatError(f"{path} is marked as a BiasMap trace, but {problem}: it is damaged, or was not "
                                   f"written by BiasMap")
        if "sha256" in meta and meta["sha256"] != tensors_sha256(tensors):  # traces saved before it have none
            raise TraceFormatError(f"{path} holds other maps and numbers than BiasMap saved in it (their checksum "
                                   f"differs): the file was changed after it was saved, by a disk, a copy or a "
                                   f"download that altered it; copy it again from where it was saved, or sample its "
                                   f"run again")
        try:
            return cls(**fields)
        except (ValueError, TypeError) as err:
            raise TraceFormatError(f"{path} is marked as a BiasMap trace, but its parts disagree ({err}): it was "
                                   f"written by an older BiasMap, or is damaged") from err

    def _evaluations(self, steps) -> torch.Tensor:
        if steps is None:
            return torch.ones_like(self.steps, dtype=torch.bool)
        first, last = _step_window(steps)
        chosen = (self.steps >= first) & (self.steps <= last)
        if not bool(chosen.any()):
            raise ValueError(f"no recorded step in the window {first}..{last}; this trace has maps of steps "
                             f"{_ranges(self.steps.unique().tolist())}"
                             + (" (a step missing in between had no maps: see the notes)"
                                if len(self.steps.unique()) < self.num_steps else "")
                             + ": set the step window (first_step, last_step; counted from 0) within those")
        return chosen

    def _check_stages(self, stages) -> list[str]:
        if stages is None:
            return self.stages
        if isinstance(stages, str):  # "down_1, up×1", as the nodes take them
            stages = [stages]
        # Ids, labels (down×1) or "all"; each stage once, or its maps would count twice.
        stages = list(dict.fromkeys(p for s in stages for p in ([s] if s in self.maps else
                                                                 parse_stages(s) or self.stages)))
        missing = [s for s in stages if s not in self.maps]
        if missing:
            middle = any(s.startswith("mid_") for s in missing) and not self.settings.get("include_middle", True)
            raise ValueError(f"stage(s) {', '.join(missing)} were not recorded; this trace has "
                             f"{', '.join(f'{s} ({stage_label(s)})' for s in self.stages)}"
                             + ": choose stages among these, or 'all'"
                             + (" (the middle block is recorded with the sampler's include_middle on)"
                                if middle else ""))
        return list(stages)


def mean_biou(block_ious: dict[str, torch.Tensor]) -> torch.Tensor:
    """mBIoU from :meth:`BiasMapTrace.block_ious`: per image, the mean over the stages that have maps."""
    return torch.stack(list(block_ious.values())).nanmean(dim=0)


def _check_q(q: float) -> None:
    """The measures' q: a fraction strictly between 0 and 1, where both masks have pixels to compare (q = 1 keeps
    none, whose IoU of 0 would read as no overlap)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be a fraction between 0 and 1 (the masks keep the pixels above that quantile: the "
                         f"paper's 0.7 keeps the top 30 %), got {q}")


def _step_window(steps) -> tuple[int, int]:
    """One step, or an inclusive (first, last) pair, as ints (numpy and 0-d tensor integers too)."""
    try:
        return (operator.index(steps),) * 2
    except TypeError:
        pass
    try:
        first, last = (operator.index(s) for s in steps)
        return first, last
    except (TypeError, ValueError):
        raise ValueError(f"steps must be one step or an inclusive (first, last) pair of steps, got {steps!r}") from None


def _ranges(numbers: list[int]) -> str:
    """Sorted distinct integers as ranges: [0, 1, 2, 4, 6, 7] → "0..2, 4, 6..7"."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)
