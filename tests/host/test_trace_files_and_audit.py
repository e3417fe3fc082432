"""Save Trace, Load Trace and Audit Log, run as ComfyUI runs them (class clone with its hidden inputs), on folders of
the test's own."""

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from guided_runs import counting_evaluations
from node_calls import as_comfy_runs, defaults, page_texts
from safetensors import safe_open
from safetensors.torch import save_file


@pytest.fixture
def folders(comfy, tmp_path):
    import folder_paths

    saved = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "in").mkdir(), (tmp_path / "out").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "in"))
    folder_paths.set_output_directory(str(tmp_path / "out"))
    yield tmp_path
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_output_directory(saved[1])


@pytest.fixture(scope="module")
def trace(pack, sd15, prompts):
    return sampled_trace(sd15, prompts, torch.zeros(2, 4, 32, 32))


def sampled_trace(sd15, prompts, latent):
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    model, clip = sd15
    pos, neg = prompts
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=2, seed=5,
                                                  sampler_name="euler", scheduler="karras", guidance_scale=0.0,
                                                  attribution_prompt="A photo of a doctor, a nurse and gender",
                                                  semantic="doctor, nurse", latent_image={"samples": latent})
    graph = {"3": {"class_type": "BiasMapGuidedKSampler",
                   "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["7", 0]}},
             "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "A photo of the face of a doctor"}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry"}}}
    with torch.inference_mode():
        return as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args).result[1]


def test_the_sampler_keeps_how_the_run_was_made_in_its_trace(trace):
    from datetime import datetime, timezone

    made = {k: v for k, v in trace.run.items() if k not in ("prompt_id", "time", "sigmas", "environment")}
    assert made == {"seed": 5, "steps": 2, "cfg": 7.0, "sampler": "euler", "scheduler": "karras", "denoise": 1.0,
                    "add_noise": True, "batch_index": None, "noise_mask": None, "start_latent": None,
                    "precision": "fp32",  # which no graph names where startup flags set it
                    "attribution_prompt": "A photo of a doctor, a nurse and gender",
                    "generation_prompt": "A photo of the face of a doctor", "negative_prompt": "blurry",
                    "model": "v1-5.safetensors"}  # from the graph ComfyUI runs
    assert len(trace.run["sigmas"]) == 3 and trace.run["sigmas"][-1] == 0.0  # karras, 2 steps
    # Which machine computed it, whose rounding a row that does not reproduce may owe its last digits to.
    import comfyui_version
    import tomllib

    from comfy.ldm.modules import attention

    version = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    kernel = attention.optimized_attention.__name__.removeprefix("attention_")
    assert trace.run["environment"] == (f"BiasMap {version['version']} · ComfyUI {comfyui_version.__version__} · "
                                        f"torch {torch.__version__} · CPU, {torch.get_num_threads()} threads · "
                                        f"{kernel} attention")
    # "nurse" is measured but the picture was not asked for one (an audit's prompt changed alone): said, once.
    missing = [n for n in trace.notes if "not in the generation prompt" in n]
    assert len(missing) == 1 and "concept(s) nurse are" in missing[0]
    assert trace.run["prompt_id"] == ""  # run outside ComfyUI's executor; the server test sees a real one
    assert abs((datetime.now(timezone.utc) - datetime.fromisoformat(trace.run["time"])).total_seconds()) < 600


def test_a_saved_trace_is_listed_by_load_trace_and_loads_as_it_was(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapLoadTrace, BiasMapSaveTrace

    workflow = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"seed": 5}}}
    names = [as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, "biasmap/audits/trace").result[0]
             for _ in range(2)]
    for typed in ("elsewhere/trace", str(folders / "out" / "elsewhere" / "trace")):  # relative, or typed whole
        with pytest.raises(ValueError, match="outside output/biasmap/, where Load Trace does not list it: start the "
                                             "prefix with biasmap/, e.g. biasmap/elsewhere/trace$"):
            as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, typed)
    # The folder named as the page shows it, in capitals, or left through ..: the example is in it.
    for typed in ("output/biasmap/trace", "Biasmap/trace", "biasmap/../trace", "./biasmap/./../trace",
                  "biasmap/sub/../../trace", "output\\biasmap\\trace", "biasmap\\..\\trace",
                  str(folders / "out" / "trace")):
        with pytest.raises(ValueError, match=r"start the prefix with biasmap/, e.g. biasmap/trace$"):
            as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, typed)
    with pytest.raises(ValueError, match=r"add a file name after biasmap/, e.g. biasmap/trace$"):
        as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, "BiasMap")
    saved = folders / "out" / "biasmap" / "audits"
    assert sorted(p.name for p in saved.iterdir()) == ["trace_00001_.safetensors", "trace_00002_.safetensors"]
    with safe_open(str(saved / "trace_00001_.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["prompt"]) == workflow

    (folders / "in" / "shared.safetensors").write_bytes((saved / "trace_00001_.safetensors").read_bytes())
    save_file({"weight": torch.zeros(2)}, str(folders / "in" / "a_model.safetensors"))  # not listed: no trace
    options = BiasMapLoadTrace.define_schema().inputs[0].options
    assert options == ["shared.safetensors", "biasmap/audits/trace_00001_.safetensors [output]",
                       "biasmap/audits/trace_00002_.safetensors [output]"]
    assert names == options[1:]  # Save Trace's output names the file as Load Trace lists it
    typed_absolute = str(folders / "out" / "biasmap" / "audits" / "trace")  # a path inside the folder, typed whole
    assert as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, typed_absolute).result[0] == (
        "biasmap/audits/trace_00003_.safetensors [output]")
    # Typed as a file's name: the counter before the extension, not trace.safetensors_00004_.safetensors.
    assert as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, "biasmap/audits/trace.SafeTensors").result[0] == (
        "biasmap/audits/trace_00004_.safetensors [output]")
    assert as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, "biasmap/audits/trace.safetensors ").result[0] == (
        "biasmap/audits/trace_00005_.safetensors [output]")
    assert as_comfy_runs(BiasMapSaveTrace, workflow).execute(trace, "biasmap/audits/trace ").result[0] == (
        "biasmap/audits/trace_00006_.safetensors [output]")  # not trace _00006_
    for name in (options[0], options[2]):
        assert BiasMapLoadTrace.validate_inputs(name) is True
        loaded = BiasMapLoadTrace.execute(name).result[0]
        assert loaded.run == trace.run and loaded.tokens == trace.tokens
        assert torch.equal(loaded.iou("gender", "doctor"), trace.iou("gender", "doctor"))


def test_a_saved_trace_keeps_the_workflow_of_the_page_that_queued_it_in_its_metadata(pack, folders, trace):
    # ComfyUI's page sends its workflow as extra_pnginfo, which ComfyUI's own savers keep beside the prompt.
    from comfy_api.latest import io

    from biasmap_pack.nodes import BiasMapSaveTrace

    prompt = {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {"seed": 5}}}
    page = {"workflow": {"nodes": [{"id": 3, "type": "BiasMapGuidedKSampler"}], "links": []}}
    saver = BiasMapSaveTrace.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.prompt: prompt,
                                                                     io.Hidden.extra_pnginfo: page}})
    saver.execute(trace, "biasmap/trace")
    with safe_open(str(folders / "out" / "biasmap" / "trace_00001_.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["prompt"]) == prompt and json.loads(metadata["workflow"]) == page["workflow"]


def test_save_trace_never_overwrites_a_file_another_comfyui_saved_under_the_counter_it_was_given(pack, folders, trace,
                                                                                                 monkeypatch):
    # Instances sharing an output folder see the same files, so ComfyUI gives them the same counter.
    import folder_paths
    from biasmap_pack.nodes import BiasMapLoadTrace, BiasMapSaveTrace

    saved = folders / "out" / "biasmap"
    saved.mkdir(parents=True)
    (saved / "trace_00001_.safetensors").write_bytes(b"the other instance's trace")
    monkeypatch.setattr(folder_paths, "get_save_image_path",
                        lambda prefix, out, *size: (str(saved), "trace", 1, "biasmap", "trace"))
    as_comfy_runs(BiasMapSaveTrace).execute(trace, "biasmap/trace")
    assert (saved / "trace_00001_.safetensors").read_bytes() == b"the other instance's trace"
    loaded = BiasMapLoadTrace.execute("biasmap/trace_00002_.safetensors [output]").result[0]
    assert loaded.run == trace.run
    assert (saved / "trace_00002_.safetensors").stat().st_mode & 0o777 == (saved / "trace_00001_.safetensors").stat(
        ).st_mode & 0o777  # readable as the output folder's other files are


def test_save_trace_writes_no_file_through_a_link_left_at_its_partial_name(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapLoadTrace, BiasMapSaveTrace

    saved, elsewhere = folders / "out" / "biasmap", folders / "elsewhere.txt"
    saved.mkdir(parents=True)
    elsewhere.write_text("not the output folder's")
    (saved / ".trace_00001_.safetensors.part").symlink_to(elsewhere)  # someone else's writing to the shared folder
    as_comfy_runs(BiasMapSaveTrace).execute(trace, "biasmap/trace")
    assert elsewhere.read_text() == "not the output folder's"
    assert BiasMapLoadTrace.execute("biasmap/trace_00001_.safetensors [output]").result[0].run == trace.run


def test_a_save_trace_that_fails_leaves_no_file_behind_and_a_partial_one_is_never_listed(pack, folders, trace,
                                                                                         monkeypatch):
    from biasmap_pack.nodes import BiasMapSaveTrace

    from biasmap_pack.nodes.trace_files import listed_traces

    def disk_full(self, path, metadata=None):
        open(path, "wb").write(b"part of a tra")
        assert listed_traces() == []  # what Load Trace would list meanwhile
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(trace), "save", disk_full)  # the pack's own BiasMapTrace
    with pytest.raises(OSError, match="No space left"):
        as_comfy_runs(BiasMapSaveTrace).execute(trace, "biasmap/trace")
    assert list((folders / "out" / "biasmap").iterdir()) == []


def test_load_trace_says_what_to_do_with_a_missing_file_or_one_that_is_not_a_trace(pack, folders, trace):
    from safetensors.torch import save_file

    from biasmap_pack.nodes import BiasMapLoadTrace

    assert "save one with BiasMap Save Trace" in BiasMapLoadTrace.validate_inputs("gone.safetensors")
    outside = folders / "outside.safetensors"  # a trace, but outside the listed folders
    trace.save(str(outside))
    (folders / "out" / "biasmap" / "folder").mkdir(parents=True)
    for name in ("../outside.safetensors", str(outside), "biasmap/folder [output]", "biasmap [output]"):
        assert "no trace file" in BiasMapLoadTrace.validate_inputs(name), name
    save_file({"w": torch.zeros(1)}, str(folders / "in" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"^model\.safetensors is a \.safetensors file but not a BiasMap trace.*[^.]\. "
                                         r"Choose a file saved by BiasMap Save Trace\.$"):  # not the server's path
        BiasMapLoadTrace.execute("model.safetensors")
    data = outside.read_bytes()
    (folders / "in" / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut short.*[^.]\. Choose a file saved by BiasMap Save Trace\.$"):
        BiasMapLoadTrace.execute("cut.safetensors")
    with safe_open(str(outside), framework="pt") as f:
        newer = {**json.loads(f.metadata()["biasmap_trace"]), "version": 99}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(folders / "in" / "newer.safetensors"),
                  metadata={"biasmap_trace": json.dumps(newer)})
    with pytest.raises(ValueError, match="^newer.safetensors is a version 99 BiasMap trace.*update BiasMap to read "
                                         "it$"):
        BiasMapLoadTrace.execute("newer.safetensors")
    with pytest.raises(ValueError, match="no trace file"):  # a linked name skips validation: checked when it runs
        BiasMapLoadTrace.execute("../outside.safetensors")
    # A linked name: run every time, as the file is not known; a value valid in JSON (ComfyUI keeps it in the prompt).
    linked = BiasMapLoadTrace.fingerprint_inputs(None)
    assert BiasMapLoadTrace.validate_inputs(None) is True and linked != BiasMapLoadTrace.fingerprint_inputs(None)
    json.loads(json.dumps(linked, allow_nan=False))


def test_load_trace_with_no_trace_saved_yet_offers_an_empty_choice_and_says_to_save_one(pack, folders):
    # An empty list's input is left out of the prompt by the frontend: ComfyUI's "Required input is missing" then.
    from biasmap_pack.nodes import BiasMapLoadTrace

    options = BiasMapLoadTrace.GET_SCHEMA().inputs[0].options
    assert options == [""]
    assert BiasMapLoadTrace.validate_inputs("").startswith("no trace file chosen")
    for value in ("", None):  # None: sent so through the API
        with pytest.raises(ValueError, match="save one with BiasMap Save Trace.*press R in the page"):
            BiasMapLoadTrace.execute(value)


def test_load_trace_reads_a_link_placed_in_the_input_folder_as_load_latent_does(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapLoadTrace

    shared = folders / "shared_drive"
    shared.mkdir()
    trace.save(str(shared / "run.safetensors"))
    (folders / "in" / "run.safetensors").symlink_to(shared / "run.safetensors")
    assert "run.safetensors" in BiasMapLoadTrace.define_schema().inputs[0].options
    assert BiasMapLoadTrace.validate_inputs("run.safetensors") is True
    assert BiasMapLoadTrace.execute("run.safetensors").result[0].tokens == trace.tokens
    # What is checked is what is read: '..' after a linked folder does not lead out of the input folder.
    (shared / "inner").mkdir()
    (folders / "in" / "linked").symlink_to(shared / "inner")
    (folders / "in" / "run.safetensors").unlink()
    (folders / "in" / "run.safetensors").write_bytes(b"")
    escape = "linked/../run.safetensors"  # as text in/run.safetensors (checked); the OS would read shared_drive's
    with pytest.raises(ValueError, match="not a BiasMap trace"):  # in/run.safetensors read, not the shared trace
        BiasMapLoadTrace.execute(escape)


def test_load_trace_reads_a_file_again_when_its_content_changes_even_at_the_same_time(pack, folders, trace):
    import os

    from biasmap_pack.nodes import BiasMapLoadTrace

    path = folders / "in" / "run.safetensors"
    trace.save(str(path))
    first = BiasMapLoadTrace.fingerprint_inputs("run.safetensors")
    stamp = os.stat(path).st_mtime_ns
    trace.run = {**trace.run, "seed": 6}  # another run's trace, copied over it with its time kept (cp -p, unzip)
    try:
        trace.save(str(path))
    finally:
        trace.run = {**trace.run, "seed": 5}
    os.utime(path, ns=(stamp, stamp))
    assert BiasMapLoadTrace.fingerprint_inputs("run.safetensors") != first


def test_audit_log_appends_a_row_per_image_and_pair_to_one_csv_over_runs(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    node = as_comfy_runs(BiasMapAuditLog)
    args = defaults(BiasMapAuditLog) | {"trace": trace}
    first = node.execute(**args | {"label": "first"}).result[0]
    node.execute(**args | {"concept_b": "nurse", "label": "second"})
    with open(folders / "out" / "biasmap" / "audit.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    # 2 images × (gender, doctor) and (gender, nurse), then 2 images × (gender, nurse)
    assert [(r["label"], r["semantic"], r["image"]) for r in rows] == [
        ("first", "doctor", "0"), ("first", "doctor", "1"), ("first", "nurse", "0"), ("first", "nurse", "1"),
        ("second", "nurse", "0"), ("second", "nurse", "1")]
    assert {(r["seed"], r["sampler"], r["scheduler"], r["guidance_scale"], r["soft_topk"], r["gate"]) for r in rows} == {
        ("5", "euler", "karras", "0.0", "paper", "skip")}
    ious = trace.iou("gender", "nurse", size=trace.image_size).tolist()  # the reference thresholds at image size
    assert [float(r["iou"]) for r in rows[4:]] == pytest.approx(ious, abs=1e-6)
    assert first.splitlines()[0].startswith("label,prompt_id,time,seed,steps")
    assert {(r["first_step"], r["last_step"]) for r in rows} == {("0", "1")}  # every step's maps: the default


def test_audit_log_summary_gives_the_papers_reductions_once_the_file_holds_guided_runs_and_their_baselines(
        pack, folders, trace):
    import copy

    from biasmap_pack.nodes import BiasMapAuditLog

    args = defaults(BiasMapAuditLog) | {"trace": trace, "concept_b": "nurse"}
    summary = as_comfy_runs(BiasMapAuditLog).execute(**args).result[1]
    assert "entanglement over the file (λ = 0 only" in summary and "\nnurse: iou " in summary  # so far
    guided = copy.copy(trace)  # the same images logged as a guided run's: nothing moved
    guided.settings = {**trace.settings, "scale": 100.0}
    summary = as_comfy_runs(BiasMapAuditLog).execute(**args | {"trace": guided}).result[1]
    lines = summary.splitlines()
    assert lines[1].startswith("reductions over the file") and lines[2].startswith("λ 100 · nurse: iou ")
    assert lines[2].endswith("(0.0 %, per image 0.0 %); 2 image(s)") and lines[5].startswith("label,")
    assert lines[3] == f"notes in the rows (the notes column): 4 row(s): {trace.notes[0][:89].rstrip()}…"  # said
    # And as a table beside the audit, for a spreadsheet: a row per metric and profession, replaced after each run.
    assert lines[4] == "the reductions as a table, for a spreadsheet: output/biasmap/audit_reductions.csv"
    with open(folders / "out" / "biasmap" / "audit_reductions.csv", newline="", encoding="utf-8-sig") as f:
        table = list(csv.DictReader(f))
    assert [(r["metric"], r["semantic"], r["guidance_scale"], r["images"], r["reduction"]) for r in table] == [
        ("iou", "nurse", "100.0", "2", "0.0"), ("mbiou", "nurse", "100.0", "2", "0.0")]
    assert list(table[0])[:2] == ["metric", "guidance_scale"] and "reduction_low" in table[0]
    node = as_comfy_runs(BiasMapAuditLog)
    summary = node.execute(**args | {"trace": guided, "label": "again"}).result[1]
    with open(folders / "out" / "biasmap" / "audit_reductions.csv", newline="", encoding="utf-8-sig") as f:
        assert [r["duplicates"] for r in csv.DictReader(f)] == ["2", "2"]  # the whole file's, written again
    # A run repeated (Audit Prompts bypassed: its sampler runs on the values last stored in it) is said, with the fix.
    assert summary.splitlines()[1] == (
        "these rows log an image the file held already (1× before: seed 5, nurse, λ 100.0, the same prompt and "
        "settings), which the figures count once: a run repeated makes the same image. To add images, advance the "
        "seed (control after generate: increment); in an audit over prompts, let Audit Prompts run (to pause it, mute "
        "it rather than bypass it: bypassed, the sampler runs on the values last stored in it)")


def _logged_after_its_baseline(trace) -> tuple[dict, object, str]:
    """Audit Log's run of ``trace`` (λ = 0), then of the same images logged as a guided run's (nothing moved): the
    file then holds pairs; → the node's inputs, the guided trace and the second run's summary."""
    import copy

    from biasmap_pack.nodes import BiasMapAuditLog

    args = defaults(BiasMapAuditLog) | {"trace": trace, "concept_b": "nurse"}
    as_comfy_runs(BiasMapAuditLog).execute(**args)
    guided = copy.copy(trace)
    guided.settings = {**trace.settings, "scale": 100.0}
    return args, guided, as_comfy_runs(BiasMapAuditLog).execute(**args | {"trace": guided}).result[1]


def test_audit_log_never_writes_its_reductions_table_over_a_file_of_other_rows(pack, folders, trace):
    other = folders / "out" / "biasmap" / "audit_reductions.csv"  # another audit, named so
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("label,prompt_id\nmine,1\n", encoding="utf-8")
    _, _, summary = _logged_after_its_baseline(trace)
    assert ("the reductions as a table were not written: output/biasmap/audit_reductions.csv holds other rows "
            "(another audit's?); give this audit another file name to have them") in summary
    assert other.read_text(encoding="utf-8") == "label,prompt_id\nmine,1\n"


def test_audit_log_writes_its_reductions_table_over_a_blank_file_of_that_name(pack, folders, trace):
    blank = folders / "out" / "biasmap" / "audit_reductions.csv"  # a byte-order mark and a line break: no rows
    blank.parent.mkdir(parents=True, exist_ok=True)
    blank.write_bytes(b"\xef\xbb\xbf\r\n")
    _, _, summary = _logged_after_its_baseline(trace)
    assert "the reductions as a table, for a spreadsheet: output/biasmap/audit_reductions.csv" in summary
    assert blank.read_text(encoding="utf-8-sig").startswith("metric,")
    kept = b"\n" * 70 + b"my,precious\ndata,1\n"  # blank as far as its first 64 characters
    blank.write_bytes(kept)
    _, _, summary = _logged_after_its_baseline(trace)
    assert "audit_reductions.csv holds other rows" in summary and blank.read_bytes() == kept


def test_audit_log_whose_reductions_table_is_open_elsewhere_logs_its_rows_and_says_to_close_it(pack, folders, trace,
                                                                                               monkeypatch):
    import os

    # Windows refuses to replace a file a spreadsheet holds open.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    _, _, summary = _logged_after_its_baseline(trace)
    hint = "close it where it is open" if os.name == "nt" else "check the folder's permissions"
    assert (f"the reductions as a table were not written to output/biasmap/audit_reductions.csv: Permission denied "
            f"({hint})") in summary and summary.startswith("2 row(s) appended")
    assert "\nλ 100 · nurse: iou " in summary  # the figures still shown
    assert sorted(p.name for p in (folders / "out" / "biasmap").iterdir()) == ["audit.csv"]  # no partial file left


def test_audit_log_whose_reductions_table_fails_keeps_its_rows_and_figures_and_says_why(pack, folders, trace,
                                                                                        monkeypatch):
    import sys

    from biasmap_pack.nodes import BiasMapAuditLog

    def fails(*args, **kwargs):
        raise RuntimeError("a fault of the table's own")

    monkeypatch.setattr(sys.modules[BiasMapAuditLog.__module__], "write_csv", fails)
    _, _, summary = _logged_after_its_baseline(trace)
    assert "\nλ 100 · nurse: iou " in summary and summary.startswith("2 row(s) appended")
    assert "\nthe reductions as a table were not written: a fault of the table's own\n" in summary


def test_audit_log_says_when_its_reductions_table_is_of_an_earlier_run_or_cannot_be_written(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    args, guided, _ = _logged_after_its_baseline(trace)
    audit = folders / "out" / "biasmap" / "audit.csv"
    with open(audit, newline="", encoding="utf-8-sig") as f:
        row = next(csv.DictReader(f))
    with open(audit, "a", newline="", encoding="utf-8") as f:  # a row without a scale: the file gives no reductions
        csv.DictWriter(f, fieldnames=list(row), lineterminator="\r\n").writerow({**row, "guidance_scale": ""})
    summary = as_comfy_runs(BiasMapAuditLog).execute(**args | {"label": "later"}).result[1]
    assert ("output/biasmap/audit_reductions.csv holds the reductions of an earlier run, not of the file as it is "
            "now") in summary
    with open(audit, newline="", encoding="utf-8-sig") as f:
        kept = [r for r in csv.DictReader(f) if r["guidance_scale"]]
    with open(audit, "w", newline="", encoding="utf-8-sig") as f:  # the row without a scale taken out again
        writer = csv.DictWriter(f, fieldnames=list(row), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(kept)
    table = folders / "out" / "biasmap" / "audit_reductions.csv"
    table.unlink()
    table.mkdir()  # a folder where the table would go
    summary = as_comfy_runs(BiasMapAuditLog).execute(**args | {"trace": guided, "label": "again"}).result[1]
    assert "the reductions as a table were not written to output/biasmap/audit_reductions.csv: " in summary
    assert "(close it" not in summary and "\nλ 100 · nurse: iou " in summary  # the figures still shown


def test_audit_log_measures_the_steps_asked_as_entanglement_iou_does(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapEntanglementIoU

    args = defaults(BiasMapAuditLog) | {"trace": trace, "concept_b": "nurse", "first_step": 1}
    csv_text = as_comfy_runs(BiasMapAuditLog).execute(**args).result[0]
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert {(r["first_step"], r["last_step"]) for r in rows} == {("1", "1")}  # last_step past the end: the end
    shown = as_comfy_runs(BiasMapEntanglementIoU).execute(**defaults(BiasMapEntanglementIoU) | {
        "trace": trace, "concept_b": "nurse", "first_step": 1}).result[0]
    assert sum(float(r["iou"]) for r in rows) / len(rows) == pytest.approx(shown, abs=1e-5)
    at_image_size = {"size": trace.image_size}  # as the rows are measured: only the steps differ
    assert [float(r["iou"]) for r in rows] == pytest.approx(
        trace.iou("gender", "nurse", steps=(1, 1), **at_image_size).tolist(), abs=1e-6)
    assert [float(r["iou"]) for r in rows] != pytest.approx(
        trace.iou("gender", "nurse", **at_image_size).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="first_step 5 is past this trace's last step, 1"):
        as_comfy_runs(BiasMapAuditLog).execute(**args | {"first_step": 5})


# The columns added last, which every older file lacks too.
_LATEST = ("batch_size", "sampler_demographic", "sampler_semantic", "noise_mask", "start_latent", "precision",
           "environment")


def test_audit_log_on_a_file_started_before_a_column_shows_the_rows_as_written_and_says_why(pack, folders, trace,
                                                                                          caplog):
    from biasmap_pack.nodes import BiasMapAuditLog

    from biasmap_engine import append_csv, audit_rows

    path = folders / "out" / "biasmap" / "audit.csv"
    later = ("negative_prompt", "model", "width", "height", "sigmas", "mask_size", "first_step", "last_step",
             *_LATEST)  # added after the file was started
    append_csv(str(path), [{k: v for k, v in row.items() if k not in later} for row in audit_rows(trace)])
    out = as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace})
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f))
    assert out.result[0].splitlines()[0].split(",") == header and "model" not in header
    assert ("without the column(s) sigmas, negative_prompt, model, precision, environment, width, height, batch_size, "
            "noise_mask, "
            "start_latent, sampler_demographic, sampler_semantic, mask_size, first_step, last_step" in caplog.text)
    # On the page too, where the console is out of sight: the summary output says it, then the rows.
    summary = out.result[1]
    assert summary.startswith("4 row(s) appended to output/biasmap/audit.csv")  # not the server's own path
    assert "give the audit a new file name" in summary
    assert summary.endswith(out.result[0])
    assert "give the audit a new file name" in caplog.text


_EVERY_STEP = "set first_step to 0 and last_step to 10000 to measure every step"
_SHOW = "if the node hides them, right-click the node and choose Show Advanced\\)$"


@pytest.mark.parametrize("asked, lost", [
    ({"first_step": 1}, "first_step, last_step, without which these rows would read as rows of every step, and pair "
                        "with such rows in the summary: give this audit another file name, or, to add to it, "
                        f"{_EVERY_STEP} \\(first_step and last_step are advanced inputs: {_SHOW}"),
    ({"last_step": 0}, "first_step, last_step, without which"),
    ({"resolution": "latent"}, "mask_size, without which these rows would read as rows at the image's size, and pair "
                               "with such rows in the summary: give this audit another file name, or, to add to it, "
                               "set resolution to image \\(resolution is an advanced input: if the node hides it, "
                               "right-click the node and choose Show Advanced\\)$"),
    ({"resolution": "latent", "first_step": 1},
     "first_step, last_step, mask_size, without which these rows would read as rows of every step and at the image's "
     f"size, .* or, to add to it, {_EVERY_STEP} and set resolution to image \\(resolution, first_step and last_step "
     f"are advanced inputs: {_SHOW}")])
def test_audit_log_refuses_a_file_started_before_the_columns_its_rows_need_to_be_paired_rightly(pack, folders, trace,
                                                                                              asked, lost):
    # Without them, rows of one step or of latent-size masks would read as whole runs at image size, and the summary
    # would pair them with those: a guided run's window against a baseline's whole run.
    from biasmap_pack.nodes import BiasMapAuditLog

    from biasmap_engine import append_csv, audit_rows

    path = folders / "out" / "biasmap" / "audit.csv"
    later = ("mask_size", "first_step", "last_step", *_LATEST)
    append_csv(str(path), [{k: v for k, v in row.items() if k not in later} for row in audit_rows(trace)])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"audit.csv was started before BiasMap wrote the column\(s\) {lost}"):
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace} | asked)
    assert path.read_bytes() == before
    as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace})  # whole runs: taken
    assert path.read_bytes() != before


def test_audit_log_refuses_rows_of_custom_sigmas_for_a_file_started_before_the_sigmas_column(pack, folders, trace):
    # Such a file tells schedules apart by the scheduler's name alone: every run of custom sigmas (SplitSigmas, Align
    # Your Steps) would be paired with every other one in the summary.
    from biasmap_pack.nodes import BiasMapAuditLog

    from biasmap_engine import append_csv, audit_rows

    path = folders / "out" / "biasmap" / "audit.csv"
    later = ("sigmas", "mask_size", "first_step", "last_step", *_LATEST)
    append_csv(str(path), [{k: v for k, v in row.items() if k not in later} for row in audit_rows(trace)])
    before = path.read_bytes()
    custom = dataclasses.replace(trace, run={**trace.run, "scheduler": "custom sigmas"})  # the Advanced sampler's
    with pytest.raises(ValueError, match=r"audit.csv was started before BiasMap wrote the column\(s\) sigmas, without "
                                         r"which these rows would read as rows on the schedule of every other run of "
                                         r"custom sigmas, and pair with such rows in the summary: give this audit "
                                         r"another file name$"):
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": custom})
    assert path.read_bytes() == before
    as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace})  # karras, named: taken
    assert path.read_bytes() != before


def test_audit_log_refuses_an_inpainting_runs_rows_for_a_file_started_before_the_noise_mask_column(pack, folders,
                                                                                                    trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    from biasmap_engine import append_csv, audit_rows

    path = folders / "out" / "biasmap" / "audit.csv"
    later = ("noise_mask", "start_latent", "precision", "environment")
    append_csv(str(path), [{k: v for k, v in row.items() if k not in later} for row in audit_rows(trace)])
    before = path.read_bytes()
    inpainted = dataclasses.replace(trace, run={**trace.run, "noise_mask": ["50.0 % (3fa2c1d9)"] * trace.num_images})
    with pytest.raises(ValueError, match=r"audit.csv was started before BiasMap wrote the column\(s\) noise_mask, "
                                         r"without which these rows would read as rows sampled without a noise mask, "
                                         r"and pair with such rows in the summary: give this audit another file name$"):
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": inpainted})
    assert path.read_bytes() == before
    as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace})  # no mask: taken
    assert path.read_bytes() != before


def test_audit_log_that_cannot_read_the_file_back_after_appending_says_so_and_does_not_fail(pack, folders, trace,
                                                                                             monkeypatch):
    # A failure after the rows are in would have the run queued again append them twice.
    from biasmap_pack.nodes import BiasMapAuditLog, audit_log

    def gone(path):
        raise OSError(f"{path} went away")

    monkeypatch.setattr(audit_log, "read_csv", gone)  # as if another program moved the file meanwhile
    result = as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace}).result
    assert "the file's figures so far could not be read: output/biasmap/audit.csv went away" in result[1]
    assert str(folders) not in result[1]  # the file as the user knows it, not by the server's path
    written = (folders / "out" / "biasmap" / "audit.csv").read_text(encoding="utf-8-sig")
    assert len(list(csv.DictReader(written.splitlines()))) == len(list(csv.DictReader(result[0].splitlines()))) > 0


def test_audit_log_refuses_a_file_it_cannot_append_to_naming_it_as_the_user_knows_it(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    (folders / "out" / "biasmap").mkdir(parents=True, exist_ok=True)
    (folders / "out" / "biasmap" / "audit.csv").write_text("label;seed\r\nrun A;5\r\n", encoding="utf-8-sig")
    with pytest.raises(ValueError, match=r"^output/biasmap/audit\.csv was saved with ; between cells") as refused:
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace})
    assert str(folders) not in str(refused.value)


def test_audit_log_takes_concept_lists_as_the_sampler_does_and_logs_every_pair(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    args = defaults(BiasMapAuditLog) | {"trace": trace, "concept_b": "nurse, doctor"}
    as_comfy_runs(BiasMapAuditLog).execute(**args)
    with open(folders / "out" / "biasmap" / "audit.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [(r["demographic"], r["semantic"]) for r in rows] == [("gender", "nurse")] * 2 + [("gender", "doctor")] * 2
    as_comfy_runs(BiasMapAuditLog).execute(**args | {"concept_a": "nurse", "concept_b": "doctor"})
    with open(folders / "out" / "biasmap" / "audit.csv", newline="", encoding="utf-8-sig") as f:
        assert [(r["demographic"], r["semantic"]) for r in list(csv.DictReader(f))[4:]] == [("nurse", "doctor")] * 2


def test_an_audit_file_that_could_take_no_rows_is_refused_when_the_prompt_is_queued_not_after_sampling(
        pack, folders):
    # Refused then, the graph's other outputs (Save Image) still run; refused at the node, the sampled image is lost.
    from biasmap_pack.nodes import BiasMapAuditLog

    (folders / "out" / "biasmap").mkdir()
    (folders / "out" / "biasmap" / "latin.csv").write_bytes("label\r\nÄrztin\r\n".encode("latin-1"))
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/latin").startswith(
        "output/biasmap/latin.csv is not UTF-8 text (invalid continuation byte in line 2): a spreadsheet saved it in "
        "another encoding; save it as CSV UTF-8, or give the audit another file name")
    (folders / "out" / "biasmap" / "runs.csv").mkdir()
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/runs") == (
        "output/biasmap/runs.csv is a folder: give the audit a file name")
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/new/audit") is True
    (folders / "out" / "biasmap" / "audit.csv").mkdir()  # the default name's file: not the one a linked name gives
    assert BiasMapAuditLog.validate_inputs(filename=None) is True
    assert BiasMapAuditLog.validate_inputs(filename="") == (  # typed empty: the default name, checked
        "output/biasmap/audit.csv is a folder: give the audit a file name")


def test_audit_log_keeps_a_column_of_notes_added_to_its_file_and_refuses_its_reductions_table_when_queued(
        pack, folders, trace):
    from biasmap_engine import read_csv
    from biasmap_pack.nodes import BiasMapAuditLog

    node = as_comfy_runs(BiasMapAuditLog)
    args = defaults(BiasMapAuditLog) | {"trace": trace, "filename": "biasmap/noted"}
    node.execute(**args)
    path = folders / "out" / "biasmap" / "noted.csv"
    records = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # as a researcher's spreadsheet saves it
        csv.writer(f).writerows([r + [note] for r, note in zip(records, ["my_notes"] + ["odd"] * len(records))])
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/noted") is True
    summary = node.execute(**args).result[1]
    assert summary.splitlines()[:2] == ["4 row(s) appended to output/biasmap/noted.csv", "the file's own column(s) "
                                        "my_notes, which BiasMap does not write, are left blank in these rows"]
    assert [r["my_notes"] for r in read_csv(str(path))] == ["odd"] * 4 + [""] * 4
    (folders / "out" / "biasmap" / "noted_reductions.csv").write_text("metric,guidance_scale,reduction\r\n")
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/noted_reductions") == (
        "output/biasmap/noted_reductions.csv is the table of reductions that Audit Log writes beside an audit file, "
        "not an audit file: give the audit's own file name (without _reductions)")


def test_an_audit_log_whose_file_cannot_be_written_says_so_on_its_node(pack, folders, trace, monkeypatch):
    # Its text would otherwise still say the run before appended its rows.
    import os

    from biasmap_pack.nodes import BiasMapAuditLog

    texts = page_texts(monkeypatch)
    args = defaults(BiasMapAuditLog) | {"trace": trace}
    as_comfy_runs(BiasMapAuditLog, node_id="7").execute(**args)
    assert texts[-1].startswith("4 row(s) appended to output/biasmap/audit.csv")

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    refused = ("output/biasmap/audit.csv could not take the rows (No space left on device): free disk space, close it "
               "where it is open (a spreadsheet on Windows locks it), make it writable, or give the audit another file "
               "name")
    with pytest.raises(ValueError, match=re.escape(refused) + "$"):
        as_comfy_runs(BiasMapAuditLog, node_id="7").execute(**args)
    assert texts[-1] == f"stopped: {refused}"


@pytest.mark.parametrize("name", ["../escape", "/tmp/biasmap_escape"])
def test_files_outside_the_output_folder_are_refused_when_the_prompt_is_queued(pack, folders, name):
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapSaveTrace

    assert "audit file" in BiasMapAuditLog.validate_inputs(filename=name)
    assert "outside ComfyUI's output folder: give a path inside it, e.g. biasmap/trace" in (
        BiasMapSaveTrace.validate_inputs(filename_prefix=name))
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/runs/a") is True
    assert BiasMapSaveTrace.validate_inputs(filename_prefix="biasmap/trace") is True
    assert BiasMapSaveTrace.validate_inputs(filename_prefix="biasmap").endswith(
        ": add a file name after biasmap/, e.g. biasmap/trace")
    # A file without a name, ".csv": a folder, a name Windows trims to nothing, or one starting with a dot.
    for folder in ("biasmap/", "biasmap\\", "biasmap/runs/.", "biasmap/..", "biasmap/. ", "biasmap/.csv", "biasmap/ .",
                   "biasmap/runs/ . "):
        why = "names no file (a folder, or a name that is empty or starts with a dot): add a file name, e.g. biasmap/"
        assert BiasMapAuditLog.validate_inputs(filename=folder) == f"the audit file '{folder.strip()}' {why}audit"
        assert BiasMapSaveTrace.validate_inputs(filename_prefix=folder) == f"the trace '{folder}' {why}trace"
    assert BiasMapAuditLog.validate_inputs(filename=" ") is True  # empty: biasmap/audit, as its tooltip says
    assert BiasMapAuditLog.validate_inputs(filename=None) is BiasMapSaveTrace.validate_inputs(None) is True  # linked


@pytest.mark.parametrize("name, problem", [
    ("biasmap/tr\0ace", "holds a character that file names cannot hold on every system"),
    ("biasmap/audit:2", "holds a character that file names cannot hold on every system"),
    ("biasmap/a?b", "holds a character that file names cannot hold on every system"),
    ("biasmap/NUL", "names a Windows device"),
    ("biasmap/con.data", "names a Windows device"),
    ("biasmap/CONOUT$", "names a Windows device"),
    ("biasmap/LPT1 ./trace", "names a Windows device"),
    ("biasmap/" + "a" * 191, "has a folder or file name longer than 190 bytes"),
    ("biasmap/" + "é" * 96, "has a folder or file name longer than 190 bytes"),
])
def test_a_file_name_some_system_cannot_hold_is_refused_when_the_prompt_is_queued(pack, folders, name, problem):
    # On the system that runs a shared workflow the save would fail only after sampling, or save nothing (NUL).
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapSaveTrace

    assert problem in BiasMapAuditLog.validate_inputs(filename=name)
    assert problem in BiasMapSaveTrace.validate_inputs(filename_prefix=name)
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/console/" + "a" * 190) is True


def test_the_longest_name_a_file_name_may_have_leaves_room_for_the_reductions_tables_partial_file(pack, folders, trace):
    # Audit Log's table is written beside its audit file as .NAME_reductions.csv.<32 hex digits>.partial first.
    from biasmap_pack.nodes import BiasMapAuditLog
    from biasmap_pack.nodes.output_files import _LONGEST_NAME

    name = "biasmap/" + "a" * _LONGEST_NAME
    assert BiasMapAuditLog.validate_inputs(filename=name) is True
    args, guided, _ = _logged_after_its_baseline(trace)
    as_comfy_runs(BiasMapAuditLog).execute(**args | {"filename": name})
    summary = as_comfy_runs(BiasMapAuditLog).execute(**args | {"trace": guided, "filename": name}).result[1]
    assert f"the reductions as a table, for a spreadsheet: output/{name}_reductions.csv" in summary


def test_save_trace_says_which_file_stands_where_its_folder_would_be_made(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapSaveTrace

    (folders / "out" / "biasmap").mkdir(parents=True)
    (folders / "out" / "biasmap" / "runs").write_text("a file, not a folder")
    said = "the trace 'biasmap/runs/trace' cannot be saved: 'runs' on its way is a file, not a folder"
    assert BiasMapSaveTrace.validate_inputs(filename_prefix="biasmap/runs/trace").startswith(said)
    with pytest.raises(ValueError, match=re.escape(said)):
        as_comfy_runs(BiasMapSaveTrace).execute(trace, "biasmap/runs/trace")


def test_audit_log_refuses_a_file_outside_the_output_folder(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    with pytest.raises(ValueError, match="outside ComfyUI's output folder"):
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace,
                                                                               "filename": "../escape"})
    assert not (folders / "escape.csv").exists()


def test_a_sibling_folder_named_like_the_output_folder_is_outside_it(pack, folders):
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapSaveTrace

    assert "outside ComfyUI's output folder" in BiasMapAuditLog.validate_inputs(filename="../out2/audit")
    assert "outside ComfyUI's output folder" in BiasMapSaveTrace.validate_inputs(filename_prefix="../outer/trace")


def test_load_trace_lists_files_in_name_order(pack, folders, trace):
    from biasmap_pack.nodes.trace_files import listed_traces

    names = ["run_f", "run_b", "run_e", "run_a", "run_d", "run_c"]  # made out of order
    for name in names:
        trace.save(str(folders / "in" / f"{name}.safetensors"))
    assert listed_traces() == [f"{name}.safetensors" for name in sorted(names)]


def test_load_trace_refuses_a_file_elsewhere_in_the_output_folder(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapLoadTrace

    (folders / "out" / "elsewhere").mkdir()
    trace.save(str(folders / "out" / "elsewhere" / "t.safetensors"))
    assert "no trace file" in BiasMapLoadTrace.validate_inputs("elsewhere/t.safetensors [output]")


def test_an_audit_file_keeps_a_csv_extension_typed_in_capitals_and_an_empty_name_is_the_default(pack, folders):
    import os

    from biasmap_pack.nodes.audit_log import _csv_path

    assert _csv_path("biasmap/Audit.CSV").endswith("Audit.CSV")
    assert _csv_path("  ").endswith(os.path.join("biasmap", "audit.csv"))


def test_audit_log_thresholds_at_the_q_it_is_given(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    text = BiasMapAuditLog.execute(**defaults(BiasMapAuditLog) | {"trace": trace, "q": 0.9,
                                                                  "concept_b": "doctor"}).result[0]
    rows = list(csv.DictReader(text.splitlines()))
    ious = trace.iou("gender", "doctor", q=0.9, size=trace.image_size).tolist()
    assert {r["q"] for r in rows} == {"0.9"} and [float(r["iou"]) for r in rows] == pytest.approx(ious, abs=1e-6)
    assert ious != pytest.approx(trace.iou("gender", "doctor", size=trace.image_size).tolist(), abs=1e-6)


def test_audit_log_thresholds_at_the_latents_size_when_asked(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    text = BiasMapAuditLog.execute(**defaults(BiasMapAuditLog) | {"trace": trace, "resolution": "latent"}).result[0]
    assert {r["mask_size"] for r in csv.DictReader(text.splitlines())} == {"32x32"}


def test_a_path_is_inside_a_folder_in_the_systems_case_so_windows_takes_biasmap_typed_in_capitals(pack, monkeypatch):
    import ntpath
    import os

    from biasmap_pack.nodes.output_files import inside

    with monkeypatch.context() as windows:  # Windows' paths for these calls alone, not for pytest's report
        windows.setattr(os, "path", ntpath)
        answers = (inside("C:\\ComfyUI\\output\\BiasMap\\trace", "C:\\ComfyUI\\output\\biasmap"),
                   inside("C:\\ComfyUI\\output2\\trace", "C:\\ComfyUI\\output"),
                   inside("D:\\output\\trace", "C:\\ComfyUI\\output"))  # another drive
    assert answers == (True, False, False)


def test_audit_log_refuses_a_word_listed_twice_which_would_log_its_pairs_twice(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    assert BiasMapAuditLog.validate_inputs(concept_b="nurse, Nurse") == (
        "concept_b: 'Nurse' is listed twice (CLIP reads capitals as lower case and spaces as one): list each word once")
    assert BiasMapAuditLog.validate_inputs(concept_a=None, concept_b="nurse, doctor") is True  # None: linked
    with pytest.raises(ValueError, match="^concept_a: 'gender' is listed twice"):  # a linked list, known at run time
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace,
                                                                               "concept_a": "gender, gender"})
    assert not (folders / "out" / "biasmap" / "audit.csv").exists()


def test_save_trace_fills_in_the_image_size_and_date_as_save_image_does_and_says_what_to_type_for_date_formats(
        pack, folders, sd15, prompts):
    import time

    from biasmap_pack.nodes import BiasMapSaveTrace

    wide = sampled_trace(sd15, prompts, torch.zeros(1, 4, 24, 40))  # not square, so width and height can't swap
    assert wide.image_size == (192, 320)
    saved = as_comfy_runs(BiasMapSaveTrace).execute(wide, "biasmap/%width%x%height%_%year%").result[0]
    assert saved == f"biasmap/320x192_{time.localtime().tm_year}_00001_.safetensors [output]"
    message = ("holds %date:…%, which ComfyUI's page fills in for its own save nodes only: type the date's parts as "
               "%year%, %month% and %day%")
    assert message in BiasMapSaveTrace.validate_inputs("biasmap/%date:yyyy-MM-dd%/trace")


@pytest.mark.parametrize("name", ["biasmap/audit_%year%", "biasmap/%date:yyyy%/audit"])
def test_audit_log_refuses_a_savers_variable_it_would_write_as_typed(pack, name):
    # An audit appends every run to one file; Save Image's %year% was written into its name as typed.
    from biasmap_pack.nodes import BiasMapAuditLog

    assert BiasMapAuditLog.validate_inputs(filename=name, concept_a="", concept_b="").startswith(
        f"the audit file '{name}' holds %")
    assert "which Audit Log does not fill in" in BiasMapAuditLog.validate_inputs(filename=name)
    assert BiasMapAuditLog.validate_inputs(filename="biasmap/audit 100%") is True  # no variable


@pytest.mark.parametrize("name", ["biasmap\\win", "biasmap/win"])
def test_a_backslash_in_a_file_name_separates_folders_on_every_system_as_validation_reads_it(pack, folders, trace,
                                                                                           name):
    # A workflow typed on Windows wrote "output/biasmap\win.csv" at the output folder's root on Linux.
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapSaveTrace

    assert as_comfy_runs(BiasMapSaveTrace).execute(trace, name).result[0] == "biasmap/win_00001_.safetensors [output]"
    BiasMapAuditLog.execute(**defaults(BiasMapAuditLog) | {"trace": trace, "filename": name})
    assert sorted(p.name for p in (folders / "out" / "biasmap").iterdir()) == ["win.csv", "win_00001_.safetensors"]
    assert not any("\\" in p.name for p in (folders / "out").iterdir())


def test_audit_log_names_an_older_file_by_its_place_in_the_output_folder_not_the_servers_path(pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    from biasmap_engine import append_csv, audit_rows

    path = folders / "out" / "biasmap" / "audit.csv"
    later = ("mask_size", "first_step", "last_step", *_LATEST)
    append_csv(str(path), [{k: v for k, v in row.items() if k not in later} for row in audit_rows(trace)])
    with pytest.raises(ValueError) as refused:
        as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace, "first_step": 1})
    assert str(refused.value).startswith("output/biasmap/audit.csv was started before BiasMap wrote the column(s)")
    assert str(folders) not in str(refused.value)


def _saved_and_a_counted_sampler(trace, sd15, prompts, attribution_prompt: str):
    """``trace`` saved for Load Trace (gender; doctor, nurse), and a one-step sampler's arguments measuring chef in
    ``attribution_prompt``, with the list its model's evaluations are counted in."""
    from biasmap_pack.nodes import BiasMapGuidedKSampler, BiasMapSaveTrace

    saved = as_comfy_runs(BiasMapSaveTrace, {}).execute(trace, "biasmap/saved").result[0]
    model, clip = sd15
    pos, neg = prompts
    counted, evaluated = counting_evaluations(model)
    args = defaults(BiasMapGuidedKSampler) | dict(
        model=counted, clip=clip, positive=pos, negative=neg, steps=1, sampler_name="euler", scheduler="normal",
        latent_image={"samples": torch.zeros(1, 4, 32, 32)}, attribution_prompt=attribution_prompt, semantic="chef")
    return saved, args, evaluated


def _beside_load_trace(saved: str, reader_id: str, reader: dict) -> dict:
    """A graph of the sampler (node 3), Load Trace of ``saved`` (node 20) and ``reader`` reading both."""
    return {"3": {"class_type": "BiasMapGuidedKSampler", "inputs": {}}, reader_id: reader,
            "20": {"class_type": "BiasMapLoadTrace", "inputs": {"trace_file": saved}}}


def test_a_word_that_a_trace_from_load_trace_lacks_is_refused_before_the_sampler_it_is_compared_with_samples(
        pack, folders, trace, sd15, prompts):
    # Entanglement IoU measures its words in both traces; Load Trace's file is chosen when queued, so a word only the
    # sampler's prompt has is said before the sampler's run, not after it.
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    saved, args, evaluated = _saved_and_a_counted_sampler(trace, sd15, prompts,
                                                          "A photo of a doctor, a chef and gender")
    reader = {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "baseline": ["20", 0],
                                                                 "concept_a": "", "concept_b": ""}}
    graph = _beside_load_trace(saved, "12", reader)
    refused = (r"^Entanglement IoU \(node 12\) measures concept_b 'chef' \(the first semantic concept of this sampler, "
               rf"as concept_b is empty\) in this sampler's trace and in the trace '{re.escape(saved)}' from Load "
               r"Trace, whose "
               r"attribution prompt lacks it \(its words: a, photo, of, doctor, nurse, and, gender\): measure a word "
               r"that both traces have, or choose another trace in Load Trace")
    with torch.inference_mode(), pytest.raises(ValueError, match=refused):
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated == []
    reader["inputs"] = {"trace": ["20", 0], "baseline": ["3", 1], "concept_a": "gender", "concept_b": "chef"}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"measures concept_b 'chef' in this sampler's"):
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)  # the other way round too
    reader["inputs"]["concept_b"] = "doctor"  # in both
    with torch.inference_mode():
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated


def test_a_loaded_traces_own_concept_that_this_samplers_prompt_lacks_is_refused_before_it_samples(
        pack, folders, trace, sd15, prompts):
    # Load Trace at the trace input, this sampler at the baseline, concepts empty: the node measures the loaded trace's
    # first concepts, read from its file's header, in this sampler's trace too.
    from biasmap_pack.nodes import BiasMapGuidedKSampler

    saved, args, evaluated = _saved_and_a_counted_sampler(trace, sd15, prompts, "A photo of a chef and gender")
    reader = {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["20", 0], "baseline": ["3", 1],
                                                                 "concept_a": "", "concept_b": ""}}
    graph = _beside_load_trace(saved, "13", reader)
    refused = (r"^Entanglement IoU \(node 13\) asks for concept_b 'doctor' \(the first semantic concept of its trace "
               rf"input, the trace '{re.escape(saved)}' from Load Trace, as concept_b is empty\), which is not a word "
               r"of this sampler's attribution prompt 'A photo of a chef and gender' \(its words: a, photo, of, chef, "
               r"and, gender\): type in its concept_b input a word of both prompts, or add the word to the "
               r"attribution prompt\. Checked before sampling")
    with torch.inference_mode(), pytest.raises(ValueError, match=refused):
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated == []
    args |= {"attribution_prompt": "A photo of a chef, a doctor and gender"}  # the loaded trace's concept is here too
    with torch.inference_mode():
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated


@pytest.mark.parametrize("chosen", ["missing.safetensors", "model.safetensors"])
def test_a_load_trace_file_that_is_no_readable_trace_is_left_to_load_trace_and_the_sampler_samples(
        pack, folders, trace, sd15, prompts, chosen):
    # Load Trace says what is wrong with its file when it runs; the sampler's check before sampling reads no header.
    from safetensors.torch import save_file

    from biasmap_pack.nodes import BiasMapGuidedKSampler

    _, args, evaluated = _saved_and_a_counted_sampler(trace, sd15, prompts, "A photo of a doctor, a chef and gender")
    save_file({"weight": torch.zeros(2)}, str(folders / "out" / "biasmap" / "model.safetensors"))
    reader = {"class_type": "BiasMapEntanglementIoU", "inputs": {"trace": ["3", 1], "baseline": ["20", 0],
                                                                 "concept_a": "", "concept_b": "doctor"}}
    graph = _beside_load_trace(chosen, "12", reader)
    with torch.inference_mode():
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated
    reader["inputs"] |= {"trace": ["20", 0], "baseline": ["3", 1]}  # the loaded file at the trace input
    evaluated.clear()
    with torch.inference_mode():
        as_comfy_runs(BiasMapGuidedKSampler, graph, node_id="3").execute(**args)
    assert evaluated


def test_audit_log_refuses_a_concept_against_one_that_an_empty_input_stands_for_naming_the_empty_input(
        pack, folders, trace):
    from biasmap_pack.nodes import BiasMapAuditLog

    args = defaults(BiasMapAuditLog) | {"trace": trace, "concept_a": "nurse", "concept_b": ""}  # doctor, nurse
    refused = (r"^concept_a 'nurse' and concept_b 'nurse' \(a semantic concept of the trace, as concept_b is empty\) "
               r"share words of the trace's attribution prompt")
    with torch.inference_mode(), pytest.raises(ValueError, match=refused):
        as_comfy_runs(BiasMapAuditLog).execute(**args)
    assert not (folders / "out" / "biasmap").exists()  # refused before a row is written


def test_an_inpainting_run_records_each_images_noise_mask_and_its_rows_carry_it(pack, folders, sd15, prompts):
    # Set Latent Noise Mask's mask, one per image here (ComfyUI repeats a single one over the batch).
    from biasmap_pack.nodes import BiasMapAuditLog, BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced
    from comfy.samplers import sampler_object

    model, clip = sd15
    pos, neg = prompts
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, :, :32] = 1  # the left half
    masks[1, :, :32, :32] = 1  # the top-left quarter
    args = defaults(BiasMapGuidedKSampler) | dict(model=model, clip=clip, positive=pos, negative=neg, steps=1,
                                                  sampler_name="euler", scheduler="normal", guidance_scale=0.0)
    with torch.inference_mode():
        trace = BiasMapGuidedKSampler.execute(**args | {"latent_image": {"samples": torch.zeros(2, 4, 32, 32),
                                                                         "noise_mask": masks}}).result[1]
        shared = BiasMapGuidedKSampler.execute(**args | {"latent_image": {"samples": torch.zeros(2, 4, 32, 32),
                                                                          "noise_mask": masks[:1]}}).result[1]
        plain = BiasMapGuidedKSampler.execute(**args | {"latent_image": {"samples": torch.zeros(1, 4, 32, 32)}})
    assert [re.sub(r"\(\w{8}\)", "(…)", m) for m in trace.run["noise_mask"]] == ["50.0 % (…)", "25.0 % (…)"]
    assert shared.run["noise_mask"] == [trace.run["noise_mask"][0]] * 2  # the same mask, the same fingerprint
    assert plain.result[1].run["noise_mask"] is None
    with torch.inference_mode():  # the Advanced sampler's too; a mask that lets all change samples as none does
        whole = BiasMapGuidedKSamplerAdvanced.execute(**defaults(BiasMapGuidedKSamplerAdvanced) | dict(
            model=model, clip=clip, positive=pos, negative=neg, guidance_scale=0.0, sampler=sampler_object("euler"),
            sigmas=torch.tensor([14.6, 0.0]), latent_image={"samples": torch.zeros(2, 4, 32, 32),
                                                             "noise_mask": torch.stack([masks[1], masks[0] * 0 + 1])}))
    assert whole.result[1].run["noise_mask"] == [trace.run["noise_mask"][1], ""]
    with torch.inference_mode():  # a mask that lets every image change: recorded as none, as without a mask
        full = BiasMapGuidedKSampler.execute(**args | {"latent_image": {"samples": torch.zeros(2, 4, 32, 32),
                                                                        "noise_mask": torch.ones(1, 1, 64, 64)}})
    assert full.result[1].run["noise_mask"] is None
    rows = as_comfy_runs(BiasMapAuditLog).execute(**defaults(BiasMapAuditLog) | {"trace": trace}).result[0]
    assert [row["noise_mask"] for row in csv.DictReader(rows.splitlines())] == trace.run["noise_mask"]
