"""Open-vocabulary attribution maps (OVAM, Marcos-Manchón et al., CVPR 2024) as BiasMap aggregates them (§2).

A layer's map for attribution token j is softmax_j(Q K′ᵀ / √d_head), with queries Q from the layer's attention
input and keys K′ = to_k(X′) from the attribution prompt's embeddings X′, summed over heads. Maps of a stage are
summed over its layers; stages are upsampled bilinearly to the largest attention resolution and summed.

Recording runs in every cross-attention layer of every model evaluation, where a GPU at SD sizes is bound by kernel
launches, not arithmetic: :func:`head_block_keys` prepares a layer's keys once per run so that
:func:`block_token_softmax_maps` needs one product, one softmax and one sum, with no transposed copies.
"""

import torch
import torch.nn.functional as F

__all__ = ["token_softmax_maps", "head_block_keys", "block_token_softmax_maps", "sum_upsampled", "concept_map"]


def token_softmax_maps(q: torch.Tensor, k_attr: torch.Tensor, heads: int, grid: tuple[int, int]) -> torch.Tensor:
    """Head-summed token-softmax maps ``[B, N, H, W]`` of queries ``[B, HW, heads·d]`` against keys ``[B|1, N, heads·d]``.

    Computed in fp32 or wider whatever the model dtype, since the energy downstream is sensitive to rounding.
    """
    b, hw, inner = q.shape
    if hw != grid[0] * grid[1]:
        raise ValueError(f"query length {hw} does not match the attention grid {grid[0]}×{grid[1]}")
    dim_head = inner // heads
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(dtype).view(b, hw, heads, dim_head).transpose(1, 2)  # [B, h, HW, d]
    kh = k_attr.to(dtype).view(k_attr.shape[0], -1, heads, dim_head).transpose(1, 2)  # [B|1, h, N, d]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * dim_head ** -0.5  # [B, h, HW, N]
    maps = scores.softmax(dim=-1).sum(dim=1)  # [B, HW, N]
    return maps.transpose(1, 2).reshape(b, -1, grid[0], grid[1])


def head_block_keys(k_attr: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys ``[1, N, heads·d]`` as the block-diagonal ``[heads·d, heads·N]`` matrix of every head's K′ᵀ/√d (fp32+)."""
    n, inner = k_attr.shape[-2:]
    dim_head = inner // heads
    dtype = torch.float64 if k_attr.dtype == torch.float64 else torch.float32
    blocks = k_attr.new_zeros(heads, dim_head, heads, n, dtype=dtype)
    # The diagonal blocks [h, d, h, N][i, :, i, :] as one view: a few kernels, not one copy per head.
    per_head = k_attr.reshape(n, heads, dim_head).permute(2, 0, 1).to(dtype) * dim_head ** -0.5  # [d, N, h]
    blocks.diagonal(dim1=0, dim2=2).copy_(per_head)
    return blocks.view(heads * dim_head, heads * n)


def block_token_softmax_maps(q: torch.Tensor, block_keys: torch.Tensor, heads: int,
                             grid: tuple[int, int]) -> torch.Tensor:
    """:func:`token_softmax_maps` against keys prepared by :func:`head_block_keys`; a ``[B, N, H, W]`` view.

    The product with the block-diagonal keys gives every head's scores as ``[B, HW, heads, N]`` (heads× the
    multiply-adds of per-head products, which are negligible beside the layer itself); the maps stay in that
    memory order, so no copy is made.
    """
    b, hw, _ = q.shape
    if hw != grid[0] * grid[1]:
        raise ValueError(f"query length {hw} does not match the attention grid {grid[0]}×{grid[1]}")
    scores = torch.matmul(q.to(block_keys.dtype), block_keys)  # [B, HW, heads·N]
    maps = scores.view(b, hw, heads, -1).softmax(dim=-1).sum(dim=2)  # [B, HW, N]
    return maps.transpose(1, 2).unflatten(2, grid)


def sum_upsampled(maps: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinearly upsample ``[..., h, w]`` maps to ``size`` (default: the largest grid) and sum them."""
    if not maps:
        raise ValueError("no maps to aggregate: select at least one stage and one step that were recorded")
    if size is None:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    total = None
    for m in maps:
        lead = m.shape[:-2]
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=tuple(size), mode="bilinear",
                              align_corners=False).view(*lead, *size)
        total = m if total is None else total + m
    return total


def concept_map(maps: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """A concept's map: the mean over its token positions of ``[..., N, H, W]`` maps (DAAM's rule for BPE pieces)."""
    if not positions:
        raise ValueError("a concept needs at least one token position")
    first, last = positions[0], positions[-1]
    if positions == list(range(first, last + 1)):  # one word's pieces: a slice needs no index tensor on the device
        return maps[..., first:last + 1, :, :].mean(dim=-3)
    return maps[..., positions, :, :].mean(dim=-3)
