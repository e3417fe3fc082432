"""One guided (or recording) run through the real ComfyUI, seen from outside BiasMap: the host tests' common driver."""

import torch

from biasmap_engine import BiasMapSettings
from biasmap_engine.host import sample_with_scheduler, start_session

ATTRIBUTION = "A photo of the face of a doctor and gender"


def sample(model, clip, pos, neg, scale, seed=0, steps=1, sampler="euler", cfg=7.0, batch=1, size=32,
           scheduler="normal", latent=None, **settings):
    """One run (of ``batch`` empty latents of ``size``², or of ``latent``, a LATENT); returns (latent, trace, first
    evaluation's (x, σ, guided denoised))."""
    out, trace, seen = evaluations(model, clip, pos, neg, scale, seed, steps, sampler, cfg, batch, size, scheduler,
                                   latent, **settings)
    return out, trace, seen[0]


def evaluations(model, clip, pos, neg, scale, seed=0, steps=1, sampler="euler", cfg=7.0, batch=1, size=32,
                scheduler="normal", latent=None, **settings):
    """One run; returns (latent, trace, every evaluation's (x, σ, guided denoised), in order)."""
    import comfy.patcher_extension as ext

    seen = []

    def spy(executor, x, timestep, model_options, seed_):
        out = executor(x, timestep, model_options, seed_)
        seen.append((x.clone(), timestep.clone(), out.clone()))
        return out

    spied = model.clone()
    spied.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, "test-spy", spy)  # outside BiasMap's main wrapper: sees its result
    lat = latent or {"samples": torch.zeros(batch, 4, size, size)}
    with torch.inference_mode():
        session = start_session(spied, clip, ATTRIBUTION, ["gender"], ["doctor"],
                                BiasMapSettings(scale=scale, **settings))
        out, trace = sample_with_scheduler(session, spied, seed, steps, cfg, sampler, scheduler, pos, neg, lat)
    return out["samples"], trace, seen


def counting_evaluations(model):
    """A clone of ``model`` and the list it appends to at each model evaluation: whether a refusal came before any."""
    import comfy.patcher_extension as ext

    evaluated = []
    counted = model.clone()
    counted.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, "test-count",
                                 lambda executor, *args: evaluated.append(1) or executor(*args))
    return counted, evaluated
