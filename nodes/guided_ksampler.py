"""BiasMap Guided KSampler: sampling that records attribution maps and, with λ > 0, lowers entanglement.

BiasMap (Chakraborty et al., arXiv 2509.13496, SIGKDD 2026) adds λ·√(1−ᾱ)·∇_z SoftIoU(demographic, semantic)
to the noise prediction at every step (within the σ window, the gate and the guided stages). With λ = 0 these
nodes sample exactly as KSampler / SamplerCustomAdvanced.
"""

import logging

from comfy_api.latest import io

from ..biasmap_engine import guidance_line, typed_concepts
from ..biasmap_engine.host import (queued_outputs, sample_with_sampler, sample_with_scheduler, sampler_names,
                                   scheduler_names, start_session)
from .common import (ADVANCED, CATEGORY, Trace, check_step_windows, guidance_inputs, plain_errors, settings_from,
                     show_on_node)
from .concepts import (absent_from, check_concepts, check_loaded_trace_words, check_words_asked, concept_inputs,
                       require)
from .prompt_graph import (attribution_clip_apart, graph_run, loaded_traces_of, step_windows_of,
                           words_asked_of)
from .trace_files import trace_file_header

__all__ = ["BiasMapGuidedKSampler", "BiasMapGuidedKSamplerAdvanced"]

_OUTPUTS = [io.Latent.Output("latent", tooltip="The sampled latent (bit-identical to the stock sampler when λ = 0)."),
            Trace.Output("trace", tooltip="Attribution maps of every step and stage, concepts, σ, settings and the "
                                          "guidance accounting; feed it to Attribution Map or Entanglement IoU.")]


def _logged(node, latent, trace) -> io.NodeOutput:
    """The node's outputs, the trace with what the graph says of the run (typed prompts, model; for the audit over
    prompts and models), and its guidance counts and notes on the node and in ComfyUI's console: the report that has
    them too is a STRING output, seen only where a Preview as Text node is connected."""
    hidden = node.hidden  # None where execute is called outside ComfyUI's executor
    trace.run.update(graph_run(hidden.prompt if hidden else None, hidden.unique_id if hidden else None))
    # The semantic concepts are what the picture is of: one missing from the typed prompt is most often a prompt
    # changed alone (an audit's next profession), whose rows would measure a word the model was not asked to draw.
    prompt = trace.run.get("generation_prompt")
    absent = absent_from(trace.semantic, prompt) if prompt else []
    if absent:
        trace.notes.append(f"the semantic concept(s) {', '.join(absent)} are not in the generation prompt "
                           f"({prompt!r}): their maps show where the model puts words it was "
                           f"not asked to draw; if the prompt was changed alone, change the attribution prompt and the "
                           f"semantic concepts with it")
    # The maps are the attention of the model's queries to the attribution prompt as the sampler's CLIP encodes it:
    # another CLIP than the prompt's (a LoRA added before CLIP Text Encode alone) gives other maps than the model's.
    clips = attribution_clip_apart(hidden.prompt, hidden.unique_id) if hidden else None
    if clips:
        trace.notes.append(f"the sampler's clip ({clips[0]}) is not the CLIP that encoded the prompt ({clips[1]}), "
                           f"so the maps are of the attribution prompt as another CLIP reads it: connect the CLIP "
                           f"that CLIP Text Encode takes (after any LoRA or CLIP Set Last Layer) to the sampler's clip "
                           f"too")
    for note in trace.notes:
        logging.warning("BiasMap: %s", note)
    show_on_node(node, "\n".join(filter(None, [guidance_line(trace), *(f"note: {note}" for note in trace.notes)])))
    return io.NodeOutput(latent, trace)


def _session(node, model, clip, kwargs, last_step: int | None):
    # Validation's check again, now that a linked prompt or list (Audit Prompts') is known: its message names the
    # list and the typing habit behind a missing word, which the lookup in the tokens cannot.
    require(check_concepts(kwargs["attribution_prompt"], kwargs["demographic"], kwargs["semantic"]))
    own = {name: typed_concepts(kwargs[name]) for name in ("demographic", "semantic")}
    hidden = node.hidden  # None where execute is called outside ComfyUI's executor
    if hidden:  # before the attribution prompt is encoded: nothing spent on a typo
        outputs = queued_outputs()
        # As typed, for an empty input of a node reading the trace: a concept's escaped brackets, person \(elderly\),
        # would be read as emphasis in the concept alone.
        typed = {name: [text for text, _ in concepts] for name, concepts in own.items()}
        files = loaded_traces_of(hidden.prompt, hidden.unique_id, outputs)
        headers = {file: trace_file_header(file) for file in set(files.values())}  # each read once
        loaded = {reader: (file, headers[file]) for reader, file in files.items() if headers[file]}
        asked = words_asked_of(hidden.prompt, hidden.unique_id, outputs, typed, loaded)
        check_words_asked(asked, kwargs["attribution_prompt"])
        check_loaded_trace_words(asked, loaded)
        check_step_windows(step_windows_of(hidden.prompt, hidden.unique_id, outputs), last_step)
    demographic, semantic = ([concept for _, concept in own[name]] for name in ("demographic", "semantic"))
    return start_session(model, clip, kwargs["attribution_prompt"], demographic, semantic, settings_from(kwargs))


class BiasMapGuidedKSampler(io.ComfyNode):
    """KSampler + BiasMap recording and SoftIoU energy guidance."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapGuidedKSampler",
            display_name="BiasMap Guided KSampler",
            category=CATEGORY,
            description="A KSampler that records open-vocabulary attribution maps of the attribution prompt's words "
                        "at every step and, with guidance scale λ > 0, steers each step toward less spatial overlap "
                        "of the demographic and semantic concepts (BiasMap, arXiv 2509.13496).",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x, SD 2.x or SDXL model (U-Net cross-attention)."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompts (after LoRA / CLIP Set Last Layer), "
                                              "used to encode the attribution prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed; the guided and unguided images of a pair share it."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (paper: 7.0)."),
                io.Combo.Input("sampler_name", options=sampler_names(), tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=scheduler_names(), tooltip="ComfyUI noise schedule."),
                io.Conditioning.Input("positive", tooltip="The generation prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Denoising strength (above 0: at 0 nothing is sampled, so there are no maps)."),
                *concept_inputs(),
                *guidance_inputs(),
            ],
            outputs=_OUTPUTS,
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, attribution_prompt=None, demographic=None, semantic=None):
        # ComfyUI pins a failure on every input named here (and skips their own range checks), so only the concepts
        # are: guided_stages, start < end and the middle block's stages are checked when the node runs, before it
        # samples.
        return check_concepts(attribution_prompt, demographic, semantic)

    @classmethod
    @plain_errors
    def execute(cls, model, clip, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, **kwargs) -> io.NodeOutput:
        # The last step it will run, after which no node reading its trace may start (dpm_fast, which keeps a grid of
        # its own, may report fewer: those nodes then say so themselves).
        session = _session(cls, model, clip, kwargs, steps - 1)
        latent, trace = sample_with_scheduler(session, model, seed, steps, cfg, sampler_name, scheduler, positive,
                                              negative, latent_image, denoise)
        return _logged(cls, latent, trace)


class BiasMapGuidedKSamplerAdvanced(io.ComfyNode):
    """SamplerCustomAdvanced-style variant: any SAMPLER and SIGMAS, with BiasMap recording and guidance."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapGuidedKSamplerAdvanced",
            display_name="BiasMap Guided KSampler (Advanced)",
            category=CATEGORY,
            description="BiasMap recording and guidance with any SAMPLER and SIGMAS, as SamplerCustomAdvanced with "
                        "a CFG guider and random noise (or none, with add_noise off).",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x, SD 2.x or SDXL model (U-Net cross-attention)."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompts, used for the attribution prompt."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed. With add_noise off it seeds nothing, but the trace and the audit "
                                     "rows name the image by it: give it the seed of the run that made the latent."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Sampler.Input("sampler", tooltip="From KSamplerSelect or any sampler node."),
                io.Sigmas.Input("sigmas", tooltip="From BasicScheduler or any scheduler node."),
                io.Conditioning.Input("positive", tooltip="The generation prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                *concept_inputs(),
                *guidance_inputs(),
                # Last, so that workflows saved before it keep their widget values in place.
                io.Boolean.Input("add_noise", default=True, extra_dict=ADVANCED,
                                 tooltip="Off: denoise the latent as it is, like SamplerCustomAdvanced with "
                                         "DisableNoise (e.g. the second half of split sigmas); as there, an "
                                         "ancestral or SDE sampler's own noise then comes from seed 0, not "
                                         "noise_seed."),
            ],
            outputs=_OUTPUTS,
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, attribution_prompt=None, demographic=None, semantic=None):
        return BiasMapGuidedKSampler.validate_inputs(attribution_prompt, demographic, semantic)

    @classmethod
    @plain_errors
    def execute(cls, model, clip, noise_seed, cfg, sampler, sigmas, positive, negative, latent_image,
                add_noise=True, **kwargs) -> io.NodeOutput:
        last_step = sigmas.shape[-1] - 2 if sigmas.shape[-1] > 1 else None  # SIGMAS of no step: nothing to check
        session = _session(cls, model, clip, kwargs, last_step)
        latent, trace = sample_with_sampler(session, model, noise_seed, cfg, sampler, sigmas, positive, negative,
                                            latent_image, add_noise)
        return _logged(cls, latent, trace)
