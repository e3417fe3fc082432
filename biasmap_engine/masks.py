"""Hard top-q masks and IoU of attribution maps (BiasMap §3, the reported metric)."""

import torch

__all__ = ["hard_mask", "iou"]


def hard_mask(maps: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Masks of the pixels strictly above each map's q-quantile (linear interpolation, as numpy.quantile).

    Works on ``[..., H, W]``; every ``H×W`` map gets its own threshold. ``q = 0.7`` keeps the top 30 %.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be a fraction in [0, 1], got {q}")
    flat = maps.flatten(-2)
    # Half-precision quantiles are both slow and unsupported on some devices; thresholds are compared in fp32 or wider.
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    threshold = torch.quantile(flat, q, dim=-1, keepdim=True)
    return (flat > threshold).view(maps.shape)


def iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """|A ∧ B| / |A ∨ B| per map pair over the last two dims; 0 where the union is empty."""
    a, b = mask_a.bool().flatten(-2), mask_b.bool().flatten(-2)
    intersection = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.zeros_like(union))
