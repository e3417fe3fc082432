"""The recorded CFG branch's OVAM maps, taken inside ComfyUI's cross-attention as ComfyUI weighs that branch's entries.

Every recorded ``attn2`` layer hands its queries and ComfyUI's ``extra_options`` to :meth:`BranchCapture.observe`.
The rows of the recorded branch are picked from the CFG batch; each conditioning entry among them is weighted as
ComfyUI weighs its noise prediction (``get_area_and_mult``: strength, and per pixel its mask; a default entry of Cond
Set Default Combine: what the other entries leave, as ``finalize_default_conds``); entries on a crop of the latent
(area conditioning) are left out. The weighted maps go to a :class:`TraceRecorder`, which divides by the total
weight whenever the maps are read (the energy reads them before the evaluation closes). A stage's layers of one entry
are computed together when the stage (or the U-Net pass) ends, in one product: a GPU at SD sizes is bound by kernel
launches.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ovam import prepare_keys, prepared_token_softmax_maps, resampled, summed_token_softmax_maps
from ..recorder import TraceRecorder
from ..stages import stage_grid, stage_of

__all__ = ["BranchCapture"]

# At most this many values in one stage's product (and as many in its softmax, 64 MiB each in fp32): the layers of an
# SDXL stage at 1024² go in parts, so the queries they keep waiting and the product stay small beside the U-Net's own.
_PRODUCT_VALUES = 1 << 24


class _Batch(NamedTuple):
    """What the layers waiting for one product share (:meth:`BranchCapture.observe`)."""

    stage: str
    grid: tuple[int, int]  # the layers' attention grid
    target: tuple[int, int]  # the stage's grid in the trace
    keys_shape: torch.Size
    q_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    entry: object  # the conditioning entry's uuid
    weight: float
    guided: bool


class BranchCapture:
    """Adds each recorded layer's maps of one CFG branch to ``recorder``; ``branch`` says which, None when idle."""

    def __init__(self, layers: dict, attribution_embeddings: torch.Tensor, recorder: TraceRecorder, note,
                 guided_layers: set | None, built_stages: dict):
        self.layers = layers
        self.built_stages = built_stages  # layer → its stage as the U-Net is built (unet.block_stages)
        self.guided_layers = guided_layers  # the layers whose maps enter the energy; None: every one
        self.embeddings = attribution_embeddings
        self.recorder = recorder
        self.note = note
        self.branch: int | None = None  # ComfyUI's cond_or_uncond index, set while a capturing U-Net pass runs
        self.latent_shape: list[int] | None = None  # the run's first latent: the trace's grids are its stages'
        self.latent_hw: tuple[int, int] | None = None  # the latent of the evaluation running now
        self._keys: dict = {}  # layer → its attribution keys, per head
        self._stacked: dict = {}  # tuple of layers → their keys concatenated (_stacked_keys)
        self._pending: list = []  # (layer, recorded rows' queries) waiting for flush, all of _pending_batch
        self._pending_batch: _Batch | None = None  # what they share
        self._pending_values = 0  # values of their product
        self._stages: dict = {}  # (layer, grid, latent size) → (stage id, the stage's grid in the trace)
        self._entry_weights: dict = {}  # conditioning entry uuid → strength, or (mask, factor) for masked entries
        self._grid_weights: dict = {}  # (uuid, rows, grid) → a masked entry's weight pooled to that grid

    def set_entries(self, conds, x_in: torch.Tensor, timestep: torch.Tensor) -> None:
        """The conditioning entries (calc_cond_batch's ``conds``) of the U-Net pass about to run on ``x_in``."""
        self._entry_weights = _entry_weights(conds)
        defaults = _default_entry_weights(conds, x_in, timestep)
        if defaults:  # they depend on the step (the other entries' timestep ranges): pooled again each time
            self._entry_weights.update(defaults)
            self._grid_weights = {k: v for k, v in self._grid_weights.items() if k[0] not in defaults}

    def observe(self, q: torch.Tensor, extra_options: dict) -> None:
        """Record one layer's maps from its queries ``[CFG batch, HW, heads·d]``, if it runs the recorded branch.

        A layer whose recorded rows are one entry with a scalar weight (no mask) waits for the next layers of its stage
        and the same entry: :meth:`flush` computes theirs together (a GPU at SD sizes is bound by kernel launches).
        """
        chunks = extra_options["cond_or_uncond"]
        picked = [i for i, c in enumerate(chunks) if c == self.branch]
        if not picked:
            return  # cond and uncond went as separate U-Net calls; this one is the other branch
        if tuple(extra_options["original_shape"][-2:]) != self.latent_hw:
            # ComfyUI gives the negative prompt an entry of each positive entry's area, with an area on the positive
            # alone the negative branch has one too (comfy/samplers.py, create_cond_with_same_area_if_none).
            self.note("area conditioning: entries of the recorded branch that cover only part of the image are not "
                      "recorded (with an area on the positive prompt, ComfyUI gives the negative prompt an entry of "
                      "that area too); its maps come from its whole-image entries")
            return
        rows = q.shape[0] // len(chunks)
        block, depth = extra_options["block"], extra_options["block_index"]
        grid = tuple(extra_options["activations_shape"][-2:])
        layer = (block[0], block[1], depth)
        keys, stage, target = self._layer_constants(layer, q, grid, heads=extra_options["n_heads"])
        uuids = extra_options.get("uuids") or [None] * len(chunks)
        weights = [self._weight_at(uuids[i], rows, target) for i in picked]
        guided = self.guided_layers is None or layer in self.guided_layers
        if len(picked) == 1 and not isinstance(weights[0], torch.Tensor):
            batch = _Batch(stage, grid, target, keys.shape, q.shape, q.dtype, q.device, uuids[picked[0]], weights[0],
                           guided)
            values = rows * q.shape[1] * keys.shape[0] * keys.shape[-1]  # of the layer's share of the product
            if batch != self._pending_batch or self._pending_values + values > _PRODUCT_VALUES:
                self.flush()
                self._pending_batch = batch
            self._pending.append((layer, q[picked[0] * rows:(picked[0] + 1) * rows]))
            self._pending_values += values
            return
        # Several entries of the branch in this batch (ConditioningCombine), or a masked one: at once.
        q_rows = torch.cat([q[i * rows:(i + 1) * rows] for i in picked])  # slices: a list index copies from the host
        per_entry = resampled(prepared_token_softmax_maps(q_rows, keys, grid), target)
        maps = None
        for weight, entry_maps in zip(weights, per_entry.unflatten(0, (len(picked), rows)).unbind(0)):
            weighted = entry_maps if _is_one(weight) else weight * entry_maps
            maps = weighted if maps is None else maps + weighted
        self.recorder.add(stage, maps, layer, sum(weights[1:], weights[0]), guided)

    def flush(self) -> None:
        """Record the layers :meth:`observe` left waiting; the session calls it when each U-Net pass ends."""
        if not self._pending:
            return
        batch, pending = self._pending_batch, self._pending
        self.discard()
        layers = [layer for layer, _ in pending]
        maps = resampled(summed_token_softmax_maps([q for _, q in pending], self._stacked_keys(layers), batch.grid),
                         batch.target)
        weighted = maps if _is_one(batch.weight) else batch.weight * maps
        self.recorder.add_layers(batch.stage, weighted, layers, batch.weight, batch.guided)

    @contextlib.contextmanager
    def recording_into(self, recorder: TraceRecorder):
        """Maps go to ``recorder`` meanwhile (a hook group's share of the maps, not traced)."""
        kept, self.recorder = self.recorder, recorder
        try:
            yield recorder
        finally:
            self.recorder = kept

    def discard(self) -> None:
        """Drop the waiting layers, of a U-Net pass that failed (and with them its graph)."""
        self._pending, self._pending_batch, self._pending_values = [], None, 0

    def forget_keys(self) -> None:
        """Make the attribution keys again at their next use: the model's weights changed (a hook group's)."""
        self.flush()  # waiting layers ran under the weights that made the keys they need
        self._keys.clear()
        self._stacked.clear()

    def _layer_constants(self, layer, q, grid, heads):
        """A layer's attribution keys K′ = to_k(X′), prepared by :func:`prepare_keys`, its stage and the stage's
        grid: made once.

        The keys are made outside inference mode, so a guided pass can save them for its backward as they are. The
        stage is looked up per grid: nodes such as Deep Shrink change a layer's grid between steps, to one that no
        U-Net level makes when its factor is not 2; such maps are resampled to their stage's grid.
        """
        keys = self._keys.get(layer)
        if keys is None or keys.device != q.device:
            with torch.inference_mode(False), torch.no_grad():
                if (self.embeddings.device, self.embeddings.dtype) != (q.device, q.dtype):
                    # Once per run: each host-to-device copy waits for the GPU (15 waits a run on an H200, one a layer).
                    self.embeddings = self.embeddings.to(device=q.device, dtype=q.dtype)
                keys = prepare_keys(self.layers[layer].to_k(self.embeddings), heads)
            self._keys[layer] = keys
        # Named on this latent, kept at the first's grid: a sampler that enlarges the latent between steps
        # (SamplerLCMUpscale) has its later maps resampled to the grids the trace began with.
        named = self._stages.get((layer, grid, self.latent_hw))
        if named is None:
            stage = stage_of(layer[:2], self.latent_hw, grid, self.built_stages.get(layer))
            named = self._stages[(layer, grid, self.latent_hw)] = stage, stage_grid(stage, self.latent_shape[-2:])
        return keys, *named

    def _stacked_keys(self, layers: list) -> torch.Tensor:
        """Layers' keys concatenated along the heads, for :func:`summed_token_softmax_maps`: made once per run."""
        if len(layers) == 1:
            return self._keys[layers[0]]
        stacked = self._stacked.get(tuple(layers))
        if stacked is None or stacked.device != self._keys[layers[0]].device:
            with torch.inference_mode(False), torch.no_grad():  # as the keys: a guided pass saves them as they are
                stacked = self._stacked[tuple(layers)] = torch.cat([self._keys[layer] for layer in layers])
        return stacked

    def _weight_at(self, uuid, rows: int, grid: tuple[int, int]):
        """An entry's weight at a layer: its strength, or for a masked entry ``[rows, 1, h, w]``: its mask pooled to
        the layer's grid times strength and mask strength (made once, outside inference mode, like the keys)."""
        weight = self._entry_weights.get(uuid, 1.0)
        if not isinstance(weight, tuple):
            return weight
        pooled = self._grid_weights.get((uuid, rows, grid))
        if pooled is None:
            mask, factor = weight
            mask = mask[:rows] if mask.shape[0] >= rows else mask.repeat(-(-rows // mask.shape[0]), 1, 1)[:rows]
            with torch.inference_mode(False), torch.no_grad():
                pooled = F.adaptive_avg_pool2d(mask.unsqueeze(1).float(), grid) * factor
            self._grid_weights[(uuid, rows, grid)] = pooled
        return pooled


def _entry_weights(conds) -> dict:
    """Each conditioning entry's weight by its uuid, as ComfyUI's ``get_area_and_mult`` makes it: the strength, and
    for a masked entry (Conditioning (Set Mask)) the mask times strength and mask strength, as (mask, factor)."""
    weights = {}
    for entries in conds:
        for entry in entries or []:
            if "uuid" in entry:
                strength = float(entry.get("strength", 1.0))
                mask = entry.get("mask")
                weights[entry["uuid"]] = strength if mask is None else \
                    (mask, strength * float(entry.get("mask_strength", 1.0)))
    return weights


def _default_entry_weights(conds, x_in, timestep) -> dict:
    """Weights of "default" entries (Cond Set Default Combine) by uuid, as ComfyUI's ``finalize_default_conds`` makes
    them: what the branch's other entries leave of the latent, relu(1 − Σ their weights), as (mask, 1)."""
    import comfy.samplers

    weights = {}
    for entries in conds:
        defaults = [entry for entry in entries or [] if "default" in entry and "uuid" in entry]
        if not defaults:
            continue
        left = torch.ones_like(x_in)
        for entry in entries:
            placed = None if "default" in entry else comfy.samplers.get_area_and_mult(entry, x_in, timestep)
            if placed is None:
                continue
            region = left
            if placed.area is not None:
                dims = len(placed.area) // 2
                for i in range(dims):
                    region = region.narrow(i + 2, placed.area[i + dims], placed.area[i])
            region -= placed.mult
        remaining = torch.relu(left)[:, 0]  # [B, H, W]: every channel of a weight is the same
        weights.update({entry["uuid"]: (remaining, 1.0) for entry in defaults})
    return weights


def _is_one(weight) -> bool:
    return not isinstance(weight, torch.Tensor) and weight == 1.0
