"""Recording and guidance with ComfyUI's conditioning tools: combined, area and timestep-ranged entries, ControlNets.

The recorded CFG branch (the negative by default) may hold several entries, some on a crop of the latent or only on
some steps; ComfyUI runs them batched or one U-Net call each, depending on free memory. The trace must not depend on
that, and every evaluation must still be recorded and accounted for.
"""

import pytest
import torch

from biasmap_engine import BiasMapSettings
from biasmap_engine.host import sample_with_sampler, sample_with_scheduler, start_session
from guided_runs import ATTRIBUTION
from guided_runs import sample as guided_sample


def sample(model, clip, pos, neg, scale=0.0, steps=2, **settings):
    lat = {"samples": torch.zeros(1, 4, 32, 32)}
    with torch.inference_mode():
        session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"],
                                BiasMapSettings(scale=scale, **settings))
        out, trace = sample_with_scheduler(session, model, 0, steps, 7.0, "euler", "normal", pos, neg, lat)
    return out["samples"], trace


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def combine(a, b):
    import nodes

    return nodes.ConditioningCombine().combine(a, b)[0]


def short_of_memory(model, monkeypatch):
    """ComfyUI then runs every conditioning entry as a U-Net call of its own."""
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))


def assert_same_maps(trace, expected, evaluations=slice(None), slack=1.0):
    assert trace.maps.keys() == expected.maps.keys()
    for stage, maps in expected.maps.items():
        torch.testing.assert_close(trace.maps[stage][evaluations], maps[evaluations], rtol=1e-5 * slack,
                                   atol=1e-6 * slack)


@pytest.mark.parametrize("factor", [2.0, 1.5])  # 1.5: grids no level makes, resampled to their stage's
def test_combined_entries_stay_averaged_when_deep_shrink_changes_the_grids_between_steps(comfy, kernel_slack, factor):
    import comfy_models
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    with torch.inference_mode():
        model, clip = comfy_models.tiny_sdxl(0)
        # Kohya Deep Shrink: from input block 2 on, the U-Net runs at a smaller size for the first half of the steps,
        # so a stage's layers differ between steps.
        shrunk = PatchModelAddDownscale.execute(model, 2, factor, 0.0, 0.5, True, "bicubic", "bicubic")[0]
    pos, neg = encode(clip, "A photo of the face of a doctor"), encode(clip, "blurry")
    _, alone = sample(shrunk, clip, pos, neg, steps=4)
    _, doubled = sample(shrunk, clip, pos, combine(neg, neg), steps=4)
    assert_same_maps(doubled, alone, slack=kernel_slack)


def test_deep_shrink_moving_layers_to_another_stage_on_some_steps_leaves_a_measurable_trace(sd15, prompts):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        # After input block 1, the U-Net runs at half size for the first 35 % of the steps: input block 3's
        # cross-attention (down×½) is at a quarter of the latent there, a stage no other step has.
        shrunk = PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")[0]
    _, trace = sample(shrunk, clip, pos, neg, steps=4)
    rows = {s: (m.flatten(1).abs().sum(1) > 0).tolist() for s, m in trace.maps.items()}
    assert rows["down_4"] == [True, True, False, False] and rows["down_2"] == [False, False, True, True]
    assert rows["down_1"] == [True] * 4
    assert trace.iou("gender", "doctor").shape == (1,)
    assert set(trace.block_ious("gender", "doctor")) == set(trace.maps)


@pytest.mark.parametrize("build, latent, block, factor", [
    ("tiny_sd15", (32, 32), 1, 1.5),  # input block 3 at 11×11 on shrunk steps, 16×16 (down×½) on the others
    ("skeleton_sd15", (48, 40), 3, 3.0),  # input blocks 4–5 at 8×7 and 7–8 at 4×4 on shrunk steps: both nearest ⅛
])
def test_deep_shrink_by_a_factor_other_than_two_records_each_stage_at_its_own_grid(comfy, build, latent, block,
                                                                                     factor):
    import comfy_models
    import nodes
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    from biasmap_engine.stages import stage_grid

    with torch.inference_mode():
        model, clip = getattr(comfy_models, build)(0)
        pos, neg = comfy_models.paper_prompts(clip)
        shrunk = PatchModelAddDownscale.execute(model, block, factor, 0.0, 0.35, True, "bicubic", "bicubic")[0]
        lat = {"samples": torch.zeros(1, 4, *latent)}
        (stock,) = nodes.common_ksampler(shrunk, 0, 3, 7.0, "euler", "normal", pos, neg, lat)
        session = start_session(shrunk, clip, ATTRIBUTION, ["gender"], ["doctor"], BiasMapSettings(scale=0.0))
        out, trace = sample_with_scheduler(session, shrunk, 0, 3, 7.0, "euler", "normal", pos, neg, lat)
    assert torch.equal(out["samples"], stock["samples"])
    # Grids no U-Net level makes are resampled to their stage's, so a stage keeps one shape over layers and steps.
    assert all(tuple(maps.shape[-2:]) == stage_grid(stage, latent) for stage, maps in trace.maps.items())
    assert trace.iou("gender", "doctor").isfinite().all()


@pytest.mark.parametrize("stages", [None, ("down_2",)])
def test_guidance_under_deep_shrink_by_one_and_a_half_applies_at_every_step(sd15, prompts, stages):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    model, clip = sd15
    with torch.inference_mode():
        shrunk = PatchModelAddDownscale.execute(model, 1, 1.5, 0.0, 0.35, True, "bicubic", "bicubic")[0]
    settings = {} if stages is None else {"guided_stages": stages}
    out, trace = guided_sample(shrunk, clip, *prompts, 100.0, steps=4, **settings)[:2]
    assert out.isfinite().all() and trace.guidance_counts()["applied"] == 4 and not trace.notes
    assert trace.guidance["energy"].isfinite().all()


@pytest.mark.parametrize("memory", ["ample", "short"])
def test_a_negative_combined_with_itself_records_the_maps_of_the_negative_alone(sd15, prompts, memory, monkeypatch,
                                                                                kernel_slack):
    model, clip = sd15
    pos, neg = prompts
    _, alone = sample(model, clip, pos, neg)
    if memory == "short":
        short_of_memory(model, monkeypatch)
    _, doubled = sample(model, clip, pos, combine(neg, neg))
    assert_same_maps(doubled, alone, slack=kernel_slack)


@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_entries_of_the_recorded_branch_are_averaged_by_strength_the_same_batched_or_in_separate_calls(
        sd15, prompts, monkeypatch, kernel_slack, strength):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    blurry = nodes.ConditioningSetAreaStrength().append(encode(clip, "blurry, lowres"), strength)[0]
    _, first = sample(model, clip, pos, neg, steps=1)
    _, second = sample(model, clip, pos, blurry, steps=1)
    _, batched = sample(model, clip, pos, combine(neg, blurry), steps=1)
    guided_batched = sample(model, clip, pos, combine(neg, blurry), scale=100.0, steps=1)[1].guidance["energy"]
    short_of_memory(model, monkeypatch)
    _, separate = sample(model, clip, pos, combine(neg, blurry), steps=1)
    guided_separate = sample(model, clip, pos, combine(neg, blurry), scale=100.0, steps=1)[1].guidance["energy"]
    for stage in first.maps:  # one step: every run sees the same latent; ComfyUI weighs the entries by strength
        torch.testing.assert_close(batched.maps[stage], (first.maps[stage] + strength * second.maps[stage])
                                   / (1 + strength), rtol=1e-5 * kernel_slack, atol=1e-6 * kernel_slack)
    assert_same_maps(separate, batched, slack=kernel_slack)
    torch.testing.assert_close(guided_separate, guided_batched, rtol=1e-4 * kernel_slack, atol=0)


LEFT_HALF = torch.zeros(1, 32, 32)
LEFT_HALF[..., :16] = 1.0  # its edge falls between grid cells at every stage of the tiny model


def assert_woman_left_doctor_right(model, clip, neg, positive):
    """The conditional branch's maps of ``positive`` are those of "a woman" on the left and "a doctor" on the right."""
    _, alone_woman = sample(model, clip, encode(clip, "a photo of a woman"), neg, steps=1, branch="cond")
    _, alone_doctor = sample(model, clip, encode(clip, "a photo of a doctor"), neg, steps=1, branch="cond")
    _, both = sample(model, clip, positive, neg, steps=1, branch="cond")
    for stage, maps in both.maps.items():  # one step: every run sees the same latent
        half = maps.shape[-1] // 2
        torch.testing.assert_close(maps[..., :half], alone_woman.maps[stage][..., :half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[..., half:], alone_doctor.maps[stage][..., half:], rtol=1e-5, atol=1e-6)


def test_masked_entries_of_the_recorded_branch_are_weighed_per_pixel_by_their_masks(sd15, prompts):
    import nodes

    model, clip = sd15
    _, neg = prompts
    set_mask = nodes.ConditioningSetMask().append
    regional = combine(set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0],
                       set_mask(encode(clip, "a photo of a doctor"), 1 - LEFT_HALF, "default", 1.0)[0])
    assert_woman_left_doctor_right(model, clip, neg, regional)
    out, guided = sample(model, clip, regional, neg, scale=100.0, branch="cond")
    assert torch.isfinite(out).all() and guided.guidance_counts()["applied"] == 2


def test_a_recorded_branch_that_weighs_nothing_on_part_or_all_of_the_image_is_noted(sd15, prompts):
    # Its maps are 0 there: a mask that leaves part out puts both concepts' top pixels inside it (an inflated IoU), and
    # strength 0 leaves nothing to measure or guide.
    import nodes

    model, clip = sd15
    _, neg = prompts
    set_mask = nodes.ConditioningSetMask().append
    said = {}
    for name, positive in (("left half", set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0]),
                           ("strength 0", set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 0.0)[0]),
                           ("no mask, strength 0",
                            nodes.ConditioningSetAreaStrength().append(encode(clip, "a photo of a woman"), 0.0)[0]),
                           ("both halves", combine(
                               set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0],
                               set_mask(encode(clip, "a photo of a doctor"), 1 - LEFT_HALF, "default", 1.0)[0]))):
        _, trace = sample(model, clip, positive, neg, branch="cond")
        said[name] = [note for note in trace.notes if "weigh" in note]
    assert said["left half"] == [
        "the conditioning whose maps are recorded (the positive prompt's, branch cond) weighs nothing on part of the "
        "image (a Conditioning (Set Mask) mask that leaves it out): its maps are 0 there, so both concepts' top pixels "
        "fall inside the mask and the IoU measures that part alone; record the other branch (the branch input), or "
        "mask the other prompt instead"]
    assert said["strength 0"] == said["no mask, strength 0"] == [
        "the conditioning whose maps are recorded (the positive prompt's, branch cond) weighed nothing on the image on "
        "some steps (strength 0, or an empty Conditioning (Set Mask) mask): its maps are 0 there, with no IoU to "
        "measure and no gradient to guide; record the other branch (the branch input), or give that conditioning "
        "weight"]
    assert said["both halves"] == []
    _, unmasked = sample(model, clip, set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0], neg)
    assert not [note for note in unmasked.notes if "weigh" in note]  # the negative prompt's maps: whole


def test_a_default_entry_weighs_only_where_the_other_entries_leave_room(sd15, prompts):
    import comfy.hooks
    import nodes

    model, clip = sd15
    _, neg = prompts
    masked_woman = nodes.ConditioningSetMask().append(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0]
    with torch.inference_mode():  # Cond Set Default Combine: the doctor wherever the masked woman is not
        positive = comfy.hooks.set_default_conds_and_combine([masked_woman], [encode(clip, "a photo of a doctor")])[0]
    assert_woman_left_doctor_right(model, clip, neg, positive)


def assert_maps_left_and_right(model, clip, neg, positive, left, right):
    """The conditional branch's maps of ``positive``: on the left ``left(woman, doctor)``, on the right
    ``right(woman, doctor)``, of the maps of "a woman" and "a doctor" alone."""
    _, woman = sample(model, clip, encode(clip, "a photo of a woman"), neg, steps=1, branch="cond")
    _, doctor = sample(model, clip, encode(clip, "a photo of a doctor"), neg, steps=1, branch="cond")
    _, both = sample(model, clip, positive, neg, steps=1, branch="cond")
    for stage, maps in both.maps.items():  # one step: every run sees the same latent
        half = maps.shape[-1] // 2
        for side, combined in ((slice(None, half), left), (slice(half, None), right)):
            torch.testing.assert_close(maps[..., side], combined(woman.maps[stage], doctor.maps[stage])[..., side],
                                       rtol=1e-5, atol=1e-6)


def test_a_masked_entrys_mask_strength_weighs_it_as_comfyui_weighs_its_prediction(sd15, prompts):
    # Conditioning (Set Mask)'s strength scales the mask: the doctor, over the whole image at 0.25, against the
    # woman on the left at 1.
    import nodes

    model, clip = sd15
    _, neg = prompts
    set_mask = nodes.ConditioningSetMask().append
    regional = combine(set_mask(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0],
                       set_mask(encode(clip, "a photo of a doctor"), torch.ones(1, 32, 32), "default", 0.25)[0])
    assert_maps_left_and_right(model, clip, neg, regional, lambda w, d: (w + 0.25 * d) / 1.25, lambda w, d: d)


def test_a_default_entry_gets_no_weight_where_the_other_entries_weigh_more_than_one(sd15, prompts):
    # relu(1 − Σ weights): the woman's mask at strength 2 leaves the default doctor nothing on the left, not −1.
    import comfy.hooks
    import nodes

    model, clip = sd15
    _, neg = prompts
    masked_woman = nodes.ConditioningSetMask().append(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 2.0)[0]
    with torch.inference_mode():
        positive = comfy.hooks.set_default_conds_and_combine([masked_woman], [encode(clip, "a photo of a doctor")])[0]
    assert_maps_left_and_right(model, clip, neg, positive, lambda w, d: w, lambda w, d: d)


def test_a_default_entry_is_weighed_again_at_each_step_as_the_other_entries_timestep_ranges_end(sd15, prompts):
    # The masked woman conditions the first step only: from the second on, the default doctor has the whole image,
    # the left half too, where its first step's weight was 0 (weights kept from that step record maps of 0 there).
    import comfy.hooks
    import nodes

    model, clip = sd15
    _, neg = prompts
    masked_woman = nodes.ConditioningSetMask().append(encode(clip, "a photo of a woman"), LEFT_HALF, "default", 1.0)[0]
    first_step = nodes.ConditioningSetTimestepRange().set_range(masked_woman, 0.0, 0.2)[0]
    with torch.inference_mode():
        positive = comfy.hooks.set_default_conds_and_combine([first_step], [encode(clip, "a photo of a doctor")])[0]
    _, trace = sample(model, clip, positive, neg, steps=3, branch="cond")
    for maps in trace.maps.values():
        left = maps[..., :maps.shape[-1] // 2].flatten(1)
        assert (left > 0).all(), "every step's maps cover the left half: the woman's, then the default doctor's"


def test_an_area_of_exactly_the_latents_size_covers_the_image(sd15, prompts, kernel_slack):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    whole = nodes.ConditioningSetArea().append(pos, 256, 256, 0, 0, 1.0)[0]  # the 32×32 latent, as an area
    _, plain = sample(model, clip, pos, neg, branch="cond")
    _, trace = sample(model, clip, whole, neg, branch="cond")
    assert not any("area" in note or "branch on those steps" in note for note in trace.notes)
    assert_same_maps(trace, plain, evaluations=slice(0, 1), slack=kernel_slack)  # ComfyUI batches areas apart


def test_an_area_of_the_latents_size_placed_off_its_corner_runs_on_a_crop_and_leaves_the_image_uncovered(
        sd15, prompts, kernel_slack):
    # ComfyUI cuts such an area at the latent's edge: its entry runs on a crop, so the other branch's maps are taken.
    import nodes

    model, clip = sd15
    pos, neg = prompts
    shifted = nodes.ConditioningSetArea().append(pos, 256, 256, 64, 64, 1.0)[0]  # 32×32 at (8, 8) of a 32×32 latent
    _, negative = sample(model, clip, pos, neg, branch="uncond")
    _, trace = sample(model, clip, shifted, neg, branch="cond")
    assert any("no positive conditioning entry covered the whole image" in note for note in trace.notes)
    assert_same_maps(trace, negative, evaluations=slice(0, 1), slack=kernel_slack)  # the first step's latent


@pytest.mark.parametrize("scale, branch", [(0.0, "uncond"), (100.0, "uncond"), (100.0, "cond")])
def test_area_conditioning_records_the_whole_image_entries_and_says_so(sd15, prompts, scale, branch):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    hat = nodes.ConditioningSetArea().append(encode(clip, "a red hat"), 128, 128, 0, 0, 1.0)[0]  # a quarter
    _, plain = sample(model, clip, pos, neg, scale=scale, branch=branch)
    out, trace = sample(model, clip, combine(pos, hat), neg, scale=scale, branch=branch)
    assert torch.isfinite(out).all()
    assert any("area conditioning" in note for note in trace.notes)
    assert_same_maps(trace, plain, evaluations=slice(0, 1))  # the first step sees the same latent
    if scale:
        assert trace.guidance_counts()["not_guided"] == 0


def test_a_timestep_range_that_empties_the_recorded_branch_moves_the_maps_to_the_other_branch(sd15, prompts):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    early_negative = nodes.ConditioningSetTimestepRange().set_range(neg, 0.0, 0.5)[0]
    out, trace = sample(model, clip, pos, early_negative, scale=100.0, steps=4)
    assert torch.isfinite(out).all()
    assert trace.maps["down_1"].shape[0] == 4
    assert trace.guidance_counts()["not_guided"] == 0
    assert any("no negative conditioning entry covered the whole image" in note for note in trace.notes)


def test_a_timestep_range_bound_is_compared_with_sigma_in_sigmas_dtype_as_comfyui_compares_it(sd15, prompts):
    # ComfyUI compares a float32 σ with the entry's bound rounded to float32: σ = 14 is not above 14 − 10⁻⁷ there,
    # so the negative entry runs on that step and its maps are the ones recorded.
    import comfy.samplers
    import node_helpers

    model, clip = sd15
    pos, neg = prompts
    ranged = node_helpers.conditioning_set_values(neg, {"timestep_start": 14.0 - 1e-7})  # 14.0 in float32
    sigmas = torch.tensor([14.0, 5.0, 0.0])
    traces = []
    with torch.inference_mode():
        for negative in (neg, ranged):
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], BiasMapSettings(scale=0.0))
            traces.append(sample_with_sampler(session, model, 0, 7.0, comfy.samplers.sampler_object("euler"), sigmas,
                                              pos, negative, {"samples": torch.zeros(1, 4, 32, 32)})[1])
    plain, trace = traces
    assert not any("covered the whole image" in note for note in trace.notes)
    assert_same_maps(trace, plain)


def test_no_whole_image_entry_on_either_branch_is_refused_with_the_fix(sd15, prompts):
    import nodes

    model, clip = sd15
    pos, neg = prompts
    early = nodes.ConditioningSetTimestepRange()
    with pytest.raises(ValueError, match=r"add a whole-image entry to one of them with Conditioning \(Combine\)"):
        sample(model, clip, early.set_range(pos, 0.0, 0.5)[0], early.set_range(neg, 0.0, 0.5)[0], steps=4)


def controlnet_conditioning(model, pos, neg, seed=1):
    """Both conditionings with a random ControlNet of the model's shape, built in inference mode as ComfyUI loads it."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import comfy_models
    import nodes

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "out_channels"}
    with torch.inference_mode():
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
        comfy_models.init_random_(net, seed)
        control = comfy.controlnet.ControlNet(net, load_device=model.load_device, manual_cast_dtype=None)
        hint = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(seed))
        return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0)[:2]


@pytest.mark.parametrize("chained", [False, True], ids=["one ControlNet", "two chained"])
def test_controlnets_loaded_in_inference_mode_leave_recording_bit_identical_and_are_guided_through(sd15, prompts,
                                                                                                   chained):
    # Two Apply ControlNet nodes in a row: the second's ControlNet holds the first as previous_controlnet, whose
    # inference-mode weights the guided pass runs through too.
    import nodes

    model, clip = sd15
    pos, neg = controlnet_conditioning(model, *prompts)
    if chained:
        pos, neg = controlnet_conditioning(model, pos, neg, seed=2)
    with torch.inference_mode():
        stock = nodes.common_ksampler(model, 0, 2, 7.0, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, 32, 32)})[0]["samples"]
    recorded, _ = sample(model, clip, pos, neg)
    assert torch.equal(recorded, stock)
    guided, trace = sample(model, clip, pos, neg, scale=100.0)
    assert trace.guidance_counts()["applied"] == 2
    assert torch.isfinite(guided).all() and not torch.equal(guided, stock)


@pytest.mark.parametrize("batched", [False, True], ids=["branches apart (CPU)", "one CFG batch (GPU)"])
def test_down_only_guidance_with_a_controlnet_records_nothing_after_the_last_guided_block(sd15, prompts, batched,
                                                                                           request):
    # A ControlNet's middle residual is added after the input blocks; it must not make the output blocks differentiable.
    if batched:
        request.getfixturevalue("gpu_batching")
    model, clip = sd15
    pos, neg = controlnet_conditioning(model, *prompts)
    unet = model.model.diffusion_model
    inputs = []
    # On the first layer of each input block after the last guided one (input 1 holds down×1's only cross-attention
    # here) and of each output block: ComfyUI runs a block's layers one by one, not through the block's forward.
    hooks = [block[0].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].requires_grad))
             for block in [*unet.input_blocks[2:], *unet.output_blocks]]
    try:
        _, trace = sample(model, clip, pos, neg, scale=100.0, steps=1, guided_stages=("down_1",))
    finally:
        for hook in hooks:
            hook.remove()
    assert trace.guidance_counts()["applied"] == 1
    assert inputs and not any(inputs)


def hook_weights(model, scale, seed=2):
    """New weights for every attention projection, for Create Hook Model as LoRA."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # the weights as loaded, not as another clone's patches left them
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen).to(v.device) for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and "attn" in k and k.endswith(".weight")}


@pytest.mark.parametrize("stages, batched", [(("down_1",), True), (None, True), (None, False)],
                         ids=["down x1, one CFG batch (GPU)", "all stages, one CFG batch (GPU)", "all stages"])
def test_hooked_conditioning_is_guided_through_its_own_weights_when_the_other_branch_has_none(sd15, prompts, stages,
                                                                                             batched, kernel_slack,
                                                                                             request):
    import comfy.hooks

    if batched:
        request.getfixturevalue("gpu_batching")

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        # Moderate weights: at 0.5 the attention logits saturate, and two attention kernels' rounding moves the maps.
        weights = hook_weights(model, 0.05)
        hooked = comfy.hooks.set_hooks_for_conditioning(pos, comfy.hooks.create_hook_model_as_lora(weights, None, 1.0,
                                                                                                   0.0))
        everywhere = model.clone()  # the same weights as an ordinary patch: the reference for the maps' branch
        everywhere.add_patches({k: ("set", (w,)) for k, w in weights.items()}, 1.0)
    _, trace = sample(model, clip, hooked, neg, scale=100.0, steps=1, branch="cond", guided_stages=stages)
    _, expected = sample(everywhere, clip, pos, neg, scale=100.0, steps=1, branch="cond", guided_stages=stages)
    _, unhooked = sample(model, clip, pos, neg, scale=100.0, steps=1, branch="cond", guided_stages=stages)
    assert trace.guidance_counts()["not_guided"] == 0  # applied, or skipped by the gate
    # The energy and its gradient depend on the maps' (positive) branch only; a batch of 2 rounds differently.
    torch.testing.assert_close(trace.guidance["energy"], expected.guidance["energy"], rtol=1e-4 * kernel_slack, atol=0)
    torch.testing.assert_close(trace.guidance["grad_norm"], expected.guidance["grad_norm"], rtol=1e-2, atol=0)
    assert not torch.allclose(trace.guidance["energy"], unhooked.guidance["energy"], rtol=1e-2)
    assert not trace.notes


def test_the_gradient_for_a_branch_whose_entries_have_different_hooks_matches_finite_differences(sd15, prompts,
                                                                                               full_fp32):
    # ComfyUI patches each hook group's weights in place in turn: one backward after the pass went through the last
    # group's weights for both groups' maps (4.6 % off with these weights; with larger ones it pointed the other way).
    import comfy.hooks

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        hooked = comfy.hooks.set_hooks_for_conditioning(
            pos, comfy.hooks.create_hook_model_as_lora(hook_weights(model, 0.02), None, 1.0, 0.0))
    two_groups = combine(hooked, encode(clip, "a photo of a doctor"))
    lam = 100.0
    _, _, (x, sigma, plain) = guided_sample(model, clip, two_groups, neg, 0.0, branch="cond")
    _, trace, (_, _, guided) = guided_sample(model, clip, two_groups, neg, lam, branch="cond")
    assert trace.guidance_counts()["applied"] == 1
    assert any("each group's entries once more with autograd" in note for note in trace.notes)
    grad_x = (plain - guided) / (lam * sigma.view(-1, 1, 1, 1) ** 2)
    h = 0.05 * x.std().item()
    scale = model.model.latent_format.scale_factor  # the sampler starts from noise + latent · scale

    def energy(offset):
        with torch.inference_mode():
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"],
                                    BiasMapSettings(scale=lam, branch="cond"))
            _, run = sample_with_scheduler(session, model, 0, 1, 7.0, "euler", "normal", two_groups, neg,
                                           {"samples": offset / scale})
        return run.guidance["energy"][0].sum()

    assert energy(torch.zeros_like(x)).item() == pytest.approx(trace.guidance["energy"][0].sum().item(), rel=1e-6)
    step = h * grad_x / grad_x.norm()
    finite_difference = (energy(step) - energy(-step)) / (2 * h)
    assert finite_difference.item() == pytest.approx(grad_x.norm().item(), rel=1e-3)


def test_entries_with_different_hooks_on_the_keys_are_mapped_each_under_its_own_weights(sd15, prompts):
    # The attribution keys K′ = to_k(X′) are kept per layer; a hook group that changes to_k makes them again.
    import comfy.hooks

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        hooks = [comfy.hooks.create_hook_model_as_lora(
            {k: w for k, w in hook_weights(model, 0.05, seed).items() if "attn2.to_k" in k}, None, 1.0, 0.0)
            for seed in (2, 3)]
        a = comfy.hooks.set_hooks_for_conditioning(pos, hooks[0])
        b = comfy.hooks.set_hooks_for_conditioning(encode(clip, "a photo of a doctor"), hooks[1])
    _, alone_a = sample(model, clip, a, neg, steps=1, branch="cond")
    _, alone_b = sample(model, clip, b, neg, steps=1, branch="cond")
    for combined in (combine(a, b), combine(b, a)):
        _, trace = sample(model, clip, combined, neg, steps=1, branch="cond")
        for stage, maps in trace.maps.items():  # the first evaluation: the same latent in all three runs
            torch.testing.assert_close(maps, (alone_a.maps[stage] + alone_b.maps[stage]) / 2, rtol=1e-5, atol=1e-6)


def test_a_hook_group_whose_entries_are_outside_their_timestep_range_costs_no_extra_pass(sd15, prompts):
    import comfy.hooks
    import comfy.patcher_extension as ext
    import nodes

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        hook = comfy.hooks.create_hook_model_as_lora(hook_weights(model, 0.02), None, 1.0, 0.0)
        late = nodes.ConditioningSetTimestepRange().set_range(comfy.hooks.set_hooks_for_conditioning(pos, hook),
                                                               0.5, 1.0)[0]  # not at the first step
    batches = []
    counted = model.clone()
    counted.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "count",
                                 lambda run, x, *args, **kw: batches.append(x.shape[0]) or run(x, *args, **kw))
    _, trace, _ = guided_sample(counted, clip, combine(late, encode(clip, "a photo of a doctor")), neg, 100.0,
                                branch="cond", guided_stages=("down_1",))
    # As without the hooked entry: one batched CFG pass on a GPU, one pass a branch on a CPU; no pass more.
    assert batches == ([1, 1] if model.load_device.type == "cpu" else [2])
    assert trace.guidance_counts()["applied"] == 1 and not trace.notes


def test_hooked_conditioning_is_recorded_with_its_weights_and_can_be_guided(sd15, prompts):
    import comfy.hooks

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():  # a hook that re-weights every attention projection (Create Hook Model as LoRA)
        hooked = comfy.hooks.set_hooks_for_conditioning(
            pos, comfy.hooks.create_hook_model_as_lora(hook_weights(model, 0.01), None, 1.0, 0.0))
    _, plain = sample(model, clip, pos, neg, steps=1, branch="cond")
    _, with_hook = sample(model, clip, hooked, neg, steps=1, branch="cond")
    assert all(not torch.allclose(with_hook.maps[s], plain.maps[s]) for s in plain.maps)
    out, guided = sample(model, clip, hooked, neg, scale=100.0, branch="cond")
    assert torch.isfinite(out).all() and guided.guidance_counts()["applied"] == 2


def gligen_box(model, clip, conditioning):
    """``conditioning`` with a GLIGEN text box ("a tie", top left), the GLIGEN model random and loaded in inference
    mode as ComfyUI loads one, its gates open so that it changes the U-Net's pass."""
    import comfy.gligen
    import comfy.model_management
    import comfy.model_patcher
    import nodes
    from comfy_models import init_random_

    with torch.inference_mode():
        widths = [m.attn1.to_q.in_features for m in model.model.diffusion_model.modules()
                  if type(m).__name__ == "BasicTransformerBlock"]  # GLIGEN's modules, one per transformer block
        gated = [comfy.gligen.GatedSelfAttentionDense(w, 768, 8, w // 8) for w in widths]
        gligen = comfy.gligen.Gligen(gated, comfy.gligen.PositionNet(768, 768), 768)
        init_random_(gligen, 3)
        for module in gated:
            module.alpha_attn.fill_(1.0)
            module.alpha_dense.fill_(1.0)
        patcher = comfy.model_patcher.ModelPatcher(gligen, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        return nodes.GLIGENTextBoxApply().append(conditioning, clip, patcher, "a tie", 16, 16, 0, 0)[0], gligen


@pytest.mark.parametrize("stages", [None, ("down_1",)], ids=["all stages", "down x1"])
def test_gligen_in_the_maps_branch_is_guided_through_its_own_weights_swapped_like_the_unets(sd15, prompts, stages,
                                                                                              monkeypatch):
    import biasmap_engine.host.guided_backward as guided_backward

    model, clip = sd15
    pos, neg = prompts
    boxed, gligen = gligen_box(model, clip, pos)
    attached = guided_backward.attached_modules
    monkeypatch.setattr(guided_backward, "attached_modules", lambda conds: [])  # as if BiasMap did not know GLIGEN's weights
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        guided_sample(model, clip, boxed, neg, 100.0, steps=1, branch="cond", guided_stages=stages)
    monkeypatch.setattr(guided_backward, "attached_modules", attached)
    out, trace, _ = guided_sample(model, clip, boxed, neg, 100.0, steps=2, branch="cond", guided_stages=stages)
    assert trace.guidance_counts()["applied"] == 2 and torch.isfinite(out).all()
    assert not any(p.is_inference() for p in gligen.parameters())
    without, _, _ = guided_sample(model, clip, pos, neg, 100.0, steps=2, branch="cond", guided_stages=stages)
    assert not torch.allclose(out, without)  # GLIGEN took part


class _Adapters:
    """Where an adapter-style node keeps the models it loads, found by its patch when it runs (not held by it)."""

    loaded = {}


@pytest.mark.parametrize("as_list", [True, False], ids=["a list", "one model"])
def test_a_model_attached_to_the_maps_branchs_entries_is_guided_through_its_own_weights_swapped_like_the_unets(
        sd15, prompts, as_list):
    # A node attaching its model to the conditioning as additional_models (ComfyUI loads it with the U-Net) and
    # running it from a patch: loaded in inference mode, it runs on activations that need gradients.
    import comfy.model_management
    import comfy.model_patcher
    import node_helpers

    model, clip = sd15
    pos, neg = prompts
    with torch.inference_mode():
        projection = torch.nn.Linear(32, 32)  # the width of the tiny U-Net's first level
        torch.nn.init.eye_(projection.weight)
        projection.weight.mul_(1.5)
        torch.nn.init.zeros_(projection.bias)
        patcher = comfy.model_patcher.ModelPatcher(projection, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        attached = node_helpers.conditioning_set_values(pos, {"additional_models": [patcher] if as_list else patcher})
        patched = model.clone()
    _Adapters.loaded["projection"] = projection

    def project(n, context, value, extra):  # looks its model up as it runs
        layer = _Adapters.loaded["projection"]
        return (layer(n) if n.shape[-1] == 32 else n), context, value

    patched.set_model_attn2_patch(project)
    try:
        out, trace, _ = guided_sample(patched, clip, attached, neg, 100.0, steps=2, branch="cond")
        without, _, _ = guided_sample(model, clip, pos, neg, 100.0, steps=2, branch="cond")
    finally:
        _Adapters.loaded.clear()
    assert trace.guidance_counts()["applied"] == 2 and torch.isfinite(out).all()
    assert not any(p.is_inference() for p in projection.parameters())
    assert not torch.allclose(out, without)  # the attached model took part


def test_an_inpainting_model_is_recorded_and_guided_through_its_latent_channels(comfy):
    # SD1.5 inpainting: the U-Net reads the latent concatenated with the mask and the masked image
    # (InpaintModelConditioning); the gradient is taken with respect to the latent's channels only.
    import comfy_models
    import nodes

    class PoolingVAE:  # stands in for a VAE: an image to a 4-channel latent 8× smaller
        def encode(self, pixels):
            return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 2, 1, 1)[:, :4]

        def spacial_compression_encode(self):
            return 8

    with torch.inference_mode():
        model, clip = comfy_models.tiny_sd15(0, in_channels=9)
        pos, neg = comfy_models.paper_prompts(clip)
        mask = torch.zeros(1, 256, 256)
        mask[:, 64:192, 64:192] = 1.0
        pos, neg, latent = nodes.InpaintModelConditioning().encode(
            pos, neg, torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0)), PoolingVAE(), mask, True)
        stock = nodes.common_ksampler(model, 0, 2, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]
        runs = {}
        for scale in (0.0, 100.0):
            session = start_session(model, clip, ATTRIBUTION, ["gender"], ["doctor"], BiasMapSettings(scale=scale))
            runs[scale] = sample_with_scheduler(session, model, 0, 2, 7.0, "euler", "normal", pos, neg, latent)
    (recorded, _), (guided, trace) = runs[0.0], runs[100.0]
    assert torch.equal(recorded["samples"], stock)
    assert trace.guidance_counts()["applied"] == 2 and not trace.notes
    assert torch.isfinite(guided["samples"]).all() and not torch.equal(guided["samples"], stock)
    keep = mask[:, ::8, ::8].unsqueeze(1) == 0  # the noise mask keeps the latent outside the inpainted square
    assert torch.equal(guided["samples"].masked_select(keep), stock.masked_select(keep))
