"""The BiasMap guidance update in ComfyUI's σ-space (BiasMap §5).

The paper adds λ·√(1−ᾱ)·∇_z E to the noise prediction ε. ComfyUI samplers read the model through
denoised = x − σ·ε on the VE latent x = z·√(1+σ²), with ᾱ = 1/(1+σ²); the same update is

    denoised ← denoised − λ·σ²·∇_x E,

exact for any prediction (ε, v, x₀, LCM) under variance-preserving noise, since it acts on the denoised the
prediction implies (host/unet.require_guidable refuses other sampling). The reference skips a step whose
‖∇_z E‖₂ ≥ 1 (``skip``); ``clip`` rescales the gradient to norm 1 instead. Every image of every evaluation gets a
status, so no step is hidden.
"""

import torch

from .ovam import concept_map
from .soft_masks import soft_iou, soft_topk

__all__ = ["GATES", "STATUS", "entanglement_energy", "guidance_step", "z_grad_norm"]

GATES = ("skip", "clip")
# Status per image and evaluation, stored as small ints in traces.
STATUS = {"not_guided": 0, "applied": 1, "clipped": 2, "skipped_gate": 3, "skipped_nonfinite": 4}


def z_grad_norm(grad_x: torch.Tensor, sigma) -> torch.Tensor:
    """‖∇_z E‖₂ per image from ∇_x E, using ∇_z = √(1+σ²)·∇_x."""
    return grad_x.flatten(1).norm(dim=1) * torch.sqrt(1 + _per_image(sigma, grad_x).to(grad_x.dtype) ** 2)


def _per_image(sigma, like: torch.Tensor) -> torch.Tensor:
    """σ as ``[B]`` for the images of ``like``: one σ (a number, 0-d or ``[1]``) is every image's."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.numel() not in (1, like.shape[0]):
        raise ValueError(f"sigma must be one value or one per image ({like.shape[0]}), got shape "
                         f"{tuple(sigma.shape)}")
    return sigma.reshape(-1).expand(like.shape[0])


def guidance_step(denoised: torch.Tensor, grad_x: torch.Tensor, sigma: torch.Tensor, scale: float,
                  gate: str = "skip", max_norm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided denoised, ‖∇_z E‖ and status per image; all on the input's device, no host synchronisation."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    wide = torch.promote_types(denoised.dtype, torch.float32)  # fp32 at least; float64 stays float64
    grad, sigma = grad_x.to(wide), _per_image(sigma, grad_x)
    norm = z_grad_norm(grad, sigma)
    # A gradient's norm is NaN or inf where any of its values is: one test per image, not one per value.
    finite = torch.isfinite(norm)
    small = norm < max_norm  # False where not finite
    if gate == "skip":
        factor = small.float()
        status = torch.where(small, STATUS["applied"], STATUS["skipped_gate"])
    else:
        factor = torch.where(finite, (max_norm / norm.clamp_min(1e-30)).clamp(max=1.0), torch.zeros_like(norm))
        status = torch.where(small, STATUS["applied"], STATUS["clipped"])
    status = torch.where(finite, status, STATUS["skipped_nonfinite"]).to(torch.int8)
    per_image = (-1, *([1] * (grad.dim() - 1)))  # [B, 1, …]: over each image's latent
    sigma2 = sigma.to(wide).view(per_image) ** 2
    step = scale * sigma2 * factor.to(wide).view_as(sigma2) * grad
    # An image not moved (gated, non-finite, or λ = 0) keeps its values as they were, chosen, not computed: its step
    # is NaN where its gradient is (NaN · 0 is NaN), or where λσ² is past the dtype's range (inf · 0). λ is a number,
    # not a tensor: tested here, not by a kernel of every guided evaluation.
    kept = (factor == 0).view(per_image) if scale else torch.ones_like(factor, dtype=torch.bool).view(per_image)
    before = denoised.to(wide)
    return torch.where(kept, before, before - step).to(denoised.dtype), norm, status


def entanglement_energy(token_maps: torch.Tensor, pairs: list[tuple[list[int], list[int]]], keep: float = 0.3,
                        gamma: float = 0.01, mode: str = "paper", iters: int = 20) -> torch.Tensor:
    """E per image: the mean SoftIoU of soft top-k masks over (demographic, semantic) concept pairs.

    ``token_maps`` is ``[B, N, H, W]`` (one evaluation's aggregated maps); each pair holds two position lists.
    """
    if not pairs:
        raise ValueError("no (demographic, semantic) concept pair to guide; give at least one word of each")
    if token_maps.dim() != 4:  # an unbatched [N, H, W] would be read as N images of H maps
        raise ValueError(f"token_maps must be [B, N, H, W], got shape {tuple(token_maps.shape)}; use maps[None] for "
                         f"one image")
    if token_maps.dtype != torch.float64:  # the energy in fp32 at least, whatever the maps' dtype
        token_maps = token_maps.float()
    concepts = sorted({tuple(p) for pair in pairs for p in pair})
    # Every concept's soft mask in one call: one set of Sinkhorn launches instead of one per concept.
    soft = soft_topk(torch.stack([concept_map(token_maps, list(c)) for c in concepts], dim=1), keep, gamma, mode, iters)
    index = {c: i for i, c in enumerate(concepts)}
    energies = [soft_iou(soft[:, index[tuple(a)]], soft[:, index[tuple(b)]]) for a, b in pairs]
    return torch.stack(energies).mean(dim=0)
