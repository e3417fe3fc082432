"""Relative reductions of entanglement from audit rows, as the paper reports them (BiasMap, arXiv 2509.13496, §3).

An audit CSV holds rows of guided runs and of the same images at λ = 0. Each guided row is paired with the λ = 0 row
of the same image (seed, noise, prompts, model, sampler settings, concept pair and q); the reduction is given both
ways the paper gives it: of the means, (mean_base − mean_guided) / mean_base, and the mean of per-image reductions.
Rows come as ``audit_rows`` makes them or as ``csv.DictReader`` reads the file back (every value a string).
"""

import math

__all__ = ["reductions"]

# What makes two rows the same image of the same concept pair, measured the same way: all but the guidance settings.
_IMAGE = ("seed", "noise_index", "steps", "cfg", "sampler", "scheduler", "denoise", "add_noise", "width", "height",
          "generation_prompt", "negative_prompt", "attribution_prompt", "model", "model_family", "demographic",
          "semantic", "q")
# What tells one guided configuration from another (a sweep of λ, or of the stages guided).
_GUIDANCE = ("guidance_scale", "branch", "include_middle", "soft_topk", "soft_topk_keep", "gamma", "gate",
             "guided_stages", "start", "end", "sinkhorn_iters")


def reductions(rows, metric: str = "iou", by: str | None = "semantic") -> list[dict]:
    """Per guided configuration (and per value of column ``by``, e.g. each profession; None: all rows together):
    how many images were paired with their λ = 0 row, both means of ``metric`` and both relative reductions."""
    rows = list(rows)
    missing = [c for c in ("guidance_scale", metric, *([by] if by else [])) if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"the rows have no column(s) {', '.join(missing)}: give rows of a BiasMap audit CSV and a "
                         f"metric such as iou, mbiou or biou_down_1")
    base = {_key(row, _IMAGE): _number(row[metric]) for row in rows if _number(row["guidance_scale"]) == 0}
    pairs: dict[tuple, list[tuple[float, float]]] = {}
    for row in rows:
        if _number(row["guidance_scale"]) == 0:
            continue
        before, after = base.get(_key(row, _IMAGE), math.nan), _number(row[metric])
        if math.isfinite(before) and math.isfinite(after):  # n/a images (no maps to threshold) pair with nothing
            group = _key(row, _GUIDANCE) + ((row[by],) if by else ())
            pairs.setdefault(group, []).append((before, after))
    if not pairs:
        raise ValueError("no guided row has a λ = 0 row of the same image: log the same seeds, prompts and settings "
                         "with guidance_scale 0 into the file too")
    return [_summary(group, values, by) for group, values in pairs.items()]


def _summary(group: tuple, values: list[tuple[float, float]], by: str | None) -> dict:
    settings = dict(zip(_GUIDANCE, group))
    before = sum(b for b, _ in values) / len(values)
    after = sum(a for _, a in values) / len(values)
    per_image = [(b - a) / b for b, a in values if b > 0]  # an image without overlap at λ = 0 has nothing to reduce
    return {**{k: v for k, v in settings.items() if v != ""}, **({by: group[-1]} if by else {}),
            "images": len(values), "base": before, "guided": after,
            "reduction": (before - after) / before if before > 0 else math.nan,
            "mean_image_reduction": sum(per_image) / len(per_image) if per_image else math.nan}


def _key(row: dict, columns: tuple) -> tuple:
    # A CSV read back gives strings, audit_rows numbers: compared as numbers where they are numbers.
    return tuple(_number(row.get(c, "")) if _is_number(row.get(c, "")) else str(row.get(c, "")) for c in columns)


def _number(value) -> float:
    return float(value) if _is_number(value) else math.nan


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
