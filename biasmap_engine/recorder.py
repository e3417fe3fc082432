"""TraceRecorder: a run's maps gathered on the device, one model evaluation at a time, into a :class:`BiasMapTrace`."""

import torch

from .ovam import largest_grid
from .trace import BiasMapTrace

__all__ = ["TraceRecorder"]


class _Sums:
    """One evaluation's maps as its layers arrive: per stage, the weighted sum over layers and entries, the total
    weight of every (layer, entry) added and the layers added."""

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float | torch.Tensor] = {}
        self.layers: dict[str, set] = {}

    def add(self, stage: str, maps: torch.Tensor, layers: list, weight) -> None:
        previous = self.maps.get(stage)
        self.maps[stage] = maps if previous is None else previous + maps
        self.weights[stage] = self.weights.get(stage, 0.0) + weight * len(layers)
        self.layers.setdefault(stage, set()).update(object() if layer is None else layer for layer in layers)

    def weighting(self) -> dict[str, tuple]:
        return {s: (self.weights[s], len(self.layers[s])) for s in self.maps}

    def means(self, weighting=None) -> dict[str, torch.Tensor]:
        weighting = weighting or self.weighting()
        return {s: _weighted_mean(m, *weighting[s]) for s, m in self.maps.items()}


class TraceRecorder:
    """Accumulates one run's maps on the device, one model evaluation at a time; :meth:`finish` builds the trace.

    Layers of one stage are summed as they arrive; nothing leaves the device until the run ends. When the recorded
    CFG branch has several conditioning entries (ConditioningCombine), each runs through every layer: the
    evaluation's maps are their mean weighted by the entries' strengths and masks, as ComfyUI weighs their noise
    predictions. With ``split_guided``, the layers whose maps enter the energy (a subset of the U-Net's blocks) are
    also summed apart: the trace's stages follow the grid a layer runs at, which nodes such as Kohya Deep Shrink change
    between steps, while guidance keeps to the blocks chosen.
    """

    def __init__(self, split_guided: bool = False):
        self._stage_maps: dict[str, list[tuple[int, torch.Tensor]]] = {}  # stage → (row among ended evaluations, maps)
        self._split_guided = split_guided
        self._current, self._guided = _Sums(), _Sums()
        self._sigmas, self._steps = [], []
        self._sampler_steps: list[int] = []  # from step_started, for the evaluations up to the latest report
        self._reported, self._last_step = 0, None
        self._skipped: list[bool] = []  # per evaluation: no maps, the U-Net never ran (skip)
        self.steps_without_evaluation: list[int] = []  # sampler steps reported with no evaluation since the last
        self._guidance: dict[str, list[torch.Tensor]] = {"energy": [], "grad_norm": [], "status": []}
        self._unweighted: list = [False, False]  # entries weighed nothing somewhere, on a whole image (on the device)

    def begin(self, sigma: torch.Tensor, step: torch.Tensor) -> None:
        """Open a model evaluation at noise level σ, of sampler step ``step`` as far as σ tells (0-d tensors: no host
        sync); :meth:`step_started` gives the sampler's own count where it reports one."""
        self.restart()
        self._sigmas.append(torch.as_tensor(sigma).detach().float().reshape(()))
        self._steps.append(torch.as_tensor(step).detach().long().reshape(()))
        self._skipped.append(False)

    def step_started(self, step: int) -> None:
        """The sampler reports step ``step`` (k-diffusion's per-step callback, made after the step's first evaluation).

        The latest evaluation is that step's first; the others since the previous report belong to the previous step
        (Heun's corrector, a midpoint, a PECE corrector's evaluation), whatever their σ.
        """
        pending = range(self._reported, len(self._sigmas))
        if not pending:  # no evaluation of the step reached the recorder, not even to be skipped
            self.steps_without_evaluation.append(step)
        earlier = self._last_step if self._last_step is not None else max(step - 1, 0)
        self._sampler_steps += [earlier] * (len(pending) - 1) + [step] * bool(pending)
        self._reported, self._last_step = len(self._sigmas), step

    def add(self, stage: str, maps: torch.Tensor, layer=None, weight: float | torch.Tensor = 1.0,
            guided: bool = True) -> None:
        """Add one layer's ``[B, N, h, w]`` maps to the open evaluation, graph kept.

        ``maps`` may hold several conditioning entries' maps, each multiplied by its weight and summed; ``weight`` is
        then their total weight, a number or per pixel ``[B, 1, h, w]``. A stage's maps are the sum over its layers
        of the entries' weighted mean. Entries are counted at every layer (``layer`` names it; None: a new one), so
        entries split over several U-Net calls, and stages whose layers change between steps, are counted right.
        ``guided``: the layer's maps enter the energy (with ``split_guided``; otherwise every layer's do).
        """
        self.add_layers(stage, maps, [layer], weight, guided)

    def add_layers(self, stage: str, maps: torch.Tensor, layers: list, weight: float | torch.Tensor = 1.0,
                   guided: bool = True) -> None:
        """:meth:`add` for the sum of several layers' maps of the same entries, each layer's weighing ``weight``."""
        self._current.add(stage, maps, layers, weight)
        if self._split_guided and guided:
            self._guided.add(stage, maps, layers, weight)

    @property
    def has_maps(self) -> bool:
        """Whether the open evaluation has any map yet."""
        return bool(self._current.maps)

    @property
    def current_grid(self) -> tuple[int, int]:
        """The largest attention grid of the open evaluation, where OVAM sums its stages."""
        return largest_grid(self._current.maps.values())

    def skip(self) -> None:
        """Close the open evaluation as one in which the U-Net never ran (a cache answered it): it has no maps and is
        left out of the trace, but keeps its place until then, so the evaluations after it get their steps right."""
        self._skipped[-1] = True
        self.restart()

    def skipped_steps(self) -> list[int]:
        """The steps of the skipped evaluations, in order."""
        return [s for s, skipped in zip(self._step_labels().tolist(), self._skipped) if skipped]

    def restart(self) -> None:
        """Drop the open evaluation's maps: when an evaluation opens or closes, and for a U-Net pass that is run again
        (after running out of memory)."""
        self._current, self._guided = _Sums(), _Sums()

    def current(self, guided: bool = False, weighting=None) -> dict[str, torch.Tensor]:
        """The open evaluation's per-stage maps (weighted mean over entries), still differentiable; ``guided``: those
        of the layers that enter the energy.

        ``weighting`` (another recorder's :meth:`weighting`) divides by that recorder's weights instead: with it, the
        maps of a part of an evaluation's entries are their share of the other recorder's maps.
        """
        return self._sums(guided).means(weighting)

    def weighting(self, guided: bool = False) -> dict[str, tuple]:
        """Per stage of the open evaluation: the total weight of its (layer, entry) maps and its number of layers."""
        return self._sums(guided).weighting()

    def _sums(self, guided: bool) -> _Sums:
        return self._guided if guided and self._split_guided else self._current

    def end(self, energy=None, grad_norm=None, status=None) -> None:
        """Close the evaluation, storing detached maps and the guidance accounting for it."""
        if not self._current.maps:
            raise RuntimeError("end() of an evaluation that recorded no map: call skip() for one the U-Net never ran "
                               "in (BiasMapSession does; DiT models are refused before sampling)")
        row = len(self._guidance["energy"])
        self._check_weight(next(iter(self._current.weights.values())))
        for stage, maps in self.current().items():
            self._stage_maps.setdefault(stage, []).append((row, maps.detach().float()))
        first = next(iter(self._current.maps.values()))
        batch, device = first.shape[0], first.device
        nan = torch.full((batch,), float("nan"), device=device)
        self._guidance["energy"].append(nan if energy is None else energy.detach().float())
        self._guidance["grad_norm"].append(nan if grad_norm is None else grad_norm.detach().float())
        self._guidance["status"].append(torch.zeros(batch, dtype=torch.int8, device=device) if status is None
                                        else status.to(torch.int8))
        self.restart()

    def unweighted(self) -> str | None:
        """Whether the recorded entries weighed nothing on an evaluation: on "all" of an image (strength 0, an empty
        mask), on "part" of one (a mask leaving part out), or None. A wait for the device: read when the run ends."""
        somewhere, everywhere = (bool(flag) for flag in self._unweighted)
        return "all" if everywhere else "part" if somewhere else None

    def _check_weight(self, weight: float | torch.Tensor) -> None:
        """Keep whether an evaluation's entries weighed nothing somewhere (its maps are 0 there): for a mask's weight
        on the device, without waiting for it; every stage has the same entries, so one stage's weight tells."""
        if isinstance(weight, torch.Tensor):  # [B, 1, h, w]: kept as two flags on the device, read once
            none = weight.detach().flatten(1) <= 0
            self._unweighted = [self._unweighted[0] | none.any(), self._unweighted[1] | none.all(1).any()]
        elif weight <= 0:
            self._unweighted = [True, True]

    def finish(self, **fields) -> BiasMapTrace:
        """Stack every evaluation and move the trace to the CPU."""
        kept = torch.tensor([not skipped for skipped in self._skipped], dtype=torch.bool)
        if not bool(kept.any()):
            raise RuntimeError("no model evaluation of the run reached the U-Net, so nothing was recorded: sample at "
                               "least one step, and bypass any node that answers every evaluation without the U-Net "
                               "(a cache)")
        rows = len(self._guidance["energy"])
        return BiasMapTrace(maps={s: _every_row(v, rows) for s, v in self._stage_maps.items()},
                            sigmas=torch.stack(self._sigmas).cpu()[kept], steps=self._step_labels()[kept],
                            guidance={k: torch.stack(v).cpu() for k, v in self._guidance.items()}, **fields)

    def _step_labels(self) -> torch.Tensor:
        """Each evaluation's step: the sampler's reports where it made any (later evaluations: its last step), else
        σ's."""
        if self._last_step is None:
            return torch.stack(self._steps).cpu()
        trailing = [self._last_step] * (len(self._sigmas) - self._reported)
        return torch.tensor(self._sampler_steps + trailing, dtype=torch.long)


def _every_row(entries: list[tuple[int, torch.Tensor]], rows: int) -> torch.Tensor:
    """A stage's maps with one row per evaluation, on the CPU: zeros where the stage had no layer, as when Kohya Deep
    Shrink runs some blocks at another grid on its steps (the stage's sum over evaluations is then over the others)."""
    if len(entries) == rows:
        return torch.stack([m for _, m in entries]).cpu()
    stacked = entries[0][1].new_zeros((rows, *entries[0][1].shape))
    for row, maps in entries:
        stacked[row] = maps
    return stacked.cpu()


def _weighted_mean(total: torch.Tensor, weight: float | torch.Tensor, layers: int) -> torch.Tensor:
    """A stage's weighted sum over layers and entries → the sum over its layers of the entries' weighted mean.

    Every layer of a stage sees the same entries with the same weights, so the entries' total weight is
    ``weight / layers``; pixels that no entry covers (weight 0) stay 0, as in ComfyUI.
    """
    if isinstance(weight, torch.Tensor):
        return total * layers / weight.clamp_min(1e-30)
    return total if weight in (0.0, float(layers)) else total * (layers / weight)
