"""BiasMap recording and guidance settings; defaults are the paper configuration (arXiv 2509.13496 §2–§5, and the
authors' code where the paper is silent)."""

import math
from dataclasses import asdict, dataclass, fields

from .guidance import GATES
from .soft_masks import check_soft_topk

__all__ = ["BRANCHES", "QUALITY_COLLAPSES_AT", "SETTING_NAMES", "BiasMapSettings"]

BRANCHES = ("uncond", "cond")  # the CFG branch whose queries build the maps, default first
QUALITY_COLLAPSES_AT = 400  # λ from which the paper's images degrade on SD 1.5 (FID above 100; BiasMap §1)


@dataclass(frozen=True)
class BiasMapSettings:
    """What to record and how to guide. ``scale`` = 0 records only and leaves sampling bit-identical."""

    scale: float = 100.0  # λ
    branch: str = "uncond"  # CFG branch whose queries build the maps (OVAM stores batch element 0, the uncond half)
    include_middle: bool = False  # OVAM leaves the middle block out
    mode: str = "paper"  # soft top-k: the reference's row-wise Sinkhorn, or the converged global solve
    keep: float = 0.3  # soft top-k keeps this fraction (= 1 − q)
    gamma: float = 0.01
    iters: int = 20  # Sinkhorn iterations of ``paper`` mode
    gate: str = "skip"  # the reference skips a step with ‖∇_z E‖ ≥ 1; ``clip`` rescales to norm 1
    guided_stages: tuple[str, ...] | None = None  # None = every recorded stage
    start: float = 0.0  # σ window as points of the model's noise range, as ComfyUI's start/end_percent
    end: float = 1.0

    def __post_init__(self):
        check_soft_topk(self.keep, self.gamma, self.mode, self.iters)
        checks = [(self.branch in BRANCHES, f"branch must be one of {BRANCHES}, got {self.branch!r}"),
                  (self.gate in GATES, f"gate must be one of {GATES}, got {self.gate!r}"),
                  (0 <= self.scale < math.inf, f"the guidance scale λ must be a number ≥ 0, got {self.scale}"),
                  (0.0 <= self.start < self.end <= 1.0,
                   f"the guidance window needs 0 ≤ start < end ≤ 1 (start = end guides nothing), got "
                   f"start={self.start}, end={self.end}"),
                  (self.include_middle or not any(s.startswith("mid_") for s in self.guided_stages or ()),
                   "the middle block's stages are recorded, and so can be guided, only with include_middle on: "
                   "turn it on or leave them out of guided_stages")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def guiding(self) -> bool:
        return self.scale != 0.0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


SETTING_NAMES = frozenset(f.name for f in fields(BiasMapSettings))  # what a trace's settings may hold
