"""The nodes called as ComfyUI calls them: validation first, then ``execute`` with their schema's defaults."""

import copy

import pytest
import torch
from guided_runs import counting_evaluations
from node_calls import as_comfy_runs, defaults, page_texts


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


@pytest.mark.parametrize("value", [12.5, 0.75, 150.25])
def test_a_guidance_scale_typed_with_decimals_keeps_them_in_comfyuis_frontend(pack, value):
    # The frontend rounds a FLOAT to its `round`, or without one to as many decimals as its step has: step 1.0 made
    # a typed λ of 12.5 a 13.
    import math

    from biasmap_pack.nodes import BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced

    for node in (BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced):
        scale = next(i for i in node.define_schema().inputs if i.id == "guidance_scale")
        unit = scale.round or 10.0 ** math.floor(math.log10(scale.step))
        assert round(value / unit) * unit == pytest.approx(value)


def picture(output):
    """A node's IMAGE output."""
    return next(o for o in output.result if isinstance(o, torch.Tensor) and o.ndim == 4)


def test_the_map_nodes_draw_over_an_rgba_image_as_over_its_rgb_and_over_a_grey_one_as_over_grey_rgb(nodes_and_trace):
    _, attribution_map, entanglement, trace = nodes_and_trace
    rgba = torch.rand(2, 256, 256, 4, generator=torch.Generator().manual_seed(0))
    grey = rgba[..., :1]
    for node in (attribution_map, entanglement):
        args = defaults(node) | {"trace": trace}
        with torch.inference_mode():
            over_rgba, over_rgb = (picture(node.execute(**args, image=image)) for image in (rgba, rgba[..., :3]))
            over_grey, over_grey_rgb, over_grey_alpha = (picture(node.execute(**args, image=image)) for image in (
                grey, grey.expand(-1, -1, -1, 3), rgba[..., :2]))
        assert over_rgba.shape == over_grey.shape == (2, 256, 256, 3)
        assert torch.equal(over_rgba, over_rgb)
        assert torch.equal(over_grey, over_grey_rgb) and torch.equal(over_grey_alpha, over_grey_rgb)


def test_attribution_map_on_the_whole_batchs_scale_keeps_each_map_and_compares_the_images(nodes_and_trace):
    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]  # a trace of 2 latents
    args = defaults(attribution_map) | {"trace": trace}
    with torch.inference_mode():
        del args["scale"]  # as an API prompt saved before the input existed
        each = attribution_map.execute(**args).result[1]
        shared = attribution_map.execute(**args, scale="whole batch").result[1]
    assert each.amax(dim=(1, 2)).tolist() == [1.0, 1.0]
    assert shared.max() == 1 and shared.min() == 0 and not torch.allclose(shared, each)
    for one, mask in zip(shared, each):  # the same map, on another scale
        assert torch.allclose((one - one.min()) / (one.max() - one.min()), mask, atol=1e-5)


def test_the_map_nodes_refuse_an_image_batch_that_is_neither_one_picture_nor_one_per_latent(nodes_and_trace):
    _, attribution_map, entanglement, trace = nodes_and_trace  # a trace of 2 latents
    for node in (attribution_map, entanglement):
        with torch.inference_mode(), pytest.raises(ValueError, match="holds 3 pictures but the trace comes from 2"):
            node.execute(**defaults(node) | {"trace": trace}, image=torch.rand(3, 64, 64, 3))


@pytest.mark.parametrize("inputs, message", [
    ({"semantic": "gender"}, "share words of the attribution prompt"),
    ({"semantic": "doctor, Doctor"}, "'Doctor' is listed twice"),
    ({"attribution_prompt": "a doctor and black woman and gender", "demographic": "black woman, woman"},
     "the demographic concepts 'black woman' and 'woman' share a place of the attribution prompt, so the map of "
     "each would take in the other's"),  # when queued, where the run would refuse the tokens
    ({"attribution_prompt": "   "}, "has no words"),
    ({"attribution_prompt": "a doctor and gender embedding:"}, "'embedding:' with no name after it"),
    ({"attribution_prompt": r"a person \(elderly\) and gender", "semantic": "person (elderly)"},
     r"type the concept as the prompt spells it, person \(elderly\)"),  # read as "person elderly", not spelled so
])
def test_validation_refuses_guidance_settings_that_cannot_run_and_says_why(nodes_and_trace, inputs, message):
    sampler = nodes_and_trace[0]
    assert message in sampler.validate_inputs(**{"attribution_prompt": "a doctor and gender", "demographic": "gender",
                                                 "semantic": "doctor", **inputs})


def test_attribution_map_validation_refuses_unknown_stages_naming_the_input(nodes_and_trace):
    attribution_map = nodes_and_trace[1]  # it runs after the sampler: a typo found when it runs wastes the sampling
    assert attribution_map.validate_inputs("gender", "Down_1, MID_2") is True
    refused = attribution_map.validate_inputs("gender", "down1")
    assert refused.startswith("stages: unknown stage 'down1'")
    assert refused.endswith(" (stages is an advanced input: if the node hides it, right-click the node and choose Show "
                            "Advanced)")
    assert attribution_map.validate_inputs("  ", "all") is True  # the trace's first demographic concept


def test_attribution_map_names_the_stages_a_trace_recorded_when_asked_for_another(nodes_and_trace):
    # mid_2 is a stage name, but this trace was recorded without the middle block: not "unknown", "not recorded".
    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    with torch.inference_mode(), pytest.raises(ValueError, match=r"mid_2 were not recorded; this trace has down_1.*: "
                                                                 r"choose stages among these, or 'all' \(the middle "
                                                                 r"block is recorded with the sampler's include_middle "
                                                                 r"on\) \(stages is an advanced input: if the node "
                                                                 r"hides it, right-click the node and choose Show "
                                                                 r"Advanced\)$"):
        attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "stages": "mid_2"})


def test_the_map_nodes_take_a_word_as_the_samplers_lists_take_it_and_an_empty_one_as_the_traces_concept(
        nodes_and_trace):
    # 'doctor,' was looked up as the word followed by a comma token: another map, and no warning.
    _, attribution_map, entanglement, trace = nodes_and_trace
    with torch.inference_mode():
        heats = [attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "word": word}).result[0]
                 for word in ("gender", "", "gender,", '"Gender."')]
        ious = [entanglement.execute(**defaults(entanglement) | {"trace": trace, "concept_a": a,
                                                                 "concept_b": b}).result[0]
                for a, b in (("gender", "doctor"), ("", ""), ("gender.", "doctor,"))]
    assert all(torch.equal(heat, heats[0]) for heat in heats) and ious == [ious[0]] * 3


def test_the_nodes_raise_their_errors_as_value_errors_comfyui_names_without_a_folder_path(nodes_and_trace):
    _, attribution_map, entanglement, trace = nodes_and_trace
    for node, word in ((attribution_map, {"word": "race"}), (entanglement, {"concept_a": "race"})):
        with torch.inference_mode(), pytest.raises(ValueError, match="'race'") as raised:
            node.execute(**defaults(node) | {"trace": trace} | word)
        # The pack's own ConceptNotFoundError, under the module name ComfyUI loaded the pack with.
        assert type(raised.value) is ValueError and type(raised.value.__cause__).__name__ == "ConceptNotFoundError"


SHOW_ADVANCED = "right-click the node and choose Show Advanced"


@pytest.mark.parametrize("inputs, message, hidden", [
    ({"start": 0.6, "end": 0.4}, "start=0.6, end=0.4", "start and end are advanced inputs"),
    ({"start": 0.5, "end": 0.5}, "start = end guides nothing", "start and end are advanced inputs"),
    ({"guided_stages": "down_1, mid_2", "include_middle": False}, "include_middle on",
     "include_middle and guided_stages are advanced inputs"),
    ({"guided_stages": "down_9"}, "guided_stages: unknown stage 'down_9'", "guided_stages is an advanced input"),
])
def test_guidance_settings_that_cannot_run_are_refused_before_sampling_and_say_why(sd15, prompts, pack, inputs,
                                                                                    message, hidden):
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg,
                                                  sampler_name="euler", scheduler="normal",
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)}) | inputs
    with torch.inference_mode(), pytest.raises(ValueError, match=message) as refused:
        BiasMapGuidedKSampler.execute(**args)
    # The page hides advanced inputs (a shared workflow may hold values its user never saw): the message says where.
    assert str(refused.value).endswith(f" ({hidden}: if the node hides {'them' if ' and ' in hidden else 'it'}, "
                                       f"{SHOW_ADVANCED})")
    # Refused when it runs, once: validation would pin the message on every input it takes.
    assert BiasMapGuidedKSampler.validate_inputs(args["attribution_prompt"], args["demographic"],
                                                 args["semantic"]) is True


@pytest.mark.parametrize("window, message, hidden", [
    ((5, 10000), "past this trace's last step, 1: set first_step to at most 1", "first_step is an advanced input"),
    ((1, 0), "first_step 1 is after last_step 0: set it to at most 0", "first_step and last_step are advanced inputs"),
])
def test_the_map_nodes_refuse_an_empty_step_window_naming_the_inputs(nodes_and_trace, window, message, hidden):
    _, attribution_map, entanglement, trace = nodes_and_trace  # a 2-step trace
    for node in (attribution_map, entanglement):
        args = defaults(node) | {"trace": trace, "first_step": window[0], "last_step": window[1]}
        with torch.inference_mode(), pytest.raises(ValueError, match=message) as refused:
            node.execute(**args)
        assert str(refused.value).endswith(f"{message} ({hidden}: if the node hides "
                                           f"{'them' if ' and ' in hidden else 'it'}, {SHOW_ADVANCED})")


@pytest.mark.parametrize("message, named", [
    ("q = 0.98 keeps no pixel: set q to at most 0.96", True), ("q must be a fraction", True),
    ("choose stages among these", True), ("stages: unknown stage 'x'", True), ("start=0.6, end=0.4", True),
    ("0 ≤ start < end ≤ 1", True), ("the backend must be CUDA", False), ("Latent From Batch past its end)", False),
    ("the guided stages: down_1", False), ("weekend < now", False), ("the text's end or start: remove it", False)])
def test_a_plain_word_is_taken_for_an_input_only_where_a_message_uses_it_as_one(pack, message, named):
    import re

    from biasmap_pack.nodes.common import _named

    assert any(re.search(_named(name), message) for name in ("stages", "start", "end", "q")) == named


def test_a_message_naming_an_input_on_the_nodes_face_gets_no_note_on_advanced_inputs(nodes_and_trace):
    entanglement, trace = nodes_and_trace[2], nodes_and_trace[3]
    with torch.inference_mode(), pytest.raises(ValueError, match="type in concept_a") as refused:
        entanglement.execute(**defaults(entanglement) | {"trace": trace, "concept_a": "doctor", "concept_b": "Doctor"})
    assert "Show Advanced" not in str(refused.value)


def test_a_message_using_an_advanced_inputs_name_as_a_plain_word_gets_no_note_on_advanced_inputs(sd15, prompts, pack):
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg,
                                                  sampler_name="euler", scheduler="normal",
                                                  latent_image={"samples": torch.zeros(0, 4, 32, 32)})
    with torch.inference_mode(), pytest.raises(ValueError, match=r"past its end\): connect [^(]*$"):
        BiasMapGuidedKSampler.execute(**args)  # "end" is an advanced input of the sampler's


@pytest.mark.parametrize("concept_a, message", [("doctor", "both hold 'Doctor'.*type in concept_a a demographic word"),
                                                ("a doctor", "share tokens.*compare two words that do not overlap")])
def test_entanglement_iou_refuses_a_word_compared_with_itself(nodes_and_trace, concept_a, message):
    entanglement, trace = nodes_and_trace[2], nodes_and_trace[3]
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        entanglement.execute(**defaults(entanglement) | {"trace": trace, "concept_a": concept_a, "concept_b": "Doctor"})


def test_the_sampler_writes_the_traces_notes_to_the_console(sd15, prompts, pack, caplog):
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=1, cfg=1.0,
                                                  sampler_name="euler", scheduler="normal", guidance_scale=0.0,
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    with torch.inference_mode(), caplog.at_level("WARNING"):
        trace = BiasMapGuidedKSampler.execute(**args).result[1]
    assert any("cfg = 1" in note for note in trace.notes)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [f"BiasMap: {note}" for note in trace.notes] == [m for m in logged if m.startswith("BiasMap:")]


def test_the_map_nodes_refuse_a_concept_list_where_they_take_one_word_before_and_when_they_run(nodes_and_trace):
    # The sampler's concept inputs take lists; here "gender, doctor" would be looked up as one phrase, comma and all.
    _, attribution_map, entanglement, trace = nodes_and_trace
    for node, inputs, fix in ((attribution_map, {"word": "gender, doctor"}, "one Attribution Map node per word"),
                              (entanglement, {"concept_a": "gender, doctor"}, "use BiasMap Audit Log")):
        assert "holds several concepts (gender, doctor) but takes one" in node.validate_inputs(**inputs)
        assert fix in node.validate_inputs(**inputs)
        with torch.inference_mode(), pytest.raises(ValueError, match="several concepts"):  # as a linked text arrives
            node.execute(**defaults(node) | {"trace": trace} | inputs)
    assert attribution_map.validate_inputs(word=None) is True and entanglement.validate_inputs("gender", None) is True


def test_the_samplers_defaults_are_the_papers_settings_and_its_inputs_reach_them(pack):
    from biasmap_pack.biasmap_engine import BiasMapSettings
    from biasmap_pack.nodes import BiasMapGuidedKSampler
    from biasmap_pack.nodes.common import settings_from

    inputs = defaults(BiasMapGuidedKSampler)
    assert settings_from(inputs) == BiasMapSettings()  # λ 100, uncond, paper soft top-k, q 0.7, γ 0.01, skip, all
    chosen = settings_from(inputs | {"q": 0.6, "gate": "clip", "soft_topk": "exact", "branch": "cond", "gamma": 0.02,
                                     "guided_stages": "down_1, up_1", "start": 0.2, "end": 0.8, "guidance_scale": 50.0})
    assert chosen == BiasMapSettings(scale=50.0, branch="cond", mode="exact", keep=0.4, gamma=0.02,
                                     gate="clip", guided_stages=("down_1", "up_1"), start=0.2, end=0.8)


@pytest.mark.parametrize("q, keep", [(0.25, 0.75), (0.5, 0.5), (0.99, 0.01)])
def test_the_samplers_q_makes_the_soft_top_k_keep_the_top_1_minus_q_at_any_q(pack, q, keep):
    from biasmap_pack.nodes import BiasMapGuidedKSampler
    from biasmap_pack.nodes.common import settings_from

    assert settings_from(defaults(BiasMapGuidedKSampler) | {"q": q}).keep == keep


def test_entanglement_iou_averages_over_the_images_that_have_a_figure(nodes_and_trace):
    import copy

    entanglement, trace = nodes_and_trace[2], copy.deepcopy(nodes_and_trace[3])
    trace.maps["down_1"][0, 1, trace.positions("gender")[0], 0, 0] = float("nan")  # image 1 overflowed
    with torch.inference_mode():
        iou, mbiou, report, *_ = entanglement.execute(**defaults(entanglement) | {"trace": trace}).result
    expected = trace.iou("gender", "doctor", size=trace.image_size)
    assert expected[1].isnan() and iou == pytest.approx(float(expected[0]))
    assert mbiou == mbiou and "over 1 of 2 image(s)" in report  # finite: image 1's other stages have maps


def test_entanglement_iou_reports_the_change_from_a_baseline_trace_measured_as_its_own(nodes_and_trace):
    import copy

    from biasmap_pack.biasmap_engine import measure_entanglement

    entanglement, trace = nodes_and_trace[2], nodes_and_trace[3]
    guided = copy.deepcopy(trace)
    guided.settings = {**trace.settings, "scale": 100.0}
    for maps in guided.maps.values():  # 'gender' mirrored: another overlap with 'doctor'
        maps[:, :, trace.positions("gender")] = maps[:, :, trace.positions("gender")].flip(-1)
    args = defaults(entanglement) | {"trace": guided, "baseline": trace, "first_step": 1}
    with torch.inference_mode():
        iou, _, report, *_ = entanglement.execute(**args).result
    before = measure_entanglement(trace, "gender", "doctor", steps=(1, 1))
    after = measure_entanglement(guided, "gender", "doctor", steps=(1, 1))
    assert iou == pytest.approx(float(after.ious.mean())) and not torch.equal(after.ious, before.ious)  # this trace's
    assert report.endswith(after.against(before)) and "against the baseline (" in report
    assert "note: the baseline differs" not in report  # the same run but for λ
    absent = copy.deepcopy(trace)
    absent.tokens = [t.replace("doctor", "nurse") for t in trace.tokens]
    with torch.inference_mode(), pytest.raises(ValueError, match=r"^the baseline trace: the concept 'doctor' is not in "
                                                                 r"the attribution prompt, whose words are: [^.]*\. "
                                                                 r"Measure a word that both traces have, or connect a "
                                                                 r"baseline whose attribution prompt has it\.$"):
        entanglement.execute(**args | {"baseline": absent})


def test_entanglement_iou_says_on_its_node_why_the_change_from_its_baseline_is_not_guidances(nodes_and_trace,
                                                                                               monkeypatch):
    # The report, which has the notes too, is seen only where Preview as Text is connected.
    entanglement, trace = nodes_and_trace[2], nodes_and_trace[3]
    texts = page_texts(monkeypatch)
    reworded = copy.deepcopy(trace)
    reworded.settings = {**trace.settings, "scale": 100.0}
    reworded.run = {**trace.run, "attribution_prompt": "a photo of a woman doctor"}
    with torch.inference_mode():
        as_comfy_runs(entanglement, node_id="9").execute(**defaults(entanglement) | {"trace": reworded,
                                                                                      "baseline": trace})
    lines = texts[-1].splitlines()
    assert lines[1].startswith("against the baseline: mIoU ") and lines[2].startswith(
        f"note: the baseline differs in attribution prompt ({trace.run.get('attribution_prompt', 'n/a')}, this run a "
        f"photo of a woman doctor): the change is not guidance's alone")
    with torch.inference_mode():
        as_comfy_runs(entanglement, node_id="9").execute(**defaults(entanglement) | {"trace": trace,
                                                                                      "baseline": reworded})
    assert "note: the baseline was guided (λ 100) and this run not" in texts[-1]


def test_a_node_run_per_item_of_a_list_input_shows_every_items_text_numbered_not_the_last_alone(nodes_and_trace,
                                                                                                  monkeypatch):
    # Rebatch Latents makes a list: ComfyUI runs the node once per batch, and each text replaces the last on the page.
    from comfy_execution.utils import CurrentNodeContext

    entanglement, trace = nodes_and_trace[2], nodes_and_trace[3]
    texts = page_texts(monkeypatch)
    one = copy.deepcopy(trace)
    one.maps = {stage: maps[:, :1] for stage, maps in trace.maps.items()}
    one.guidance = {key: value[:, :1] for key, value in trace.guidance.items()}
    one.latent_shape = [1, *trace.latent_shape[1:]]
    node = as_comfy_runs(entanglement, node_id="9")
    with torch.inference_mode():
        for prompt_id, batch in (("alone", trace), ("alone too", one)):  # each batch queued alone: its own text
            with CurrentNodeContext(prompt_id, "9", 0):
                node.execute(**defaults(entanglement) | {"trace": batch})
        for prompt_id in ("a list", "the list again"):
            for index, batch in enumerate((trace, one)):
                with CurrentNodeContext(prompt_id, "9", index):
                    node.execute(**defaults(entanglement) | {"trace": batch})
    whole, alone = texts[:2]
    assert "mIoU " in whole and whole != alone
    assert texts[2] == whole  # a list's first item: sent as a node run once sends it
    assert texts[3] == f"list item 1:\n{whole}\n\nlist item 2:\n{alone}"
    assert texts[4:] == texts[2:4]  # the next prompt's list starts anew
    with torch.inference_mode(), CurrentNodeContext("no list", "9", 0):
        node.execute(**defaults(entanglement) | {"trace": one})
    assert texts[-1] == alone


@pytest.mark.parametrize("mask", ["normalized", "thresholded"])
def test_attribution_map_draws_an_image_whose_maps_overflowed_empty_and_says_so(nodes_and_trace, caplog, mask):
    import copy

    attribution_map, trace = nodes_and_trace[1], copy.deepcopy(nodes_and_trace[3])
    trace.maps["down_1"][0, 1, trace.positions("gender")[0], 0, 0] = float("nan")  # image 1 overflowed
    with torch.inference_mode():
        heat, out_mask = attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "mask": mask}).result
    assert torch.isfinite(heat).all() and torch.isfinite(out_mask).all()
    assert not out_mask[1].any() and out_mask[0].any()  # image 0 keeps its map
    assert "image(s) 1 of the batch hold NaN or inf in the maps of 'gender'" in caplog.text
    if mask == "normalized":  # on the whole batch's scale, image 0's own: the empty image sets no minimum
        with torch.inference_mode():
            shared = attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "mask": mask,
                                                                             "scale": "whole batch"}).result[1]
        assert torch.equal(shared, out_mask)


def test_the_map_nodes_show_their_pictures_on_themselves_and_entanglement_draws_at_image_size(nodes_and_trace):
    # At latent size (32×32 here) the picture's label covered it and cut the IoU short.
    _, attribution_map, entanglement, trace = nodes_and_trace
    with torch.inference_mode():
        heat = attribution_map.execute(**defaults(attribution_map) | {"trace": trace})
        measured = entanglement.execute(**defaults(entanglement) | {"trace": trace, "resolution": "latent"})
    assert len(heat.ui.as_dict()["images"]) == 2 and len(measured.ui["images"]) == 2
    assert "IoU" in measured.ui["text"][0]
    assert picture(measured).shape[1:3] == trace.image_size == (256, 256)
    assert "masks at 32×32" in measured.result[2]  # measured where asked


def test_an_image_of_another_shape_than_the_latents_is_drawn_on_with_a_warning(nodes_and_trace, caplog):
    _, attribution_map, entanglement, trace = nodes_and_trace
    warning = "the image is 128×256, a shape other than the decoded latent's (256×256)"
    for node in (attribution_map, entanglement):
        caplog.clear()
        with torch.inference_mode():
            out = node.execute(**defaults(node) | {"trace": trace, "image": torch.rand(2, 256, 128, 3)})
        assert warning in caplog.text
        if node is entanglement:  # on the page too: its report says so, where the console is out of sight
            assert f"picture: {warning}" in out.result[2] and f"picture: {warning}" in out.ui["text"][0]
        caplog.clear()
        with torch.inference_mode():
            out = node.execute(**defaults(node) | {"trace": trace, "image": torch.rand(2, 512, 512, 3)})  # scaled
        assert "shape other" not in caplog.text
        assert node is not entanglement or "picture:" not in out.result[2]


def test_one_picture_drawn_under_the_maps_of_several_latents_is_said_on_the_node(nodes_and_trace, caplog):
    # Image From Batch's one picture under every image's maps: allowed (a reference picture), but not unsaid.
    _, attribution_map, entanglement, trace = nodes_and_trace  # a trace of 2 latents
    said = "one picture is drawn under the maps of each of the trace's 2 latents: connect the images decoded"
    for node in (attribution_map, entanglement):
        caplog.clear()
        with torch.inference_mode():
            out = node.execute(**defaults(node) | {"trace": trace, "image": torch.rand(1, 256, 256, 3)})
        assert said in caplog.text
        assert node is not entanglement or f"picture: {said}" in out.result[2]


def test_the_attribution_maps_thresholded_mask_keeps_the_top_1_minus_q(nodes_and_trace):
    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    for q in (0.7, 0.9):
        with torch.inference_mode():
            _, mask = attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "mask": "thresholded",
                                                                             "q": q}).result
        assert mask.shape == (2, 256, 256) and float(mask.mean()) == pytest.approx(1 - q, abs=0.01)


def test_the_generation_prompt_is_read_from_the_graph_where_it_is_typed_text(pack):
    from biasmap_pack.nodes.prompt_graph import generation_prompt

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"positive": ["7", 0], "negative": ["7", 1]}},
             "7": {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["5", 0], "negative": ["6", 0]}},
             "5": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["10", 0]}},
             "10": {"class_type": "GLIGENTextBoxApply", "inputs": {"conditioning_to": ["4", 0], "text": "a tie"}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0], "clip": ["1", 1]}},
             "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a photo of a doctor"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}}}
    assert generation_prompt(graph, "3") == "a photo of a doctor"
    assert generation_prompt(graph, 3, "negative") == "blurry"  # ComfyUI's unique_id is a string; either works
    graph["4"]["inputs"]["text"] = ["8", 0]  # text a node makes while the graph runs: its template is not the prompt
    graph["8"] = {"class_type": "DPRandomGenerator", "inputs": {"text": "a photo of a {doctor|nurse}"}}
    assert generation_prompt(graph, "3") == ""
    graph["7"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["6", 0]}}
    assert generation_prompt(graph, "3", "negative") == ""  # two texts, neither the prompt
    assert generation_prompt(None, None) == generation_prompt({}, "3") == ""  # outside ComfyUI's executor


def test_the_generation_prompt_of_an_audit_plan_is_the_one_its_run_makes_unless_an_input_is_linked(pack):
    from biasmap_pack.nodes import BiasMapAuditPrompts
    from biasmap_pack.nodes.prompt_graph import generation_prompt

    plan = defaults(BiasMapAuditPrompts) | {"run": 20}
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"positive": ["4", 0]}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 0], "clip": ["1", 1]}},
             "2": {"class_type": "BiasMapAuditPrompts", "inputs": plan}}
    made = BiasMapAuditPrompts.execute(**plan).result
    assert generation_prompt(graph, "3") == made[0] == "A photo of the face of a artist"  # run 20: seed 1
    assert made[1:] == ("A photo of the face of a artist and gender", "gender", "artist", 1,
                        "run 20 of runs 0–1899: artist, seed 1")
    graph["4"]["inputs"]["text"] = ["2", 1]  # the attribution prompt: not what the picture was made of
    assert generation_prompt(graph, "3") == ""
    graph["4"]["inputs"]["text"] = ["2", 0]
    graph["2"]["inputs"] = plan | {"run": ["9", 0]}  # the run number made while the graph runs
    assert generation_prompt(graph, "3") == ""
    checked = {k: plan[k] for k in ("run", "subjects", "seeds")}  # the others keep ComfyUI's own range checks
    assert BiasMapAuditPrompts.validate_inputs(**checked | {"run": None}) is True  # linked: checked when it runs
    assert "the pass is complete" in BiasMapAuditPrompts.validate_inputs(**checked | {"run": 1900})
    # ComfyUI skips its own range check of inputs that validate_inputs names: an API client's values are checked here.
    before = "run -1 is before this audit's first run: set run to 0 to begin it"
    assert BiasMapAuditPrompts.validate_inputs(**checked | {"run": -1}).startswith(before)
    assert BiasMapAuditPrompts.validate_inputs(**checked | {"run": 10_000_001}).startswith("run 10000001 is past")
    assert BiasMapAuditPrompts.validate_inputs(run=0, subjects="doctor", seeds=100_000) is True  # bounds included
    assert "is past 10,000,000" not in BiasMapAuditPrompts.validate_inputs(**checked | {"run": 10_000_000})
    for run in (0, None):  # typed, or linked: the typed seeds are checked either way
        assert BiasMapAuditPrompts.validate_inputs(**checked | {"run": run, "seeds": 100_001}) == (
            "seeds 100001 is outside 1–100,000: set it within")
    # The template and the demographic when queued too, also where the subjects are linked.
    typed = checked | {"template": plan["template"], "demographic": "gender, Gender"}
    for subjects in (plan["subjects"], None):
        assert BiasMapAuditPrompts.validate_inputs(**typed | {"subjects": subjects}).startswith(
            "demographic concept(s) listed twice: Gender")
    assert "has no {} for the subject" in BiasMapAuditPrompts.validate_inputs(**checked | {"template": "a photo"})
    for value, message in (({"run": -1}, before), ({"seeds": 0}, "seeds 0 is outside")):  # linked: checked when it runs
        with pytest.raises(ValueError, match=message):
            BiasMapAuditPrompts.execute(**plan | value)


@pytest.mark.parametrize("scale", [100.0, 400.0])
def test_a_lambda_from_the_papers_quality_collapse_on_is_noted_in_the_trace(sd15, prompts, pack, scale):
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=1,
                                                  sampler_name="euler", scheduler="normal", guidance_scale=scale,
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    with torch.inference_mode():
        trace = BiasMapGuidedKSampler.execute(**args).result[1]
    noted = [note for note in trace.notes if "image quality collapses" in note]
    assert noted == ([] if scale < 400 else [
        "λ 400 is at or above 400, from which the paper finds image quality collapses on SD 1.5 (FID above 100); "
        "λ 100 keeps most of the reduction"])


def one_step_sampler(sd15, prompts):
    """Node "3" of a graph, a one-step BiasMap sampler, run as ComfyUI runs it (``run(graph)``), and the model
    evaluations it made."""
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    counted, evaluated = counting_evaluations(model)
    args = defaults(BiasMapGuidedKSampler) | dict(model=counted, clip=clip, positive=pos, negative=neg, steps=1,
                                                  sampler_name="euler", scheduler="normal",
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)})

    def run(graph):
        with torch.inference_mode():
            return as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)

    return run, evaluated


def test_a_word_that_a_node_reading_the_trace_lacks_is_refused_before_the_sampler_samples(sd15, prompts, pack,
                                                                                          monkeypatch):
    # Those nodes run after the sampler and cannot see its attribution prompt when queued: a typo cost the whole run.
    from biasmap_pack.biasmap_engine.host import sampling

    run, evaluated = one_step_sampler(sd15, prompts)
    encoded = []
    encode = sampling.encode_attribution
    monkeypatch.setattr(sampling, "encode_attribution",
                        lambda clip, text: encoded.append(text) or encode(clip, text))
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "8": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "11": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "Gender,"}},
             "12": {"class_type": "BiasMapEntanglementIoU",
                    "inputs": {"trace": ["8", 1], "baseline": ["3", 1], "concept_a": "", "concept_b": "docter"}},
             "13": {"class_type": "BiasMapAuditLog", "inputs": {"trace": ["8", 1], "concept_a": "gendre",
                                                                "concept_b": ["20", 0]}}}
    with pytest.raises(ValueError, match=r"^Entanglement IoU \(node 12\) asks for concept_b 'docter', which is not a "
                                         r"word of this sampler's attribution prompt 'A photo of the face of a doctor "
                                         r"and gender' \(its words: .*\): correct its concept_b input"):
        run(graph)
    assert evaluated == [] and encoded == []  # refused before the attribution prompt is encoded, too
    graph["12"]["inputs"]["concept_b"] = "doctor"  # node 13 reads another sampler's trace: that one checks it
    assert run(graph).result[1].steps.numel() == 1 and evaluated
    assert encoded == ["A photo of the face of a doctor and gender"]  # the spy sees the encoding when there is one


@pytest.mark.parametrize("node, concept_a, concept_b, told", [
    ("BiasMapEntanglementIoU", "", "gender", r"Entanglement IoU \(node 12\) measures concept_a 'gender' \(the first "
                                             r"demographic concept of this sampler, as concept_a is empty\) against "
                                             r"concept_b 'gender'"),
    ("BiasMapEntanglementIoU", "face of", "face", r"Entanglement IoU \(node 12\) measures concept_a 'face of' against "
                                                  r"concept_b 'face'"),
    ("BiasMapAuditLog", "gender, doctor", "", r"Audit Log \(node 12\) measures concept_a 'doctor' against concept_b "
                                              r"'doctor' \(every semantic concept of this sampler, as concept_b is "
                                              r"empty\)"),
])
def test_a_node_that_would_measure_a_concept_against_itself_is_refused_before_the_sampler_samples(
        sd15, prompts, pack, node, concept_a, concept_b, told):
    # Its overlap with itself is 1 whatever the image, which the node refuses after the sampler ran: the run was lost.
    run, evaluated = one_step_sampler(sd15, prompts)
    reader = {"class_type": node, "inputs": {"trace": ["3", 1], "concept_a": concept_a, "concept_b": concept_b}}
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}}, "12": reader}
    with pytest.raises(ValueError, match=rf"^{told}, which share words of this sampler's attribution prompt 'A photo "
                                         rf"of the face of a doctor and gender': .* Checked before sampling"):
        run(graph)
    assert evaluated == []
    reader["inputs"] |= {"concept_a": "", "concept_b": ""}  # the sampler's own concepts, which it keeps apart
    graph["13"] = {"class_type": node, "inputs": {"trace": ["3", 1], "concept_a": "face", "concept_b": "doctor"}}
    reader["inputs"]["concept_b"] = "face"  # a concept of another node: a pair is one node's two inputs
    assert run(graph).result[1].steps.numel() == 1 and evaluated


@pytest.mark.parametrize("node, shown", [("BiasMapAttributionMap", "Attribution Map"),
                                         ("BiasMapEntanglementIoU", "Entanglement IoU"),
                                         ("BiasMapAuditLog", "Audit Log")])
def test_a_step_window_that_ends_before_it_starts_is_refused_before_the_sampler_samples(sd15, prompts, pack, node,
                                                                                        shown):
    # Those nodes refuse it when they run, after the sampler: ComfyUI then stops the graph, and the run is lost.
    run, evaluated = one_step_sampler(sd15, prompts)
    reader = {"class_type": node, "inputs": {"trace": ["3", 1], "first_step": 5, "last_step": 2}}
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}}, "12": reader}
    with pytest.raises(ValueError, match=rf"^{shown} \(node 12\): first_step 5 is after last_step 2: set it to at most "
                                         rf"2 \(advanced inputs of that node: if it hides them, right-click it and "
                                         rf"choose Show Advanced\)\. Checked before sampling, so that the run is not "
                                         rf"lost to it\.$"):
        run(graph)
    assert evaluated == []
    reader["inputs"] |= {"first_step": 1, "last_step": 10000}  # past the one step this sampler runs
    with pytest.raises(ValueError, match=rf"^{shown} \(node 12\): first_step 1 is past this sampler's last step, 0: "
                                         rf"set first_step to at most 0 \(advanced inputs of that node: "):
        run(graph)
    assert evaluated == []
    reader["inputs"]["first_step"] = 0
    assert run(graph).result[1].steps.numel() == 1 and evaluated


def test_a_step_window_of_a_node_not_queued_does_not_stop_the_sampler(sd15, prompts, pack, monkeypatch):
    # "Queue Selected Output Nodes": the Attribution Map does not run, and its window is not the run's concern.
    import biasmap_pack.nodes.guided_ksampler as guided_ksampler

    run, evaluated = one_step_sampler(sd15, prompts)
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "12": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "first_step": 5,
                                                                      "last_step": 2}},
             "16": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0]}}}
    monkeypatch.setattr(guided_ksampler, "queued_outputs", lambda: ["16"])
    assert run(graph).result[1].steps.numel() == 1 and evaluated
    monkeypatch.setattr(guided_ksampler, "queued_outputs", lambda: ["12", "16"])
    with pytest.raises(ValueError, match=r"first_step 5 is after last_step 2"):
        run(graph)


def test_the_step_windows_asked_of_a_trace_are_those_typed_into_the_nodes_reading_it(pack):
    from biasmap_pack.nodes.prompt_graph import step_windows_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "8": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "11": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "first_step": 3,
                                                                      "last_step": 1}},
             "12": {"class_type": "BiasMapEntanglementIoU", "_meta": {"title": "λ 100 vs 0"},
                    "inputs": {"trace": ["8", 1], "baseline": ["3", 1], "first_step": 0, "last_step": 10000}},
             "13": {"class_type": "BiasMapAuditLog", "inputs": {"trace": ["3", 1]}},  # saved before the window
             "14": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "first_step": ["20", 0],
                                                                      "last_step": 4}},  # linked: read as it runs
             "15": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 0], "first_step": 9,
                                                                      "last_step": 1}},  # not a trace: a latent
             "16": {"class_type": "SaveImage", "inputs": {"images": ["11", 0]}},
             "17": {"class_type": "BiasMapSaveTrace", "inputs": {"trace": ["3", 1], "filename_prefix": "biasmap/t"}}}
    assert step_windows_of(graph, "3") == [("Attribution Map", "11", 3, 1),
                                           ('Entanglement IoU "λ 100 vs 0"', "12", 0, 10000)]
    assert step_windows_of(graph, 3, ["16"]) == [("Attribution Map", "11", 3, 1)]
    assert step_windows_of(graph, "8") == [('Entanglement IoU "λ 100 vs 0"', "12", 0, 10000)]


@pytest.mark.parametrize("node", ["BiasMapEntanglementIoU", "BiasMapAuditLog"])
def test_a_concept_typed_in_both_inputs_of_a_node_is_refused_when_queued(pack, node):
    nodes = {"BiasMapEntanglementIoU": pack.nodes.BiasMapEntanglementIoU, "BiasMapAuditLog": pack.nodes.BiasMapAuditLog}
    validate = nodes[node].validate_inputs
    assert validate(concept_a="Gender", concept_b="gender") == (
        "concept_a and concept_b both hold 'gender' (CLIP reads capitals as lower case and spaces as one), whose "
        "overlap with itself is 1 whatever the image: type in concept_a a demographic word and in concept_b a semantic "
        "one")
    assert validate(concept_a="gender", concept_b="doctor") is True
    assert validate(concept_a="", concept_b="gender") is True  # the trace's own concept: the sampler checks it
    assert validate(concept_a=None, concept_b="gender") is True  # linked: checked when the node runs


def test_a_concept_linked_into_both_inputs_of_audit_log_is_refused_when_it_runs(nodes_and_trace, pack):
    trace, audit_log = nodes_and_trace[3], pack.nodes.BiasMapAuditLog
    with pytest.raises(ValueError, match="concept_a and concept_b both hold 'Gender'"):
        audit_log.execute(**defaults(audit_log) | {"trace": trace, "concept_a": "gender", "concept_b": "Gender"})


def test_the_words_a_node_asks_for_are_all_named_with_the_typing_habit_that_explains_them(pack):
    from biasmap_pack.nodes.concepts import check_words_asked
    from biasmap_pack.nodes.prompt_graph import WordsAsked

    asked = [WordsAsked("Audit Log", "13", "concept_b", "docter, doctor", "")]  # a typo, and 'd + octor
    with pytest.raises(ValueError, match=r"asks for concept_b 'docter', 'doctor', which.* remove the single quotes"):
        check_words_asked(asked, "a 'doctor' and a nurse of gender")


def test_an_empty_concept_of_a_node_comparing_with_this_trace_is_checked_as_the_other_samplers_first_concept(
        sd15, prompts, pack):
    # Entanglement IoU measures its baseline with the words of its trace input; an empty concept stands for that
    # trace's first concept, which this sampler (the baseline) must also have, or the comparison fails after both ran.
    run, evaluated = one_step_sampler(sd15, prompts)
    guided = {"class_type": "BiasMapGuidedKSampler", "inputs": {"demographic": "woman, man", "semantic": "doctor"}}
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}}, "8": guided,
             "12": {"class_type": "BiasMapEntanglementIoU",
                    "inputs": {"trace": ["8", 1], "baseline": ["3", 1], "concept_a": " ", "concept_b": ""}}}
    with pytest.raises(ValueError, match=r"^Entanglement IoU \(node 12\) asks for concept_a 'woman' \(the first "
                                         r"demographic concept of its trace input, as concept_a is empty\), which is "
                                         r"not a word of this sampler's attribution prompt .*: type in its concept_a "
                                         r"input a word of both prompts, or add the word to the attribution prompt"):
        run(graph)
    assert evaluated == []
    guided["inputs"]["demographic"] = ["2", 0]  # made while the graph runs: not known when queued
    assert run(graph).result[1].steps.numel() == 1
    graph["12"]["inputs"]["trace"] = ["3", 1]  # its own trace: its own first concept
    guided["inputs"]["demographic"] = "woman"
    assert run(graph).result[1].steps.numel() == 1


def test_with_some_outputs_queued_only_the_nodes_that_run_for_them_are_asked_for_their_words(pack):
    # "Queue Selected Output Nodes" sends the whole graph and the outputs to run; the others' nodes do not run.
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "9": {"class_type": "SaveImage", "inputs": {"images": ["11", 0]}},
             "11": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "gender"}},
             "12": {"class_type": "BiasMapEntanglementIoU",
                    "inputs": {"trace": ["3", 1], "concept_a": "gendre", "concept_b": "doctor"}}}
    every = [("Attribution Map", "11", "word", "gender", ""), ("Entanglement IoU", "12", "concept_a", "gendre", ""),
             ("Entanglement IoU", "12", "concept_b", "doctor", "")]
    assert words_asked_of(graph, "3") == every
    assert words_asked_of(graph, "3", ["9"]) == every[:1]  # the map runs for the Save Image that reads its picture
    assert words_asked_of(graph, 3, [12]) == every[1:]
    assert words_asked_of(graph, "3", []) == []


def test_the_words_asked_of_a_trace_are_each_word_input_and_an_empty_one_the_first_concept_of_its_own_list(pack):
    # concept_a stands for the trace input's first demographic concept, concept_b for its first semantic one; an empty
    # word of a node reading this sampler's own trace is its own concept, which validation already checked.
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"demographic": "gender", "semantic": "doctor"}},
             "8": {"class_type": "BiasMapGuidedKSampler", "inputs": {"demographic": "woman, man",
                                                                     "semantic": "nurse, pilot"}},
             "11": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": ""}},
             "12": {"class_type": "BiasMapEntanglementIoU",
                    "inputs": {"trace": ["8", 1], "baseline": ["3", 1], "concept_a": "", "concept_b": ""}},
             "13": {"class_type": "BiasMapAuditLog", "inputs": {"trace": ["3", 1], "concept_a": "gender",
                                                                "concept_b": "docter"}}}
    assert words_asked_of(graph, "3") == [
        ("Entanglement IoU", "12", "concept_a", "woman",
         "the first demographic concept of its trace input, as concept_a is empty"),
        ("Entanglement IoU", "12", "concept_b", "nurse",
         "the first semantic concept of its trace input, as concept_b is empty"),
        ("Audit Log", "13", "concept_a", "gender", ""), ("Audit Log", "13", "concept_b", "docter", "")]


def test_the_model_and_the_scheduler_behind_sigmas_are_read_from_the_graph_where_they_are_named(pack):
    from biasmap_pack.nodes.prompt_graph import graph_run

    graph = {"3": {"class_type": "BiasMapGuidedKSamplerAdvanced",
                   "inputs": {"model": ["13", 0], "sigmas": ["14", 0], "positive": ["4", 0], "negative": ["4", 0]}},
             "13": {"class_type": "FreeU_V2", "inputs": {"model": ["12", 0], "b1": 1.3}},
             "12": {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["11", 0], "lora_name": "style.safetensors", "strength_model": 1.0}},
             "11": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                           "lora_name": "detail.safetensors", "strength_model": 0.8}},
             "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/v1-5.safetensors"}},
             "14": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 20,
                                                               "denoise": 0.6}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}}}
    assert graph_run(graph, "3") == {"generation_prompt": "a photo", "negative_prompt": "a photo",
                                     "model": "sd15/v1-5.safetensors + detail.safetensors (0.8) + style.safetensors "
                                              "+ FreeU_V2 (b1 1.3)", "scheduler": "karras", "denoise": 0.6}
    graph["14"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["15", 0], "step": 10}}  # part of a schedule
    graph["12"]["inputs"]["strength_model"] = ["16", 0]  # a linked strength
    graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "unet.safetensors"}}
    assert graph_run(graph, "3") == {"generation_prompt": "a photo", "negative_prompt": "a photo",
                                     "model": "unet.safetensors + detail.safetensors (0.8) + style.safetensors "
                                              "(linked strength) + FreeU_V2 (b1 1.3)"}
    graph["1"]["inputs"] |= {"weight_dtype": "default"}  # as the page saves it: the file's own weights
    assert graph_run(graph, "3")["model"].startswith("unet.safetensors + detail")
    graph["1"]["inputs"] |= {"weight_dtype": "fp8_e4m3fn"}  # other weights, another model to an audit
    assert graph_run(graph, "3")["model"].startswith("unet.safetensors (fp8_e4m3fn) + detail")
    graph["1"]["inputs"] |= {"weight_dtype": "default"}
    graph["13"]["inputs"] = {"model": ["12", 0], "b1": ["17", 0], "b2": 1.4}  # a linked value: not known here
    assert graph_run(graph, "3")["model"].endswith(" + FreeU_V2 (b1 linked, b2 1.4)")
    graph["13"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["12", 0], "sampling": "v_prediction",
                                                                     "zsnr": True}}
    assert graph_run(graph, "3")["model"].endswith(" + ModelSamplingDiscrete (sampling v_prediction, zsnr on)")
    graph["13"] = {"class_type": "Power Lora Loader (rgthree)", "inputs": {"model": ["12", 0], "lora_1": {"on": True}}}
    assert graph_run(graph, "3")["model"].endswith("+ Power Lora Loader (rgthree)")  # what it applied is its own
    graph["12"] = {"class_type": "HypernetworkLoader",
                   "inputs": {"model": ["11", 0], "hypernetwork_name": "style.pt", "strength": 0.5}}
    graph["4"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a photo", "text_l": "photo"}}
    assert graph_run(graph, "3")["model"] == ("unet.safetensors + detail.safetensors (0.8) + style.pt (0.5) "
                                              "+ Power Lora Loader (rgthree)")
    assert graph_run(graph, "3")["generation_prompt"] == "a photo | photo"  # SDXL's: both encoders read theirs
    graph["4"]["inputs"]["text_l"] = ["5", 0]
    graph["5"] = {"class_type": "PrimitiveString", "inputs": {"value": "a photo"}}
    assert graph_run(graph, "3")["generation_prompt"] == "a photo"  # the same text twice, through a primitive
    graph["5"] = {"class_type": "WildcardProcessor", "inputs": {"text": "a {doctor|nurse}"}}
    assert graph_run(graph, "3")["generation_prompt"] == ""  # text_l made while the graph runs: no one typed text
    graph["4"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"text": "a photo", "ascore": 6.0}}
    assert graph_run(graph, "3")["generation_prompt"] == "a photo"
    graph["11"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["1", 0]}}
    assert graph_run(graph, "3")["model"] == ""  # made from two: no one file
    graph["11"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "flux1-dev-Q4_K_S.gguf"}}  # another pack's
    assert graph_run(graph, "3")["model"].startswith("flux1-dev-Q4_K_S.gguf + style.pt (0.5)")  # named by its file
    graph["11"] = {"class_type": "SomeModelMaker", "inputs": {"preset": 3}}
    assert graph_run(graph, "3")["model"].startswith("SomeModelMaker + style.pt (0.5)")  # no file: by its class
    assert graph_run(None, None) == {"generation_prompt": "", "negative_prompt": "", "model": ""}


def test_the_model_names_its_text_encoders_where_a_lora_clip_skip_or_hooks_changed_them(pack):
    # A LoRA's CLIP strength, CLIP Set Last Layer or hooks change the picture and the maps: runs that differ there must
    # not pair in an audit as the same model, nor go unnamed in a baseline report.
    from biasmap_pack.nodes.prompt_graph import graph_run

    graph = {"3": {"class_type": "BiasMapGuidedKSampler",
                   "inputs": {"model": ["11", 0], "clip": ["1", 1], "positive": ["5", 0], "negative": ["4", 0]}},
             "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
             "11": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "d.pt",
                                                           "strength_model": 0.8, "strength_clip": 0.5}},
             "12": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["11", 1], "stop_at_clip_layer": -2}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "5": {"class_type": "ConditioningSetTimestepRange",
                   "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 1.0}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}}}
    model = "v1-5.safetensors + d.pt (0.8)"

    def named(**clips):
        """The model's name with the clip inputs of these nodes linked to these links."""
        for node, link in clips.items():
            graph[node.removeprefix("n")]["inputs"]["clip"] = link
        return graph_run(graph, "3")["model"]

    assert named() == model  # the checkpoint's own CLIP everywhere: unnamed, as in files logged before
    changed = "v1-5.safetensors + d.pt (0.5) + last layer -2"
    assert named(n6=["12", 0], n4=["12", 0], n3=["12", 0]) == f"{model} · clip: {changed}"
    assert named(n4=["1", 1]) == f"{model} · clip: {changed}, negative clip: v1-5.safetensors"
    assert named(n3=["1", 1]) == f"{model} · clip: {changed}, negative clip: v1-5.safetensors, attribution clip: " \
                                 "v1-5.safetensors"
    assert named(n6=["1", 1], n3=["12", 0]) == f"{model} · clip: v1-5.safetensors, attribution clip: {changed}"
    graph["12"]["inputs"]["stop_at_clip_layer"] = ["20", 0]
    graph["11"]["inputs"]["strength_clip"] = 0  # ComfyUI applies nothing to the CLIP
    assert named() == f"{model} · clip: v1-5.safetensors, attribution clip: v1-5.safetensors + last layer (linked)"
    graph["13"] = {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "hooks": ["14", 0],
                                                            "apply_to_conds": True, "schedule_clip": False}}
    assert named(n6=["13", 0], n3=["1", 1]) == f"{model} · clip: v1-5.safetensors + SetClipHooks, " \
                                               "negative clip: v1-5.safetensors, attribution clip: v1-5.safetensors"
    graph["15"] = {"class_type": "CLIPLoader",
                   "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}}
    assert named(n6=["15", 0], n4=["15", 0], n3=["15", 0]) == f"{model} · clip: clip_l.safetensors"
    graph["15"] = {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["1", 1], "clip2": ["16", 0], "ratio": 0.5}}
    assert named() == f"{model} · clip: CLIPMergeSimple"  # made of two: by its class, not as the checkpoint's own
    graph["5"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                  "conditioning_2": ["4", 0]}}
    assert named(n4=["1", 1], n3=["1", 1]) == model  # no one encoder: unnamed, as its prompt is
    graph["5"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"clip": ["12", 0], "text_g": "a", "text_l": "a"}}
    assert named(n4=["12", 0], n3=["12", 0]) == f"{model} · clip: v1-5.safetensors + last layer (linked)"
    graph["1"]["inputs"]["ckpt_name"] = "old.pkl"  # a file kind whose name the loader's read gives, not _loaded's
    assert named(n5=["1", 1], n4=["1", 1], n3=["1", 1]) == "old.pkl + d.pt (0.8)"


def test_every_node_takes_q_over_the_samplers_range(pack):
    # q = 0 would keep every pixel but the faintest, which the report called "top 100 % masks".
    from biasmap_pack import nodes

    ranges = {name: next((i.min, i.max, i.default) for i in getattr(nodes, name).define_schema().inputs if i.id == "q")
              for name in ("BiasMapGuidedKSampler", "BiasMapAttributionMap", "BiasMapEntanglementIoU",
                           "BiasMapAuditLog")}
    assert set(ranges.values()) == {(0.01, 0.99, 0.70)}, ranges


def entangle(trace, **inputs):
    """Entanglement IoU's outputs: IoU, mBIoU, report, picture, mask_a, mask_b, overlap."""
    from biasmap_pack.nodes import BiasMapEntanglementIoU

    with torch.inference_mode():
        return BiasMapEntanglementIoU.execute(**defaults(BiasMapEntanglementIoU) | {"trace": trace} | inputs).result


def test_the_default_step_window_is_every_step_and_the_report_names_none(nodes_and_trace):
    from biasmap_pack.nodes.common import step_window

    trace = nodes_and_trace[3]
    assert step_window(trace, 0, 10000) is None
    assert ", steps" not in entangle(trace)[2].splitlines()[0]


def test_masks_of_a_wide_trace_are_thresholded_at_its_height_and_width_at_either_resolution(nodes_and_trace):
    from biasmap_pack.nodes.common import mask_size

    wide = copy.deepcopy(nodes_and_trace[3])
    wide.latent_shape = [2, 4, 24, 40]  # as (H, W), like the image's size and the masks' last two dims
    assert mask_size(wide, "latent") == (24, 40)
    assert mask_size(wide, "image") == wide.image_size == (192, 320)


def test_an_empty_concept_input_is_the_traces_first_concept_of_its_list(nodes_and_trace):
    trace = copy.deepcopy(nodes_and_trace[3])
    trace.semantic = ["doctor", "face"]
    assert entangle(trace)[2].startswith("BiasMap entanglement of 'gender' and 'doctor'")


def test_entanglement_iou_gives_the_mean_mbiou_as_its_mbiou_output(nodes_and_trace):
    from biasmap_pack.biasmap_engine import measure_entanglement

    trace = nodes_and_trace[3]
    iou, mbiou, *_ = entangle(trace)
    assert mbiou == pytest.approx(float(measure_entanglement(trace, "gender", "doctor").mbiou.mean()))
    assert mbiou != iou


def test_entanglement_iou_hands_on_the_masks_it_measured_and_their_overlap(nodes_and_trace):
    trace = nodes_and_trace[3]
    iou, _, _, _, mask_a, mask_b, overlap = entangle(trace)
    a, b = trace.iou_and_masks("gender", "doctor", size=trace.image_size)[1]
    assert mask_a.shape == (2, *trace.image_size) and mask_a.dtype == torch.float32  # a MASK, one per image
    assert torch.equal(mask_a, a.float()) and torch.equal(mask_b, b.float())
    assert torch.equal(overlap, (a & b).float()) and overlap.any()
    assert iou == pytest.approx(float((overlap.sum((1, 2)) / (mask_a + mask_b - overlap).sum((1, 2))).mean()))


def test_entanglement_iou_hands_on_empty_masks_for_an_image_it_could_not_measure(nodes_and_trace):
    from biasmap_pack.biasmap_engine import entanglement_picture

    trace = copy.deepcopy(nodes_and_trace[3])
    for maps in trace.maps.values():  # image 1 overflowed to inf in one pixel: its IoU is n/a
        maps[0, 1, trace.positions("gender")[0], 0, 0] = float("inf")
    _, _, report, picture, mask_a, mask_b, overlap = entangle(trace)
    assert "n/a" in report
    assert not mask_a[1].any() and not mask_b[1].any() and not overlap[1].any()
    assert mask_a[0].any() and mask_b[0].any()  # image 0 measured as before
    empty = torch.zeros(1, *trace.image_size, dtype=torch.bool)
    drawn = entanglement_picture(empty, empty, torch.tensor([float("nan")]), ("gender", "doctor"))
    assert torch.equal(picture[1], drawn[0])  # nothing painted, as the label says n/a


def test_a_baseline_is_measured_at_its_own_image_size(nodes_and_trace):
    trace = nodes_and_trace[3]
    bigger = copy.deepcopy(trace)
    bigger.latent_shape = [2, 4, 64, 64]
    assert "masks (512×512, this run 256×256)" in entangle(trace, baseline=bigger)[2]


def test_the_picture_of_latent_size_masks_paints_what_they_cover(nodes_and_trace):
    from biasmap_pack.biasmap_engine import measure_entanglement

    trace = nodes_and_trace[3]
    picture = entangle(trace, resolution="latent")[3]  # 256², the masks' 32² scaled 8×
    a, b = measure_entanglement(trace, "gender", "doctor", size=(32, 32)).masks
    union = (a | b).float()[:, 8:].mean()  # below the label
    painted = (picture[:, 64:] > 0).any(-1).float().mean()
    assert float(painted) == pytest.approx(float(union), abs=0.03)


def test_attribution_map_takes_its_colormap_and_opacity(nodes_and_trace):
    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    args = defaults(attribution_map) | {"trace": trace}
    image = torch.rand(2, 256, 256, 3)
    with torch.inference_mode():
        gray = attribution_map.execute(**args | {"colormap": "gray"}).result[0]
        clear = attribution_map.execute(**args | {"opacity": 0.0}, image=image).result[0]
    assert torch.allclose(gray[..., 0], gray[..., 1]) and torch.allclose(gray[..., 1], gray[..., 2])
    assert torch.allclose(clear, image)


def test_attribution_map_blended_by_the_map_shows_the_image_where_the_word_weighs_nothing(nodes_and_trace):
    from biasmap_engine import colorize

    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    args = defaults(attribution_map) | {"trace": trace, "opacity": 0.8}
    image = torch.rand(1, 256, 256, 3)  # one image under the batch's two maps, as ComfyUI wires it
    with torch.inference_mode():
        del args["blend"]  # as a prompt saved before the input existed: uniform
        uniform = attribution_map.execute(**args, image=image).result[0]
        by_map, maps01 = attribution_map.execute(**args, image=image, blend="by map").result
    heat = colorize(maps01, "inferno")
    assert torch.allclose(uniform, torch.lerp(image, heat, 0.8), atol=1e-6)
    assert torch.allclose(by_map, torch.lerp(image, heat, 0.8 * maps01.unsqueeze(-1)), atol=1e-6)
    unseen, peak = maps01 == 0, maps01 == 1  # each image's map stretched over 0–1: both are there
    assert unseen.any() and peak.any()
    assert torch.equal(by_map[unseen], image.expand_as(by_map)[unseen])
    assert torch.allclose(by_map[peak], uniform[peak], atol=1e-6)


def test_attribution_maps_legend_names_the_word_in_the_pictures_corner_and_leaves_the_mask_and_the_rest(
        nodes_and_trace):
    from biasmap_engine import label_heatmaps

    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    args = defaults(attribution_map) | {"trace": trace, "word": '"Doctor",', "colormap": "viridis"}
    image = torch.rand(2, 256, 256, 3)
    with torch.inference_mode():
        del args["legend"]  # as a prompt saved before the input existed: none
        plain = attribution_map.execute(**args, image=image).result
        labelled = attribution_map.execute(**args, image=image, legend=True).result
    assert torch.equal(labelled[0], label_heatmaps(plain[0], "Doctor", "viridis"))  # as typed, less its quotes
    assert not torch.equal(labelled[0], plain[0]) and torch.equal(labelled[1], plain[1])


def test_the_map_nodes_say_on_themselves_which_letters_of_their_labels_no_font_here_draws(nodes_and_trace, sd15,
                                                                                           prompts, monkeypatch):
    # A console line alone goes unseen on the page: the node says which letters its picture shows as boxes.
    from biasmap_pack.biasmap_engine import labels  # the pack's, as ComfyUI loads it

    sampler, attribution_map, entanglement, _ = nodes_and_trace
    model, clip = sd15
    args = defaults(sampler) | dict(model=model, clip=clip, positive=prompts[0], negative=prompts[1], steps=1,
                                    sampler_name="euler", scheduler="normal", guidance_scale=0.0,
                                    latent_image={"samples": torch.zeros(1, 4, 32, 32)},
                                    attribution_prompt="a photo of the face of an infirmière and gender",
                                    demographic="gender", semantic="infirmière")
    texts = page_texts(monkeypatch)
    with torch.inference_mode():
        trace = sampler.execute(**args).result[1]
        as_comfy_runs(entanglement, node_id="9").execute(**defaults(entanglement) | {"trace": trace})
        assert ("as boxes" in texts[-1]) == (labels.undrawn_note("a=gender b=infirmière") is not None)  # fonts here
        monkeypatch.setattr(labels, "_FALLBACK_FONTS", ())  # Pillow's own font alone: ASCII
        labels._fonts.cache_clear()
        try:
            as_comfy_runs(entanglement, node_id="9").execute(**defaults(entanglement) | {"trace": trace})
            boxed_pair = texts[-1]
            as_comfy_runs(attribution_map, node_id="8").execute(**defaults(attribution_map) | {
                "trace": trace, "word": "infirmière", "legend": True})
            boxed_word = texts[-1]
            as_comfy_runs(attribution_map, node_id="8").execute(**defaults(attribution_map) | {
                "trace": trace, "word": "infirmière"})
        finally:
            labels._fonts.cache_clear()
    assert "the picture's label draws è as boxes: no font found here has them all" in boxed_pair
    assert "the picture's label draws è as boxes" in boxed_word and "as boxes" not in texts[-1]  # no legend: none


def test_the_image_check_warns_of_a_two_percent_crop_and_not_of_a_scaled_landscape_image(pack):
    from types import SimpleNamespace

    from biasmap_pack.nodes.common import check_images

    landscape = SimpleNamespace(num_images=1, image_size=(256, 384))
    assert check_images(torch.rand(1, 512, 768, 3), landscape, "test") is None
    assert check_images(torch.rand(1, 227, 341, 3), landscape, "test") is None  # scaled by 0.89, sizes rounded
    square = SimpleNamespace(num_images=1, image_size=(256, 256))
    assert "a shape other than" in check_images(torch.rand(1, 256, 251, 3), square, "test")  # 5 columns cropped


def test_a_plan_whose_subjects_are_linked_gives_no_generation_prompt(pack):
    from biasmap_pack.nodes import BiasMapAuditPrompts
    from biasmap_pack.nodes.prompt_graph import generation_prompt

    plan = defaults(BiasMapAuditPrompts) | {"run": 0, "subjects": ["9", 0]}
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"positive": ["4", 0]}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 0]}},
             "2": {"class_type": "BiasMapAuditPrompts", "inputs": plan}}
    assert generation_prompt(graph, "3") == ""


def test_a_diffusers_model_is_named_by_its_folder(pack):
    from biasmap_pack.nodes.prompt_graph import graph_run

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"model": ["1", 0]}},
             "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "stable-diffusion-v1-5"}}}
    assert graph_run(graph, "3")["model"] == "stable-diffusion-v1-5"


def test_attribution_map_draws_the_stages_it_is_given(nodes_and_trace):
    from biasmap_pack.biasmap_engine import normalize_maps

    attribution_map, trace = nodes_and_trace[1], nodes_and_trace[3]
    stage = trace.stages[-1]
    with torch.inference_mode():
        _, mask = attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "stages": stage}).result
    assert torch.allclose(mask, normalize_maps(trace.concept_map("gender", [stage], size=trace.image_size)), atol=1e-6)
    assert not torch.allclose(mask, normalize_maps(trace.concept_map("gender", size=trace.image_size)), atol=1e-3)


def test_attribution_map_draws_an_image_whose_maps_overflowed_only_outside_its_stages_as_any_other(nodes_and_trace,
                                                                                                  caplog):
    attribution_map, trace = nodes_and_trace[1], copy.deepcopy(nodes_and_trace[3])
    trace.maps["down_1"][0, 1, trace.positions("gender")[0], 0, 0] = float("nan")  # image 1 overflowed in down_1
    stage = trace.stages[-1]
    assert stage != "down_1"
    with torch.inference_mode():
        _, mask = attribution_map.execute(**defaults(attribution_map) | {"trace": trace, "stages": stage}).result
    assert mask[1].any() and "hold NaN or inf" not in caplog.text


def test_entanglement_iou_thresholds_at_the_q_it_is_given(nodes_and_trace):
    trace = nodes_and_trace[3]
    iou, _, report, *_ = entangle(trace, q=0.9)
    expected = trace.iou("gender", "doctor", q=0.9, size=trace.image_size)
    assert iou == pytest.approx(float(expected.mean())) and "(top 10 % masks at 256×256" in report
    assert iou != pytest.approx(float(trace.iou("gender", "doctor", size=trace.image_size).mean()))  # not q = 0.7's


def test_entanglement_iou_averages_mbiou_over_the_images_that_have_one(nodes_and_trace):
    trace = copy.deepcopy(nodes_and_trace[3])
    for maps in trace.maps.values():  # image 1 overflowed in every stage: no BIoU, so no mBIoU
        maps[0, 1, trace.positions("gender")[0], 0, 0] = float("nan")
    _, mbiou, report, *_ = entangle(trace)
    expected = trace.mbiou("gender", "doctor", size=trace.image_size)
    assert expected[1].isnan() and mbiou == pytest.approx(float(expected[0]))
    assert f"mBIoU {float(expected[0]):.4f} over 1 of 2 image(s)" in report


def test_audit_prompts_start_at_the_first_seed_and_end_their_pass_after_the_seeds_asked(pack):
    from biasmap_pack.nodes import BiasMapAuditPrompts

    plan = defaults(BiasMapAuditPrompts) | {"subjects": "doctor, nurse", "seeds": 5, "first_seed": 1000}
    assert BiasMapAuditPrompts.execute(**plan | {"run": 3}).result[3:5] == ("nurse", 1001)  # seed by seed
    assert BiasMapAuditPrompts.validate_inputs(run=9, subjects=plan["subjects"], seeds=5) is True
    assert "the pass is complete" in BiasMapAuditPrompts.validate_inputs(run=10, subjects=plan["subjects"], seeds=5)


def test_audit_prompts_walk_subject_by_subject_when_asked(pack):
    from biasmap_pack.nodes import BiasMapAuditPrompts

    made = BiasMapAuditPrompts.execute(**defaults(BiasMapAuditPrompts) | {"run": 1, "order": "subject by subject"})
    assert made.result[3:5] == ("architect", 1)


def test_the_sampler_nodes_at_lambda_0_give_the_stock_samplers_latent_bit_for_bit_with_every_sampler_and_scheduler(
        sd15, prompts, pack):
    import comfy.samplers
    import nodes
    from comfy_extras import nodes_custom_sampler as custom

    from biasmap_pack.nodes import BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced

    model, clip = sd15
    pos, neg = prompts
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    runs = [(s, "normal", 1.0) for s in comfy.samplers.KSampler.SAMPLERS]
    runs += [("euler_ancestral", s, 0.6) for s in comfy.samplers.KSampler.SCHEDULERS]  # its noise, denoise < 1
    differing = []
    with torch.inference_mode():
        for sampler, scheduler, denoise in runs:
            (stock,) = nodes.common_ksampler(model, 7, 2, 5.0, sampler, scheduler, pos, neg, latent, denoise=denoise)
            ours = BiasMapGuidedKSampler.execute(**defaults(BiasMapGuidedKSampler) | dict(
                model=model, clip=clip, seed=7, steps=2, cfg=5.0, sampler_name=sampler, scheduler=scheduler,
                positive=pos, negative=neg, latent_image=latent, denoise=denoise, guidance_scale=0.0)).result[0]
            if not torch.equal(stock["samples"], ours["samples"]):
                differing.append((sampler, scheduler))
        # The Advanced node with DisableNoise, as SamplerCustomAdvanced on the second half of split sigmas.
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4)[2:]
        sampler = comfy.samplers.sampler_object("euler_ancestral")
        guider = custom.CFGGuider.execute(model, pos, neg, 5.0)[0]
        stock = custom.SamplerCustomAdvanced.execute(custom.DisableNoise.execute()[0], guider, sampler, sigmas,
                                                     latent)[0]
        ours = BiasMapGuidedKSamplerAdvanced.execute(**defaults(BiasMapGuidedKSamplerAdvanced) | dict(
            model=model, clip=clip, noise_seed=7, cfg=5.0, sampler=sampler, sigmas=sigmas, positive=pos, negative=neg,
            latent_image=latent, guidance_scale=0.0, add_noise=False)).result[0]
    assert len(runs) > 40 and differing == []
    assert torch.equal(stock["samples"], ours["samples"])


def test_the_graph_reader_names_the_nodes_their_word_inputs_and_the_trace_output_as_their_schemas_do(pack):
    # prompt_graph reads the API prompt by node ids, input names and output slots: a schema changed alone would
    # leave the words asked of a trace unchecked before sampling, silently.
    from biasmap_pack.nodes import NODES, prompt_graph

    schemas = {schema.node_id: schema for schema in (node.define_schema() for node in NODES)}
    for node_id, (shown, names) in prompt_graph._WORD_INPUTS.items():
        inputs = {i.id: i for i in schemas[node_id].inputs}
        assert schemas[node_id].display_name.endswith(shown)
        assert all(inputs[name].get_io_type() == "STRING" for name in names)
        assert {"trace", "baseline"} & set(inputs) <= set(prompt_graph._TRACE_INPUTS)
        assert all(inputs[t].get_io_type() == "BIASMAP_TRACE" for t in prompt_graph._TRACE_INPUTS if t in inputs)
    for node_id in prompt_graph._SAMPLERS:
        outputs = [o.get_io_type() for o in schemas[node_id].outputs]
        assert outputs.index("BIASMAP_TRACE") == prompt_graph._TRACE_SLOT
        assert {"demographic", "semantic"} <= {i.id for i in schemas[node_id].inputs}
    assert set(prompt_graph._EMPTY_MEANS) <= set(prompt_graph._WORD_INPUTS["BiasMapEntanglementIoU"][1])


def test_an_empty_concept_of_a_node_reading_this_trace_stands_for_its_first_or_every_concept_as_the_node_reads_it(pack):
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "12": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "concept_a": "",
                                                                       "concept_b": "nurse"}},
             "13": {"class_type": "BiasMapAuditLog", "inputs": {"trace": ["3", 1], "concept_a": "",
                                                                "concept_b": "nurse"}}}
    own = {"demographic": ["woman", "man"], "semantic": ["doctor"]}
    assert words_asked_of(graph, "3", own=own) == [
        ("Entanglement IoU", "12", "concept_a", "woman",
         "the first demographic concept of this sampler, as concept_a is empty"),
        ("Entanglement IoU", "12", "concept_b", "nurse", ""),
        ("Audit Log", "13", "concept_a", "woman, man",
         "every demographic concept of this sampler, as concept_a is empty"),
        ("Audit Log", "13", "concept_b", "nurse", "")]
    assert words_asked_of(graph, "3") == [("Entanglement IoU", "12", "concept_b", "nurse", ""),
                                          ("Audit Log", "13", "concept_b", "nurse", "")]


def test_a_linked_attribution_prompt_missing_a_concept_is_refused_with_validations_message_before_sampling(sd15,
                                                                                                          prompts, pack):
    # Audit Prompts' template "A photo of '{}'" makes 'doctor' into 'd + octor: validation could not see the linked
    # text, and the run's own lookup names neither the list nor the quotes.
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    counted, evaluated = counting_evaluations(model)
    args = defaults(BiasMapGuidedKSampler) | dict(
        model=counted, clip=clip, positive=pos, negative=neg, steps=1, sampler_name="euler", scheduler="normal",
        latent_image={"samples": torch.zeros(1, 4, 32, 32)}, attribution_prompt="A photo of 'doctor' and gender")
    refused = r"^semantic concept\(s\) doctor not in the attribution prompt .* remove the single quotes around it"
    with torch.inference_mode(), pytest.raises(ValueError, match=refused):
        BiasMapGuidedKSampler.execute(**args)
    assert evaluated == []


def test_the_words_asked_of_a_trace_name_their_node_by_its_title_where_the_user_gave_it_one(pack):
    # The page shows titles, not ids: a workflow with two Attribution Maps needs the title to find the one meant.
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "11": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "gendre"},
                    "_meta": {"title": "Where is gender? (λ = 0)"}},
             "12": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "doctor"},
                    "_meta": {"title": "BiasMap Attribution Map"}},
             "13": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "nurse"},
                    "_meta": {"title": "Baseline Attribution Map"}},
             "14": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "man"},
                    "_meta": {"title": "  Mine  "}},
             "15": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "word": "man"},
                    "_meta": {"title": " "}}}
    assert [asked.node for asked in words_asked_of(graph, "3")] == [
        'Attribution Map "Where is gender? (λ = 0)"', "Attribution Map", 'Attribution Map "Baseline Attribution Map"',
        'Attribution Map "Mine"', "Attribution Map"]


def test_the_advanced_sampler_refuses_a_step_window_past_its_sigmas_last_step_before_it_samples(sd15, prompts, pack):
    import comfy.samplers
    from biasmap_pack.nodes import BiasMapGuidedKSamplerAdvanced

    model, clip = sd15
    pos, neg = prompts
    counted, evaluated = counting_evaluations(model)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)  # steps 0 and 1
    args = defaults(BiasMapGuidedKSamplerAdvanced) | dict(
        model=counted, clip=clip, noise_seed=0, cfg=7.0, sampler=comfy.samplers.sampler_object("euler"),
        sigmas=sigmas, positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    reader = {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["3", 1], "first_step": 2,
                                                                "last_step": 10000}}
    graph = {"3": {"class_type": "BiasMapGuidedKSamplerAdvanced", "inputs": {}}, "12": reader}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"first_step 2 is past this sampler's last step, 1: "):
        as_comfy_runs(BiasMapGuidedKSamplerAdvanced, graph, node_id="3").execute(**args)
    assert evaluated == []
    reader["inputs"]["first_step"] = 1
    with torch.inference_mode():
        assert as_comfy_runs(BiasMapGuidedKSamplerAdvanced, graph, node_id="3").execute(**args).result[1] \
            .steps.numel() == 2 and evaluated


def test_a_sampler_whose_clip_is_not_the_prompts_says_so_in_its_notes(sd15, prompts, pack):
    # The usual result of adding a LoRA to a workflow: CLIP Text Encode takes its CLIP, the sampler the checkpoint's.
    from biasmap_pack.nodes import BiasMapGuidedKSampler
    from biasmap_pack.nodes.prompt_graph import attribution_clip_apart

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=1,
                                                  sampler_name="euler", scheduler="normal",
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"clip": ["1", 1], "positive": ["6", 0]}},
             "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
             "11": {"class_type": "LoraLoader", "inputs": {"clip": ["1", 1], "lora_name": "d.pt",
                                                           "strength_clip": 0.5}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["11", 1]}}}
    assert attribution_clip_apart(graph, "3") == ("v1-5.safetensors", "v1-5.safetensors + d.pt (0.5)")
    with torch.inference_mode():
        notes = as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args).result[1].notes
    assert ("the sampler's clip (v1-5.safetensors) is not the CLIP that encoded the prompt (v1-5.safetensors + d.pt "
            "(0.5)), so the maps are of the attribution prompt as another CLIP reads it: connect the CLIP that CLIP "
            "Text Encode takes (after any LoRA or CLIP Set Last Layer) to the sampler's clip too") in notes
    graph["3"]["inputs"]["clip"] = ["11", 1]
    assert attribution_clip_apart(graph, "3") is None
    with torch.inference_mode():
        notes = as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args).result[1].notes
    assert not any("sampler's clip" in note for note in notes)
    graph["6"]["inputs"]["clip"] = ["20", 0]  # another node's CLIP, linked from a node the prompt lacks: not named
    assert attribution_clip_apart(graph, "3") is None


@pytest.mark.parametrize("kind", ["interrupt", "error"])
def test_a_sampler_stopped_by_an_interrupt_or_another_error_says_so_on_its_node(sd15, prompts, pack, monkeypatch,
                                                                                kind):
    # Its text would otherwise still give the run before's guidance counts, as if this one had run.
    import comfy.model_management as mm

    from biasmap_pack.nodes import BiasMapGuidedKSampler

    texts = page_texts(monkeypatch)
    model, clip = sd15
    pos, neg = prompts

    def stop(n, context, value, extra):
        if kind == "error":
            raise RuntimeError("out of luck")
        mm.interrupt_current_processing(True)  # the Cancel button
        return n, context, value

    stopping = model.clone()
    stopping.set_model_attn2_patch(stop)
    args = defaults(BiasMapGuidedKSampler) | dict(model=stopping, clip=clip, positive=pos, negative=neg, steps=2,
                                                  sampler_name="euler", scheduler="normal",
                                                  latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    try:
        with torch.inference_mode(), pytest.raises(RuntimeError if kind == "error" else
                                                   mm.InterruptProcessingException):
            as_comfy_runs(BiasMapGuidedKSampler, node_id="3").execute(**args)
    finally:
        mm.interrupt_current_processing(False)
    assert texts == ["stopped: interrupted" if kind == "interrupt" else "stopped: RuntimeError: out of luck"]


def test_a_one_step_window_at_the_samplers_last_step_passes_the_check_before_sampling(pack):
    from types import SimpleNamespace

    from biasmap_pack.nodes.common import check_step_windows

    def window(first_step, last_step):
        return SimpleNamespace(node="Attribution Map", node_id="12", first_step=first_step, last_step=last_step)

    check_step_windows([window(1, 1), window(0, 0), window(1, 10000)], last=1)  # neither swapped nor past the end
    check_step_windows([window(7, 10000)])  # no last step known (SIGMAS of no step): only a swap is checked
    with pytest.raises(ValueError, match=r"^Attribution Map \(node 12\): first_step 2 is past this sampler's last "
                                         r"step, 1: set first_step to at most 1 \(advanced inputs of that node"):
        check_step_windows([window(2, 2)], last=1)


def test_an_empty_concept_of_a_node_reading_the_trace_stands_for_a_concept_with_escaped_brackets_as_typed(sd15,
                                                                                                       prompts, pack):
    # "person \(elderly\)" is the concept "person (elderly)": joined from the parsed list, its brackets were read again
    # as emphasis, and the check before sampling refused a graph that runs.
    from biasmap_pack.nodes import BiasMapGuidedKSampler
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(
        model=model, clip=clip, positive=pos, negative=neg, steps=1, sampler_name="euler", scheduler="normal",
        latent_image={"samples": torch.zeros(1, 4, 32, 32)}, semantic="person \\(elderly\\)",
        attribution_prompt="A photo of a person \\(elderly\\) doctor and gender")
    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "12": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "concept_a": "",
                                                                       "concept_b": ""}}}
    with torch.inference_mode():
        _, trace = as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args).result
    assert trace.semantic == ["person (elderly)"]
    # This trace as the baseline of another sampler's, whose list the empty input stands for.
    graph["4"] = {"class_type": "BiasMapGuidedKSampler", "inputs": {"demographic": "gender",
                                                                    "semantic": "person \\(elderly\\), doctor"}}
    graph["12"]["inputs"] |= {"trace": ["4", 1], "baseline": ["3", 1]}
    assert [asked.text for asked in words_asked_of(graph, "3")] == ["gender", "person \\(elderly\\)"]  # as typed
    with torch.inference_mode():
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)


def test_the_advanced_sampler_refuses_sigmas_of_no_step_naming_a_scheduler_at_denoise_0(sd15, prompts, pack):
    import comfy.samplers
    from biasmap_pack.nodes import BiasMapGuidedKSamplerAdvanced

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSamplerAdvanced) | dict(
        model=model, clip=clip, sampler=comfy.samplers.sampler_object("euler"), positive=pos, negative=neg,
        sigmas=torch.FloatTensor([]), latent_image={"samples": torch.zeros(1, 4, 32, 32)})  # BasicScheduler's at 0
    with torch.inference_mode(), pytest.raises(ValueError, match=r"^0 sigma\(s\) make no sampling step.*\(BasicScheduler "
                                                                 r"at denoise 0 gives none, SplitSigmas at the last step "
                                                                 r"leaves low_sigmas one σ of 0: connect a schedule of "
                                                                 r"at least two sigmas, or bypass this sampler, which "
                                                                 r"then has nothing to denoise\)$"):
        BiasMapGuidedKSamplerAdvanced.execute(**args)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"^1 sigma\(s\).*\(BasicScheduler at denoise 0"):
        BiasMapGuidedKSamplerAdvanced.execute(**args | {"sigmas": sigmas[-1:]})  # SplitSigmas at the last step: 0
    # SplitSigmas at step 0: bypassed, its latent would reach the next sampler without the noise it adds.
    with torch.inference_mode(), pytest.raises(ValueError, match=r"^1 sigma\(s\) make no sampling step, so there "
                                                                 r"are no maps to record or guide \(SplitSigmas at "
                                                                 r"step 0 leaves high_sigmas so, which only noise the "
                                                                 r"latent: split at a later step, or sample the whole "
                                                                 r"schedule here\)$"):
        BiasMapGuidedKSamplerAdvanced.execute(**args | {"sigmas": sigmas[:1]})


def test_the_traces_from_load_trace_that_a_reader_compares_with_this_samplers_are_found_by_reader(pack):
    from biasmap_pack.nodes.prompt_graph import loaded_traces_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "20": {"class_type": "BiasMapLoadTrace", "inputs": {"trace_file": "old.safetensors"}},
             "21": {"class_type": "BiasMapLoadTrace", "inputs": {"trace_file": ["9", 0]}},  # linked: not known yet
             "12": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "baseline": ["20", 0]}},
             "13": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["20", 0], "baseline": ["3", 1]}},
             "14": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "baseline": ["3", 1]}},
             "15": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "baseline": ["21", 0]}},
             "16": {"class_type": "BiasMapAttributionMap", "inputs": {"trace": ["20", 0]}}}  # not this sampler's
    assert loaded_traces_of(graph, "3") == {"12": "old.safetensors", "13": "old.safetensors"}
    assert loaded_traces_of(graph, "3", outputs=["13"]) == {"13": "old.safetensors"}


def test_an_empty_concept_of_a_node_comparing_a_loaded_trace_with_this_samplers_stands_for_the_loaded_ones(pack):
    from biasmap_pack.biasmap_engine import TraceHeader, split_concepts
    from biasmap_pack.nodes.prompt_graph import words_asked_of

    graph = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}},
             "20": {"class_type": "BiasMapLoadTrace", "inputs": {"trace_file": "old.safetensors"}},
             "13": {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["20", 0], "baseline": ["3", 1],
                                                                       "concept_a": "", "concept_b": "nurse"}}}
    header = TraceHeader(tokens=[], demographic=["person (elderly)", "race"], semantic=["doctor"])
    asked = words_asked_of(graph, "3", loaded={"13": ("old.safetensors", header)})
    # The brackets are the trace's own, not emphasis; an empty concept_a stands for the first demographic concept only.
    assert [(a.input, split_concepts(a.text)) for a in asked] == [("concept_a", ["person (elderly)"]),
                                                                  ("concept_b", ["nurse"])]
    assert asked[0].stands_for == ("the first demographic concept of its trace input, the trace 'old.safetensors' "
                                   "from Load Trace, as concept_a is empty")
    assert [a.text for a in words_asked_of(graph, "3")] == ["nurse"]  # without the file's header: only what is typed


def test_a_concept_measured_against_the_one_an_empty_input_stands_for_is_refused_naming_the_empty_input(
        nodes_and_trace):
    # The sampler's check before sampling says this too; where the sampler's result is cached, only the node's own
    # check runs, and the words' lookup alone would name 'doctor' twice, one of them never typed in the node.
    _, _, entanglement, trace = nodes_and_trace  # gender; doctor
    refused = (r"^concept_a 'doctor' and concept_b 'doctor' \(the first semantic concept of the trace, as concept_b is "
               r"empty\) share words of the trace's attribution prompt, .*type in concept_a a demographic word")
    with torch.inference_mode(), pytest.raises(ValueError, match=refused):
        entanglement.execute(**defaults(entanglement) | {"trace": trace, "concept_a": "doctor", "concept_b": ""})


def test_a_pair_that_overlaps_only_in_the_baselines_prompt_is_refused_naming_the_empty_input_and_the_baseline(
        sd15, prompts, pack):
    from biasmap_pack.nodes import BiasMapEntanglementIoU, BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    run = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=1,
                                                 sampler_name="euler", scheduler="normal", guidance_scale=0.0,
                                                 latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    with torch.inference_mode():
        # 'a female' and 'female doctor' apart here, one place in the baseline's 'a female doctor'.
        trace = BiasMapGuidedKSampler.execute(**run | {"attribution_prompt": "a female nurse, the female doctor and "
                                                                             "gender", "semantic": "female doctor"})
        baseline = BiasMapGuidedKSampler.execute(**run | {"attribution_prompt": "a female doctor and gender"})
        args = defaults(BiasMapEntanglementIoU) | {"trace": trace.result[1], "concept_a": "a female", "concept_b": ""}
        BiasMapEntanglementIoU.execute(**args)  # measured in the trace alone: apart
        refused = (r"^the baseline trace: concept_a 'a female' and concept_b 'female doctor' \(the first semantic "
                   r"concept of the trace, as concept_b is empty\) share words of the baseline's attribution prompt")
        with pytest.raises(ValueError, match=refused):
            BiasMapEntanglementIoU.execute(**args | {"baseline": baseline.result[1]})


def test_the_readmes_table_of_guidance_inputs_gives_each_inputs_default_and_range_as_both_samplers_have_them(pack):
    import pathlib
    import re

    from biasmap_pack.nodes import BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("The guidance inputs of both Guided KSamplers", 1)[1].split("\n\n")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    said = {}
    for names, default, span, _ in rows:  # `start`, `end` | 0, 1 | 0–1: one cell for two inputs
        for name, value in zip(re.findall(r"`(\w+)`", names), default.split(", ")):
            said[name] = (value, span)

    def shown(value):
        return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else value

    for node in (BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced):
        inputs = {i.id: i for i in node.define_schema().inputs}
        for name, (value, span) in said.items():
            schema = inputs[name]
            assert shown(schema.default) == (shown(float(value)) if value[0].isdigit() else value), name
            if getattr(schema, "options", None):
                assert span.split(", ") == list(schema.options), name
            elif getattr(schema, "min", None) is not None:
                assert span == f"{schema.min:g}–{schema.max:g}", name
    assert set(said) == {"guidance_scale", "branch", "include_middle", "soft_topk", "q", "gamma", "gate",
                         "guided_stages", "start", "end"}
