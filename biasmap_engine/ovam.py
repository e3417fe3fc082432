"""Open-vocabulary attribution maps (OVAM, Marcos-Manchón et al., CVPR 2024) as BiasMap aggregates them (§2).

A layer's map for attribution token j is softmax_j(Q K′ᵀ / √d_head), with queries Q from the layer's attention
input and keys K′ = to_k(X′) from the attribution prompt's embeddings X′, summed over heads. Maps of a stage are
summed over its layers; stages are upsampled bilinearly to the largest attention resolution and summed.

Recording runs in every cross-attention layer of every model evaluation, where a GPU at SD sizes is bound by kernel
launches, not arithmetic: :func:`prepare_keys` prepares a layer's keys once per run so that
:func:`summed_token_softmax_maps` needs one product, one softmax and one sum for all the layers of a stage, with
no transposed copies.
"""

import torch
import torch.nn.functional as F

__all__ = ["token_softmax_maps", "prepare_keys", "prepared_token_softmax_maps", "summed_token_softmax_maps",
           "largest_grid", "resampled", "sum_upsampled", "varies", "concept_map"]


def token_softmax_maps(q: torch.Tensor, k_attr: torch.Tensor, heads: int, grid: tuple[int, int]) -> torch.Tensor:
    """Head-summed token-softmax maps ``[B, N, H, W]`` of queries ``[B, HW, heads·d]`` against keys
    ``[B|1, N, heads·d]``.

    The formula one layer at a time, as written above; recording computes the same maps with :func:`prepare_keys` and
    :func:`summed_token_softmax_maps`. In fp32 or wider whatever the model dtype, as recording computes them.
    """
    b, hw, inner = q.shape
    if hw != grid[0] * grid[1]:
        raise ValueError(f"query length {hw} does not match the attention grid {grid[0]}×{grid[1]}: a node ahead "
                         f"of BiasMap changes the number of image tokens cross-attention sees; bypass it")
    dim_head = inner // heads
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(dtype).reshape(b, hw, heads, dim_head).transpose(1, 2)  # [B, h, HW, d]
    kh = k_attr.to(dtype).view(k_attr.shape[0], -1, heads, dim_head).transpose(1, 2)  # [B|1, h, N, d]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * dim_head ** -0.5  # [B, h, HW, N]
    maps = scores.softmax(dim=-1).sum(dim=1)  # [B, HW, N]
    return maps.transpose(1, 2).reshape(b, -1, grid[0], grid[1])


def prepare_keys(k_attr: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys ``[1, N, heads·d]`` as every head's K′ᵀ/√d, ``[heads, d, N]`` in fp32 or wider: made once per run."""
    n, inner = k_attr.shape[-2:]
    dtype = torch.float64 if k_attr.dtype == torch.float64 else torch.float32
    per_head = k_attr.reshape(n, heads, inner // heads).permute(1, 2, 0).to(dtype)
    return (per_head * (inner // heads) ** -0.5).contiguous()


def prepared_token_softmax_maps(q: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """:func:`token_softmax_maps` against keys made by :func:`prepare_keys`; a ``[B, N, H, W]`` view."""
    return summed_token_softmax_maps([q], keys, grid)


def summed_token_softmax_maps(qs: list[torch.Tensor], keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The sum over layers of :func:`prepared_token_softmax_maps`: queries ``[B, HW, heads·d]`` of layers on one grid,
    against their :func:`prepare_keys` keys concatenated along the heads, ``[layers·heads, d, N]``.

    One batched product, one softmax and one sum for all the layers, and no transposed copy of one layer's queries:
    fp32 queries are read per head in place (fp16 and bf16 ones are converted to the keys' dtype once); several
    layers' are stacked in one copy. The maps keep the product's memory order.
    """
    b, hw, _ = qs[0].shape
    if hw != grid[0] * grid[1]:
        raise ValueError(f"query length {hw} does not match the attention grid {grid[0]}×{grid[1]}: a node ahead "
                         f"of BiasMap changes the number of image tokens cross-attention sees; bypass it")
    heads, dim_head, _ = keys.shape
    if len(qs) == 1:
        per_head = qs[0].to(keys.dtype).reshape(b * hw, heads, dim_head).transpose(0, 1)  # [heads, B·HW, d]
    else:
        per_layer = heads // len(qs)
        per_head = torch.stack([q.reshape(b * hw, per_layer, dim_head).transpose(0, 1) for q in qs])
        per_head = per_head.to(keys.dtype).view(heads, b * hw, dim_head)
    maps = torch.bmm(per_head, keys).softmax(dim=-1).sum(dim=0)  # [B·HW, N]
    return maps.view(b, hw, -1).transpose(1, 2).unflatten(2, grid)


def largest_grid(maps) -> tuple[int, int]:
    """The largest ``(h, w)`` grid among ``[..., h, w]`` maps: where OVAM sums its stages."""
    return max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])


def sum_upsampled(maps: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinearly upsample ``[..., h, w]`` maps to ``size`` (default: the largest grid) and sum them."""
    if not maps:
        raise ValueError("no maps to aggregate: select at least one stage and one step that were recorded")
    if size is None:
        size = largest_grid(maps)
    total = None
    for m in maps:
        m = resampled(m, size)
        total = m if total is None else total + m
    return total


# A map's spread, relative to its largest magnitude, below which it is flat: bilinear resampling leaves a few units
# in the last place of float32 on a map of one value (a 1×1 stage), which min-max scaling would stretch into a pattern.
_FLAT_SPREAD = 1e-5


def varies(lowest: torch.Tensor, highest: torch.Tensor) -> torch.Tensor:
    """Whether maps with these extremes hold more than one value, beyond resampling's rounding (False for NaN)."""
    return highest - lowest > _FLAT_SPREAD * torch.maximum(highest.abs(), lowest.abs())


def resampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[..., h, w]`` maps at ``size``, bilinearly as OVAM brings stages to one grid (as they are if already)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=tuple(size), mode="bilinear",
                         align_corners=False).view(*maps.shape[:-2], *size)


def concept_map(maps: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """A concept's map: the mean over its token positions of ``[..., N, H, W]`` maps (DAAM's rule for BPE pieces)."""
    if not positions:
        raise ValueError("a concept needs at least one token position")
    first, last = positions[0], positions[-1]
    if positions == list(range(first, last + 1)):  # one word's pieces
        return maps[..., first:last + 1, :, :].mean(dim=-3)
    # Selected one by one: an index list would be copied from the host, a wait for the device on a GPU.
    return torch.stack([maps[..., p, :, :] for p in positions], dim=-3).mean(dim=-3)
