"""The nodes called as ComfyUI calls them: validation first, then ``execute`` with their schema's defaults."""

import pytest
import torch


def defaults(node) -> dict:
    return {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}


@pytest.fixture(scope="module")
def nodes_and_trace(pack, sd15, prompts):
    from biasmap_pack.nodes import BiasMapAttributionMap, BiasMapEntanglementIoU, BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=2,
                                                  sampler_name="euler", scheduler="normal", guidance_scale=0.0,
                                                  latent_image={"samples": torch.zeros(2, 4, 32, 32)})
    with torch.inference_mode():
        trace = BiasMapGuidedKSampler.execute(**args).result[1]
    return BiasMapGuidedKSampler, BiasMapAttributionMap, BiasMapEntanglementIoU, trace


def picture(output):
    """A node's IMAGE output."""
    return next(o for o in output.result if isinstance(o, torch.Tensor) and o.ndim == 4)


def test_the_map_nodes_draw_over_an_rgba_image_as_over_its_rgb(nodes_and_trace):
    _, attribution_map, entanglement, trace = nodes_and_trace
    rgba = torch.rand(2, 256, 256, 4, generator=torch.Generator().manual_seed(0))
    for node in (attribution_map, entanglement):
        args = defaults(node) | {"trace": trace}
        with torch.inference_mode():
            over_rgba, over_rgb = (picture(node.execute(**args, image=image)) for image in (rgba, rgba[..., :3]))
        assert over_rgba.shape == (2, 256, 256, 3)
        assert torch.equal(over_rgba, over_rgb)


def test_the_map_nodes_refuse_an_image_batch_that_is_neither_one_picture_nor_one_per_latent(nodes_and_trace):
    _, attribution_map, entanglement, trace = nodes_and_trace  # a trace of 2 latents
    for node in (attribution_map, entanglement):
        with torch.inference_mode(), pytest.raises(ValueError, match="holds 3 pictures but the trace comes from 2"):
            node.execute(**defaults(node) | {"trace": trace}, image=torch.rand(3, 64, 64, 3))


@pytest.mark.parametrize("inputs, message", [
    ({"start": 0.6, "end": 0.4}, "start=0.6, end=0.4"),
    ({"guided_stages": "down_1, mid_2", "include_middle": False}, "include_middle on"),
    ({"guided_stages": "down_9"}, "unknown stage 'down_9'"),
    ({"start": 0.5, "end": 0.5}, "start = end guides nothing"),
    ({"semantic": "gender"}, "share words of the attribution prompt"),
    ({"semantic": "doctor, Doctor"}, "'Doctor' is listed twice"),
    ({"attribution_prompt": "   "}, "has no words"),
])
def test_validation_refuses_guidance_settings_that_cannot_run_and_says_why(nodes_and_trace, inputs, message):
    sampler = nodes_and_trace[0]
    assert message in sampler.validate_inputs(**{"attribution_prompt": "a doctor and gender", "demographic": "gender",
                                                 "semantic": "doctor", **inputs})


def test_validation_accepts_stage_names_in_any_case_and_the_middle_block_when_it_is_recorded(nodes_and_trace):
    sampler = nodes_and_trace[0]
    assert sampler.validate_inputs("a doctor and gender", "gender", "doctor", "Down_1, MID_2", True, 0.2, 0.8) is True
