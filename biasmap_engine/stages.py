"""U-Net stages: which cross-attention layers belong together for block-wise IoU (BiasMap §2, §3)."""

import math
import re

__all__ = ["STAGE_ORDER", "finest_grid", "stage_id", "stage_of", "stage_grid", "stage_label", "parse_stages"]

# Stage ids are ASCII (they name tensors in saved traces): direction and resolution divisor relative to the latent.
_DIVISORS = (1, 2, 4, 8, 16)
STAGE_ORDER = (tuple(f"down_{d}" for d in _DIVISORS) + tuple(f"mid_{d}" for d in _DIVISORS)
               + tuple(f"up_{d}" for d in reversed(_DIVISORS)))
_DIRECTION = {"input": "down", "middle": "mid", "output": "up"}
_FRACTION = {1: "1", 2: "½", 4: "¼", 8: "⅛", 16: "1/16"}
_TYPED_FRACTION = {"½": "1/2", "¼": "1/4", "⅛": "1/8"}  # as a keyboard types them


def stage_of(block: tuple, latent_hw: tuple[int, int], attention_hw: tuple[int, int], built: str | None = None) -> str:
    """The stage id of a layer, e.g. ``("input", 4)`` at half the latent size → ``"down_2"``.

    The divisor is the one whose grid the layer runs at: a U-Net level's stride-2 convolutions make ⌈h/d⌉×⌈w/d⌉
    grids, so non-square latents and sizes that are not multiples of 64 name the same stages as the square case, and
    the levels of a latent a few pixels high are told apart by their widths. ``built``: the layer's stage as the
    U-Net is built (unet.block_stages); it names the layer whenever it runs at that stage's grid, also where the
    deepest levels of a tiny latent share one grid. A grid no level makes (a node resizing inside the U-Net: Kohya
    Deep Shrink by a factor that is not 2, or at odd sizes) takes the divisor nearest by area, at most the deepest
    level's (Deep Shrink by 9 runs a 512² image's deepest level at 2×2); its maps are resampled to that stage's grid
    (:func:`stage_grid`) when recorded.
    """
    attention_hw = tuple(attention_hw)
    grids = {d: _grid(latent_hw, d) for d in _DIVISORS}
    if built is not None and grids.get(_divisor(built)) == attention_hw:
        return built
    divisor = next((d for d, grid in grids.items() if grid == attention_hw), None)
    if divisor is None:
        area_ratio = latent_hw[0] * latent_hw[1] / (attention_hw[0] * attention_hw[1])
        divisor = min(2 ** round(math.log2(max(area_ratio, 1.0)) / 2), _DIVISORS[-1])  # a stage traces can name
    return stage_id(block, divisor)


def stage_grid(stage: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid a stage's levels run at: ``"down_2"`` of a 13×21 latent → 7×11 (⌈h/d⌉×⌈w/d⌉)."""
    return _grid(latent_hw, _divisor(stage))


def finest_grid(stages, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid of the finest of ``stages`` (the smallest divisor) at ``latent_hw``: the largest attention grid, where
    OVAM sums their maps."""
    return stage_grid(min(stages, key=_divisor), latent_hw)


def _grid(latent_hw, divisor: int) -> tuple[int, int]:
    return -(-latent_hw[0] // divisor), -(-latent_hw[1] // divisor)


def _divisor(stage: str) -> int:
    return int(stage.rsplit("_", 1)[1])


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


def parse_stages(text: str) -> list[str] | None:
    """Stage ids (``down_1``, any case) or labels (``down×1``, also typed ``down x 1/2``) separated by commas or spaces
    (as a report and the audit CSV write them) → ids, each once, in the U-Net's order (any order typed guides alike);
    ``""`` or ``"all"`` (with stray commas, or twice) → None."""
    read = re.sub(r"(?i)\b(down|mid|up)\s*[x×]\s*", r"\1×", text)  # 'down x 1/2' as one label
    parts = [p for p in re.split(r"[,\s]+", read) if p]
    if not text.strip() or {p.lower() for p in parts} == {"all"}:
        return None
    if "all" in (p.lower() for p in parts):
        raise ValueError(f"'all' is every stage, so it goes alone: give 'all', or the stages without it (got "
                         f"{text!r})")
    labels = {stage_label(s): s for s in STAGE_ORDER}
    aliases = {s: s for s in STAGE_ORDER} | labels | {_typed(label): s for label, s in labels.items()}
    stages = []
    for part in parts:
        stage = aliases.get(part.lower())
        if stage is None:
            typed = f" in {text!r}" if read != text else ""
            raise ValueError(f"unknown stage {part!r}{typed}{_meant(part.lower())}; choose from "
                             f"{', '.join(STAGE_ORDER)} or 'all', or name them as the reports do (down×1, down×½, …, "
                             f"up×1: the grid's scale against the latent's)")
        stages.append(stage)
    if not stages:  # only separators: a typo, not a choice of stages
        raise ValueError(f"no stage named in {text!r}; give stage ids such as down_1, up_1, or 'all'")
    return [stage for stage in STAGE_ORDER if stage in stages]


def _typed(label: str) -> str:
    """A stage label as a keyboard types it: ``down×½`` → ``down×1/2``."""
    return "".join(_TYPED_FRACTION.get(c, c) for c in label)


def _meant(part: str) -> str:
    """The stage an unknown name would be: an id without its underscore (``down1``), or a label with the divisor where
    the reports write its fraction (``down×2``)."""
    match = re.fullmatch(r"(down|mid|up)(×?)(\d+)", part)
    stage = f"{match[1]}_{match[3]}" if match else None
    if stage not in STAGE_ORDER or stage_label(stage) == part:
        return ""
    if not match[2]:
        return f" (meant {stage}?)"
    return f" (the number after × is the grid's scale: {stage} is {stage_label(stage)}, at 1/{match[3]} of the latent)"
