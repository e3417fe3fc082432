"""Recording attribution maps along the real sampling trajectory (discovery), against the real ComfyUI."""

import copy

import pytest
import torch

from biasmap_engine import (BiasMapSettings, BiasMapTrace, ConceptNotFoundError, find_word_positions, prompt_words,
                            token_softmax_maps)
from biasmap_engine.host import (UnsupportedModelError, encode_attribution, sample_with_sampler,
                                 sample_with_scheduler, start_session)
from guided_runs import ATTRIBUTION

RECORD = BiasMapSettings(scale=0.0)


def latent(batch=2, h=40, w=56):  # a 320×448 image: not a multiple of 64, not square
    return {"samples": torch.zeros(batch, 4, h, w)}


def run(model, clip, prompts, settings=RECORD, sampler="euler", cfg=7.0, steps=3, lat=None, attribution=ATTRIBUTION):
    import nodes

    pos, neg = prompts
    lat = lat or latent()
    with torch.inference_mode():
        (stock,) = nodes.common_ksampler(model, 0, steps, cfg, sampler, "normal", pos, neg, lat)
        session = start_session(model, clip, attribution, ["gender"], ["doctor"], settings)
        ours, trace = sample_with_scheduler(session, model, 0, steps, cfg, sampler, "normal", pos, neg, lat)
    return stock["samples"], ours["samples"], trace


@pytest.mark.parametrize("cfg", [1.0, 7.0])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_recording_leaves_the_latent_bit_identical_to_the_stock_ksampler(sd15, prompts, sampler, cfg):
    model, clip = sd15
    stock, ours, trace = run(model, clip, prompts, sampler=sampler, cfg=cfg)
    assert torch.equal(stock, ours)
    evaluations = 5 if sampler == "heun" else 3  # heun evaluates twice per step but not on the last one
    assert trace.maps["down_1"].shape == (evaluations, 2, len(trace.tokens), 40, 56)
    assert trace.maps["down_2"].shape[-2:] == (20, 28)
    assert torch.isfinite(trace.maps["down_1"]).all()
    assert trace.guidance_counts() == {"not_guided": evaluations * 2} | dict.fromkeys(
        ("applied", "clipped", "skipped_gate", "skipped_nonfinite"), 0)
    assert torch.isnan(trace.guidance["energy"]).all()  # no energy at λ = 0: not a guided E of 0
    if cfg == 1.0:
        assert [note for note in trace.notes if "cfg = 1" in note] != [] and len(set(trace.notes)) == len(trace.notes)


def test_advanced_variant_records_with_any_sampler_and_sigmas(sd15, prompts):
    import comfy.sample
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4)
        sampler = comfy.samplers.sampler_object("dpmpp_2m")
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        lat = latent()
        noise = comfy.sample.prepare_noise(lat["samples"], 3)
        stock = guider.sample(noise, lat["samples"], sampler, sigmas, seed=3)
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        ours, trace = sample_with_sampler(session, model, 3, 5.0, sampler, sigmas, pos, neg, lat)
    assert torch.equal(stock.cpu(), ours["samples"].cpu())
    assert trace.steps.tolist() == [0, 1, 2, 3]
    assert torch.allclose(trace.sigmas, sigmas[:-1].float().cpu())
    assert {k: v for k, v in trace.run.items() if k not in ("prompt_id", "time", "environment")} == {
        "seed": 3, "steps": 4, "cfg": 5.0, "sampler": "dpmpp_2m", "scheduler": "custom sigmas", "add_noise": True,
        "batch_index": None, "noise_mask": None, "start_latent": None, "attribution_prompt": ATTRIBUTION,
        "precision": "fp32", "sigmas": [float(f"{s:.4g}") for s in sigmas.tolist()]}  # the schedule: audits pair by it


def test_a_trace_made_inside_comfyuis_executor_names_the_prompt_that_ran_it(sd15, prompts):
    # Audit rows of one run are told apart from a cached trace logged again by the prompt id.
    from comfy_execution.utils import CurrentNodeContext

    model, clip = sd15
    with CurrentNodeContext("the-prompt-id", "3"):
        _, _, trace = run(model, clip, prompts, steps=1, lat=latent(batch=1, h=16, w=16))
    assert trace.run["prompt_id"] == "the-prompt-id"


def test_a_trace_keeps_the_models_precision_and_a_report_against_a_baseline_of_another_says_so(comfy):
    # Startup flags (--fp16-unet) set it where no graph names it; fp8 weights move the IoU more than λ 100 on these.
    import comfy_models

    from biasmap_engine import audit_rows, measure_entanglement

    traces = {}
    for name, dtypes in {"fp32": (torch.float32, None), "fp16 weights, fp32 compute": (torch.float16, torch.float32),
                         "fp8_e4m3fn weights, bf16 compute": (torch.float8_e4m3fn, torch.bfloat16)}.items():
        with torch.inference_mode():
            model, clip = comfy_models.tiny_sd15(0, dtype=dtypes[0], compute_dtype=dtypes[1])
            _, _, traces[name] = run(model, clip, comfy_models.paper_prompts(clip), steps=1,
                                     lat=latent(batch=1, h=16, w=16))
        assert traces[name].run["precision"] == name
    report = measure_entanglement(traces["fp8_e4m3fn weights, bf16 compute"], "gender", "doctor").against(
        measure_entanglement(traces["fp32"], "gender", "doctor"))
    assert "precision (fp32, this run fp8_e4m3fn weights, bf16 compute)" in report
    # And an audit's rows, whose summary pairs an image only with one of its precision.
    assert [audit_rows(t)[0]["precision"] for t in traces.values()] == list(traces)


def test_a_trace_keeps_the_denoise_its_run_was_made_with(sd15, prompts):
    # Audits pair a guided run with its baseline by how they were made: a partial denoise is part of that.
    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_scheduler(session, model, 0, 2, 7.0, "euler", "normal", pos, neg,
                                         latent(batch=1, h=16, w=16), denoise=0.6)
    assert trace.run["denoise"] == 0.6


@pytest.mark.parametrize("scale", [0.0, 100.0], ids=["recording", "guided"])
def test_a_sampler_that_enlarges_the_latent_between_steps_is_recorded_at_the_first_sizes_grids(sd15, prompts, scale):
    # SamplerLCMUpscale: its later evaluations had been taken for area conditioning, and the run refused.
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_advanced_samplers import SamplerLCMUpscale

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sampler = SamplerLCMUpscale.execute(1.5, -1, "bilinear")[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(7.0)
        lat = latent(batch=1, h=8, w=12)
        noise = comfy.sample.prepare_noise(lat["samples"], 0)
        stock = guider.sample(noise, lat["samples"], sampler, sigmas, seed=0)
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], BiasMapSettings(scale=scale))
        ours, trace = sample_with_sampler(session, model, 0, 7.0, sampler, sigmas, pos, neg, lat)
    assert ours["samples"].shape == stock.shape == (1, 4, 12, 18)
    assert torch.equal(ours["samples"], stock) if scale == 0 else torch.isfinite(ours["samples"]).all()
    assert trace.latent_shape == [1, 4, 8, 12] and trace.maps["down_1"].shape[-2:] == (8, 12)
    assert trace.maps["down_2"].shape[-2:] == (4, 6) and torch.isfinite(trace.maps["down_1"]).all()
    assert all((trace.maps[s].flatten(1) > 0).any(1).all() for s in trace.stages)  # every evaluation, every stage
    assert trace.steps.tolist() == [0, 1, 2, 3] and any("changed the latent's size" in n for n in trace.notes)
    if scale:
        assert trace.guidance_counts()["applied"] == 4


def test_the_middle_block_is_recorded_and_guided_when_asked_for(sd15, prompts):
    # Off by default, as OVAM's locator; include_middle adds its stage, and guidance may take it alone.
    model, clip = sd15
    stock, ours, trace = run(model, clip, prompts, settings=BiasMapSettings(scale=0.0, include_middle=True))
    assert torch.equal(stock, ours) and trace.stages == ["down_1", "down_2", "mid_2", "up_2", "up_1"]
    assert trace.maps["mid_2"].shape[-2:] == (20, 28) and (trace.maps["mid_2"].flatten(1) > 0).any(1).all()
    _, guided, trace = run(model, clip, prompts, settings=BiasMapSettings(scale=100.0, include_middle=True,
                                                                          guided_stages=("mid_2",)))
    assert trace.guidance_counts()["applied"] == 3 * 2 and not torch.equal(stock, guided)


def test_a_latent_picked_from_a_batch_keeps_which_noise_of_the_seed_it_got(sd15, prompts):
    # Latent From Batch: ComfyUI gives image 0 the seed's third noise; seed and image number alone would not say so.
    import nodes

    from biasmap_engine import audit_rows, measure_entanglement

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        picked = nodes.LatentFromBatch().frombatch({"samples": torch.zeros(3, 4, 32, 32)}, 2, 1)[0]
        stock = nodes.common_ksampler(model, 5, 1, 7.0, "euler", "normal", pos, neg, picked)[0]["samples"]
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        ours, trace = sample_with_scheduler(session, model, 5, 1, 7.0, "euler", "normal", pos, neg, picked)
    assert torch.equal(ours["samples"], stock) and trace.run["batch_index"] == [2]
    assert [row["noise_index"] for row in audit_rows(trace)] == [2]
    assert "image 0 (noise 2 of the seed): IoU" in measure_entanglement(trace, "gender", "doctor").report


def test_a_latent_the_sampler_itself_makes_nan_is_named_in_the_notes_not_blamed_on_fp16(sd15, prompts):
    # dpmpp_2m over sigmas with a repeated value divides by a zero-length interval: NaN in the stock sampler too.
    import comfy.samplers

    from biasmap_engine import measure_entanglement

    model, clip = sd15
    pos, neg = prompts
    sigmas = torch.tensor([14.6146, 3.0, 3.0, 1.0, 0.0])
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        out, trace = sample_with_sampler(session, model, 7, 5.0, comfy.samplers.sampler_object("dpmpp_2m"), sigmas,
                                         pos, neg, latent(batch=1, h=16, w=16))
    assert out["samples"].isnan().all()
    assert [note for note in trace.notes if "NaN or inf" in note] == [
        next(note for note in trace.notes if note.startswith("the sampler handed the model a latent holding NaN"))]
    assert "the sampler's latent was already NaN, see the trace's notes" in measure_entanglement(trace, "gender", "doctor").report
    with torch.inference_mode():
        _, finite = sample_with_sampler(start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD), model,
                                        7, 5.0, comfy.samplers.sampler_object("dpmpp_2m"), sigmas[[0, 1, 3, 4]], pos,
                                        neg, latent(batch=1, h=16, w=16))
    assert not any("NaN" in note for note in finite.notes)  # the same sigmas without the repeated one


def test_a_latent_given_with_nan_is_named_as_the_input_not_blamed_on_the_sampler_or_the_model(sd15, prompts):
    # An img2img latent from a VAE Encode that overflowed in fp16: NaN from the start, in the stock sampler too.
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    given = latent(batch=1, h=16, w=16)
    given["samples"][0, 0, 3, 3] = float("nan")
    with torch.inference_mode():
        _, by_steps = sample_with_scheduler(start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD),
                                            model, 7, 2, 5.0, "euler", "normal", pos, neg, given, denoise=0.5)
        _, by_sigmas = sample_with_sampler(start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD),
                                           model, 7, 5.0, comfy.samplers.sampler_object("euler"),
                                           torch.tensor([3.0, 1.0, 0.0]), pos, neg, given, add_noise=False)
    for trace in (by_steps, by_sigmas):
        assert [note for note in trace.notes if "NaN or inf" in note] == [
            "the latent_image input holds NaN or inf values (a VAE Encode that overflowed in fp16, e.g.): the maps and "
            "the output are NaN whatever BiasMap does, as with ComfyUI's KSampler; run the VAE in fp32 or bf16 "
            "(ComfyUI's --fp32-vae or --bf16-vae), or check the node that made the latent"]


def test_an_attribution_prompt_with_emphasis_weights_is_noted_as_moving_the_maps(sd15):
    # A generation prompt pasted with its weights: the maps are of scaled embeddings, not of the words as CLIP reads them.
    model, clip = sd15
    notes = {text: start_session(model, clip, text, ["gender"], ["doctor"], RECORD).notes for text in (
        "A photo of the face of a (doctor:1.5) and ((gender))", "A photo of the face of a doctor and gender",
        r"A photo of the face of a doctor \(elderly\) and gender", "(A photo:1.0) of the face of a doctor and gender")}
    weighted, *plain = notes.values()
    assert weighted == ["the attribution prompt weights 'doctor' ×1.5, 'gender' ×1.21 (ComfyUI's emphasis): its "
                        "encoding scales those words' embeddings, so their maps and the IoU move with the weight; for "
                        "maps as the paper measures them, type the attribution prompt without weights"]
    assert plain == [[], [], []]  # escaped brackets and a weight of 1 weigh nothing


def test_a_latent_made_nan_by_the_models_own_overflow_is_not_blamed_on_the_sampler(sd15, prompts):
    # An output that overflowed (fp16) makes the next step's latent NaN: the sampler only passed it on.
    model, clip = sd15
    overflowing = model.clone()
    overflowing.set_model_attn2_patch(lambda q, k, v, extra: (q * float("inf"), k, v))
    _, out, trace = run(overflowing, clip, prompts, steps=3, lat=latent(batch=1, h=16, w=16))
    assert out.isnan().all() and not any("the sampler handed the model" in note for note in trace.notes)


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral"])
def test_advanced_variant_without_noise_continues_a_latent_like_disable_noise(sd15, prompts, sampler_name):
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)[3:]
        sampler = comfy.samplers.sampler_object(sampler_name)
        noisy = {"samples": torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * sigmas[0]}
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        # SamplerCustomAdvanced passes DisableNoise's seed, 0, to the sampler: an ancestral one's noise comes from it.
        stock = guider.sample(torch.zeros_like(noisy["samples"]), noisy["samples"], sampler, sigmas, seed=0)
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        ours, trace = sample_with_sampler(session, model, 7, 5.0, sampler, sigmas, pos, neg, noisy, add_noise=False)
    assert torch.equal(stock.cpu(), ours["samples"].cpu())
    assert trace.steps.tolist() == [0, 1, 2]
    # noise_seed as given, though it seeds nothing here: the rows name the image by it, and continued latents of other
    # seeds would all be seed 0 to an audit.
    assert (trace.run["seed"], trace.run["add_noise"]) == (7, False)


def stock_and_advanced_variant(model, clip, prompts, lat, steps):
    """SamplerCustomAdvanced's latent (RandomNoise seed 3, CFGGuider at cfg 5, euler) and the Advanced variant's
    latent and trace, from the same inputs."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
        sampler = comfy.samplers.sampler_object("euler")
        guider = custom.CFGGuider.execute(model, pos, neg, 5.0)[0]
        stock = custom.SamplerCustomAdvanced.execute(custom.RandomNoise.execute(3)[0], guider, sampler, sigmas,
                                                     lat)[0]
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        ours, trace = sample_with_sampler(session, model, 3, 5.0, sampler, sigmas, pos, neg, lat)
    return stock["samples"], ours["samples"], trace


def test_advanced_variant_denoises_only_inside_the_latents_noise_mask_as_sampler_custom_advanced_does(sd15, prompts):
    # Set Latent Noise Mask (inpainting): outside the mask the latent is kept as it was.
    model, clip = sd15
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    lat = {"samples": torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)), "noise_mask": mask}
    stock, ours, _ = stock_and_advanced_variant(model, clip, prompts, lat, steps=3)
    assert torch.equal(stock, ours)
    change = (ours - lat["samples"]).abs()
    assert change[..., :8, :].max() < 1e-4 < change[..., 8:24, 8:24].mean()  # outside: kept, to float rounding


def test_advanced_variant_samples_an_empty_latent_of_another_channel_count_as_sampler_custom_advanced_does(sd15,
                                                                                                          prompts):
    # An empty 16-channel latent (EmptySD3LatentImage) on an SD1.5 model: ComfyUI takes it at the model's 4 channels.
    model, clip = sd15
    stock, ours, trace = stock_and_advanced_variant(model, clip, prompts, {"samples": torch.zeros(1, 16, 32, 32)},
                                                    steps=2)
    assert ours.shape == (1, 4, 32, 32) and torch.equal(stock, ours)
    assert trace.steps.tolist() == [0, 1]


def test_advanced_variant_names_the_sampler_in_its_trace_as_ksampler_names_it(sd15, prompts):
    # A SAMPLER carries no name: uni_pc's function is sample_unipc, and KSamplerSelect's ddim runs euler's.
    import comfy.samplers
    from comfy_extras.nodes_advanced_samplers import SamplerLCMUpscale

    model, clip = sd15
    pos, neg = prompts
    named = {}
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
        # dpm_fast is made anew each time (named by its function); SamplerLCMUpscale's function is no KSampler's.
        samplers = {name: comfy.samplers.sampler_object(name) for name in ("uni_pc", "uni_pc_bh2", "ddim", "dpmpp_2m",
                                                                            "dpm_fast")}
        samplers["lcm upscale"] = SamplerLCMUpscale.execute(1.0, -1, "bilinear")[0]
        for name, sampler in samplers.items():
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
            _, trace = sample_with_sampler(session, model, 0, 5.0, sampler, sigmas, pos, neg,
                                           latent(batch=1, h=16, w=16))
            named[name] = trace.run["sampler"]
    assert named == {"uni_pc": "uni_pc", "uni_pc_bh2": "uni_pc_bh2", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m",
                     "dpm_fast": "dpm_fast",
                     "lcm upscale": "lcm_upscale (total_upscale 1, upscale_method bilinear)"}


def test_advanced_variant_names_the_options_a_sampler_node_sets_otherwise_than_its_defaults(sd15, prompts):
    # SamplerEulerAncestral at eta 0 samples another image than at eta 1, KSamplerSelect's euler_ancestral: an audit
    # must not pair the two as one image, nor a report compare them as runs that differ in λ alone.
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import (SamplerDPMAdaptative, SamplerDPMPP_2M_SDE, SamplerER_SDE,
                                                   SamplerEulerAncestral)

    from biasmap_engine.host.sampling import _sampler_name as sampler_name

    model, clip = sd15
    pos, neg = prompts
    named = {}
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
        samplers = {"eta 0": SamplerEulerAncestral.execute(0.0, 1.0)[0],
                    "defaults": SamplerEulerAncestral.execute(1.0, 1.0)[0],
                    "select": comfy.samplers.sampler_object("euler_ancestral"),
                    "sde": SamplerDPMPP_2M_SDE.execute("heun", 1.0, 0.5, "cpu")[0],
                    # Its eta is held by a function it passes on: named by the values that function holds.
                    "er_sde eta 0.5": SamplerER_SDE.execute("Reverse-time SDE", 3, 0.5, 1.0)[0],
                    "er_sde eta 2": SamplerER_SDE.execute("Reverse-time SDE", 3, 2.0, 1.0)[0]}
        for key, sampler in samplers.items():
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
            _, trace = sample_with_sampler(session, model, 0, 5.0, sampler, sigmas, pos, neg,
                                           latent(batch=1, h=16, w=16))
            named[key] = trace.run["sampler"]
    assert named == {"eta 0": "euler_ancestral (eta 0)", "defaults": "euler_ancestral", "select": "euler_ancestral",
                     "sde": "dpmpp_2m_sde (s_noise 0.5, solver_type heun)",
                     "er_sde eta 0.5": "er_sde (noise_scaler [eta 0.5])",
                     "er_sde eta 2": "er_sde (noise_scaler [eta 2])"}
    # At its defaults, which k-diffusion's function declares, not the wrapper passing them on (named without sampling:
    # its adaptive steps take long on random weights).
    adaptive = SamplerDPMAdaptative.execute(3, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81, 0.0, 1.0)[0]
    assert sampler_name(adaptive) == "dpm_adaptive" == sampler_name(comfy.samplers.sampler_object("dpm_adaptive"))
    assert sampler_name(SamplerDPMAdaptative.execute(2, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81, 0.0, 1.0)[0]) == (
        "dpm_adaptive (order 2)")


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "Advanced"])
def test_the_latent_a_run_starts_from_is_fingerprinted_per_image_and_an_empty_one_is_not(sd15, prompts, advanced):
    # img2img from two source images at one seed, or second passes after first passes that differ: other images.
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    source = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).half().float()  # fp16 holds it
    starts = {"empty": torch.zeros(2, 4, 16, 16), "one source": torch.cat([torch.zeros(1, 4, 16, 16), source]),
              "fp16": torch.cat([torch.zeros(1, 4, 16, 16), source.half()]), "other": torch.cat([source, -source])}
    recorded = {}
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)[1:]
        for key, samples in starts.items():
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
            if advanced:
                _, trace = sample_with_sampler(session, model, 0, 5.0, comfy.samplers.sampler_object("euler"),
                                               sigmas, pos, neg, {"samples": samples}, add_noise=False)
            else:
                _, trace = sample_with_scheduler(session, model, 0, 2, 5.0, "euler", "normal", pos, neg,
                                                 {"samples": samples}, denoise=0.5)
            recorded[key] = trace.run["start_latent"]
    assert recorded["empty"] is None  # text to image: every row's start_latent blank, as in files before it
    assert recorded["one source"][0] == "" and len(recorded["one source"][1]) == 8
    assert recorded["fp16"] == recorded["one source"]  # the values, not their dtype (fp16 holds these exactly)
    assert recorded["other"][0] == recorded["one source"][1] != recorded["other"][1]


# Evaluations per step of a 3-step run: the last step of most of these samplers is one Euler step (σ_next = 0).
LABELS = {"euler": [0, 1, 2], "dpm_2": [0, 0, 1, 1, 2], "dpm_2_ancestral": [0, 0, 1, 1, 2],
          "dpmpp_2s_ancestral": [0, 0, 1, 1, 2], "heun": [0, 0, 1, 1, 2], "heunpp2": [0, 0, 0, 1, 1, 2],
          "sa_solver_pece": [0, 1, 1, 2, 2], "uni_pc": [0, 1, 2]}


@pytest.mark.parametrize("sampler", LABELS)
def test_every_evaluation_is_labelled_with_the_sampler_step_that_makes_it(sd15, prompts, sampler):
    # σ alone cannot tell: Heun's corrector runs at the next step's σ, an ancestral midpoint can lie below it, and
    # SA-Solver's PECE evaluates twice at a step's own σ.
    model, clip = sd15
    _, _, trace = run(model, clip, prompts, sampler=sampler, lat=latent(batch=1, h=16, w=16))
    assert trace.steps.tolist() == LABELS[sampler] and trace.num_steps == 3


def test_an_evaluation_with_churn_above_its_steps_sigma_keeps_its_step(sd15, prompts):
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
        churned = comfy.samplers.ksampler("euler", {"s_churn": 1.0})
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_sampler(session, model, 0, 5.0, churned, sigmas, pos, neg, latent(batch=1, h=16, w=16))
    assert (trace.sigmas[1:] > sigmas[1:-1]).all()  # σ̂ = σ_i (1 + γ) lies in the interval of step i − 1
    assert trace.steps.tolist() == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_step_labels_stay_in_range_on_a_schedule_that_stops_above_zero(sd15, prompts, sampler):
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)[:4]
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_sampler(session, model, 0, 5.0, comfy.samplers.sampler_object(sampler), sigmas, pos,
                                       neg, latent(batch=1, h=16, w=16))
    assert trace.steps.tolist() == [0, 0, 1, 1, 2, 2] and trace.num_steps == 3  # the last step's second evaluation too


def test_a_run_without_any_model_evaluation_is_refused_with_the_fix(sd15, prompts):
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        with pytest.raises(ValueError, match="set denoise above 0"):
            sample_with_scheduler(session, model, 0, 4, 7.0, "euler", "normal", pos, neg, latent(), denoise=0.0)
        with pytest.raises(ValueError, match="make no sampling step.*split at a later step"):  # one σ above 0
            sample_with_sampler(session, model, 0, 7.0, comfy.samplers.sampler_object("euler"), torch.ones(1), pos,
                                neg, latent())


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_recorded_maps_equal_a_recomputation_from_the_layers_queries_and_keys(sd15, prompts, branch):
    model, clip = sd15
    seen = []

    def spy(q, k, v, extra):  # an earlier node's replace on down×1; BiasMap chains it
        import comfy.ldm.modules.attention as attention

        seen.append((q.clone(), extra["cond_or_uncond"][:]))
        return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra["attn_precision"])

    spied = model.clone()
    # down×1's one layer, and up×1's two: their queries depend on the text through the layers before them, so the
    # two CFG branches' differ there, and only the unconditional branch's give the trace's maps.
    blocks = [("input", 1), ("output", 2), ("output", 3)]
    for name, number in blocks:
        spied.set_model_attn2_replace(spy, name, number)
    _, _, trace = run(spied, clip, prompts, BiasMapSettings(scale=0.0, branch=branch), steps=2)
    with torch.inference_mode():
        emb, _ = encode_attribution(clip, ATTRIBUTION)
    want, other = {}, {}
    for (name, number), (q, chunks) in zip(blocks, seen[-len(blocks):]):  # the last evaluation
        keys = comfy_layer(model, (name, number, 0)).to_k(emb.to(q.device, q.dtype))
        rows = q.shape[0] // len(chunks)
        stage = "down_1" if name == "input" else "up_1"
        recorded = int(branch == "uncond")  # ComfyUI's cond_or_uncond: 1 is the unconditional branch
        for chunk, maps in ((recorded, want), (1 - recorded, other)):
            start = chunks.index(chunk) * rows
            maps[stage] = maps.get(stage, 0) + token_softmax_maps(q[start:start + rows], keys, 8, (40, 56)).cpu()
    for stage in ("down_1", "up_1"):
        assert torch.allclose(trace.maps[stage][-1], want[stage], atol=1e-6)
    assert not torch.allclose(trace.maps["up_1"][-1], other["up_1"], atol=1e-4)  # the test can tell the branches


def test_the_layers_of_a_stage_share_one_attribution_product_per_evaluation(sd15, prompts, monkeypatch):
    from biasmap_engine.host import capture

    model, clip = sd15
    products = []

    def counted(qs, keys, grid):
        products.append((len(qs), grid))
        return summed(qs, keys, grid)

    summed = capture.summed_token_softmax_maps
    monkeypatch.setattr(capture, "summed_token_softmax_maps", counted)
    stock, ours, trace = run(model, clip, prompts, steps=2)
    assert torch.equal(stock, ours)
    # A GPU at SD sizes is bound by kernel launches: one product, softmax and sum per stage, not per layer. The tiny
    # U-Net records down×1 (one layer), up×1 (two), down×½ (one) and up×½ (two).
    per_evaluation = sorted(products[:len(trace.stages)])
    assert per_evaluation == sorted([(1, (40, 56)), (2, (40, 56)), (1, (20, 28)), (2, (20, 28))])
    assert len(products) == len(trace.stages) * trace.sigmas.numel()


def test_a_stage_too_large_for_one_product_is_computed_in_parts_with_the_same_maps(sd15, prompts, monkeypatch):
    from biasmap_engine.host import capture

    model, clip = sd15
    _, _, whole = run(model, clip, prompts, steps=1)
    products = []

    def counted(qs, keys, grid):
        products.append(len(qs))
        return summed(qs, keys, grid)

    summed = capture.summed_token_softmax_maps
    monkeypatch.setattr(capture, "summed_token_softmax_maps", counted)
    monkeypatch.setattr(capture, "_PRODUCT_VALUES", 1)  # every layer's product alone exceeds it
    _, _, parts = run(model, clip, prompts, steps=1)
    assert products == [1] * 6  # the tiny U-Net's six layers, one product each
    for stage, maps in whole.maps.items():
        torch.testing.assert_close(parts.maps[stage], maps, rtol=1e-6, atol=1e-7)


def test_an_ovam_concept_matches_its_ordinary_cross_attention_map_on_the_same_tokens(sd15):
    model, clip = sd15
    with torch.inference_mode():
        emb, tokens = encode_attribution(clip, ATTRIBUTION)
    positive = [[emb, {}]]  # generation context = exactly the attribution tokens: same keys, same softmax
    seen = []

    def spy(q, k, v, extra):
        import comfy.ldm.modules.attention as attention

        seen.append((q.clone(), k.clone(), extra["cond_or_uncond"][:]))
        return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra["attn_precision"])

    spied = model.clone()
    spied.set_model_attn2_replace(spy, "input", 1)
    _, _, trace = run(spied, clip, (positive, positive), BiasMapSettings(scale=0.0, branch="cond"), steps=1)
    q, k, chunks = seen[-1]
    rows = q.shape[0] // len(chunks)
    cond = chunks.index(0) * rows
    qh = q[cond:cond + rows].float().view(rows, -1, 8, q.shape[-1] // 8).transpose(1, 2)
    kh = k[cond:cond + rows].float().view(rows, -1, 8, k.shape[-1] // 8).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) * (q.shape[-1] // 8) ** -0.5).softmax(-1).sum(1)  # ordinary attention
    doctor = tokens.index("doctor</w>")
    ordinary = probs[..., doctor].view(rows, 40, 56).cpu()
    assert torch.allclose(trace.concept_map("doctor", stages=["down_1"]), ordinary, atol=1e-5)


@pytest.mark.parametrize("depth", [None, 0], ids=["block key", "block and depth key"])
def test_another_nodes_attn2_replace_still_takes_effect_and_its_layer_is_recorded(sd15, prompts, depth):
    # A replace keyed with the layer's depth in its block (IPAdapter's) wins over the block's key in ComfyUI: it is
    # chained like the other.
    model, clip = sd15

    def halve(q, k, v, extra):
        import comfy.ldm.modules.attention as attention

        return 0.5 * attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra["attn_precision"])

    patched, blockwise = model.clone(), model.clone()
    patched.set_model_attn2_replace(halve, "output", 2, depth)
    blockwise.set_model_attn2_replace(halve, "output", 2)
    plain, _, _ = run(model, clip, prompts)
    stock, ours, trace = run(patched, clip, prompts)
    assert not torch.equal(plain, stock)  # the test patch matters
    assert torch.equal(stock, ours)  # and still applies under BiasMap
    assert torch.equal(trace.maps["up_1"], run(blockwise, clip, prompts)[2].maps["up_1"])  # its layer's maps in


def snapshot(model):
    return copy.deepcopy({k: repr(v) for k, v in model.model_options.items()}), len(model.model_options)


def test_no_patch_remains_after_sampling_an_error_or_an_interrupt(sd15, prompts):
    import comfy.model_management as mm

    model, clip = sd15
    before = snapshot(model)
    params_before = {n: p.data_ptr() for n, p in model.model.diffusion_model.named_parameters()}
    reference, _, _ = run(model, clip, prompts, steps=2)
    assert snapshot(model) == before

    calls = {"n": 0}

    def fail_or_interrupt(kind):
        def patch(n, context, value, extra):
            calls["n"] += 1
            if calls["n"] == 20:
                if kind == "error":
                    raise RuntimeError("boom inside sampling")
                mm.interrupt_current_processing(True)
            return n, context, value
        return patch

    for kind, expected in (("error", RuntimeError), ("interrupt", mm.InterruptProcessingException)):
        calls["n"] = 0
        failing = model.clone()
        failing.set_model_attn2_patch(fail_or_interrupt(kind))
        with pytest.raises(expected), torch.inference_mode():  # BiasMap's run alone: the 20th layer call is in it
            session = start_session(failing, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
            sample_with_scheduler(session, failing, 0, 3, 7.0, "euler", "normal", *prompts, latent())
        mm.interrupt_current_processing(False)
        assert calls["n"] >= 20 and snapshot(model) == before
    after, _, _ = run(model, clip, prompts, steps=2)
    assert torch.equal(after, reference)
    assert {n: p.data_ptr() for n, p in model.model.diffusion_model.named_parameters()} == params_before


@pytest.mark.parametrize("shrunk, scale", [(False, 0.0), (False, 100.0), (True, 0.0)],
                         ids=["recorded", "guided", "Deep Shrink x1.5 at an odd size"])
def test_trace_from_a_run_round_trips_through_safetensors(sd15, prompts, tmp_path, shrunk, scale):
    # Load Trace checks each stage's grid against the latent's and the guidance accounting's shape: every run's
    # trace must pass, also one of resampled grids.
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    model, clip = sd15
    if shrunk:
        with torch.inference_mode():
            model = PatchModelAddDownscale.execute(model, 1, 1.5, 0.0, 0.5, True, "bicubic", "bicubic")[0]
    _, _, trace = run(model, clip, prompts, settings=BiasMapSettings(scale=scale), steps=2,
                      lat=latent(batch=1, h=13, w=21) if shrunk else None)
    path = str(tmp_path / "trace.safetensors")
    trace.save(path)
    back = BiasMapTrace.load(path)
    assert all(torch.equal(back.maps[s], trace.maps[s]) for s in trace.stages)
    assert back.model_family == "SD15" and back.tokens == trace.tokens
    assert torch.equal(back.iou("gender", "doctor"), trace.iou("gender", "doctor"))
    assert back.guidance_counts() == trace.guidance_counts() and back.guidance.keys() == trace.guidance.keys()


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_or_blank_attribution_prompt_is_refused_before_sampling(sd15, prompt):
    model, clip = sd15  # an attribution prompt linked from another node is checked here only
    with torch.inference_mode(), pytest.raises(ValueError, match="the attribution prompt is empty"):
        start_session(model, clip, prompt, ["gender"], ["doctor"], BiasMapSettings(scale=0.0))


def test_a_concept_missing_from_the_attribution_prompt_is_refused_before_sampling(sd15):
    model, clip = sd15
    words = r"whose words are: a, photo, of, the, face, doctor, and, gender\. "  # each once, in the prompt's order
    with torch.inference_mode(), pytest.raises(ValueError, match=words):
        start_session(model, clip, ATTRIBUTION, ["race"], ["doctor"], RECORD)


def test_words_are_found_as_clip_splits_them_and_validation_accepts_exactly_those(sd15, pack):
    from biasmap_pack.nodes.concepts import check_concepts

    _, clip = sd15
    prompt = "A photo of a woman's face, a fire-fighter. Un médecin"
    with torch.inference_mode():
        _, tokens = encode_attribution(clip, prompt)
    for word in ("woman", "woman's", "fire-fighter", "Médecin"):
        assert find_word_positions(tokens, word)
        assert check_concepts(prompt, word, "face") is True
    assert "médecin" in prompt_words(tokens)
    assert check_concepts(prompt, "firefighter", "face") is not True
    weighted = "a (doctor:1.2) and gender, embedding:style \\(hat\\)"
    assert check_concepts(weighted, "gender", "doctor") is True and check_concepts(weighted, "gender", "(hat") is True
    assert all(check_concepts(weighted, "gender", word) is not True for word in ("1", "style", "embedding"))
    assert check_concepts(prompt, "face, a woman's", "a fire-fighter") is True  # phrases, in order
    assert "share words" in check_concepts(prompt, "a woman's", "woman's face")  # the same occurrence of woman's
    assert check_concepts(prompt, "face woman", "face") is not True
    with pytest.raises(ConceptNotFoundError):
        find_word_positions(tokens, "firefighter")


def test_a_textual_inversion_embedding_in_the_attribution_prompt_is_kept_as_a_marker(sd15, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    _, clip = sd15
    tokenizer = clip.tokenizer.clip_l
    width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[-1]
    save_file({"emb_params": torch.randn(2, width)}, str(tmp_path / "style.safetensors"))
    monkeypatch.setattr(tokenizer, "embedding_directory", str(tmp_path))
    monkeypatch.setattr(tokenizer, "embedding_size", width)
    with torch.inference_mode():
        embeddings, tokens = encode_attribution(clip, "a doctor embedding:style and gender")
    assert tokens.count("<|embedding|>") == 2 and embeddings.shape[1] == len(tokens)
    assert find_word_positions(tokens, "gender") == [tokens.index("gender</w>")]


def counting_encodings(clip):
    """A clone of ``clip`` and the list of token batches it is asked to encode."""
    c, calls = clip.clone(), []
    real = c.encode_from_tokens
    c.encode_from_tokens = lambda tokens: calls.append(tokens) or real(tokens)
    return c, calls


def test_the_attribution_prompt_is_encoded_once_per_clip_prompt_clip_skip_and_patches(sd15):
    # A new seed runs the node again; ComfyUI would not encode an unchanged prompt again either.
    import gc

    import biasmap_engine.host.attribution as attribution

    _, clip = sd15
    with torch.inference_mode():
        c, calls = counting_encodings(clip)
        first, tokens = encode_attribution(c, ATTRIBUTION)
        tokens.append("changed by a caller")
        again, again_tokens = encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 1 and again is first and again_tokens == tokens[:-1]
        encode_attribution(c, "a doctor and gender")
        assert len(calls) == 2
        c.clip_layer(-2)
        skipped, _ = encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 3 and not torch.equal(skipped, first)
        c.clip_layer(None)
        key = next(k for k in c.get_key_patches() if k.endswith("final_layer_norm.bias"))
        c.add_patches({key: (torch.full_like(c.patcher.model_state_dict()[key], 0.5),)})  # a LoRA-style weight patch
        patched, _ = encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 4 and not torch.equal(patched, first)
    gc.collect()  # CLIPs other tests left for the collector go first: only this one is counted
    clips = len(attribution._ENCODED)
    del c
    gc.collect()
    assert len(attribution._ENCODED) == clips - 1  # gone with its CLIP


def test_a_clip_keeps_the_encodings_of_its_last_eight_attribution_prompts_only(sd15):
    # An audit over professions changes the attribution prompt every run: the encodings kept must not grow with it.
    _, clip = sd15
    with torch.inference_mode():
        c, calls = counting_encodings(clip)
        prompts = [f"a photo of a doctor and gender {i}" for i in range(9)]
        for prompt in prompts:
            encode_attribution(c, prompt)
        encode_attribution(c, prompts[1])  # among the last eight: kept
        assert len(calls) == 9
        encode_attribution(c, prompts[0])  # the oldest: gone, encoded again
        assert len(calls) == 10


def test_the_attribution_prompt_is_encoded_again_when_the_same_clips_tokenizer_options_or_hooks_change(sd15):
    # ComfyUI's nodes change these on a clone; a change made to the same CLIP object must not reuse the old encoding.
    import comfy.hooks

    _, clip = sd15
    with torch.inference_mode():
        c, calls = counting_encodings(clip)
        encode_attribution(c, ATTRIBUTION)
        c.set_tokenizer_option("clip_l_min_padding", 5)  # a tokenizer option, set on this very object
        encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 2
        c.patcher.forced_hooks = comfy.hooks.HookGroup()  # hooks set on this very object
        encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 3
        encode_attribution(c, ATTRIBUTION)
        assert len(calls) == 3  # and kept again while they stay


def test_long_attribution_prompts_span_several_chunks(sd15, prompts):
    model, clip = sd15
    long_prompt = "A photo of the face of a " + "very " * 80 + "kind doctor and gender"
    _, _, trace = run(model, clip, prompts, steps=1, attribution=long_prompt)
    assert len(trace.tokens) > 77
    assert trace.positions("gender") == [len(trace.tokens) - 2]
    assert torch.isfinite(trace.concept_map("gender")).all()


def test_the_words_of_a_long_attribution_prompts_later_chunks_keep_their_own_embeddings(sd15):
    # Each 77-token chunk is encoded on its own: a word in the second chunk is that chunk's row, not the first's.
    _, clip = sd15
    text = "A photo of the face of a " + "very " * 80 + "kind doctor and gender"
    with torch.inference_mode():
        embeddings, names = encode_attribution(clip, text)
        whole = clip.encode_from_tokens(clip.tokenize(text))
    assert whole.shape[1] == 2 * 77 and names.count("<|startoftext|>") == 2
    second = names.index("<|startoftext|>", 1)  # where the second chunk's tokens start in the names
    for word in ("kind</w>", "doctor</w>", "gender</w>"):
        i = names.index(word)
        assert torch.equal(embeddings[0, i], whole[0, 77 + i - second]), word


def test_sd2_v_prediction_and_sdxl_models_record_their_own_stages(comfy):
    import comfy_models
    import nodes

    for build, stages, grid in ((comfy_models.tiny_sd2v, ["down_1", "down_2", "up_2", "up_1"], (32, 32)),
                                (comfy_models.tiny_sdxl, ["down_2", "down_4", "up_4", "up_2"], (16, 16))):
        with torch.inference_mode():
            model, clip = build(0)
            pos, neg = comfy_models.paper_prompts(clip)
            lat = {"samples": torch.zeros(1, 4, 32, 32)}
            (stock,) = nodes.common_ksampler(model, 0, 2, 6.0, "euler", "normal", pos, neg, lat)
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
            ours, trace = sample_with_scheduler(session, model, 0, 2, 6.0, "euler", "normal", pos, neg, lat)
        assert torch.equal(stock["samples"], ours["samples"])
        assert trace.stages == stages
        assert tuple(trace.maps[stages[0]].shape[-2:]) == grid
        assert trace.model_family in ("SD20", "SDXL")


def test_a_latent_a_few_pixels_high_records_each_level_as_a_stage_of_its_own(comfy):
    import comfy_models
    import nodes

    with torch.inference_mode():
        model, clip = comfy_models.tiny_sdxl(0)
        pos, neg = comfy_models.paper_prompts(clip)
        lat = {"samples": torch.zeros(1, 4, 5, 64)}  # a 512×40 image: SDXL's levels run at 3×32 and 2×16
        (stock,) = nodes.common_ksampler(model, 0, 1, 6.0, "euler", "normal", pos, neg, lat)
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        ours, trace = sample_with_scheduler(session, model, 0, 1, 6.0, "euler", "normal", pos, neg, lat)
    assert torch.equal(stock["samples"], ours["samples"])
    assert trace.stages == ["down_2", "down_4", "up_4", "up_2"]
    assert tuple(trace.maps["down_2"].shape[-2:]) == (3, 32) and tuple(trace.maps["down_4"].shape[-2:]) == (2, 16)


def test_a_dit_model_is_refused_with_its_family_named(comfy, sd15):
    import comfy_models

    _, clip = sd15
    with torch.inference_mode():
        dit = comfy_models.tiny_dit(0)
        with pytest.raises(UnsupportedModelError, match="Flux"):
            start_session(dit, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)


def comfy_layer(model, key):
    from biasmap_engine.host import cross_attention_layers

    return cross_attention_layers(model.model.diffusion_model)[key]


def test_cond_and_uncond_in_separate_unet_calls_record_the_same_maps(sd15, prompts, monkeypatch):
    model, clip = sd15
    _, _, batched_trace = run(model, clip, prompts, steps=2)
    # ComfyUI batches cond and uncond only when memory allows; a model that seems to need infinite memory gets
    # them as separate U-Net calls.
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    chunks = set()

    def spy(n, context, value, extra):
        chunks.add(tuple(extra["cond_or_uncond"]))
        return n, context, value

    spied = model.clone()
    spied.set_model_attn2_patch(spy)
    stock, ours, trace = run(spied, clip, prompts, steps=2)
    assert chunks == {(0,), (1,)}  # really one branch per U-Net call
    assert torch.equal(stock, ours)
    for stage in batched_trace.stages:  # batch 1 and batch 2 U-Net calls round differently on a GPU (cuDNN, TF32)
        assert torch.allclose(trace.maps[stage], batched_trace.maps[stage], rtol=1e-3, atol=1e-5)


def test_a_clip_of_another_model_family_is_refused_with_the_fix(comfy, sd15):
    import comfy_models

    model, _ = sd15
    with torch.inference_mode():
        _, sdxl_clip = comfy_models.tiny_sdxl(0)
        with pytest.raises(ValueError, match="2048-wide embeddings but this SD15 model's cross-attention expects 768"):
            start_session(model, sdxl_clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)


def test_a_sampler_that_reports_no_steps_labels_each_evaluation_by_the_interval_its_sigma_lies_in(sd15, prompts):
    # Without k-diffusion's per-step callback the σ is all there is: σ_i is step i's (the interval (σ_i+1, σ_i]).
    import comfy.samplers

    def euler_without_reports(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_sampler(session, model, 0, 5.0, comfy.samplers.KSAMPLER(euler_without_reports),
                                       sigmas, pos, neg, latent(batch=1, h=16, w=16))
    assert trace.steps.tolist() == [0, 1, 2] and trace.num_steps == 3


def test_a_sampler_that_reports_no_steps_keeps_its_labels_in_range_on_a_schedule_that_stops_above_zero(sd15,
                                                                                                         prompts):
    # Heun's last corrector runs at the schedule's last σ, the end of the last step's interval, not a step of its own.
    import comfy.samplers

    def heun_without_reports(model, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            slope = (x - model(x, sigmas[i] * ones, **(extra_args or {}))) / sigmas[i]
            ahead = x + slope * (sigmas[i + 1] - sigmas[i])
            slope_ahead = (ahead - model(ahead, sigmas[i + 1] * ones, **(extra_args or {}))) / sigmas[i + 1]
            x = x + (slope + slope_ahead) / 2 * (sigmas[i + 1] - sigmas[i])
        return x

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)[:4]
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_sampler(session, model, 0, 5.0, comfy.samplers.KSAMPLER(heun_without_reports),
                                       sigmas, pos, neg, latent(batch=1, h=16, w=16))
    assert trace.steps.tolist() == [0, 1, 1, 2, 2, 2] and trace.num_steps == 3


def test_an_adaptive_sampler_counting_more_steps_than_the_schedule_keeps_its_labels_in_range(sd15, prompts):
    model, clip = sd15
    _, _, trace = run(model, clip, prompts, sampler="dpm_adaptive", steps=3, lat=latent(batch=1, h=16, w=16))
    assert trace.steps.max().item() <= 2 and trace.num_steps <= 3, trace.steps.tolist()


@pytest.mark.parametrize("cfg, sigmas, cause", [
    (float("nan"), [14.6146, 3.0, 1.0, 0.0], "the model's prediction held NaN or inf values"),
    (5.0, [14.6146, 1.0, 0.0, 0.0], "the sampler's last step made the output latent NaN or inf"),
])
def test_an_output_latent_made_nan_by_the_model_or_the_last_step_is_named_in_the_notes_once(sd15, prompts, cfg,
                                                                                           sigmas, cause):
    # Never by the correction, which is skipped where it is not finite: a NaN image should not come without a word.
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        out, trace = sample_with_sampler(session, model, 7, cfg, comfy.samplers.sampler_object("euler"),
                                         torch.tensor(sigmas), pos, neg, latent(batch=1, h=16, w=16))
    assert not out["samples"].isfinite().all()
    assert [note for note in trace.notes if "NaN or inf" in note] == [
        next(note for note in trace.notes if note.startswith(cause))]


def test_a_latent_of_no_image_is_refused_with_what_to_connect(sd15, prompts):
    import comfy.samplers

    model, clip = sd15
    pos, neg = prompts
    empty = {"samples": torch.zeros(0, 4, 16, 16)}
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        for sample in (lambda: sample_with_scheduler(session, model, 0, 1, 7.0, "euler", "normal", pos, neg, empty),
                       lambda: sample_with_sampler(session, model, 0, 7.0, comfy.samplers.sampler_object("euler"),
                                                   torch.tensor([14.6, 0.0]), pos, neg, empty)):
            with pytest.raises(ValueError, match="the latent holds no image .*connect a latent with at least one"):
                sample()


def test_the_ksampler_path_names_a_nan_output_latent_in_the_notes_too(sd15, prompts, monkeypatch):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    sample = nodes.common_ksampler

    def last_step_nan(*args, **kwargs):  # as sigmas that repeat at the end would make it
        (out,) = sample(*args, **kwargs)
        return ({**out, "samples": torch.full_like(out["samples"], float("nan"))},)

    monkeypatch.setattr(nodes, "common_ksampler", last_step_nan)
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], RECORD)
        _, trace = sample_with_scheduler(session, model, 0, 1, 7.0, "euler", "normal", pos, neg,
                                         latent(batch=1, h=16, w=16))
    assert [note for note in trace.notes if note.startswith("the sampler's last step made the output latent NaN")]
