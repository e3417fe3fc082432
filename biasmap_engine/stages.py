"""U-Net stages: which cross-attention layers belong together for block-wise IoU (BiasMap §2, §3)."""

import math

__all__ = ["STAGE_ORDER", "stage_id", "stage_of", "stage_label", "parse_stages"]

# Stage ids are ASCII (they name tensors in saved traces): direction and resolution divisor relative to the latent.
_DIVISORS = (1, 2, 4, 8, 16)
STAGE_ORDER = (tuple(f"down_{d}" for d in _DIVISORS) + tuple(f"mid_{d}" for d in _DIVISORS)
               + tuple(f"up_{d}" for d in reversed(_DIVISORS)))
_DIRECTION = {"input": "down", "middle": "mid", "output": "up"}
_FRACTION = {1: "1", 2: "½", 4: "¼", 8: "⅛", 16: "1/16"}


def stage_of(block: tuple, latent_hw: tuple[int, int], attention_hw: tuple[int, int]) -> str:
    """The stage id of a layer, e.g. ``("input", 4)`` at half the latent size → ``"down_2"``.

    The divisor is read from the real grid sizes, so non-square latents and sizes that are not multiples of 64
    (where ⌈h/2⌉ grids appear) name the same stage as the square case.
    """
    return stage_id(block, 2 ** round(math.log2(max(latent_hw[0] / attention_hw[0], 1.0))))


def stage_id(block: tuple, divisor: int) -> str:
    """The stage id of a block at ``divisor`` times smaller than the latent: ``("input", 4)``, 2 → ``"down_2"``."""
    direction = _DIRECTION.get(block[0])
    if direction is None:
        raise ValueError(f"unknown U-Net block {block!r}; expected input, middle or output")
    return f"{direction}_{divisor}"


def stage_label(stage: str) -> str:
    """Human label of a stage id: ``"down_2"`` → ``"down×½"``."""
    direction, divisor = stage.split("_")
    return f"{direction}×{_FRACTION.get(int(divisor), '1/' + divisor)}"


def parse_stages(text: str, available: list[str] | None = None) -> list[str] | None:
    """Comma-separated stage ids (``down_1``, any case) or labels (``down×1``) → ids; ``""`` or ``"all"`` → None."""
    if text.strip().lower() in ("", "all"):
        return None
    aliases = {s: s for s in STAGE_ORDER} | {stage_label(s): s for s in STAGE_ORDER}
    choices = list(available) if available is not None else list(STAGE_ORDER)
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        stage = aliases.get(part, aliases.get(part.lower()))
        if stage is None or stage not in choices:
            raise ValueError(f"unknown stage {part!r}; choose from {', '.join(choices)} or 'all'")
        stages.append(stage)
    if not stages:  # only separators: a typo, not a choice of stages
        raise ValueError(f"no stage named in {text!r}; give stage ids such as down_1, up_1, or 'all'")
    return stages
