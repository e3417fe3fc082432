"""One BiasMap sampling run inside ComfyUI: attn2 capture, per-evaluation bookkeeping and the guidance update (the
gradient it adds is taken in guided_backward.py).

Hooks, all on a clone of the caller's MODEL (the original is never patched; a guided pass swaps the U-Net's
inference-mode weights for ordinary tensors of the same values, which the original shares, see guided_backward.py):
- an ``attn2`` replace on every recorded layer computes the layer's real output exactly as ComfyUI would (or
  through a replace another node registered before, which it chains) and hands the recorded CFG branch's queries to
  the capture (capture.py), which weighs that branch's entries as ComfyUI does; where a step has no whole-image
  entry on the chosen branch (timestep ranges), the other branch is recorded;
- a ``PREDICT_NOISE`` wrapper opens and closes one model evaluation (and applies the guidance update to the
  CFG result); it is also the cancellation point;
- a ``SAMPLER_SAMPLE`` wrapper passes the sampler a per-step callback that labels the evaluations with its steps;
- a ``CALC_COND_BATCH`` wrapper marks the evaluation's main U-Net pass. When guiding, that pass is the guided pass
  (guided_backward.py: autograd on, the latent as leaf), so no second forward is needed. On a CPU the maps' branch
  runs alone with autograd and the other branch without, so the backward covers one branch (also a truncated one:
  down×1 is 1.14× faster so); on a GPU one batched pass is cheaper (at SD sizes it is bound by kernel launches).
  Those batch-1 CPU passes compute convolutions on grids of ≤ 8×8 with PyTorch's direct kernel (small_grid_conv.py).
  A batched pass that runs out of GPU memory (ComfyUI sizes batches for inference, autograd keeps every activation
  until the backward) is run again that way, and so are the run's later steps, with a note; so is a pass whose
  entries carry different hooks (conditioning.hook_groups), since ComfyUI patches each hook group's weights in place;
- in a guided pass a ``DIFFUSION_MODEL`` wrapper detaches the U-Net's output: the gradient comes from the captured
  queries, so the layers after them keep nothing for the backward, and no node around the U-Net is handed their graph;
- an evaluation in which the U-Net never ran for the maps (a cache node answered it: EasyCache inside BiasMap's
  wrapper, LazyCache outside it, seen by a second ``PREDICT_NOISE`` wrapper placed first in the model's options) is
  left out of the trace, keeping its place for the step labels, and its step is named in a note (the innermost
  ``DIFFUSION_MODEL`` wrapper tells whether the U-Net ran); one in which it ran but none of its passes over the whole
  latent reached the hooks (context windows, tiles, another node taking the attention layers over) is refused. In a
  guided pass, an outermost ``DIFFUSION_MODEL`` wrapper gives the wrappers around the U-Net its input detached.
"""

import contextlib
import functools
import math

import torch

from ..guidance import guidance_step
from ..recorder import TraceRecorder
from ..run_notes import (NOT_FINITE, emphasis_note, gate_note, kernel_note, quality_note, skipped_steps_note,
                         unevaluated_steps_note, unweighted_note)
from ..settings import BiasMapSettings
from ..soft_masks import check_keep
from ..stages import STAGE_ORDER, finest_grid
from ..tokens import find_word_positions, require_distinct_concepts
from .attribution import weighted_parts
from .capture import BranchCapture
from .conditioning import covers_image, hook_groups
from .guided_backward import GuidedBackward
from .guidance_window import GuidanceWindow
from .guided_pass import attention_rounding_apart, out_of_memory, out_of_memory_explained, with_sdpa_attention
from .small_grid_conv import SmallGridConvolution
from .unet import block_stages, model_family, require_guidable, require_unet

__all__ = ["BiasMapSession"]

_KEY = "biasmap"
_OUTER_KEY = "biasmap-outermost"
_COND, _UNCOND = 0, 1  # ComfyUI's indices in calc_cond_batch's conds list and in cond_or_uncond
_ONLY = 0  # the index of the one branch in a conds list of one (an extra pass runs the maps' branch alone)
_NAMES = {_COND: "positive", _UNCOND: "negative"}


class BiasMapSession:
    """Records (and optionally guides) one sampling run; :meth:`patch` gives the model to sample with."""

    def __init__(self, model_patcher, attribution_embeddings: torch.Tensor, tokens: list[str],
                 demographic: list[str], semantic: list[str], settings: BiasMapSettings, attribution_prompt: str = ""):
        self.layers = require_unet(model_patcher)
        if settings.guiding:
            require_guidable(model_patcher)
        self.family = model_family(model_patcher)
        width = next(iter(self.layers.values())).to_k.in_features
        if attribution_embeddings.shape[-1] != width:
            raise ValueError(f"the CLIP gives {attribution_embeddings.shape[-1]}-wide embeddings but this "
                             f"{self.family} model's cross-attention expects {width}: connect the CLIP that was "
                             f"loaded with this checkpoint")
        self.tokens, self.attribution_prompt = tokens, attribution_prompt
        self.demographic, self.semantic = demographic, semantic
        self.settings = settings
        self.notes: list[str] = []
        # The parts get a note-taker that holds the list, not the session: a bound method would make a reference
        # cycle, and a session, with its maps and after a failed guided pass its autograd graph, would wait for
        # Python's cycle collector instead of going when the run ends.
        self._note = functools.partial(_add_note, self.notes)
        # Pasted with the generation prompt's emphasis, most often.
        for note in filter(None, [emphasis_note(weighted_parts(attribution_prompt)),
                                  kernel_note(attention_rounding_apart(model_patcher)) if settings.guiding else None]):
            self._note(note)
        recorded = {k: v for k, v in self.layers.items() if k[0] != "middle" or settings.include_middle}
        self._block_stages = block_stages(model_patcher.model.diffusion_model, recorded)
        guided_layers = self._guided_layers()
        self.recorder = TraceRecorder(split_guided=guided_layers is not None)
        self.capture = BranchCapture(self.layers, attribution_embeddings, self.recorder, self._note, guided_layers,
                                     self._block_stages)
        self._main_pass_pending = False
        self._gradient_and_energy: tuple | None = None  # (∇_x E, E) of the open evaluation
        self._branch_alone = False  # set once a batched guided pass ran out of GPU memory
        self._evaluations = 0  # evaluations that reached _predict_noise
        self._unet_ran = False  # the U-Net ran in the open evaluation
        self._unet_input: tuple | None = None  # (detached, differentiable) U-Net input, while _detach_around runs
        # Resolved now, so a word missing from the attribution prompt fails before any sampling.
        positions = {word: find_word_positions(tokens, word) for word in (*demographic, *semantic)}
        require_distinct_concepts(demographic, semantic, positions)
        self.pairs = [(positions[a], positions[b]) for a in demographic for b in semantic]
        self._given_not_finite: torch.Tensor | None = None  # whether the latent given to sample held NaN/inf
        self._latent_not_finite: torch.Tensor | None = None  # whether the sampler handed NaN/inf (on the device)
        self._output_not_finite: torch.Tensor | None = None  # whether the model made NaN/inf of a finite latent
        self._latent_finite: torch.Tensor | None = None  # the open evaluation's latent is finite
        self.window = GuidanceWindow(model_patcher, settings)
        self._schedule: torch.Tensor | None = None  # the sigmas the sampler was given
        if settings.guiding and not self.pairs:
            raise ValueError("guidance needs at least one demographic and one semantic concept: type a word of the "
                             "attribution prompt in each list, or set the guidance scale to 0 to record maps only")
        self.backward = (GuidedBackward(model_patcher, settings, self.pairs, self.capture, self.recorder, self._note,
                                        guided_layers) if settings.guiding else None)

    # ---- patching -------------------------------------------------------------------------------------------

    def patch(self, model_patcher):
        """A clone of ``model_patcher`` carrying this session's hooks."""
        m = model_patcher.clone()
        if self.backward is not None:
            self.backward.patch(m, model_patcher)
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        blocks = {(name, number) for name, number, _ in self._block_stages}  # the recorded layers' blocks
        for name, number in sorted(blocks):
            m.set_model_attn2_replace(self._replace(existing.get((name, number))), name, number)
            # A replace keyed with a depth index wins over the two-part key: chain those too.
            for key, prev in existing.items():
                if len(key) == 3 and key[:2] == (name, number):
                    m.set_model_attn2_replace(self._replace(prev), name, number, key[2])
        import comfy.patcher_extension as ext

        m.add_wrapper_with_key(ext.WrappersMP.SAMPLER_SAMPLE, _KEY, self._sampler_sample)
        m.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, _KEY, self._predict_noise)
        m.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, _KEY, self._calc_cond_batch)
        m.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, _KEY, self._diffusion_model)
        # A hook group's weights (Create Hook LoRA) may change the layers' to_k: keys made under another group's are
        # stale. ComfyUI calls this after patching a group's weights in, before the U-Net runs under them.
        m.add_callback_with_key(ext.CallbacksMP.ON_APPLY_HOOKS, _KEY, lambda *_: self.capture.forget_keys())
        # Outermost of all too, around what other nodes wrap: evaluations that one of them answers without calling
        # further in (LazyCache) keep their place in the steps' accounting, and in a guided pass the wrappers around
        # the U-Net (EasyCache) see its input detached.
        _add_outermost(m, ext.WrappersMP.PREDICT_NOISE, lambda *args, **kwargs: self._keep_place(*args, **kwargs))
        _add_outermost(m, ext.WrappersMP.DIFFUSION_MODEL, lambda *args, **kwargs: self._detach_around(*args, **kwargs))
        return m

    def _guided_layers(self) -> set | None:
        """The layers whose maps enter the energy, chosen by the stage of their block (None: every recorded layer).

        By block, not by the grid a layer runs at, which nodes such as Kohya Deep Shrink change on some steps: the
        guided blocks stay the same at every step.
        """
        guided = self.settings.guided_stages
        if not self.settings.guiding or guided is None:
            return None
        present = sorted(set(self._block_stages.values()), key=STAGE_ORDER.index)
        absent = [s for s in guided if s not in present]
        if len(absent) == len(guided):
            raise ValueError(f"none of the guided stages {', '.join(guided)} has cross-attention in this {self.family} "
                             f"model; it records {', '.join(present)}: set guided_stages to some of these, or to "
                             f"'all' (stages name blocks as the U-Net is built; with Deep Shrink a trace may file some "
                             f"steps' maps under other stages)")
        if absent:
            self._note(f"guided stage(s) {', '.join(absent)}: this {self.family} model has no cross-attention there, "
                       f"so the energy comes from {', '.join(s for s in guided if s in present)}; leave the others "
                       f"out of guided_stages")
        layers = {layer for layer, stage in self._block_stages.items() if stage in guided}
        return None if len(layers) == len(self._block_stages) else layers  # every layer: one sum serves both

    def _replace(self, previous):
        import comfy.ldm.modules.attention as attention

        def attn2_replace(q, k, v, extra_options):
            if previous is not None:
                out = previous(q, k, v, extra_options)
            else:  # the call CrossAttention.forward makes, so the output stays bit-identical
                out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                    attn_precision=extra_options["attn_precision"],
                                                    transformer_options=extra_options)
            if self.capture.branch is not None:
                self.capture.observe(q, extra_options)
            return out

        return attn2_replace

    # ---- per-evaluation wrappers ----------------------------------------------------------------------------

    def _sampler_sample(self, executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        """The sampler run, with its per-step callback also labelling evaluations with the sampler's step.

        σ alone cannot tell Heun's corrector (at σ_i+1) from step i+1's first evaluation, nor a PECE corrector's second
        evaluation at σ_i from a next step; k-diffusion's samplers report each step right after its first evaluation.
        """
        if self.backward is not None:  # the energy's maps are at the largest recorded grid of this latent
            # (guided_backward's _energy sums them at the recorder's current_grid: the finest stage's grid)
            hw = args[0].shape[-2:]  # the noise, the latent's size
            check_keep(finest_grid(self._block_stages.values(), hw), self.settings.keep, self.settings.mode)
        last = sigmas.shape[-1] - 2
        self._schedule = sigmas  # read at the end of the run, to say which schedule it was (audits pair by it)

        def reported(step, *rest):
            self.recorder.step_started(min(int(step), last))  # dpm_adaptive counts its own, more, steps
            if callback is not None:
                callback(step, *rest)

        return executor(guider, sigmas, extra_args, reported, *args, **kwargs)

    def _keep_place(self, executor, x, timestep, model_options, seed):
        """Outermost: an evaluation that never reached :meth:`_predict_noise` (a cache answered) is opened and skipped,
        so that the evaluations around it keep their steps (the sampler's reports count evaluations)."""
        reached = self._evaluations
        out = executor(x, timestep, model_options, seed)
        if self._evaluations == reached:
            self.recorder.begin(*_sigma_and_step(timestep, model_options))
            self.recorder.skip()
        return out

    def _predict_noise(self, executor, x, timestep, model_options, seed):
        """One model evaluation: its maps recorded (and, when guiding, its correction applied to the CFG result)."""
        self._open(x, timestep, model_options)
        # Another node owning the single calc-cond slot may split or reorder the conds: use an extra pass then.
        extra_pass = "sampler_calc_cond_batch_function" in model_options
        self._main_pass_pending = not extra_pass
        try:
            denoised = executor(x, timestep, model_options, seed)
        finally:
            self._main_pass_pending = False
        self._output_not_finite = _either(self._output_not_finite,
                                          ~torch.isfinite(denoised).all() & self._latent_finite)
        if extra_pass:
            self._extra_pass(executor.class_obj, x, timestep, model_options)
        if not self.recorder.has_maps:
            if self._unet_ran:
                raise ValueError("the U-Net ran in this evaluation, but no pass of it over the whole latent reached "
                                 "BiasMap's cross-attention hooks: a node ran it only on parts of the latent (context "
                                 "windows over the image, tiled sampling) or took its cross-attention layers over; "
                                 "BiasMap needs one U-Net pass over the whole latent per evaluation, so remove or "
                                 "bypass that node")
            self.recorder.skip()  # the U-Net never ran: another node answered (a cache); see finish
            return denoised
        if self._gradient_and_energy is None:
            self.recorder.end()
            return denoised
        grad, energy = self._gradient_and_energy
        denoised, norm, status = guidance_step(denoised, grad, timestep, self.settings.scale, self.settings.gate)
        self.recorder.end(energy=energy, grad_norm=norm, status=status)
        return denoised

    def _open(self, x, timestep, model_options) -> None:
        """An evaluation begins: the cancellation point, the latent's size and finiteness, the recorder's entry."""
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self._evaluations += 1
        if self.capture.latent_shape is None:
            self.capture.latent_shape = list(x.shape)
        self.capture.latent_hw = tuple(x.shape[-2:])
        if self.capture.latent_hw != tuple(self.capture.latent_shape[-2:]):
            first = "×".join(map(str, self.capture.latent_shape[:1:-1]))
            self._note(f"the sampler changed the latent's size during the run (it began at {first}, e.g. "
                       f"SamplerLCMUpscale): maps of the later sizes are resampled to the first size's grids, and the "
                       f"trace measures at that size")
        self.recorder.begin(*_sigma_and_step(timestep, model_options))
        # Read once, at the end of the run: a sampler step can make the latent NaN by itself (a zero-length σ
        # interval), and its maps and output are NaN then whatever BiasMap does; not when an earlier output was NaN
        # (an fp16 overflow), which the sampler only passed on.
        self._latent_finite = torch.isfinite(x).all()
        not_finite = ~self._latent_finite
        if self._output_not_finite is not None:
            not_finite = not_finite & ~self._output_not_finite
        self._latent_not_finite = _either(self._latent_not_finite, not_finite)
        self._gradient_and_energy = None
        self._unet_ran = False

    def _detach_around(self, executor, x, *args, **kwargs):
        """Outermost around the U-Net: in a guided pass, the wrappers in between get its input detached, so their own
        arithmetic records nothing for autograd (EasyCache mixes it with what it kept from unguided steps, made in
        inference mode, which autograd cannot save); :meth:`_diffusion_model` hands the U-Net the input back."""
        if not (self._guiding and x.requires_grad):
            return executor(x, *args, **kwargs)
        self._unet_input = (x.detach(), x)
        try:
            return executor(self._unet_input[0], *args, **kwargs)
        finally:
            self._unet_input = None

    def _diffusion_model(self, executor, x, *args, **kwargs):
        """Innermost around the U-Net: it only runs when the U-Net does (not when a cache answers instead)."""
        if self.capture.branch is not None:  # the maps' pass: not PAG's or SAG's, nor the other branch's alone
            self._unet_ran = True
        if self._unet_input is not None and x is self._unet_input[0]:
            x = self._unet_input[1]
        try:
            out = executor(x, *args, **kwargs)
        except BaseException:
            self.capture.discard()
            raise
        self.capture.flush()  # the layers the capture left waiting, before anything reads the maps
        # The gradient comes from the captured queries, never from the output: the layers after the last of them
        # are cut off here, so their activations go now, not after the backward, and no node outside (EasyCache
        # keeps output − input between steps) holds on to them.
        return out.detach() if self._guiding else out

    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        if not self._main_pass_pending:  # another node's extra pass (SAG, PAG, …): not part of the trace
            return executor(model, conds, x_in, timestep, model_options)
        self._main_pass_pending = False
        if x_in.shape[0] != self.capture.latent_shape[0]:  # the maps and the gradient are per latent of the batch
            raise ValueError(f"a node ran the U-Net only on parts of the latent: {x_in.shape[0]} of its "
                             f"{self.capture.latent_shape[0]} images at a time (context windows over the batch, as "
                             f"for AnimateDiff); BiasMap needs one U-Net pass over the whole latent per evaluation, "
                             f"so remove or bypass that node")
        self.capture.set_entries(conds, x_in, timestep)
        branch = self._branch(conds, x_in, timestep)
        guide = self.window.admits(timestep)
        # The maps' branch alone when the other branch's hook group would leave its weights in the model (hook_groups).
        if guide and (self._branch_alone or _branches_apart(x_in.device)
                      or len(hook_groups(conds, timestep)) > 1):
            return self._run_branch_alone(executor, model, conds, x_in, timestep, model_options, branch)
        try:
            return self._run_branch(model, functools.partial(executor, model), x_in, timestep, model_options, branch,
                                    guide, conds)
        except RuntimeError as err:
            if not (guide and out_of_memory(err)):
                raise
        # Outside the except block, so the failed pass's activations are freed before the retry. ComfyUI sizes its
        # batches for inference; autograd keeps every activation of the guided pass until the backward.
        import comfy.model_management

        self.recorder.restart()  # drops the failed pass's maps, and with them its graph, before the cache is emptied
        self._unet_ran = False
        comfy.model_management.soft_empty_cache()
        self._branch_alone = True
        casts = ("; and the weight copies ComfyUI casts as layers run are cast again in the backward rather than kept"
                 if self.backward.memory_ran_short() else "")
        self._note("GPU memory ran short for one batched CFG pass with autograd: from that step on, the maps' branch "
                   f"runs alone with autograd and the other branch without (one more U-Net pass per step){casts}")
        return self._run_branch_alone(executor, model, conds, x_in, timestep, model_options, branch)

    def _run_branch_alone(self, executor, model, conds, x_in, timestep, model_options, branch):
        """The guided evaluation with only the maps' branch under autograd, so the backward covers one branch.

        The default on a CPU, where a batch of two costs what two passes of one do; both branches then run at batch 1,
        where the direct kernel beats oneDNN on the smallest grids. On a GPU, the fallback when memory runs short.
        """
        others = [c if i != branch else None for i, c in enumerate(conds)]
        only = [c if i == branch else None for i, c in enumerate(conds)]
        cpu = x_in.device.type == "cpu"
        # On a CPU the other branch's attention runs in SDPA too: ComfyUI's CPU default (sub-quadratic attention in
        # plain torch ops) is the slower kernel, and λ > 0 changes the result anyway. A GPU keeps ComfyUI's choice.
        other_options = with_sdpa_attention(model_options, everywhere=True) if cpu else model_options
        with SmallGridConvolution() if cpu else contextlib.nullcontext():
            # Without autograd, as ComfyUI runs it: running out of memory there is ComfyUI's to explain.
            out = (executor(model, others, x_in, timestep, other_options) if any(c is not None for c in others)
                   else [torch.zeros_like(x_in) for _ in conds])
            with out_of_memory_explained():
                guided = self._run_branch(model, functools.partial(executor, model), x_in, timestep, model_options,
                                          branch, True, only)
        out[branch] = guided[branch]
        return out

    def _extra_pass(self, guider, x, timestep, model_options):
        """Capture (and guide) through one more U-Net pass of the maps' branch, as PAG and SAG run theirs."""
        import comfy.samplers

        self._note("another node holds ComfyUI's sampler_calc_cond_batch_function slot: BiasMap ran one extra U-Net "
                   "pass per evaluation for its maps (slower, same method)")
        conds = [guider.conds.get("positive"), guider.conds.get("negative")]
        if math.isclose(guider.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):  # as ComfyUI
            conds[_UNCOND] = None
        self.capture.set_entries(conds, x, timestep)
        branch = self._branch(conds, x, timestep)
        model = guider.inner_model

        def extra(c, x_, t, options):
            return comfy.samplers.calc_cond_batch(model, c, x_, t, options)

        with out_of_memory_explained():  # this pass runs the maps' branch alone already
            self._run_branch(model, extra, x, timestep, model_options, _ONLY, self.window.admits(timestep),
                             [conds[branch]])

    def _run_branch(self, model, run, x, timestep, model_options, branch, guide, conds):
        """``run(conds, x, σ, options)`` with the maps of ``branch`` captured; with ``guide``, also ∇_x E through
        that pass. ``conds`` are the entries it runs: their ControlNets run on the latent too, so the gradient goes
        through them as well.
        """
        self.capture.branch = branch
        try:
            if not guide:
                return run(conds, x, timestep, model_options)
            out, self._gradient_and_energy = self.backward.run(model, run, conds, x, timestep, model_options)
            return out
        finally:
            self.capture.branch = None

    # ---- helpers --------------------------------------------------------------------------------------------

    def _branch(self, conds, x, timestep) -> int:
        """The CFG branch whose maps are recorded: the chosen one, unless no entry of it covers the image now."""
        wanted = _UNCOND if self.settings.branch == "uncond" else _COND
        other = _COND if wanted == _UNCOND else _UNCOND
        if covers_image(conds[wanted], x, timestep):
            return wanted
        if not covers_image(conds[other], x, timestep):
            raise ValueError("BiasMap records one CFG branch's maps over the whole image, but at this step neither the "
                             "positive nor the negative conditioning has an entry covering the whole image (area "
                             "conditioning or timestep ranges leave none): add a whole-image entry to one of them "
                             "with Conditioning (Combine)")
        if conds[wanted] is None:
            self._note("cfg = 1 skips the unconditional pass: maps come from the conditional branch on those steps")
        else:
            self._note(f"on some steps no {_NAMES[wanted]} conditioning entry covered the whole image (area or "
                       f"timestep-range conditioning): maps come from the {_NAMES[other]} branch on those steps")
        return other

    @property
    def _guiding(self) -> bool:
        """A guided U-Net pass is running."""
        return self.backward is not None and self.backward.active

    def given_latent(self, samples: torch.Tensor) -> None:
        """The latent the run starts from, checked for NaN and inf on its device (read when the run ends)."""
        self._given_not_finite = ~torch.isfinite(samples).all()

    def finish(self, samples: torch.Tensor | None = None, **run):
        """The run's :class:`BiasMapTrace`; ``samples``: the sampled latent, ``run``: how it was sampled (seed, steps,
        …), kept in the trace."""
        # Read once, here: NaN in the output latent comes from the model or the sampler, never from the correction,
        # which is skipped where it is not finite. Each note names its cause once; a NaN given would blame both.
        given = self._given_not_finite is not None and bool(self._given_not_finite)
        made = not given and self._output_not_finite is not None and bool(self._output_not_finite)
        handed = not given and self._latent_not_finite is not None and bool(self._latent_not_finite)
        last_step = (samples is not None and not (given or made or handed)
                     and not bool(torch.isfinite(samples).all()))
        recorded = (f"the {_NAMES[_UNCOND if self.settings.branch == 'uncond' else _COND]} prompt's, branch "
                    f"{self.settings.branch}")
        for note in filter(None, [*self.window.notes(), quality_note(self.settings.scale),
                                  *(NOT_FINITE[cause] for cause, found in (("given", given), ("made", made),
                                                                           ("handed", handed)) if found),
                                  unweighted_note(self.recorder.unweighted(), recorded),
                                  NOT_FINITE["last step"] if last_step else None]):
            self._note(note)
        if self.backward is not None:
            self.backward.finish()
        for note in filter(None, [skipped_steps_note(sorted(set(self.recorder.skipped_steps()))),
                                  # Every call of the model reaches the outermost wrapper (_keep_place): these steps
                                  # never called it.
                                  unevaluated_steps_note(sorted(set(self.recorder.steps_without_evaluation)))]):
            self._note(note)
        if self._schedule is not None:  # 4 significant digits tell schedules apart and read in a CSV cell
            run["sigmas"] = [float(f"{s:.4g}") for s in self._schedule.flatten().tolist()]
        trace = self.recorder.finish(tokens=self.tokens, latent_shape=self.capture.latent_shape or [],
                                     demographic=self.demographic, semantic=self.semantic, model_family=self.family,
                                     settings=self.settings.to_dict(), notes=self.notes,
                                     run={**run, "attribution_prompt": self.attribution_prompt})
        gated = gate_note(trace.guidance_counts())  # the statuses read once, from the finished trace
        if gated:
            _add_note(trace.notes, gated)
        return trace


def _either(flag: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """A flag kept on the device over a run: ``flag`` or ``other`` (``other`` when there is none yet)."""
    return other if flag is None else flag | other


def _branches_apart(device: torch.device) -> bool:
    """Whether a guided evaluation runs its CFG branches as passes of their own, so the backward covers one branch: on
    a CPU, where a batch of two costs what two passes of one do; a GPU at SD sizes is bound by kernel launches and runs
    one batched pass."""
    return device.type == "cpu"


def _add_outermost(model_patcher, wrapper_type: str, wrapper) -> None:
    """``wrapper`` first among its type in the model's options, whose wrappers ComfyUI puts before the model's own
    when sampling starts. A plain function, not a bound method: cloning a model deep-copies its options."""
    wrappers = model_patcher.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    wrappers[wrapper_type] = {_OUTER_KEY: [wrapper], **wrappers.get(wrapper_type, {})}


def _sigma_and_step(timestep, model_options) -> tuple[torch.Tensor, torch.Tensor]:
    """σ of an evaluation and the step i whose interval (σ_i+1, σ_i] holds it: the label where the sampler reports no
    steps (see _sampler_sample). 0-d tensors, no host synchronisation."""
    schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
    sigma = timestep.reshape(-1)[0]
    if schedule is None:
        return sigma, torch.zeros((), dtype=torch.long)
    return sigma, ((schedule >= sigma * (1 - 1e-5)).sum() - 1).clamp(0, schedule.numel() - 2)


def _add_note(notes: list[str], text: str) -> None:
    """Add a run's note once."""
    if text not in notes:
        notes.append(text)
