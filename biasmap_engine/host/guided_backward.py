"""The guided pass: ∇_x E taken through the U-Net pass that computes the evaluation's maps (BiasMap §5).

The session hands each guided evaluation's pass of the maps' branch to :meth:`GuidedBackward.run`, which runs it
with autograd on (the latent as leaf), so no second forward is needed, and takes the energy's backward before
anything of the pass is freed:
- every module the pass runs (the U-Net's, ControlNets', GLIGEN's, other nodes' U-Net patches') has its
  inference-mode weights swapped for ordinary tensors of the same values first (unet.deinference_): autograd cannot
  save inference tensors;
- attention that the backward goes through runs in PyTorch's fused SDPA kernel (``optimized_attention_override``):
  ComfyUI's CPU default, sub-quadratic attention in plain torch ops, is the slower kernel forward and backward, and
  some GPU kernels it may pick (SageAttention) have no backward at all;
- the U-Net patches in the model's options run with autograd keeping copies of what they save
  (guided_pass.with_patches_on_copies), since some change in place the activations they computed with (FreeU V2);
- in a backward through the whole U-Net autograd keeps SiLU, gelu and group norm outputs as recipes, computed again
  in the backward (lean_backward.py), and so the weight copies that ComfyUI casts as layers run (manual cast, low
  VRAM; cast_weights.py) where they would take much of the memory free; when only down stages are guided,
  ``input_block_patch``/``output_block_patch`` detach the activations after the last guided block instead, so
  autograd neither records nor keeps the rest;
- with a ControlNet attached, ``input_block_patch_after_skip`` gives the next block a copy of each skip tensor, since
  ComfyUI adds the ControlNet's residuals to the skip tensors in place;
- through an fp16 U-Net the backward is scaled as mixed-precision training scales its loss (_HALF_LOSS_SCALE);
- a maps' branch whose entries carry different hooks runs each hook group once more with autograd, for an exact
  gradient (:meth:`GuidedBackward._run_hook_groups`).
"""

import contextlib

import torch

from ..guidance import entanglement_energy
from ..ovam import sum_upsampled
from ..recorder import TraceRecorder
from .conditioning import attached_modules, control_models, hook_groups
from .cast_weights import CastCopies, cast_layers, worth_casting_again
from .guided_pass import (differentiable_quantized, offload_streams_wait, patch_modules, quantized_layers,
                          with_patches_on_copies, with_sdpa_attention)
from .lean_backward import LeanBackward
from .unet import deinference_, weight_slots

__all__ = ["GuidedBackward"]

# The energy's backward through an fp16 U-Net is scaled by this power of two (exact to undo), as mixed-precision
# training scales its loss: fp16 flushes gradients below 6e-8 to zero, and those of E ≤ 1 spread over a U-Net's
# activations come close (measured on the tiny test model: a gradient 10⁴ times smaller came out all zero). A scaled
# gradient that overflows is skipped as non-finite, and the run's later backwards are scaled 2⁵ times less (1024, 32,
# then 1): at most two evaluations lost to overflow, where a scale of 1 would leave the later small gradients to
# vanish, moving nothing (mixed-precision training halves its scale, over thousands of steps, not a run's twenty).
_HALF_LOSS_SCALE = 2.0 ** 10
_SCALE_BACKOFF = 2.0 ** 5


class GuidedBackward:
    """∇_x E of a run's guided evaluations, through the passes of the maps' branch that ``capture`` records."""

    def __init__(self, model_patcher, settings, pairs, capture, recorder: TraceRecorder, note,
                 guided_layers: set | None):
        self.settings, self.pairs, self.capture, self.recorder, self.note = settings, pairs, capture, recorder, note
        self.active = False  # a guided U-Net pass is running (the session's wrappers around the U-Net read it)
        self._computes_in = model_patcher.model.manual_cast_dtype or model_patcher.model.get_dtype()
        self._loss_scale = _HALF_LOSS_SCALE if self._computes_in == torch.float16 else None  # a tensor once used
        self._flushed = 0  # fp16 gradients of an image that came out all zero (a tensor once counted)
        modules = list(model_patcher.model.diffusion_model.modules())
        self._group_norms = [m for m in modules if isinstance(m, torch.nn.GroupNorm)]
        self._quantized = quantized_layers(modules)
        self._last_guided_input = _last_input_block(guided_layers)
        self._weight_slots: dict[torch.nn.Module, list] = {}  # deinference_'s, per module guided through
        self._cast_layers: dict[torch.nn.Module, list] = {}  # cast_layers', per module guided through
        self._casting_again: bool | None = None  # worth_casting_again, asked at the run's first whole-U-Net pass
        self._patch_modules: list[torch.nn.Module] = []  # held by other nodes' U-Net patches (patch_modules)
        self._truncating = False
        self._controlled = False  # a guided pass whose entries carry a ControlNet

    def patch(self, m, model_patcher) -> None:
        """The block patches a guided pass needs, on ``m`` (the session's clone of ``model_patcher``), before the
        session adds its own: other nodes' patches hold modules whose weights the backward goes through."""
        found = patch_modules(m.model_options)
        if found:  # the U-Net's own modules are swapped anyway
            unet = set(map(id, model_patcher.model.diffusion_model.modules()))
            self._patch_modules = [p for p in found if id(p) not in unet]
        # Functions, not bound methods: cloning the model deep-copies its options, and with them a bound method's
        # object, which holds the U-Net's modules (weight_slots).
        if self._last_guided_input is not None:
            m.set_model_input_block_patch(lambda *args: self._truncate_input(*args))
            m.set_model_output_block_patch(lambda *args: self._truncate_skip(*args))
        m.set_model_input_block_patch_after_skip(lambda *args: self._separate_skip(*args))

    def run(self, model, run, conds, x, timestep, model_options) -> tuple[list, tuple | None]:
        """``run(conds, x, σ, options)`` as the evaluation's guided pass → its outputs, detached, and (∇_x E, E), or
        None when the pass recorded no maps (the session says why)."""
        groups = hook_groups(conds, timestep)
        if len(groups) > 1:
            out, result = self._run_hook_groups(model, run, x, timestep, model_options, conds, groups)
        else:
            out, result = self._with_autograd(model, run, conds, x, timestep, model_options, self._energy_gradient)
        if result is not None and self._loss_scale is not None:  # the whole gradient: not a hook group's share
            self._flushed = self._flushed + (result[0].flatten(1) == 0).all(dim=1).sum()  # no host synchronisation
        return out, result

    def memory_ran_short(self) -> bool:
        """Cast weight copies again from the next pass on, whatever the memory free at the run's first pass said: a
        guided pass ran out of memory, and casting them again costs less time than the fallback's extra U-Net pass.
        True where the passes kept copies until now."""
        kept = self._casting_again is False
        self._casting_again = True
        return kept

    def finish(self) -> None:
        """The run's notes on the fp16 loss scale: a scaled gradient that overflowed, gradients that vanished."""
        if isinstance(self._loss_scale, torch.Tensor) and float(self._loss_scale) < _HALF_LOSS_SCALE:
            self.note(f"a gradient through this fp16 model overflowed once scaled (by {_HALF_LOSS_SCALE:g} at first, "
                      f"the scale that keeps small fp16 gradients from vanishing, lowered {_SCALE_BACKOFF:g}-fold at "
                      f"each overflow, to {float(self._loss_scale):g}): each such evaluation was skipped as "
                      f"non-finite, and counted so; --bf16-unet (ComfyUI's option) needs no scale")
        flushed = int(self._flushed)
        if flushed:
            self.note(f"{flushed} guided evaluation(s) of an image got a gradient of exactly zero through this fp16 "
                      f"model (fp16 flushes values below 6e-8 to zero; the backward was scaled by "
                      f"{_HALF_LOSS_SCALE:g} at most): counted as applied, the correction moved nothing there; start "
                      f"ComfyUI with --bf16-unet (or --fp32-unet) to guide them")

    # ---- block patches ----------------------------------------------------------------------------------------

    def _truncate_input(self, h, transformer_options):
        if self._truncating and transformer_options["block"][1] >= self._last_guided_input:
            return h.detach()  # nothing after this block reaches the energy
        return h

    def _truncate_skip(self, h, hsp, transformer_options):
        # h too: a ControlNet's middle residual, added after the input blocks, would make it differentiable again.
        return (h.detach(), hsp.detach()) if self._truncating else (h, hsp)

    def _separate_skip(self, h, transformer_options):
        # ComfyUI adds a ControlNet's output residuals to the skip tensors in place (apply_control), after the next
        # block saved them for its backward; the next block gets a copy, so the saved tensor stays intact.
        return h.clone() if self._controlled and h.requires_grad else h

    # ---- the pass and its backward ------------------------------------------------------------------------------

    def _with_autograd(self, model, run, conds, x, timestep, model_options, gradient):
        """``run`` as a guided pass: autograd on, the latent a leaf; returns its outputs, detached, and
        ``gradient(leaf)``, taken before anything of the pass is freed.

        Where autograd records attention the pass runs PyTorch's SDPA; ``conds``' ControlNets join the gradient.
        Every module the pass runs (the U-Net's, ControlNets', GLIGEN's, other nodes' patches') has its
        inference-mode weights swapped first: autograd cannot save those.
        """
        controls = control_models(conds)
        modules = (model.diffusion_model, *controls, *attached_modules(conds), *self._patch_modules)
        for module in modules:
            if module not in self._weight_slots:  # modules stay within a run; their tensors may not (hooks)
                self._weight_slots[module] = weight_slots(module)
                self._cast_layers[module] = cast_layers(module, self._computes_in, x.device)  # set when loading
            deinference_(module, self._weight_slots[module])
        self._controlled = bool(controls)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x_leaf = x.detach().clone().requires_grad_(True)
                self._truncating = self._last_guided_input is not None
                # A third less kept for the backward through the whole U-Net, and no weight copies where memory is
                # short for them (worth_casting_again); a truncated one keeps little, and the recipes' Python would
                # cost a launch-bound GPU more than they save there.
                whole = self._last_guided_input is None
                layers = [m for module in modules for m in self._cast_layers[module]] if whole else []
                if layers and self._casting_again is None:
                    self._casting_again = worth_casting_again(layers, self._computes_in, x.device)
                casts = CastCopies(layers if self._casting_again else [])
                with (casts, LeanBackward(self._group_norms, casts) if whole else contextlib.nullcontext(),
                      differentiable_quantized(self._quantized)):
                    self.active = True
                    out = run(conds, x_leaf, timestep.detach().clone(),
                              with_sdpa_attention(with_patches_on_copies(model_options)))
                gradient_at_x = gradient(x_leaf)
                offload_streams_wait(x.device)  # the backward read weights copied on them (low VRAM)
                return [o.detach() for o in out], gradient_at_x
        finally:
            self._truncating = self._controlled = self.active = False

    def _energy_gradient(self, x_leaf):
        """(∇_x E, E) from the open evaluation's maps, or None when it has none."""
        if not self.recorder.has_maps:
            return None
        energy = self._energy(self.recorder.current(guided=True))
        if not energy.requires_grad:
            raise RuntimeError("BiasMap guidance found no gradient path from the latent to the cross-attention "
                               "queries: a layer in this model computes them outside autograd (a custom quantized or "
                               "compiled kernel). Load the model without it, or set the guidance scale to 0 to record "
                               "maps only")
        return self._gradient(energy.sum(), x_leaf), energy.detach()

    def _gradient(self, value, x_leaf):
        """∂value/∂x; through an fp16 U-Net with ``value`` scaled (_HALF_LOSS_SCALE); no host synchronisation."""
        if self._loss_scale is None:
            return torch.autograd.grad(value, x_leaf)[0]
        if not isinstance(self._loss_scale, torch.Tensor):
            self._loss_scale = value.new_full((), self._loss_scale)
        grad = torch.autograd.grad(value * self._loss_scale, x_leaf)[0] / self._loss_scale
        # Lowered only when the scale overflowed the gradient: not for an energy that is no number by itself.
        overflowed = torch.isfinite(value).all() & ~torch.isfinite(grad).all()
        self._loss_scale = torch.where(overflowed, (self._loss_scale / _SCALE_BACKOFF).clamp_min(1.0), self._loss_scale)
        return grad

    def _run_hook_groups(self, model, run, x, timestep, model_options, conds, groups):
        """The guided evaluation of a maps' branch whose entries carry different hooks, with the exact gradient.

        ComfyUI patches each hook group's weights into the model in place, one group after the other, so a backward
        after one pass would go through the last group's weights for every group's maps (measured: the gradient then
        points away from lower entanglement). The maps are linear in each group's entries, M = Σ_g M_g, so: one pass
        without autograd gives M, E and ∂E/∂M; then each group runs again with autograd, and its backward
        ∂E/∂M · ∂M_g/∂x runs while its weights are in the model. One more U-Net pass of the maps' branch per group.
        """
        self.note("the maps' CFG branch holds entries with different hooks (Create Hook LoRA and the like): ComfyUI "
                  "patches each hook group's weights in turn, so for an exact gradient BiasMap ran each group's "
                  "entries once more with autograd (one more U-Net pass per group and step)")
        out = run(conds, x, timestep, model_options)
        if not self.recorder.has_maps:
            return out, None
        with torch.inference_mode(False), torch.enable_grad():
            maps = {s: m.clone().requires_grad_(True) for s, m in self.recorder.current(guided=True).items()}
            energy = self._energy(maps)
            slopes = dict(zip(maps, torch.autograd.grad(energy.sum(), list(maps.values()))))
        weighting = self.recorder.weighting(guided=True)
        grad = torch.zeros_like(x)
        for group in groups:
            shares = TraceRecorder(split_guided=self.capture.guided_layers is not None)  # this group's, not traced

            def group_gradient(x_leaf, shares=shares):
                current = shares.current(guided=True, weighting=weighting)
                if not current:  # none of the group's entries ran over the whole latent at this step
                    return torch.zeros_like(x_leaf)
                return self._gradient(sum((slopes[s] * m).sum() for s, m in current.items()), x_leaf)

            with self.capture.recording_into(shares):
                grad += self._with_autograd(model, run, group, x, timestep, model_options, group_gradient)[1]
        return out, (grad, energy.detach())

    def _energy(self, maps):
        if not maps:  # the guided blocks ran, but none of them for the recorded branch's whole-image entries
            raise ValueError(f"no map of the guided stages {', '.join(self.settings.guided_stages or ['all'])} was "
                             f"recorded at this step, though the model has them: a node skipped or replaced those "
                             f"blocks' cross-attention; bypass it, or set guided_stages to 'all'")
        s = self.settings
        # At the largest attention grid of all recorded stages, as the reference aggregates, also when the guided
        # stages are coarser (down×½ alone at 512² is soft top-k over 64² pixels, not 32²). The session checked q
        # against this grid before the first step (stages.finest_grid of the blocks as built): keep the two alike.
        maps = sum_upsampled(list(maps.values()), self.recorder.current_grid)
        return entanglement_energy(maps, self.pairs, s.keep, s.gamma, s.mode, s.iters)


def _last_input_block(guided_layers) -> int | None:
    """The last input block whose maps enter the energy, when no middle or up stage does; else None."""
    if guided_layers is None or any(name != "input" for name, _, _ in guided_layers):
        return None
    return max(number for _, number, _ in guided_layers)
