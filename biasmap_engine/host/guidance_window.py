"""Which evaluations of a run are guided: the σ window (start/end as ComfyUI's start_percent and end_percent) and the
σ cap above which no step is guided (BiasMap §5), counted for the run's notes."""

import math

import torch

from ..settings import BiasMapSettings

__all__ = ["GuidanceWindow", "SIGMA_CAP"]

# Twice the largest σ of SD's schedule (14.6), for which the paper's λ is set: above it, as on the first steps of a
# zero-terminal-SNR schedule (σ 4519) or an EDM one, the correction's size in the x₀ prediction, about λ·σ·‖∇_z E‖,
# grows past what λ was set for, and at σ 4519 wrecks the image. Such evaluations are left unguided, with a note.
SIGMA_CAP = 2 * 14.6146


class GuidanceWindow:
    """The guidance window of one run: σ is read on the host per evaluation only where the window is narrower than
    the model's noise range or the schedule goes past SIGMA_CAP; SD's own schedules, guided whole, read nothing."""

    def __init__(self, model_patcher, settings: BiasMapSettings):
        self.settings = settings
        # The σ range guided, read once now: None where it is the model's whole noise range.
        self._sigmas = _guided_sigmas(model_patcher, settings) if settings.guiding else None
        self._hits = 0  # evaluations inside the window
        self._above_cap = 0  # evaluations in the window but above SIGMA_CAP, left unguided
        self._highest = 0.0  # the highest σ of those

    def widen_for(self, sigmas: torch.Tensor) -> None:
        """The schedule a custom sampler is given (SIGMAS of any range, e.g. KarrasScheduler's σ_max 80 on SD): σ is
        then read per evaluation where it goes past SIGMA_CAP. Read here, before sampling (SIGMAS are on the CPU)."""
        if self.settings.guiding and self._sigmas is None and float(sigmas.max()) > SIGMA_CAP:
            self._sigmas = (0.0, math.inf)

    def admits(self, timestep: torch.Tensor) -> bool:
        """Whether the evaluation at ``timestep`` (σ) is guided; counted."""
        if not self.settings.guiding:
            return False
        if self._sigmas is not None:  # a host read of σ: a narrower window, or σ past the cap
            low, high = self._sigmas
            sigma = float(timestep.reshape(-1)[0])
            if not low <= sigma <= high:
                return False
            if sigma > SIGMA_CAP:
                self._above_cap += 1
                self._highest = max(self._highest, sigma)
                return False
        self._hits += 1
        return True

    def notes(self) -> list[str]:
        """What the run's notes say of the window: evaluations above the cap, or none guided."""
        notes = []
        if self._above_cap:
            notes.append(f"{self._above_cap} evaluation(s) at σ above {SIGMA_CAP:.1f} were not guided"
                         + (", the later ones were" if self._hits else
                            ", and no other fell in the guidance window, so nothing was guided")
                         + f": this schedule goes past SD's σ 14.6, for which the paper's λ is set (zero terminal "
                           f"SNR, an EDM schedule, custom sigmas), and there the correction would move the x₀ "
                           f"prediction by about λ·σ·‖∇_z E‖, at this run's σ {self._highest:.4g} enough to wreck the "
                           f"image")
        if self.settings.guiding and not self._hits and not self._above_cap:
            notes.append(f"no evaluation of this run fell in the guidance window (start {self.settings.start:g}, end "
                         f"{self.settings.end:g}: points of the model's whole noise range, as ComfyUI's start_percent "
                         f"and end_percent, not of this run's steps; with denoise < 1 or split sigmas a run covers "
                         f"only part of it), so nothing was guided: widen the window")
        return notes


def _guided_sigmas(model_patcher, settings: BiasMapSettings) -> tuple[float, float] | None:
    """The (lowest, highest) σ of the guidance window; None where it is the model's whole noise range and that stays
    under SIGMA_CAP. Host reads, once, before sampling."""
    sampling = model_patcher.get_model_object("model_sampling")
    whole = settings.start <= 0.0 and settings.end >= 1.0
    if whole and float(sampling.sigma_max) <= SIGMA_CAP:
        return None
    return sampling.percent_to_sigma(settings.end), sampling.percent_to_sigma(settings.start)
