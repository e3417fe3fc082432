"""Recording and guidance next to other nodes that patch or wrap the model, as users chain them before the sampler:
ComfyUI's own model patches and guiders, caches that answer evaluations without the U-Net, context windows."""

import contextlib

import pytest
import torch
from guided_runs import sample


def _patched(name, model, neg):
    """``model`` through ComfyUI's node ``name`` with typical settings."""
    from comfy_extras import (nodes_apg, nodes_attention_multiply, nodes_cfg, nodes_eps, nodes_freelunch, nodes_fresca,
                              nodes_hypertile, nodes_mahiro, nodes_model_advanced, nodes_model_downscale, nodes_pag,
                              nodes_perpneg, nodes_sag, nodes_tcfg, nodes_tomesd)

    nodes = {
        "FreeU": lambda: nodes_freelunch.FreeU.execute(model, 1.3, 1.4, 0.9, 0.2),
        "FreeU_V2": lambda: nodes_freelunch.FreeU_V2.execute(model, 1.3, 1.4, 0.9, 0.2),
        "FreSca": lambda: nodes_fresca.FreSca.execute(model, 1.0, 1.25, 20),
        "HyperTile": lambda: nodes_hypertile.HyperTile.execute(model, 16, 2, 0, False),
        "TomePatchModel": lambda: nodes_tomesd.TomePatchModel.execute(model, 0.3),
        "PatchModelAddDownscale": lambda: nodes_model_downscale.PatchModelAddDownscale.execute(
            model, 1, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"),
        "PerturbedAttentionGuidance": lambda: nodes_pag.PerturbedAttentionGuidance.execute(model, 3.0),
        "SelfAttentionGuidance": lambda: nodes_sag.SelfAttentionGuidance.execute(model, 0.5, 2.0),
        "APG": lambda: nodes_apg.APG.execute(model, 1.0, 5.0, 0.5),
        "CFGZeroStar": lambda: nodes_cfg.CFGZeroStar.execute(model),
        "CFGNorm": lambda: nodes_cfg.CFGNorm.execute(model, 1.0),
        "TCFG": lambda: nodes_tcfg.TCFG.execute(model),
        "Mahiro": lambda: nodes_mahiro.Mahiro.execute(model),
        "EpsilonScaling": lambda: nodes_eps.EpsilonScaling.execute(model, 1.005),
        "TemporalScoreRescaling": lambda: nodes_eps.TemporalScoreRescaling.execute(model, 0.95, 1.0),
        "RescaleCFG": lambda: nodes_model_advanced.RescaleCFG().patch(model, 0.7),
        "ModelSamplingDiscrete v zsnr": lambda: nodes_model_advanced.ModelSamplingDiscrete().patch(
            model, "v_prediction", True),
        "ModelSamplingDiscrete lcm": lambda: nodes_model_advanced.ModelSamplingDiscrete().patch(model, "lcm", False),
        "UNetSelfAttentionMultiply": lambda: nodes_attention_multiply.UNetSelfAttentionMultiply.execute(
            model, 1.1, 0.9, 1.0, 1.0),
        "UNetCrossAttentionMultiply": lambda: nodes_attention_multiply.UNetCrossAttentionMultiply.execute(
            model, 1.1, 0.9, 1.0, 1.0),
        "PerpNeg": lambda: nodes_perpneg.PerpNeg.execute(model, neg, 1.0),
    }
    with torch.inference_mode():
        return nodes[name]()[0]


@pytest.mark.parametrize("stages, batched", [(None, False), (("down_1",), False), (None, True), (("down_1",), True)],
                         ids=["all stages", "down x1", "all stages, one CFG batch (GPU)", "down x1, one CFG batch (GPU)"])
@pytest.mark.parametrize("node", [
    "FreeU", "FreeU_V2", "FreSca", "HyperTile", "TomePatchModel", "PatchModelAddDownscale",
    "PerturbedAttentionGuidance", "SelfAttentionGuidance", "APG", "CFGZeroStar", "CFGNorm", "TCFG", "Mahiro",
    "EpsilonScaling", "TemporalScoreRescaling", "RescaleCFG", "ModelSamplingDiscrete v zsnr",
    "ModelSamplingDiscrete lcm", "UNetSelfAttentionMultiply", "UNetCrossAttentionMultiply", "PerpNeg"])
def test_guidance_applies_at_every_step_below_the_sigma_cap_under_comfyuis_model_patch_nodes(sd15, prompts, node,
                                                                                             stages, batched, request):
    if batched:
        request.getfixturevalue("gpu_batching")
    model, clip = sd15
    pos, neg = prompts
    patched = _patched(node, model, neg)
    plain, _, _ = sample(patched, clip, pos, neg, 0.0, steps=2, guided_stages=stages)
    guided, trace, _ = sample(patched, clip, pos, neg, 100.0, steps=2, guided_stages=stages)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
    counts = trace.guidance_counts()
    above = int(node == "ModelSamplingDiscrete v zsnr")  # its first step, at σ 4519, is left unguided
    assert counts["applied"] == trace.steps.numel() - above and counts["not_guided"] == above
    assert trace.steps.numel() == sum(counts.values()) and set(trace.steps.tolist()) == {0, 1}


@pytest.mark.parametrize("cache", ["EasyCacheNode", "LazyCacheNode"])
def test_steps_a_cache_node_answers_without_the_unet_are_named_in_a_note_not_recorded(sd15, prompts, cache):
    # EasyCache skips the U-Net inside BiasMap's evaluation; LazyCache answers the whole evaluation outside it.
    import nodes
    from comfy_extras import nodes_easycache

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        cached = getattr(nodes_easycache, cache).execute(model, 0.5, 0.0, 1.0, False)[0]
        (stock,) = nodes.common_ksampler(cached, 0, 10, 7.0, "euler", "normal", pos, neg,
                                         {"samples": torch.zeros(1, 4, 32, 32)})
    for lam in (0.0, 100.0):
        out, trace, _ = sample(cached, clip, pos, neg, lam, steps=10)
        assert torch.isfinite(out).all()
        assert torch.equal(out, stock["samples"]) == (lam == 0.0)  # recording leaves the cache's choices alone
        unrecorded = sorted(set(range(10)) - set(trace.steps.tolist()))
        assert unrecorded, "the cache answered no step at this threshold: the test needs a lower one"
        (note,) = [n for n in trace.notes if "did not run" in n]
        assert f"of sampler step(s) {', '.join(map(str, unrecorded))}:" in note and cache[:-4] in note
        counts = trace.guidance_counts()
        assert counts["applied" if lam else "not_guided"] == trace.steps.numel() == sum(counts.values())


def _answering_every_third(model):
    """``model`` with a PREDICT_NOISE wrapper in its options (where ComfyUI puts it before the model's own) that answers
    every third evaluation with the previous output, as a cache registered there would."""
    import comfy.patcher_extension as ext

    previous = []

    def cache(executor, *args, **kwargs):
        if previous and len(previous) % 3 == 2:
            previous.append(previous[-1])
            return previous[-1]
        previous.append(executor(*args, **kwargs))
        return previous[-1]

    answering = model.clone()
    ext.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, "test-cache", cache, answering.model_options,
                             is_model_options=True)
    return answering


def test_steps_the_sampler_reports_without_evaluating_the_model_are_named_as_the_samplers_not_a_caches(sd15,
                                                                                                     prompts):
    import comfy.samplers
    from biasmap_engine import BiasMapSettings
    from biasmap_engine.host import sample_with_sampler, start_session
    from guided_runs import ATTRIBUTION

    def euler_reusing_odd_steps(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Euler that reuses the previous denoised on odd steps, as a sampler-level cache would."""
        denoised = None
        for i in range(len(sigmas) - 1):
            if denoised is None or i % 2 == 0:
                denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    model, clip = sd15
    pos, neg = prompts
    sigmas = torch.tensor([14.6146, 6.0, 3.0, 1.0, 0.0])
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], BiasMapSettings(scale=100.0))
        _, trace = sample_with_sampler(session, model, 0, 7.0, comfy.samplers.KSAMPLER(euler_reusing_odd_steps),
                                       sigmas, pos, neg, {"samples": torch.zeros(1, 4, 32, 32)})
    assert trace.steps.tolist() == [0, 2]
    (note,) = [n for n in trace.notes if "step(s) 1, 3" in n]
    assert note.startswith("the sampler reported step(s) 1, 3 without evaluating the model") and "Cache" not in note


@pytest.mark.parametrize("cache", ["EasyCacheNode", "LazyCacheNode", "a wrapper in the model's options"])
def test_with_a_cache_and_a_two_evaluation_sampler_each_recorded_evaluation_keeps_its_step(sd15, prompts, cache):
    # Heun evaluates each step twice; a cache answering some of them must not shift the others' steps.
    import comfy.patcher_extension as ext
    from comfy_extras import nodes_easycache

    model, clip = sd15
    pos, neg = prompts
    ran = []  # per model evaluation, in order: whether the U-Net ran

    def evaluation(executor, *args, **kwargs):
        ran.append(False)
        return executor(*args, **kwargs)

    def unet(executor, *args, **kwargs):
        ran[-1] = True
        return executor(*args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(ext.WrappersMP.PREDICT_NOISE, "test-evaluations", evaluation)
    if cache.endswith("Node"):
        with torch.inference_mode():
            cached = getattr(nodes_easycache, cache).execute(counted, 0.5, 0.0, 1.0, False)[0]
    else:
        cached = _answering_every_third(counted)
        wrappers = cached.model_options["transformer_options"]["wrappers"]
        wrappers[ext.WrappersMP.PREDICT_NOISE] = {"test-evaluations": [evaluation],  # outside the cache
                                                  **wrappers[ext.WrappersMP.PREDICT_NOISE]}
        cached.remove_wrappers_with_key(ext.WrappersMP.PREDICT_NOISE, "test-evaluations")
    cached.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "test-unet", unet)  # inside it
    _, trace, _ = sample(cached, clip, pos, neg, 100.0, steps=8, sampler="heun")
    assert len(ran) == 15 and 1 < sum(ran) < 15  # step k's evaluations are the (2k)th and (2k+1)th
    assert trace.steps.tolist() == [k // 2 for k, unet_ran in enumerate(ran) if unet_ran]


@pytest.mark.parametrize("extra", ["PerturbedAttentionGuidance", "SelfAttentionGuidance"])
def test_a_cache_skipping_the_maps_pass_while_another_nodes_extra_pass_runs_is_still_a_cache(sd15, prompts, extra):
    from comfy_extras import nodes_easycache, nodes_pag, nodes_sag

    model, clip = sd15
    pos, neg = prompts
    args = {"PerturbedAttentionGuidance": (nodes_pag, (3.0,)), "SelfAttentionGuidance": (nodes_sag, (0.5, 2.0))}
    module, settings = args[extra]
    with torch.inference_mode():
        guided = getattr(module, extra).execute(model, *settings)[0]
        # A high reuse threshold: at 0.5 EasyCache answered no step of the SAG run on an H200 (TF32 numbers).
        cached = nodes_easycache.EasyCacheNode.execute(guided, 2.0, 0.0, 1.0, False)[0]
    skipped = []
    for lam in (0.0, 100.0):
        out, trace, _ = sample(cached, clip, pos, neg, lam, steps=10)
        skipped.append(10 - trace.steps.numel())
        assert torch.isfinite(out).all()
        assert (skipped[-1] > 0) == any("did not run for BiasMap" in note for note in trace.notes)
    assert any(skipped), "the cache answered no step at this threshold: the test needs a lower one"


def test_a_cache_and_a_guidance_window_work_together(sd15, prompts):
    # EasyCache keeps tensors made on the unguided (inference-mode) steps and mixes them with the guided pass's input.
    from comfy_extras import nodes_easycache

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        cached = nodes_easycache.EasyCacheNode.execute(model, 0.5, 0.0, 1.0, False)[0]
    out, trace, _ = sample(cached, clip, pos, neg, 100.0, steps=10, start=0.3)
    counts = trace.guidance_counts()
    assert torch.isfinite(out).all() and counts["not_guided"] > 0 and counts["applied"] > 0


@pytest.mark.parametrize("length, overlap, dim, batch, cause", [
    (16, 4, 3, 1, "no pass of it over the whole latent reached"),  # windows of 16 of the latent's 32 columns
    (1, 0, 0, 2, "1 of its 2 images at a time")])  # one image of two at a time (AnimateDiff's)
def test_an_evaluation_whose_unet_ran_only_on_parts_of_the_latent_is_refused_with_the_cause(sd15, prompts, length,
                                                                                            overlap, dim, batch, cause):
    import comfy.context_windows as windows
    from comfy_extras import nodes_context_windows

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        tiled = nodes_context_windows.ContextWindowsManualNode.execute(
            model, length, overlap, windows.ContextSchedules.STATIC_STANDARD, 1, False,
            windows.ContextFuseMethods.PYRAMID, dim, False)[0]
    for lam in (0.0, 100.0):
        with pytest.raises(ValueError, match=f"{cause}.*remove or bypass that node"):
            sample(tiled, clip, pos, neg, lam, batch=batch)


def test_a_guided_passs_unet_output_carries_no_graph_out_of_the_unet(sd15, prompts):
    # The gradient comes from the captured queries; a node around the U-Net (EasyCache keeps output − input between
    # steps) must not be handed the graph of the layers after them.
    import comfy.patcher_extension as ext

    model, clip = sd15
    pos, neg = prompts
    seen = []

    def around(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((torch.is_grad_enabled(), out.grad_fn))
        return out

    outside = model.clone()
    outside.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "test-around", around)
    _, trace, _ = sample(outside, clip, pos, neg, 100.0)
    assert trace.guidance_counts()["applied"] == 1
    assert any(grad for grad, _ in seen) and all(node is None for _, node in seen)


def test_a_guided_evaluations_predictions_carry_no_graph_out_of_the_guided_pass(sd15, prompts):
    # What calc_cond_batch hands the sampler (and any wrapper around it) is computed after the U-Net: detached too.
    import comfy.patcher_extension as ext

    model, clip = sd15
    pos, neg = prompts
    seen = []

    def around(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append([o.grad_fn for o in out])
        return out

    outside = model.clone()
    outside.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, "test-around", around)
    _, trace, _ = sample(outside, clip, pos, neg, 100.0)
    assert trace.guidance_counts()["applied"] == 1
    assert seen and all(node is None for nodes in seen for node in nodes)


def test_a_hypernetwork_loaded_in_inference_mode_can_be_guided_through(sd15, prompts, tmp_path):
    # HypernetworkLoader's patch holds layers of its own, made in inference mode; in a guided pass they run on keys
    # and values that need gradients, so their weights are swapped as the U-Net's are.
    from comfy_extras import nodes_hypernetwork

    model, clip = sd15
    pos, neg = prompts
    gen = torch.Generator().manual_seed(0)
    layers = {dim: [{"linear.0.weight": torch.randn(dim, dim, generator=gen) * 0.05, "linear.0.bias": torch.zeros(dim)}
                    for _ in range(2)] for dim in (32, 64, 768)}  # the tiny U-Net's attn1 widths and the context's
    torch.save(layers, tmp_path / "hypernetwork.pt")
    with torch.inference_mode():
        patch = nodes_hypernetwork.load_hypernetwork_patch(str(tmp_path / "hypernetwork.pt"), 1.0)
        patched = model.clone()
        patched.set_model_attn1_patch(patch)
        patched.set_model_attn2_patch(patch)
    assert_takes_part_and_is_guided(model, patched, clip, pos, neg)


def test_an_attn2_replace_holding_layers_loaded_in_inference_mode_can_be_guided_through(sd15, prompts):
    # An adapter-style node replaces attn2 with a function whose closure holds a projection of its own, loaded in
    # inference mode; in a guided pass it runs on an output that needs gradients, so its weight is swapped too.
    import comfy.ldm.modules.attention as attention
    import comfy.model_management

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():  # on the device the U-Net runs on, as the adapter's loader would put it
        projection = torch.nn.Linear(32, 32, device=comfy.model_management.get_torch_device())  # output block 2's width
        torch.nn.init.eye_(projection.weight)
        projection.weight.mul_(1.5)
        torch.nn.init.zeros_(projection.bias)

        def projected(q, k, v, extra):
            return projection(attention.optimized_attention(q, k, v, extra["n_heads"]))

        patched = model.clone()
        patched.set_model_attn2_replace(projected, "output", 2)
    assert_takes_part_and_is_guided(model, patched, clip, pos, neg)


def assert_takes_part_and_is_guided(model, patched, clip, pos, neg):
    """``patched``, ``model`` with another node's patch, samples another image, and is guided at both of two steps."""
    plain, _, _ = sample(model, clip, pos, neg, 0.0, steps=2)
    recorded, _, _ = sample(patched, clip, pos, neg, 0.0, steps=2)
    guided, trace, _ = sample(patched, clip, pos, neg, 100.0, steps=2)
    assert not torch.equal(plain, recorded)  # the patch takes part
    assert trace.guidance_counts()["applied"] == 2 and torch.isfinite(guided).all()
    assert not torch.equal(guided, recorded)


def test_a_quantized_checkpoint_on_a_gpu_with_fp8_compute_is_guided_through_its_dequantized_weights(comfy, monkeypatch):
    # Its layers quantize their inputs outside autograd there; the guided pass uses ComfyUI's full-precision path.
    pytest.importorskip("comfy_kitchen", reason="comfy-kitchen, a ComfyUI v0.8.0 requirement that its fp8 "
                                                "quantization needs, is not installed: pip install comfy-kitchen")
    import comfy_models
    import nodes

    from biasmap_engine.host import guided_backward

    with torch.inference_mode():
        model, clip = comfy_models.tiny_sd15_fp8_quantized(0)
        pos, neg = comfy_models.paper_prompts(clip)
        stock = nodes.common_ksampler(model, 0, 2, 7.0, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, 32, 32)})[0]["samples"]
    recorded, _, _ = sample(model, clip, pos, neg, 0.0, steps=2)
    assert torch.equal(recorded, stock)  # the sampler's own passes keep the quantized kernels
    guided, trace, _ = sample(model, clip, pos, neg, 100.0, steps=2)
    assert trace.guidance_counts()["applied"] == 2 and torch.isfinite(guided).all() and not torch.equal(guided, stock)
    layers = guided_backward.quantized_layers(model.model.diffusion_model.modules())
    assert layers and all(not m._full_precision_mm for m in layers)  # restored

    # Without that path the queries carry no gradient, and the message says so instead of autograd's.
    monkeypatch.setattr(guided_backward, "differentiable_quantized", lambda layers: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="no gradient path from the latent to the cross-attention queries"):
        sample(model, clip, pos, neg, 100.0, steps=2)
