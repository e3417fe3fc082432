import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from biasmap_engine import (STATUS, BiasMapTrace, ConceptNotFoundError, TraceFormatError, TraceRecorder, guidance_line,
                            hard_mask, iou, measure_entanglement, sum_upsampled)

TOKENS = ["<|startoftext|>", "a</w>", "doctor</w>", "and</w>", "gender</w>", "<|endoftext|>"]


def recorded_trace(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rec = TraceRecorder()
    for step, sigma in enumerate([14.6, 7.0, 2.0]):
        rec.begin(torch.tensor(sigma), torch.tensor(step))
        for _layer in range(2):
            rec.add("down_1", torch.rand(2, 6, 8, 12, generator=gen))
            rec.add("down_2", torch.rand(2, 6, 4, 6, generator=gen))
        rec.add("up_1", torch.rand(2, 6, 8, 12, generator=gen))
        guided = step > 0
        rec.end(energy=torch.rand(2, generator=gen) if guided else None,
                grad_norm=torch.rand(2, generator=gen) if guided else None,
                status=torch.tensor([STATUS["applied"], STATUS["skipped_gate"]]) if guided else None)
    return rec.finish(tokens=TOKENS, latent_shape=[2, 4, 8, 12], demographic=["gender"], semantic=["doctor"],
                      model_family="SD15", settings={"branch": "uncond", "scale": 100.0}, notes=["test"],
                      run={"seed": 7, "steps": 3, "cfg": 7.0, "sampler": "euler", "scheduler": "normal",
                           "attribution_prompt": "a doctor and gender"})


def test_recorder_sums_layers_per_stage_and_keeps_every_evaluation():
    trace = recorded_trace()
    assert trace.stages == ["down_1", "down_2", "up_1"]
    assert trace.maps["down_1"].shape == (3, 2, 6, 8, 12)
    assert trace.steps.tolist() == [0, 1, 2]
    assert trace.num_steps == 3
    assert trace.image_size == (64, 96)


def test_the_guidance_line_counts_each_outcome_over_evaluation_image_pairs_and_leaves_out_those_none_had():
    trace = recorded_trace()  # step 0 unguided; steps 1 and 2: image 0 applied, image 1 skipped by the gate
    assert guidance_line(trace) == ("guidance over (evaluation, image) pairs: not guided 2/6, applied 2/6, skipped "
                                    "gate 2/6")
    trace.guidance = {"status": torch.zeros(3, 2, dtype=torch.int8)}  # at λ = 100, as recorded
    assert guidance_line(trace) == "no evaluation was guided although λ = 100 (see the notes)"
    trace.settings = {**trace.settings, "scale": 0.0}
    assert guidance_line(trace) == "no guidance applied (λ = 0): recording only"
    trace.guidance = {}
    assert guidance_line(trace) is None  # a trace without guidance accounting


def test_concept_map_sums_steps_and_upsamples_stages():
    trace = recorded_trace()
    got = trace.concept_map("doctor", stages=["down_1", "down_2"], steps=(1, 2))
    d1 = trace.maps["down_1"][1:].sum(0)[:, 2]
    d2 = trace.maps["down_2"][1:].sum(0)[:, 2]
    assert torch.allclose(got, sum_upsampled([d1, d2], (8, 12)))


def test_maps_reach_the_requested_size_through_the_largest_attention_grid_as_ovam_aggregates():
    trace = recorded_trace()
    at_grid = trace.token_maps()
    assert at_grid.shape[-2:] == (8, 12)
    assert torch.allclose(trace.token_maps(size=(64, 96)), sum_upsampled([at_grid], (64, 96)))
    # A stage alone too: down_2 (4×6) goes to the 8×12 grid first, then to the image.
    down_2 = trace.token_maps(stages=["down_2"], size=(64, 96))
    assert torch.allclose(down_2, sum_upsampled([sum_upsampled([trace.maps["down_2"].sum(0)], (8, 12))], (64, 96)))
    assert not torch.allclose(down_2, sum_upsampled([trace.maps["down_2"].sum(0)], (64, 96)))


def test_a_word_missing_from_a_trace_is_refused_with_the_fix_a_trace_allows():
    # A saved trace cannot gain words: the words of its attribution prompt are those it was sampled with.
    with pytest.raises(ConceptNotFoundError, match=r"the concept 'nurse' is not in the attribution prompt, whose words "
                                                   r"are: a, doctor, and, gender\. Pick one of these, or sample again "
                                                   r"with it added to the sampler's attribution prompt"):
        recorded_trace().positions("nurse")


def test_a_stage_of_one_pixel_has_no_block_iou_and_is_left_out_of_mbiou():
    # A 1×1 map (a tiny latent's coarsest stage) is one value everywhere: nothing lies above its quantile, so both
    # masks are empty, and their IoU of 0 would read as no overlap at all and pull mBIoU down.
    gen = torch.Generator().manual_seed(3)
    rec = TraceRecorder()
    rec.begin(torch.tensor(14.6), torch.tensor(0))
    rec.add("down_1", torch.rand(1, 6, 8, 8, generator=gen))
    rec.add("down_8", torch.rand(1, 6, 1, 1, generator=gen))
    rec.end()
    trace = rec.finish(tokens=TOKENS, latent_shape=[1, 4, 8, 8], demographic=["gender"], semantic=["doctor"],
                       model_family="SD15", settings={}, notes=[], run={})
    blocks = trace.block_ious("doctor", "gender")
    assert blocks["down_8"].isnan().all() and blocks["down_1"].isfinite().all()
    assert torch.equal(trace.mbiou("doctor", "gender"), blocks["down_1"])
    assert trace.iou("doctor", "gender").isfinite().all()  # summed with the 8×8 stage, the map is not flat
    faint = trace.maps["down_1"].clone()
    trace.maps["down_1"] = 1 + 1e-3 * faint  # a spread of 0.1 %: small, but a map's, not rounding's
    assert trace.block_ious("doctor", "gender")["down_1"].isfinite().all()
    trace.maps["down_1"] = faint
    report = measure_entanglement(trace, "gender", "doctor").report
    assert "image(s) 0: n/a where a word's map is flat there (one value everywhere: a stage of one pixel" in report
    assert "n/a where a word's map is flat" not in measure_entanglement(recorded_trace(), "gender", "doctor").report


def test_iou_and_block_ious_follow_the_hard_mask_definition():
    trace = recorded_trace()
    maps = trace.token_maps(size=(64, 96))
    want = iou(hard_mask(maps[:, 2]), hard_mask(maps[:, 4]))
    assert torch.allclose(trace.iou("doctor", "gender", size=(64, 96)), want)
    blocks = trace.block_ious("doctor", "gender")
    assert set(blocks) == {"down_1", "down_2", "up_1"}
    assert torch.allclose(trace.mbiou("doctor", "gender"), torch.stack(list(blocks.values())).mean(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_maps_kept_in_half_precision_are_measured_as_their_values_in_fp32(dtype):
    half, wide = recorded_trace(), recorded_trace()
    for stage in half.stages:
        half.maps[stage] = half.maps[stage].to(dtype)
        wide.maps[stage] = half.maps[stage].float()  # the same values
    assert half.token_maps(size=64).dtype == torch.float32
    wider = recorded_trace()
    wider.maps = {stage: maps.double() for stage, maps in wider.maps.items()}
    assert wider.token_maps(size=64).dtype == torch.float64  # fp32 at least: float64 stays float64
    assert torch.equal(half.iou("doctor", "gender", size=256), wide.iou("doctor", "gender", size=256))
    assert torch.equal(half.mbiou("doctor", "gender", size=256), wide.mbiou("doctor", "gender", size=256))


@pytest.mark.parametrize("q", [0.0, 1.0, 1.5, -0.1])
def test_a_q_that_leaves_a_mask_nothing_or_everything_to_compare_is_refused(q):
    trace = recorded_trace()
    with pytest.raises(ValueError, match=rf"q must be a fraction between 0 and 1 .*, got {q}"):
        trace.iou("doctor", "gender", q)
    with pytest.raises(ValueError, match="q must be a fraction between 0 and 1"):
        trace.iou_and_masks("doctor", "gender", q)
    with pytest.raises(ValueError, match="q must be a fraction between 0 and 1"):
        measure_entanglement(trace, "doctor", "gender", q)


def test_a_folder_given_as_a_trace_is_named_as_one(tmp_path):
    with pytest.raises(TraceFormatError, match=r"is a folder: give the path of a trace file in it"):
        BiasMapTrace.load(str(tmp_path))


def test_the_report_shows_pieces_that_split_a_characters_bytes_as_the_word_they_spell():
    trace = recorded_trace()
    # 医生 in CLIP's byte alphabet, cut by BPE inside its characters' bytes, in the place of 'doctor'
    trace.tokens = [*TOKENS[:2], "åĮ", "»ç", "ĶŁ</w>", *TOKENS[4:]]
    for stage in trace.stages:
        trace.maps[stage] = torch.cat([trace.maps[stage][:, :, :3], trace.maps[stage][:, :, 2:]], dim=2)
    assert "tokens of '医生': 医生</w> (3 pieces)" in measure_entanglement(trace, "医生", "gender").report
    trace.tokens[2:5] = ["x", "åĮ", "»çĶŁ</w>"]  # a piece of plain letters before them: still one word shown
    assert "tokens of 'x医生': x医生</w> (3 pieces)" in measure_entanglement(trace, "x医生", "gender").report


def test_guidance_counts_cover_every_image_of_every_evaluation():
    counts = recorded_trace().guidance_counts()
    assert counts["not_guided"] == 2 and counts["applied"] == 2 and counts["skipped_gate"] == 2
    assert sum(counts.values()) == 6


def test_save_and_load_round_trip_exactly(tmp_path):
    trace = recorded_trace()
    path = str(tmp_path / "t.safetensors")
    trace.save(path, {"prompt": '{"3": {}}'})
    back = BiasMapTrace.load(path)
    assert back.run == trace.run and back.run["seed"] == 7
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["prompt"] == '{"3": {}}'  # the workflow, as ComfyUI's savers keep it
    for stage in trace.stages:
        assert torch.equal(back.maps[stage], trace.maps[stage])
    for key in trace.guidance:  # NaN where nothing was guided: equal as NaN, bit for bit otherwise
        torch.testing.assert_close(back.guidance[key], trace.guidance[key], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(back.sigmas, trace.sigmas) and torch.equal(back.steps, trace.steps)
    assert (back.tokens, back.latent_shape, back.settings, back.notes) == (
        trace.tokens, trace.latent_shape, trace.settings, trace.notes)
    assert torch.equal(back.iou("doctor", "gender"), trace.iou("doctor", "gender"))


def test_a_trace_saved_before_runs_were_kept_loads_with_an_empty_run(tmp_path):
    trace = recorded_trace()
    path = str(tmp_path / "old.safetensors")
    trace.save(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["biasmap_trace"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["run"]
    save_file(tensors, path, metadata={"biasmap_trace": json.dumps(meta)})
    back = BiasMapTrace.load(path)
    assert back.run == {} and torch.equal(back.iou("doctor", "gender"), trace.iou("doctor", "gender"))


def test_loading_a_checkpoint_or_junk_says_it_is_not_a_trace(tmp_path):
    ckpt = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(TraceFormatError, match="not a BiasMap trace"):
        BiasMapTrace.load(ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TraceFormatError, match="not a BiasMap trace"):
        BiasMapTrace.load(str(junk))


def test_a_traces_tokens_and_concepts_are_read_from_its_header_and_none_from_a_file_that_is_no_readable_trace(
        tmp_path):
    path = tmp_path / "trace.safetensors"
    recorded_trace().save(str(path))
    assert BiasMapTrace.header_of(str(path)) == (TOKENS, ["gender"], ["doctor"])
    assert BiasMapTrace.header_of(str(path)).semantic == ["doctor"]
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"), metadata={"format": "pt"})
    (tmp_path / "notes.safetensors").write_text("not a trace")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:40])
    description, tensors = _saved_parts(tmp_path)
    changes = {"later": {"version": 99}, "tokens_not_texts": {"tokens": [1, 2]}, "semantic_a_text": {"semantic": "x"},
               "no_demographic": {"demographic": None}, "version_true": {"version": True}, "no_version": {}}
    for name, change in changes.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"biasmap_trace": json.dumps(
            description | change if change else {k: v for k, v in description.items() if k != "version"})})
    for other in ("model", "lora", "notes", "damaged", "missing", *changes):
        assert BiasMapTrace.header_of(str(tmp_path / f"{other}.safetensors")) is None, other


def test_a_cut_short_damaged_or_newer_trace_says_which_and_what_to_do(tmp_path):
    path = str(tmp_path / "trace.safetensors")
    recorded_trace().save(path)
    data = open(path, "rb").read()
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["biasmap_trace"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(TraceFormatError, match="cut short.*Load a file written by BiasMapTrace.save") as raised:
        BiasMapTrace.load(str(cut))
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # as multiprocessing passes it on
    for name, description, message in (("no_notes", json.dumps({k: v for k, v in meta.items() if k != "notes"}),
                                        r"damaged or incomplete \(no 'notes'\)"),
                                       ("bad_json", "{not json", "damaged or incomplete")):
        save_file(tensors, str(tmp_path / name), metadata={"biasmap_trace": description})
        with pytest.raises(TraceFormatError, match=message):
            BiasMapTrace.load(str(tmp_path / name))
    save_file(tensors, str(tmp_path / "newer"), metadata={"biasmap_trace": json.dumps({**meta, "version": 99})})
    with pytest.raises(ValueError, match="version 99 BiasMap trace, and this BiasMap reads versions up to 1: update"):
        BiasMapTrace.load(str(tmp_path / "newer"))


def _saved_parts(tmp_path):
    """The description and tensors of a saved trace, to tamper with as a file from someone else might be."""
    path = str(tmp_path / "trace.safetensors")
    recorded_trace().save(path)
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["biasmap_trace"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("change, problem", [
    ({"latent_shape": [2, 4, 80000, 120000]}, r"latent of 120000×80000 is larger than ComfyUI's image nodes make"),
    ({"latent_shape": [2, 4, 64, 96]}, r"maps of stage down_1 are 12×8, where a 96×64 latent's are 96×64 \(as in "
                                       r"traces of runs with Kohya Deep Shrink that BiasMap saved before 2026-11-29, "
                                       r"which kept the grids layers ran at: sample such a run again to measure it\)"),
    ({"latent_shape": [2, 4, "8", 12]}, r"latent_shape \[2, 4, '8', 12\] is not a latent's \[B, C, H, W\]"),
    ({"latent_shape": {"0": 2}}, r"is not a latent's \[B, C, H, W\]"),
    ({"latent_shape": [2]}, r"is not a latent's"),
    ({"latent_shape": [2, 4, 0, 12]}, r"latent_shape \[2, 4, 0, 12\] is not a latent's \[B, C, H, W\] \(four whole "
                                      r"numbers of at least 1\)"),
    ({"latent_shape": [2, 4, 80000, 12]}, r"latent of 12×80000 is larger than ComfyUI's image nodes make"),
    # A small file of many images of a large latent (coarse maps only) would have the nodes take gigabytes each.
    ({"latent_shape": [3, 4, 2048, 2048]}, r"its 3 image\(s\) of 16384×16384 are 805,306,368 pixels, more than the "
                                          r"268,435,456 BiasMap measures at image size \(256 images of 1024²\)"),
    ({"semantic": "doctor"}, r"its semantic is not a list of texts"),
    ({"model_family": 15}, r"its model_family is not a text"),
    ({"tokens": [0, 1, 2, 3, 4, 5]}, r"its tokens is not a list of texts"),
    ({"demographic": "gender"}, r"its demographic is not a list of texts"),
    ({"notes": "hello"}, r"its notes is not a list of texts"),
    ({"settings": []}, r"its settings are not a table"),
    ({"settings": {"label": "forged"}}, r"its settings hold 'label', which are not BiasMap settings"),
    ({"settings": {"scale": "a lot"}}, r"its settings are not BiasMap settings"),
    ({"run": None}, r"its run is not a table"),
    ({"run": {"sigmas": "abc"}}, r"its run's sigmas are not a list of numbers"),
    ({"run": {"batch_index": [0]}}, r"its run's batch_index is not one whole number per image \(2\)"),
    ({"run": {"batch_index": [0, True]}}, r"its run's batch_index is not one whole number per image \(2\)"),
    ({"run": {"noise_mask": ["50.0 % (3fa2c1d9)"]}}, r"its run's noise_mask is not one text per image \(2\)"),
    ({"run": {"noise_mask": [0.5, 0.5]}}, r"its run's noise_mask is not one text per image \(2\)"),
    ({"run": {"noise_mask": []}}, r"its run's noise_mask is not one text per image \(2\)"),
    ({"run": {"start_latent": ["3fa2c1d9"]}}, r"its run's start_latent is not one text per image \(2\)"),
    ({"run": {"start_latent": "3fa2c1d9"}}, r"its run's start_latent is not one text per image \(2\)"),
    ({"run": {"sigmas": ["14.6", "7.0"]}}, r"its run's sigmas are not a list of numbers"),
    # An audit file's summaries read its rows' seeds back: one that is not a seed would stop every later summary.
    ({"run": {"seed": "abc"}}, r"its run's seed 'abc' is not a whole number from 0 to 18446744073709551615"),
    ({"run": {"seed": 1.5e300}}, r"its run's seed 1\.5e\+300 is not a whole number"),
    ({"run": {"seed": 2 ** 64}}, r"its run's seed 18446744073709551616 is not a whole number"),
    ({"run": {"seed": True}}, r"its run's seed True is not a whole number"),
    ({"run": {"steps": -5}}, r"its run's steps -5 are not a whole number of 0 or more"),
    ({"run": {"cfg": "nan"}}, r"its run's cfg is not a number"),
    ({"run": {"sampler": {"name": "euler"}}}, r"its run's sampler is not a text"),
    ({"run": {"generation_prompt": 7}}, r"its run's generation_prompt is not a text"),
    ({"run": {"add_noise": "yes"}}, r"its run's add_noise is not true or false"),
    ({"settings": {"guided_stages": [1, 2]}}, r"its settings' guided_stages are not a list of stage names"),
    ({"format": "not_biasmap"}, r"damaged or incomplete \(format 'not_biasmap'"),
    ({"version": -5}, r"damaged or incomplete \(format 'biasmap_trace', version -5\)"),
    ({"version": True}, r"damaged or incomplete \(format 'biasmap_trace', version True\)"),
])
def test_a_trace_file_whose_description_has_wrong_types_or_sizes_is_refused_naming_the_field(tmp_path, change,
                                                                                             problem):
    # A 3 KB file naming a huge latent would have the nodes draw and measure at its image size (gigabytes).
    meta, tensors = _saved_parts(tmp_path)
    save_file(tensors, str(tmp_path / "tampered"), metadata={"biasmap_trace": json.dumps({**meta, **change})})
    with pytest.raises(TraceFormatError, match=problem):
        BiasMapTrace.load(str(tmp_path / "tampered"))


def test_a_trace_that_load_would_refuse_is_refused_when_saved_and_nothing_is_written(tmp_path):
    trace = recorded_trace()
    trace.settings = {**trace.settings, "label": "mine"}  # built in a notebook: no BiasMap setting
    with pytest.raises(ValueError, match=r"cannot be saved as a file Load Trace reads: its settings hold 'label', "
                                         r"which are not BiasMap settings\. Set that field as BiasMap's sampler "
                                         r"records it$"):
        trace.save(str(tmp_path / "notebook.safetensors"))
    assert not (tmp_path / "notebook.safetensors").exists()


def test_a_trace_of_too_many_pixels_is_refused_when_saved_with_the_batch_to_make_smaller(tmp_path):
    trace = recorded_trace()
    trace.latent_shape = [300, 4, 128, 128]  # 300 images of 1024², as a sampler would record them
    with pytest.raises(ValueError, match=r"too large for a file Load Trace reads: its 300 image\(s\) of 1024×1024 "
                                         r"are 314,572,800 pixels, .* sample in batches of fewer images, and save "
                                         r"each batch's trace$"):
        trace.save(str(tmp_path / "big.safetensors"))
    assert not (tmp_path / "big.safetensors").exists()


def test_a_trace_file_whose_description_nests_too_deep_for_json_is_refused(tmp_path):
    meta, tensors = _saved_parts(tmp_path)
    save_file(tensors, str(tmp_path / "deep"), metadata={"biasmap_trace": "[" * 100000 + "]" * 100000})
    with pytest.raises(TraceFormatError, match="damaged or incomplete"):
        BiasMapTrace.load(str(tmp_path / "deep"))


@pytest.mark.parametrize("change, problem", [
    (lambda t: {k: v for k, v in t.items() if not k.startswith("maps.")}, r"it holds no maps"),
    (lambda t: t | {"maps.zz_9": t.pop("maps.up_1")}, r"maps of a stage 'zz_9', which no BiasMap records"),
    (lambda t: t | {"maps.down_1": t["maps.down_1"].long()}, r"maps of stage down_1 are not \[evaluations"),
    (lambda t: t | {"maps.down_1": t["maps.down_1"].to(torch.float8_e4m3fn)},
     r"maps of stage down_1 are not \[evaluations, images, tokens, h, w\] numbers of 16 bits or more \(they are "
     r"torch.float8_e4m3fn, \[3, 2, 6, 8, 12\]\)"),
    (lambda t: t | {"sigmas": t["sigmas"].to(torch.float8_e5m2)}, r"its sigmas are not one number per evaluation"),
    (lambda t: t | {"steps": t["steps"].float()}, r"its steps are not one step number"),
    (lambda t: t | {"steps": t["steps"] - 1}, r"its steps are not one step number \(0 or more\)"),
    (lambda t: t | {"steps": t["steps"].bool()}, r"its steps are not one step number"),
    (lambda t: t | {"maps.down_1": t["maps.down_1"][0].clone()}, r"maps of stage down_1 are not \[evaluations"),
    (lambda t: t | {"guidance.energy": t["guidance.energy"][:2].clone()}, r"guidance energy is not \[evaluations 3, "
                                                                       r"images 2\]"),
    (lambda t: t | {"guidance.status": torch.cat([t["guidance.status"][:1] + 40, t["guidance.status"][1:]])},
     r"status holds codes no BiasMap writes"),
    (lambda t: t | {"sigmas": t["sigmas"][:, None]}, r"its sigmas are not one number per evaluation"),
    (lambda t: t | {"guidance.status": t["guidance.status"][:, :1].clone()}, r"guidance status is not \[evaluations 3, "
                                                                     r"images 2\]"),
    (lambda t: t | {"guidance.status": t["guidance.status"] + 40}, r"status holds codes no BiasMap writes"),
    (lambda t: t | {"guidance.script": t["guidance.energy"].clone()}, r"its guidance holds 'script'"),
])
def test_a_trace_file_whose_tensors_have_wrong_kinds_or_shapes_is_refused_naming_them(tmp_path, change, problem):
    meta, tensors = _saved_parts(tmp_path)
    save_file(change(tensors), str(tmp_path / "tampered"), metadata={"biasmap_trace": json.dumps(meta)})
    with pytest.raises(TraceFormatError, match=problem):
        BiasMapTrace.load(str(tmp_path / "tampered"))


@pytest.mark.parametrize("tensor", ["maps.down_1", "steps", "sigmas"])
def test_a_trace_file_whose_numbers_changed_after_saving_is_refused_by_its_checksum(tmp_path, tensor):
    # Bytes a disk or a copy altered read as numbers of the right kind: NaN maps, a step 16711681.
    meta, tensors = _saved_parts(tmp_path)
    tensors[tensor].view(-1).view(torch.uint8)[:4] = 0xFF
    save_file(tensors, str(tmp_path / "altered"), metadata={"biasmap_trace": json.dumps(meta)})
    with pytest.raises(TraceFormatError, match=r"holds other maps and numbers than BiasMap saved in it \(their "
                                               r"checksum differs\): the file was changed after it was saved"):
        BiasMapTrace.load(str(tmp_path / "altered"))


def test_a_trace_file_saved_before_the_checksum_is_read_as_it_is(tmp_path):
    meta, tensors = _saved_parts(tmp_path)
    del meta["sha256"]
    tensors["maps.down_1"][0, 0, 0, 0, 0] = 7.0
    save_file(tensors, str(tmp_path / "older"), metadata={"biasmap_trace": json.dumps(meta)})
    assert BiasMapTrace.load(str(tmp_path / "older")).maps["down_1"][0, 0, 0, 0, 0] == 7.0


def test_unrecorded_stage_or_empty_step_window_errors_name_what_exists():
    trace = recorded_trace()
    with pytest.raises(ValueError, match=r"this trace has down_1 .*: choose stages among these, or 'all'$"):
        trace.concept_map("doctor", stages=["mid_8"])
    with pytest.raises(ValueError, match=r"steps 0..2: set the step window \(first_step, last_step; counted from 0\) "
                                         r"within those$"):
        trace.concept_map("doctor", steps=(5, 9))


def test_recorder_keeps_the_mean_over_the_recorded_branchs_entries():
    gen = torch.Generator().manual_seed(3)
    first, second = torch.rand(2, 1, 6, 4, 4, generator=gen)
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    for maps in (first, second):  # two conditioning entries, e.g. in two U-Net calls
        rec.add("down_1", maps, layer="input 1")
    assert torch.allclose(rec.current()["down_1"], (first + second) / 2)
    rec.end()
    trace = rec.finish(tokens=TOKENS, latent_shape=[1, 4, 4, 4])
    assert torch.allclose(trace.maps["down_1"][0], (first + second) / 2)


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_several_layers_added_at_once_count_as_added_one_by_one(strength):
    layers = torch.rand(3, 1, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    one_by_one, at_once = TraceRecorder(), TraceRecorder()
    for rec in (one_by_one, at_once):
        rec.begin(torch.tensor(1.0), torch.tensor(0))
    for i, maps in enumerate(layers):
        one_by_one.add("up_1", strength * maps, f"output {i}", strength)
    at_once.add_layers("up_1", strength * layers.sum(0), ["output 0", "output 1", "output 2"], strength)
    assert one_by_one.weighting() == at_once.weighting() == {"up_1": (pytest.approx(3 * strength), 3)}
    assert torch.allclose(at_once.current()["up_1"], layers.sum(0))
    assert torch.allclose(at_once.current()["up_1"], one_by_one.current()["up_1"])


def test_a_trace_shows_as_a_short_summary_not_its_map_values():
    text = repr(recorded_trace())
    assert text == ("BiasMapTrace(2 image(s), 3 step(s), 3 evaluation(s), stages down_1 down_2 up_1, concepts gender × "
                    "doctor, 6 tokens, model SD15)")


def test_recorder_weighs_masked_entries_per_pixel():
    first, second = torch.rand(2, 1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    left = torch.zeros(1, 1, 4, 4)
    left[..., :2] = 1.0
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    for maps, weight in ((first, left), (second, 1 - left)):  # e.g. two Conditioning (Set Mask) entries
        rec.add("down_1", weight * maps, "input 1", weight)
    assert torch.allclose(rec.current()["down_1"], torch.where(left.bool(), first, second))
    alone = TraceRecorder()  # one masked entry alone: the pixels it leaves uncovered stay 0, as in ComfyUI, not 0/0
    alone.begin(torch.tensor(1.0), torch.tensor(0))
    alone.add("down_1", left * first, "input 1", left)
    assert torch.equal(alone.current()["down_1"], left * first)
    unweighted = TraceRecorder()  # an entry of strength 0 (ConditioningSetAreaStrength 0): maps of 0, not 0/0
    unweighted.begin(torch.tensor(1.0), torch.tensor(0))
    unweighted.add("down_1", 0.0 * first, "input 1", 0.0)
    assert torch.equal(unweighted.current()["down_1"], torch.zeros_like(first))


def test_shares_of_an_evaluations_entries_weighted_like_the_whole_add_up_to_its_maps():
    # Guidance through several hook groups: each group's entries run again alone; their maps, weighted by the whole
    # evaluation's weights, are that group's share of its maps.
    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 1, 3, 4, 4, generator=gen)
    weights = (1.0, 3.0, torch.rand(1, 1, 4, 4, generator=gen))
    whole = TraceRecorder()
    whole.begin(torch.tensor(1.0), torch.tensor(0))
    parts = [TraceRecorder() for _ in maps]
    for recorder, entries in ((whole, range(3)), *((part, [i]) for i, part in enumerate(parts))):
        for layer in ("input 1", "input 2"):
            for i in entries:
                recorder.add("down_1", weights[i] * maps[i], layer, weights[i])
    shares = [part.current(weighting=whole.weighting())["down_1"] for part in parts]
    assert torch.allclose(sum(shares), whole.current()["down_1"])
    assert not torch.allclose(shares[0], parts[0].current()["down_1"])


def test_recorder_restart_drops_a_failed_passs_maps_but_keeps_the_evaluation():
    rec = TraceRecorder()
    rec.begin(torch.tensor(3.0), torch.tensor(0))
    rec.add("down_1", torch.full((1, 2, 4, 4), 5.0), "input 1")  # a pass that then ran out of memory
    rec.restart()
    rec.add("down_1", torch.ones(1, 2, 4, 4), "input 1")
    rec.end()
    trace = rec.finish(tokens=["a", "b"], latent_shape=[1, 4, 4, 4])
    assert trace.sigmas.tolist() == [3.0] and torch.equal(trace.maps["down_1"], torch.ones(1, 1, 2, 4, 4))


@pytest.mark.parametrize("reports, steps, skipped", [
    # evaluations with maps ("e") or skipped ("s": a cache answered), and the sampler's step reports, in order
    (["e", 0, "s", 1, "e", 2, "e", 3], [0, 2, 3], [1]),  # Euler, step 1 answered by a cache
    (["e", 0, "e", "s", 1, "e", "e", 2], [0, 0, 1, 2], [1]),  # Heun: step 1's first evaluation answered
    (["e", 0, "s", "e", 1, "e", 2], [0, 1, 2], [0]),  # Heun: step 0's corrector answered
])
def test_skipped_evaluations_keep_their_place_for_the_step_labels_and_are_left_out_of_the_trace(reports, steps,
                                                                                               skipped):
    rec = TraceRecorder()
    for item in reports:
        if item in ("e", "s"):
            rec.begin(torch.tensor(1.0), torch.tensor(9))  # σ's label, overridden by the reports
            if item == "e":
                rec.add("down_1", torch.full((1, 2, 4, 4), float(len(rec._sigmas))))
                rec.end()
            else:
                assert not rec.has_maps
                rec.skip()
        else:
            rec.step_started(item)
    assert rec.skipped_steps() == skipped and rec.steps_without_evaluation == []
    trace = rec.finish(tokens=["a", "b"], latent_shape=[1, 4, 4, 4])
    assert trace.steps.tolist() == steps and trace.sigmas.numel() == len(steps)
    if steps == [0, 2, 3]:  # a window on the answered step names the steps that have maps, not 0..3
        with pytest.raises(ValueError, match=r"window 1..1; this trace has maps of steps 0, 2..3 \(a step missing"):
            trace.token_maps(steps=(1, 1))
    recorded = [i + 1 for i, item in enumerate(x for x in reports if x in ("e", "s")) if item == "e"]
    assert trace.maps["down_1"][:, 0, 0, 0, 0].tolist() == [float(i) for i in recorded]


def test_a_step_reported_with_no_evaluation_at_all_is_listed():
    rec = TraceRecorder()
    rec.begin(torch.tensor(2.0), torch.tensor(0))
    rec.add("down_1", torch.ones(1, 2, 4, 4))
    rec.end()
    rec.step_started(0)
    rec.step_started(1)  # answered before anything reached the recorder
    assert rec.steps_without_evaluation == [1]


def test_recorder_refuses_an_evaluation_without_maps():
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(RuntimeError, match="call skip"):
        rec.end()


def test_entanglement_is_measured_at_image_size_unless_told_otherwise_and_the_report_says_where():
    trace = recorded_trace()
    result = measure_entanglement(trace, "gender", "doctor")
    assert result.masks[0].shape == (2, 64, 96)
    assert torch.equal(result.ious, trace.iou("gender", "doctor", size=(64, 96)))
    assert "masks at 96×64" in result.report.splitlines()[0]


def test_entanglement_report_names_images_whose_maps_are_not_finite():
    trace = recorded_trace()
    trace.maps["down_2"][1, 1, 4, 0, 0] = float("nan")  # its "gender" map, at one step
    result = measure_entanglement(trace, "gender", "doctor")
    assert "image(s) 1: their maps hold NaN or inf values" in result.report
    assert "image(s) 0" not in measure_entanglement(recorded_trace(), "gender", "doctor").report
    # Its empty masks would give IoU 0, read as no overlap at all: it is n/a instead, and left out of the means.
    assert result.ious[0].isfinite() and result.ious[1].isnan() and trace.iou("gender", "doctor")[1].isnan()
    assert result.block_ious["down_2"][1].isnan() and result.block_ious["down_1"][1].isfinite()
    assert f"mIoU {result.ious[0]:.4f} over 1 of 2 image(s) (n/a: no maps to threshold)" in result.report
    # mBIoU keeps image 1: its other stages have maps. Each mean says over how many images it is taken.
    assert f"mBIoU {result.mbiou.mean():.4f} over 2 image(s)" in result.report and result.mbiou[1].isfinite()
    trace.maps["down_2"][0, 0, 4, 0, 0] = float("nan")
    assert "mIoU n/a over 0 of 2 image(s)" in measure_entanglement(trace, "gender", "doctor").report
    assert any(line.startswith("image 1: IoU n/a") for line in result.report.splitlines())


def test_entanglement_report_names_an_image_only_when_the_maps_of_its_two_words_are_not_finite():
    trace = recorded_trace()
    trace.maps["down_2"][1, 1, 1, 0, 0] = float("nan")  # image 1's "a": neither word's map, and its IoU is measured
    result = measure_entanglement(trace, "gender", "doctor")
    assert result.ious.isfinite().all() and "NaN" not in result.report
    assert not trace.finite([1])[1] and trace.finite([1])[0] and trace.finite([2, 4]).all()


def test_entanglement_report_names_an_image_by_either_words_maps_over_the_steps_measured_only():
    trace = recorded_trace()
    trace.maps["down_2"][1, 1, 2, 0, 0] = float("nan")  # image 1's "doctor" (the second word), at step 1
    assert "image(s) 1: their maps hold NaN or inf values" in measure_entanglement(trace, "gender", "doctor").report
    late = measure_entanglement(trace, "gender", "doctor", steps=(2, 2))  # step 1 is not measured: nothing to name
    assert late.ious.isfinite().all() and "NaN" not in late.report


def test_entanglement_report_gives_per_image_and_per_stage_figures_and_the_guidance_counts():
    trace = recorded_trace()
    result = measure_entanglement(trace, "gender", "doctor", size=(16, 24))
    assert torch.equal(result.ious, trace.iou("gender", "doctor", size=(16, 24)))
    assert torch.allclose(result.mbiou, trace.mbiou("gender", "doctor", size=(16, 24)))
    lines = result.report.splitlines()
    assert lines[0].startswith("BiasMap entanglement of 'gender' and 'doctor' (top 30 % masks at 24×16, SD15)")
    assert lines[1] == "run: seed 7 · euler/normal · 3 steps · cfg 7 · λ 100 · guided stages all"
    assert lines[2] == "attribution prompt: a doctor and gender"  # the maps' words; no generation prompt kept here
    assert lines[3].startswith("mIoU")
    assert any(line.startswith("image 1: IoU") and "down×½" in line for line in lines)
    assert "tokens of 'doctor': doctor</w>" in result.report
    assert "applied 2/6" in result.report and "skipped gate 2/6" in result.report
    assert "note: test" in result.report
    trace.run |= {"generation_prompt": "A photo of the face of a doctor", "model": "v1-5.safetensors",
                  "negative_prompt": "blurry"}
    prompted = measure_entanglement(trace, "gender", "doctor").report.splitlines()
    assert prompted[2:6] == ["model: v1-5.safetensors", "prompt: A photo of the face of a doctor", "negative: blurry",
                             "attribution prompt: a doctor and gender"]
    assert prompted[6].startswith("mIoU")
    trace.run |= {"generation_prompt": "A photo of\nthe face of a doctor"}  # typed on two lines: one line here
    assert "prompt: A photo of⏎the face of a doctor" in measure_entanglement(trace, "gender", "doctor").report
    trace.run |= {"generation_prompt": "A photo of the face of a doctor"}
    trace.run |= {"denoise": 0.6}
    assert measure_entanglement(trace, "gender", "doctor").report.splitlines()[1] == (
        "run: seed 7 · euler/normal · 3 steps · denoise 0.6 · cfg 7 · λ 100 · guided stages all")
    trace.run |= {"denoise": 1.0, "add_noise": False, "seed": 0}  # the Advanced sampler's DisableNoise
    assert measure_entanglement(trace, "gender", "doctor").report.splitlines()[1].startswith(
        "run: seed 0 · add_noise off · euler/normal · 3 steps · cfg 7")
    windowed = measure_entanglement(trace, "gender", "doctor", steps=(1, 2)).report.splitlines()[0]
    assert windowed.endswith("masks at 96×64, steps 1–2 of 0–2, SD15)")  # reports side by side say which steps
    trace.run, trace.settings = {}, {}  # a trace saved before runs were kept
    assert measure_entanglement(trace, "gender", "doctor").report.splitlines()[1] == "run: not recorded in this trace"


def test_report_masks_are_the_masks_its_iou_is_measured_on():
    trace = recorded_trace()
    result = measure_entanglement(trace, "gender", "doctor", size=(16, 24))
    maps = trace.token_maps(size=(16, 24))
    assert torch.equal(result.masks[0], hard_mask(maps[:, 4]))
    assert torch.equal(result.ious, iou(*result.masks))


@pytest.mark.parametrize("reports, steps", [
    # evaluations made ("e") and the sampler's step reports (numbers), in order → each evaluation's step
    (["e", 0, "e", 1, "e", 2], [0, 1, 2]),  # Euler
    (["e", 0, "e", "e", 1, "e", "e", 2], [0, 0, 1, 1, 2]),  # Heun: a corrector, then the next step's first
    (["e", 0, "e", 1, "e", "e", 2, "e"], [0, 1, 1, 2, 2]),  # SA-Solver PECE: the corrector after the report
    (["e", "e", 1, "e", 2], [0, 1, 2]),  # UniPC: its first evaluation before any report
])
def test_evaluations_take_the_step_the_sampler_reports_after_each_steps_first_evaluation(reports, steps):
    rec = TraceRecorder()
    for item in reports:
        if item == "e":
            rec.begin(torch.tensor(1.0), torch.tensor(5))  # σ's label, overridden by the reports
            rec.add("down_1", torch.rand(1, 6, 2, 2))
            rec.end()
        else:
            rec.step_started(item)
    assert rec.finish(tokens=TOKENS, latent_shape=[1, 4, 2, 2]).steps.tolist() == steps


def test_a_stage_missing_from_some_evaluations_gets_zero_rows_there_and_the_trace_stays_measurable():
    # Kohya Deep Shrink runs some blocks at half size on its early steps: their layers fall in another stage there.
    rec = TraceRecorder()
    gen = torch.Generator().manual_seed(0)
    stages_per_step = [("down_1", "down_4"), ("down_1",), ("down_1", "down_2")]
    for step, stages in enumerate(stages_per_step):
        rec.begin(torch.tensor(10.0 - step), torch.tensor(step))
        for stage in stages:
            size = {"down_1": 8, "down_2": 4, "down_4": 2}[stage]
            rec.add(stage, torch.rand(1, 6, size, size, generator=gen))
        rec.end()
    trace = rec.finish(tokens=TOKENS, latent_shape=[1, 4, 8, 8])
    assert {s: m.shape[0] for s, m in trace.maps.items()} == {"down_1": 3, "down_4": 3, "down_2": 3}
    assert trace.maps["down_4"][1:].abs().sum() == 0 and trace.maps["down_2"][:2].abs().sum() == 0
    assert trace.maps["down_4"][0].abs().sum() > 0 and trace.maps["down_2"][2].abs().sum() > 0
    assert torch.equal(trace.concept_map("doctor", stages=["down_2"]),
                       trace.concept_map("doctor", stages=["down_2"], steps=(2, 2)))
    assert trace.iou("doctor", "gender").shape == (1,) and len(trace.block_ious("doctor", "gender")) == 3
    # A window where a stage has only zero rows: its BIoU is n/a and mBIoU the mean over the stages that have maps,
    # not pulled down by the 0 of its empty masks.
    window = trace.block_ious("doctor", "gender", steps=(0, 1))
    assert window["down_2"].isnan().all() and window["down_1"].isfinite().all() and window["down_4"].isfinite().all()
    assert torch.allclose(trace.mbiou("doctor", "gender", steps=(0, 1)), (window["down_1"] + window["down_4"]) / 2)
    assert trace.iou("doctor", "gender", steps=(0, 1)).isfinite().all()  # the stages that have maps are measured


def test_the_guided_layers_are_summed_apart_for_the_energy_and_all_layers_for_the_trace():
    gen = torch.Generator().manual_seed(3)
    a, b, c = (torch.rand(1, 6, 4, 4, generator=gen) for _ in range(3))
    split = TraceRecorder(split_guided=True)
    split.begin(torch.tensor(1.0), torch.tensor(0))
    split.add("down_1", a, layer="input 1", guided=True)
    split.add("down_1", b, layer="input 2", guided=False)  # e.g. a block Deep Shrink moved onto this grid
    split.add("down_2", c, layer="input 4", guided=False)
    assert set(split.current(guided=True)) == {"down_1"}
    assert torch.equal(split.current(guided=True)["down_1"], a)
    assert torch.equal(split.current()["down_1"], a + b) and torch.equal(split.current()["down_2"], c)
    assert split.weighting(guided=True) == {"down_1": (1.0, 1)}
    split.end()
    assert torch.equal(split.finish(tokens=TOKENS, latent_shape=[1, 4, 4, 4]).maps["down_1"][0], a + b)
    whole = TraceRecorder()  # every layer guided: one sum serves both
    whole.begin(torch.tensor(1.0), torch.tensor(0))
    whole.add("down_1", a, guided=False)
    assert torch.equal(whole.current(guided=True)["down_1"], a)


def test_a_notebooks_stage_step_and_size_arguments_are_read_as_the_nodes_read_theirs():
    trace = recorded_trace()
    down = trace.concept_map("gender", stages=["down_1"], steps=(1, 1), size=(16, 16))
    assert torch.equal(trace.concept_map("gender", stages="down_1", steps=1, size=16), down)  # not letter by letter
    assert torch.equal(trace.concept_map("gender", stages=["down×1"], steps=(1, 1), size=(16, 16)), down)
    assert torch.equal(trace.concept_map("gender", stages="down×1, up×1"),
                       trace.concept_map("gender", stages=["down_1", "up_1"]))
    assert torch.equal(trace.concept_map("gender", stages=["down_1", "down×1"]),  # once, not twice
                       trace.concept_map("gender", stages="down_1"))
    assert torch.equal(trace.concept_map("gender", stages=["all"]), trace.concept_map("gender"))
    assert torch.equal(trace.concept_map("gender", steps=(torch.tensor(1), trace.steps.max())),  # a notebook's ints
                       trace.concept_map("gender", steps=(1, 2)))
    assert measure_entanglement(trace, "gender", "doctor", size=16).masks[0].shape[-2:] == (16, 16)
    for steps in ((2, None), (0, 1, 2), "1"):
        with pytest.raises(ValueError, match=r"inclusive \(first, last\) pair"):
            trace.concept_map("gender", steps=steps)


def test_a_trace_built_by_hand_with_parts_that_disagree_is_refused_naming_them(tmp_path):
    trace = recorded_trace()
    with pytest.raises(ValueError, match=r"maps of stage down_1 are \(3, 2, 6, 8, 12\).*images 1"):
        BiasMapTrace(maps=trace.maps, tokens=trace.tokens, sigmas=trace.sigmas, steps=trace.steps,
                     latent_shape=[1, 4, 8, 12])  # one image, where the maps hold two
    with pytest.raises(ValueError, match="3 σ but 2 step labels"):
        BiasMapTrace(maps=trace.maps, tokens=trace.tokens, sigmas=trace.sigmas, steps=trace.steps[:2],
                     latent_shape=trace.latent_shape)
    with pytest.raises(ValueError, match="maps but no latent_shape"):
        BiasMapTrace(maps=trace.maps, tokens=trace.tokens, sigmas=trace.sigmas, steps=trace.steps, latent_shape=[])
    with pytest.raises(FileNotFoundError):  # no file at all is not a damaged trace
        BiasMapTrace.load(str(tmp_path / "nowhere.safetensors"))
    trace.maps["down_1"] = trace.maps["down_1"][:2]  # a stage with fewer rows than evaluations, saved as it is
    trace.save(str(tmp_path / "disagrees.safetensors"))
    with pytest.raises(TraceFormatError, match="parts disagree.*written by an older BiasMap, or is damaged"):
        BiasMapTrace.load(str(tmp_path / "disagrees.safetensors"))


def test_the_report_of_a_trace_whose_run_says_little_is_still_written():
    trace = recorded_trace()
    for run, settings, line in (({"sampler": "euler"}, {}, "run: euler"),
                                ({"cfg": "7"}, {"scale": None}, "run: cfg 7 · λ None")):
        trace.run, trace.settings = run, settings
        assert measure_entanglement(trace, "gender", "doctor").report.splitlines()[1] == line


def test_one_images_guidance_counts_are_its_own_evaluations():
    # 3 evaluations × 2 images: evaluation 0 not guided, then image 0 applied twice and image 1 gated twice. A status
    # matrix that is not symmetric tells the image's column from an evaluation's row.
    trace = recorded_trace()
    zero = dict.fromkeys(STATUS, 0)
    assert trace.guidance_counts(0) == {**zero, "not_guided": 1, "applied": 2}
    assert trace.guidance_counts(1) == {**zero, "not_guided": 1, "skipped_gate": 2}


def test_masks_of_a_word_of_several_pieces_threshold_the_mean_of_its_pieces():
    tokens = ["<|startoftext|>", "a</w>", "fire", "fighter</w>", "and</w>", "gender</w>", "<|endoftext|>"]
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(1, len(tokens), 8, 8, generator=gen)
    maps[0, 3] = torch.rand(8, 8, generator=gen) * 10  # the second piece dominates: the mean is not the first piece
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    rec.add("down_1", maps)
    rec.end()
    trace = rec.finish(tokens=tokens, latent_shape=[1, 4, 8, 8], demographic=["gender"], semantic=["firefighter"])
    assert trace.positions("firefighter") == [2, 3]
    got_a, got_b = trace.iou_and_masks("firefighter", "gender", size=8)[1]
    assert torch.equal(got_a, hard_mask(maps[:, 2:4].mean(1)))
    assert not torch.equal(got_a, hard_mask(maps[:, 2]))
    assert torch.equal(got_b, hard_mask(maps[:, 5]))


def test_a_stage_this_version_does_not_know_comes_after_the_known_ones():
    maps = {s: torch.zeros(1, 1, 1, 4, 4) for s in ("up_1", "zz_9", "down_1")}
    trace = BiasMapTrace(maps, ["a</w>"], torch.ones(1), torch.zeros(1), [1, 4, 4, 4])
    assert trace.stages == ["down_1", "up_1", "zz_9"]


def test_layers_added_without_a_name_are_each_a_layer_of_their_own_and_summed():
    a, b = torch.rand(1, 6, 4, 4), torch.rand(1, 6, 4, 4)
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    rec.add("down_1", a)
    rec.add("down_1", b)
    rec.end()
    torch.testing.assert_close(rec.finish(tokens=TOKENS, latent_shape=[1, 4, 4, 4]).maps["down_1"][0], a + b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_traces_maps_are_float32_whatever_the_dtype_they_were_recorded_in(dtype):
    maps = torch.rand(1, 6, 4, 4, dtype=torch.float64)
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    rec.add("down_1", maps.to(dtype), "input 1")
    rec.end()
    kept = rec.finish(tokens=TOKENS, latent_shape=[1, 4, 4, 4]).maps["down_1"][0]
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, maps.to(dtype).float())


def test_an_image_is_not_measurable_where_any_stage_of_its_two_words_holds_nan():
    trace = recorded_trace()
    trace.maps["down_2"][1, 1, 4, 0, 0] = float("nan")  # image 1's "gender", one stage, one step
    assert trace.measurable("gender", "doctor").tolist() == [True, False]


def test_an_image_whose_maps_are_not_finite_is_not_also_named_as_flat():
    trace = recorded_trace()
    trace.maps["down_2"][1, 1, 4, 0, 0] = float("nan")
    report = measure_entanglement(trace, "gender", "doctor").report
    assert "image(s) 1: their maps hold NaN or inf values" in report and "flat" not in report


def test_evaluations_before_the_first_report_of_step_0_are_step_0s():
    rec = TraceRecorder()
    for item in ["e", "e", 0, "e", 1]:
        if item == "e":
            rec.begin(torch.tensor(1.0), torch.tensor(5))
            rec.add("down_1", torch.rand(1, 2, 2, 2))
            rec.end()
        else:
            rec.step_started(item)
    assert rec.finish(tokens=["a", "b"], latent_shape=[1, 4, 2, 2]).steps.tolist() == [0, 0, 1]
