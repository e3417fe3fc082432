import copy
import csv
import importlib.util
import itertools
import math
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from biasmap_engine import audit
from biasmap_engine import (STATUS, BiasMapSettings, OlderFileError, TraceRecorder, append_csv, audit_rows,
                            check_appendable, csv_text, is_reductions_table, logged_before, measure_entanglement, read_csv,
                            reductions, reductions_report, reductions_table, reductions_text, write_csv)
from biasmap_engine.report import shown_number

TOKENS = ["<|startoftext|>", "a</w>", "doctor</w>", "nurse</w>", "gender</w>", "<|endoftext|>"]
RUN = {"seed": 42, "steps": 2, "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "denoise": 1.0,
       "attribution_prompt": "a doctor, nurse and gender"}


def halves_trace(stages=("down_1", "up_1"), notes=()):
    """Two images on an 8×8 grid: 'gender' on the left half, 'doctor' on the top half (IoU 1/3 at q = 0.5), 'nurse'
    on the top half in image 0 and on the left half in image 1 (IoU 1/3, then 1)."""
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    top = left.t()
    maps = torch.zeros(2, len(TOKENS), 8, 8)
    maps[:, 4], maps[:, 2] = left, top
    maps[0, 3], maps[1, 3] = top, left
    rec = TraceRecorder()
    for step in range(2):
        rec.begin(torch.tensor(10.0 - step), torch.tensor(step))
        for stage in stages:
            rec.add(stage, maps.clone())
        rec.end(energy=torch.rand(2), grad_norm=torch.rand(2),
                status=torch.tensor([STATUS["applied"], STATUS["skipped_gate"] if step else STATUS["applied"]]))
    return rec.finish(tokens=TOKENS, latent_shape=[2, 4, 8, 8], demographic=["gender"], semantic=["doctor", "nurse"],
                      model_family="SD15", settings={"scale": 100.0, "guided_stages": None}, notes=list(notes), run=RUN)


def test_audit_rows_give_each_image_and_pair_its_iou_biou_and_guidance_counts():
    trace = halves_trace(notes=["a note"])
    rows = audit_rows(trace, q=0.5, size=(8, 8), label="run A")
    assert [(r["semantic"], r["image"]) for r in rows] == [("doctor", 0), ("doctor", 1), ("nurse", 0), ("nurse", 1)]
    assert [r["iou"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0], abs=1e-6)
    assert [r["biou_down_1"] for r in rows] == [r["iou"] for r in rows] == [r["mbiou"] for r in rows]
    assert [(r["applied"], r["skipped_gate"], r["not_guided"]) for r in rows] == [(2, 0, 0), (1, 1, 0)] * 2
    first = rows[0]
    assert {k: first[k] for k in RUN} == RUN
    assert (first["label"], first["demographic"], first["q"], first["guidance_scale"], first["guided_stages"],
            first["notes"]) == ("run A", "gender", 0.5, 100.0, "all", "a note")
    assert first["prompt_id"] == first["time"] == first["sigmas"] == ""  # not in this trace's run: empty columns
    assert first["mask_size"] == "8x8" and audit_rows(trace)[0]["mask_size"] == "64x64"  # where masks were made
    trace.run = {**RUN, "sigmas": [14.61, 1.0, 0.0]}
    assert audit_rows(trace)[0]["sigmas"] == "14.61 1 0"  # the schedule, which tells custom sigmas apart


def test_audit_rows_give_each_image_the_noise_of_the_seed_it_got():
    trace = halves_trace()
    assert [r["noise_index"] for r in audit_rows(trace, pairs=[("gender", "doctor")])] == [0, 1]
    trace.run = {**RUN, "batch_index": [3, 5]}  # Latent From Batch: images 0 and 1 got the seed's noises 3 and 5
    assert [r["noise_index"] for r in audit_rows(trace, pairs=[("gender", "doctor")])] == [3, 5]


def test_audit_rows_take_biasmaps_settings_only_so_no_other_key_takes_a_columns_place():
    trace = halves_trace()
    trace.settings = {**trace.settings, "label": "forged", "=HYPERLINK(1)": 1}  # as a notebook's trace may hold
    row = audit_rows(trace, label="mine")[0]
    assert row["label"] == "mine" and "=HYPERLINK(1)" not in row and row["guidance_scale"] == 100.0


def test_rows_with_a_cell_longer_than_csv_reads_back_are_refused_before_they_are_written(tmp_path):
    path = tmp_path / "audit.csv"
    rows = audit_rows(halves_trace(), label="x" * (csv.field_size_limit() + 1))  # a label linked from a long text
    with pytest.raises(ValueError, match=r"this trace's label is longer than Python's csv module reads back "
                                         r"\(131072 characters\): shorten it"):
        append_csv(str(path), rows)
    assert not path.exists() or path.read_bytes() == b""


@pytest.mark.parametrize("separated", ["quoted", "plain"])
def test_an_audit_file_saved_again_with_semicolons_between_cells_says_to_save_it_with_commas(tmp_path, separated):
    # Excel set to a region that writes decimal commas saves CSV that way.
    path = tmp_path / "audit.csv"
    rows = audit_rows(halves_trace(), label="run A")
    text = csv_text(rows)
    semicolons = (text.replace(",", ";") if separated == "quoted" else
                  "\n".join(";".join(f"{v}".replace(",", " ") for v in row.values()) for row in [rows[0]] * 2))
    path.write_text(semicolons, encoding="utf-8-sig")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="saved with ; between cells .*: save it as comma-separated CSV UTF-8"):
        append_csv(str(path), rows)
    assert path.read_bytes() == before


@pytest.mark.parametrize("damage, cause", [
    ('"' + "x" * 200_000 + '"\r\n', "field larger than field limit"),
    ('edited,"a quote left open\r\n', "unexpected end of data"),  # would take every later row into one cell
    ("Krankenschwester,\xe4rztin\r\n", "'utf-8' codec can't decode"),  # saved again in a spreadsheet's own encoding
])
def test_an_audit_file_that_cannot_be_read_back_takes_no_rows_and_says_how_to_mend_it(tmp_path, damage, cause):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))
    with open(path, "ab") as f:
        f.write(damage.encode("latin-1" if "\xe4" in damage else "utf-8"))
    before = path.read_bytes()
    fix = "save it as CSV UTF-8 or mend the line, or give the audit another file name"
    with pytest.raises(ValueError, match=rf"cannot be read as an audit CSV \({cause}.*{fix}"):
        append_csv(str(path), audit_rows(halves_trace()))
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=rf"\({cause}.*{fix}"):
        read_csv(str(path))


def test_a_write_the_disk_refuses_midway_leaves_no_part_of_a_row_and_the_next_append_reads_whole(
        tmp_path, monkeypatch):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))
    before = path.read_bytes()
    write, calls = os.write, []

    def disk_full(fd, data):  # a full disk: the first write takes part of the rows, the next is refused
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return write(fd, bytes(data[:len(data) // 2]))

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        append_csv(str(path), audit_rows(halves_trace(), label="cut"))
    monkeypatch.undo()
    assert len(calls) == 2 and path.read_bytes() == before
    append_csv(str(path), audit_rows(halves_trace(), label="after"))
    assert [r["label"] for r in read_csv(str(path))] == [""] * 4 + ["after"] * 4


def test_reading_an_audit_skips_a_spreadsheets_empty_rows_and_refuses_damaged_ones_naming_them(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))
    width = len(read_csv(str(path))[0])
    with open(path, "ab") as f:  # a spreadsheet saved trailing empty rows, and a blank line
        f.write(b"," * (width - 1) + b"\r\n\r\n" + b"," * (width - 1) + b"\r\n")  # rows 6, 7 and 8
    assert read_csv(str(path)) == read_csv(str(path))[:4] and len(read_csv(str(path))) == 4
    text = path.read_text(encoding="utf-8-sig")
    line = text.splitlines()[1]
    path.write_text(text + line[:len(line) // 2] + "\r\n", encoding="utf-8-sig")  # a row cut short
    append_csv(str(path), audit_rows(halves_trace(), label="after"))  # appends still go on
    with pytest.raises(ValueError, match=rf"has rows with another number of cells than its header's {width}: "
                                         rf"row\(s\) 9 \(\d+ cells\), as a spreadsheet numbers them \(a write cut "
                                         rf"short, or cells added or removed by hand\): delete or mend them$"):
        read_csv(str(path))


def test_a_file_given_a_second_byte_order_mark_by_another_tool_is_read_and_appended_to_as_it_was(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), label="first"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    append_csv(str(path), audit_rows(halves_trace(), label="second"))
    rows = read_csv(str(path))
    assert "label" in rows[0] and [r["label"] for r in rows] == ["first"] * 4 + ["second"] * 4


def test_reading_an_audit_names_a_repeated_header_a_column_named_twice_and_counts_rows_after_blank_lines(tmp_path):
    first, second = tmp_path / "gpu0.csv", tmp_path / "gpu1.csv"
    append_csv(str(first), audit_rows(halves_trace(), label="0"))
    append_csv(str(second), audit_rows(halves_trace(), label="1"))
    joined = tmp_path / "joined.csv"
    joined.write_bytes(first.read_bytes() + second.read_bytes())  # cat gpu0.csv gpu1.csv (its byte-order mark too)
    with pytest.raises(ValueError, match=r"joined.csv repeats its header in row\(s\) 6 \(two audit files joined into "
                                         r"one\?\): delete those rows$"):
        read_csv(str(joined))
    text = first.read_text(encoding="utf-8-sig")
    header, row = text.splitlines()[:2]
    twice = tmp_path / "twice.csv"
    twice.write_text(f"{header},iou\r\n{row},0.5\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"twice.csv names the column\(s\) 'iou' twice in its header: delete one"):
        read_csv(str(twice))
    extra = tmp_path / "extra.csv"  # blank lines before the header, a row of blanks, a row with a cell too many
    extra.write_text(f"\r\n\r\n{text} , ,\r\n{row},x\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"row\(s\) 9 \({len(header.split(',')) + 1} cells\), as"):
        read_csv(str(extra))
    many = tmp_path / "many.csv"
    many.write_text(text + "x,y\r\n" * 6, encoding="utf-8")
    with pytest.raises(ValueError, match=r"row\(s\) 6 \(2 cells\), 7 \(2 cells\), 8 \(2 cells\), 9 \(2 cells\), "
                                         r"10 \(2 cells\) and more, as"):
        read_csv(str(many))


@pytest.mark.parametrize("added", ["my_notes", ""], ids=["a column of notes", "an empty column a spreadsheet kept"])
def test_a_column_the_researcher_added_to_the_file_is_kept_and_left_blank_in_rows_appended_later(tmp_path, added):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), label="first"))
    records = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    noted = [records[0][:3] + [added] + records[0][3:]] + [r[:3] + ["looks odd"] + r[3:] for r in records[1:]]
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows(noted)
    check_appendable(str(path))
    written = append_csv(str(path), audit_rows(halves_trace(), label="second"))
    rows = read_csv(str(path))
    assert list(written[0]) == list(rows[0]) == noted[0] and [r[added] for r in written] == [""] * 4
    assert [(r["label"], r[added]) for r in rows] == [("first", "looks odd")] * 4 + [("second", "")] * 4
    assert reductions_text(rows) == reductions_text([{k: v for k, v in r.items() if k != added} for r in rows])


def test_a_file_whose_biasmap_columns_were_removed_is_refused_before_a_run_and_when_rows_come_naming_them(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))
    records = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    kept = [i for i, c in enumerate(records[0]) if c not in ("time", "notes")]
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows([[r[i] for i in kept] for r in records])
    before = path.read_bytes()
    fix = r"time, notes, which every row .*\(removed in a spreadsheet, or .*\?\): put them back from a copy of the file"
    with pytest.raises(ValueError, match=rf"audit.csv lacks BiasMap's column\(s\) {fix}"):
        check_appendable(str(path))
    with pytest.raises(ValueError, match=rf"The file lacks BiasMap's column\(s\) {fix}"):
        append_csv(str(path), audit_rows(halves_trace()))
    assert path.read_bytes() == before
    other = tmp_path / "other.csv"
    other.write_text("name,score\r\nx,1\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match="other.csv is not an audit file of BiasMap's .*: give the audit another file"):
        check_appendable(str(other))
    with pytest.raises(ValueError, match="other.csv is not an audit file of BiasMap's"):
        append_csv(str(other), audit_rows(halves_trace()))  # a name linked from another node: checked when rows come


def test_the_reductions_table_given_as_the_audit_file_is_refused_before_a_run(tmp_path):
    path = tmp_path / "audit_reductions.csv"
    path.write_text("metric,guidance_scale,semantic,images,base,guided,reduction\r\niou,100,doctor,3,0.4,0.3,0.25\r\n",
                    encoding="utf-8-sig")
    fix = r"is the table of reductions that Audit Log writes beside an audit file, not an audit file: give the audit's"
    with pytest.raises(ValueError, match=fix):
        check_appendable(str(path))
    with pytest.raises(ValueError, match=fix):
        append_csv(str(path), audit_rows(halves_trace()))
    path.write_text("semantic,metric,images,reduction\r\ndoctor,iou,3,0.25\r\n", encoding="utf-8-sig")
    with pytest.raises(ValueError, match=fix):  # its columns put in another order by a spreadsheet
        check_appendable(str(path))
    path.write_text("metric;semantic;reduction\r\niou;doctor;0,25\r\n", encoding="utf-8-sig")
    with pytest.raises(ValueError, match=fix):  # saved with ; between cells: not told to save it with commas first
        check_appendable(str(path))


def test_a_reductions_table_is_known_by_its_header_as_written_or_as_a_spreadsheet_saves_it_again(tmp_path):
    # One rule for the audit's refusal above and for Audit Log, which replaces a table beside the audit, never an audit.
    base, guided = _baseline_and_guided()
    table, audit = tmp_path / "audit_reductions.csv", tmp_path / "audit.csv"
    write_csv(str(table), reductions_table(audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5,
                                                                                             size=(8, 8))))
    append_csv(str(audit), audit_rows(guided))
    assert is_reductions_table(str(table)) and not is_reductions_table(str(audit))
    for header in ("metric;guidance_scale;reduction", "semantic,reduction,metric"):  # semicolons; columns moved
        table.write_text(header + "\r\n", encoding="utf-8-sig")
        assert is_reductions_table(str(table)), header
    table.write_text("metric,score\r\n", encoding="utf-8")
    assert not is_reductions_table(str(table))


def test_a_row_cut_inside_a_quoted_cell_is_refused_before_a_run_naming_the_line_it_starts_in(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))  # the header and 4 rows: lines 1–5
    with open(path, "ab") as f:
        f.write(b'edited,"a quote left open\r\nand a second line\r\n')
    with pytest.raises(ValueError, match=r"\(unexpected end of data in the row starting in line 6\): .* mend the line"):
        check_appendable(str(path))


def test_rows_are_appended_in_the_order_a_spreadsheet_put_the_files_columns_in(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), label="first"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        records = list(csv.reader(f))
    order = sorted(range(len(records[0])), key=lambda i: records[0][i])  # columns sorted by name
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows([[record[i] for i in order] for record in records])
    append_csv(str(path), audit_rows(halves_trace(), label="second"))
    rows = read_csv(str(path))
    assert list(rows[0]) == sorted(rows[0]) and [r["label"] for r in rows] == ["first"] * 4 + ["second"] * 4
    assert {k: v for k, v in rows[4].items() if k not in ("label", "time")} == {
        k: v for k, v in rows[0].items() if k not in ("label", "time")}


def test_an_audit_file_that_could_take_no_rows_is_refused_before_any_run(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "audit.csv"
    check_appendable(str(path))  # new, in a folder still to be made
    append_csv(str(path), audit_rows(halves_trace()))
    check_appendable(str(path))
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ValueError, match=r"folder.csv is a folder: give the audit a file name"):
        check_appendable(str(tmp_path / "folder.csv"))
    check_appendable(str(tmp_path / "a" / "b" / "c" / "audit.csv"))  # folders still to be made, at any depth
    (tmp_path / "a file").write_text("x")
    os.chmod(tmp_path / "a file", 0o755)  # a file that may be entered as a folder may be is still no folder
    with pytest.raises(ValueError, match=r"a file/sub/audit.csv cannot be made: 'a file' on its way is a file, not a "
                                         r"folder; give the audit another file name$"):
        check_appendable(str(tmp_path / "a file" / "sub" / "audit.csv"))
    os.symlink(tmp_path / "gone.csv", tmp_path / "link.csv")
    with pytest.raises(ValueError, match=r"link.csv is a link to a file that is not there: remove the link"):
        check_appendable(str(tmp_path / "link.csv"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(path.read_bytes() + "Ärztin\r\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8 text \(invalid .* in line 6\): a spreadsheet "
                                         r"saved it in another encoding; save it as CSV UTF-8"):
        check_appendable(str(latin))
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("label;seed\r\nx;1\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match="saved with ; between cells"):
        check_appendable(str(semicolons))
    before = path.read_bytes()

    def locked(file, mode="r", *args, **kwargs):  # as Windows opens a file a spreadsheet has open, or any read-only one
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audit, "open", locked, raising=False)
    with pytest.raises(ValueError, match=r"audit.csv cannot be opened to append rows \(Permission denied\): close it "
                                         r"where it is open \(a spreadsheet on Windows locks it\), make it writable, "
                                         r"or give the audit another file name$"):
        check_appendable(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before  # opened, not written
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, mode: access(where, mode & ~os.W_OK) and not mode & os.W_OK)
    with pytest.raises(ValueError, match="new.csv cannot be made: .* or change the folder's permissions"):
        check_appendable(str(tmp_path / "new.csv"))  # a folder of another user's, which root here may write to


def test_the_queue_time_check_reads_a_file_again_only_once_it_changed(tmp_path, monkeypatch):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace()))
    check_appendable(str(path))
    reads = []
    monkeypatch.setattr(audit, "_semicolons", lambda where: reads.append(where) or ValueError("semicolons"))
    path.write_bytes(path.read_bytes().replace(b",", b";"))  # changed: read again, and refused
    with pytest.raises(ValueError, match="semicolons"):
        check_appendable(str(path))
    os.utime(path, ns=(0, 0))
    with pytest.raises(ValueError, match="semicolons"):  # not passed before: read again
        check_appendable(str(path))
    assert len(reads) == 2


def test_audit_rows_match_the_trace_at_image_size_and_take_a_chosen_pair():
    trace = halves_trace()
    rows = audit_rows(trace, pairs=[("gender", "nurse")])
    assert [r["iou"] for r in rows] == pytest.approx(trace.iou("gender", "nurse").tolist(), abs=1e-6)
    assert [r["mbiou"] for r in rows] == pytest.approx(trace.mbiou("gender", "nurse").tolist(), abs=1e-6)


def test_audit_rows_measure_the_maps_of_the_steps_asked_and_say_which():
    trace = halves_trace()
    for stage in trace.stages:
        trace.maps[stage][1, 0, 3] = trace.maps[stage][1, 0, 4]  # at the last step, image 0's nurse is on the left
    late = audit_rows(trace, q=0.5, pairs=[("gender", "nurse")], size=(8, 8), steps=(1, 1))
    whole = audit_rows(trace, q=0.5, pairs=[("gender", "nurse")], size=(8, 8))
    assert [r["iou"] for r in late] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert [r["iou"] for r in late] == pytest.approx(
        measure_entanglement(trace, "gender", "nurse", 0.5, (8, 8), steps=(1, 1)).ious.tolist(), abs=1e-6)
    assert whole[0]["iou"] < 1
    assert [(r["first_step"], r["last_step"]) for r in late + whole] == [(1, 1)] * 2 + [(0, 1)] * 2


def test_audit_rows_need_a_pair():
    trace = halves_trace()
    trace.semantic = []
    with pytest.raises(ValueError, match="give the two words"):
        audit_rows(trace)


@pytest.mark.parametrize("pair", [("gender", "gender"), ("Doctor", "doctor")])
def test_audit_rows_refuse_a_concept_compared_with_itself_before_any_row(pair):
    # Its overlap with itself is 1 whatever the image: a notebook gets the nodes' refusal, not an IoU of 1.
    with pytest.raises(ValueError, match="compare two words that do not overlap"):
        audit_rows(halves_trace(), pairs=[("gender", "doctor"), pair])
    with pytest.raises(ValueError, match="compare two words that do not overlap"):
        measure_entanglement(halves_trace(), *pair)


def test_append_csv_writes_the_header_once_and_keeps_every_run(tmp_path):
    path = str(tmp_path / "audits" / "audit.csv")
    first, second = audit_rows(halves_trace(), q=0.5, label="1"), audit_rows(halves_trace(), q=0.5, label="2")
    append_csv(path, first)
    append_csv(path, second)
    with open(path, newline="", encoding="utf-8-sig") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(first) + len(second)
    assert [r["label"] for r in read] == ["1"] * len(first) + ["2"] * len(second)
    assert read[0]["attribution_prompt"] == "a doctor, nurse and gender"  # quoted: the comma stays inside
    assert float(read[3]["iou"]) == first[3]["iou"]


def test_append_csv_refuses_rows_of_other_stages_and_names_them(tmp_path):
    path = str(tmp_path / "audit.csv")
    append_csv(path, audit_rows(halves_trace(), q=0.5))
    with pytest.raises(ValueError, match="only the file has: biou_down_1, biou_up_1; only the trace has: biou_down_2"
                                         r"\). .*include_middle"):
        append_csv(path, audit_rows(halves_trace(stages=("down_2",)), q=0.5))
    with open(path, encoding="utf-8-sig") as f:
        assert len(f.readlines()) == 1 + 4  # nothing appended


def test_a_new_csv_starts_with_the_byte_order_mark_excel_needs_and_appends_add_none(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="médecin"))
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="医生"))
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbflabel,") and data.count(b"\xef\xbb\xbf") == 1
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["médecin"] * 4 + ["医生"] * 4


def test_append_csv_takes_a_file_a_spreadsheet_saved_again_without_the_byte_order_mark(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5))
    path.write_bytes(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))
    append_csv(str(path), audit_rows(halves_trace(), q=0.5))
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_append_csv_starts_on_a_new_line_when_the_file_lost_its_last_line_break(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(notes=["a note"]), q=0.5))
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))  # as some spreadsheet exports save it
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="next"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [""] * 4 + ["next"] * 4 and rows[3]["notes"] == "a note"


def test_csv_text_is_what_the_file_holds(tmp_path):
    rows = audit_rows(halves_trace(), q=0.5)
    path = str(tmp_path / "audit.csv")
    append_csv(path, rows)
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert f.read().replace("\r\n", "\n") == csv_text(rows)


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r", "\n", " =", "\n@", "\u00a0+", "\ufeff=",
                                   "\u202e-", "＝", "'=", "''+"])
def test_every_formula_start_is_escaped_and_reads_back_as_it_was(tmp_path, start):
    # Also after spaces, line breaks or format characters an import may trim, in full width, and after apostrophes.
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label=start + "SUM(A1)"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["label"] == "'" + start + "SUM(A1)"
    assert read_csv(str(path))[0]["label"] == start + "SUM(A1)"


def test_a_cell_an_earlier_biasmap_marked_reads_back_as_it_was_logged(tmp_path):
    # Before 2026-12-01 '-1.5 ' (a number followed by a space) and a tab before digits were marked; now they are not.
    path = tmp_path / "audit.csv"
    path.write_text("label,notes\n'-1.5 ,'\t5\n'=x,'@y\n", encoding="utf-8")
    assert read_csv(str(path)) == [{"label": "-1.5 ", "notes": "\t5"}, {"label": "=x", "notes": "@y"}]


@pytest.mark.parametrize("label", ["-1.5", "+2", "-3e-4", "-.5", "'quoted'", "'", "' -1.5", "doctor's"])
def test_a_signed_number_or_apostrophes_without_a_formula_start_are_written_and_read_back_as_typed(tmp_path, label):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label=label))
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["label"] == label
    assert read_csv(str(path))[0]["label"] == label


def test_a_sign_before_digits_of_another_script_is_escaped_as_text_not_kept_as_a_number(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="-٣"))  # ٣: a digit to Python, not a spreadsheet
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert next(csv.DictReader(f))["label"] == "'-٣"


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path):
    rows = audit_rows(halves_trace(), q=0.5, label='=HYPERLINK("http://x","y")')
    rows[0]["notes"], rows[0]["iou"] = "-1+1", -0.5
    path = str(tmp_path / "audit.csv")
    append_csv(path, rows)
    with open(path, newline="", encoding="utf-8-sig") as f:
        written = list(csv.DictReader(f))
    assert [r["label"] for r in written] == ['\'=HYPERLINK("http://x","y")'] * len(rows)
    assert (written[0]["notes"], written[0]["iou"]) == ("'-1+1", "-0.5")  # text escaped, numbers kept
    assert list(csv.DictReader(csv_text(rows).splitlines()))[0]["label"] == written[0]["label"]
    assert rows[0]["label"].startswith("=")  # the rows themselves keep the values, for pandas users


def test_an_image_without_finite_maps_gets_nan_rows_not_an_iou_of_0(tmp_path):
    trace = halves_trace()
    trace.maps["down_1"][0, 1, 4, 0, 0] = float("nan")  # image 1's 'gender' map overflowed at one step
    rows = audit_rows(trace, q=0.5, size=(8, 8))
    assert [r["image"] for r in rows if r["iou"] != r["iou"]] == [1, 1]  # NaN in both pairs of image 1
    assert [r["biou_down_1"] != r["biou_down_1"] for r in rows] == [False, True] * 2
    assert [r["biou_up_1"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0], abs=1e-6)
    path = str(tmp_path / "audit.csv")
    append_csv(path, rows)
    with open(path, newline="", encoding="utf-8-sig") as f:
        assert [r["iou"] for r in csv.DictReader(f)][1] == "nan"  # what pandas and spreadsheets read as missing


def _append_in_turn(folder, who, barrier):
    for i in range(20):
        barrier.wait()  # both processes append at the same moment into a new file
        append_csv(os.path.join(folder, f"audit{i}.csv"), [{"label": who, "notes": "x" * 20000} for _ in range(3)])


@pytest.mark.skipif(os.name == "nt", reason="forks two processes")
def test_two_processes_appending_to_one_csv_write_one_header_and_whole_rows(tmp_path):
    # ComfyUI instances that share an output folder, one per GPU, log into one audit file.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2, timeout=60)  # a worker that dies fails the test instead of hanging the other
    workers = [context.Process(target=_append_in_turn, args=(str(tmp_path), who, barrier), daemon=True)
               for who in ("gpu0", "gpu1")]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    assert [w.exitcode for w in workers] == [0, 0]
    for i in range(20):
        with open(tmp_path / f"audit{i}.csv", newline="", encoding="utf-8-sig") as f:
            records = list(csv.reader(f))
        assert records[0] == ["label", "notes"] and records.count(records[0]) == 1 and len(records) == 1 + 2 * 3
        assert sorted(r[0] for r in records[1:]) == ["gpu0"] * 3 + ["gpu1"] * 3
        assert all(r[1] == "x" * 20000 for r in records[1:])


def test_rows_are_on_disk_before_the_lock_is_released(tmp_path, monkeypatch):
    # Another process may read the file as soon as it is unlocked: small rows must not wait in a buffer.
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "audit.csv"
    sizes, flock = [], fcntl.flock

    def recording_flock(fd, operation):
        if operation == fcntl.LOCK_UN:
            sizes.append(os.path.getsize(path))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", recording_flock)
    append_csv(str(path), [{"label": "a", "iou": 0.5}])
    assert sizes == [os.path.getsize(path)] and sizes[0] > 0


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n", b"\xef\xbb\xbf\r\n\r\n"])
def test_a_file_with_nothing_but_a_byte_order_mark_or_blank_lines_starts_afresh(tmp_path, content):
    path = tmp_path / "audit.csv"
    path.write_bytes(content)
    append_csv(str(path), [{"label": "a", "iou": 0.5}])
    append_csv(str(path), [{"label": "b", "iou": 0.25}])
    assert path.read_bytes() == b"\xef\xbb\xbflabel,iou\r\na,0.5\r\nb,0.25\r\n"


def test_a_file_whose_first_line_is_blank_before_rows_is_refused_untouched(tmp_path):
    path = tmp_path / "audit.csv"
    path.write_bytes(b"\r\nlabel,iou\r\na,0.5\r\n")
    with pytest.raises(ValueError, match="first line of .* is blank, not an audit header"):
        append_csv(str(path), [{"label": "b", "iou": 0.25}])
    assert path.read_bytes() == b"\r\nlabel,iou\r\na,0.5\r\n"
    with pytest.raises(ValueError, match="first line of .* is blank, not an audit header"):
        check_appendable(str(path))  # when the prompt is queued


# Each file lacks the columns added after its own, down to the latest.
_LATEST = ("batch_size", "sampler_demographic", "sampler_semantic", "noise_mask", "start_latent", "precision",
           "environment")


@pytest.mark.parametrize("missing", [("noise_index", "generation_prompt", "negative_prompt", "model", "width",
                                      "height", "sigmas", "mask_size", "first_step", "last_step", *_LATEST),
                                     ("generation_prompt", "negative_prompt", "model", "width", "height", "sigmas",
                                      "mask_size", "first_step", "last_step", *_LATEST),
                                     ("negative_prompt", "model", "width", "height", "sigmas", "mask_size",
                                      "first_step", "last_step", *_LATEST),
                                     ("sigmas", "mask_size", "first_step", "last_step", *_LATEST),
                                     ("first_step", "last_step", *_LATEST),
                                     _LATEST, ("noise_mask", "start_latent", "precision", "environment"),
                                     ("start_latent", "precision", "environment"), ("precision", "environment"),
                                     ("environment",)],
                         ids=["before noise_index", "before generation_prompt", "before model and size",
                              "before sigmas and mask size", "before the step window",
                              "before batch size and the sampler's concepts", "before the noise mask",
                              "before the start latent", "before the precision", "before the environment"])
def test_a_file_written_before_the_latest_columns_takes_new_rows_under_its_own_header(tmp_path, missing):
    path = tmp_path / "audit.csv"
    old = [{k: v for k, v in row.items() if k not in missing} for row in audit_rows(halves_trace(), q=0.5)]
    append_csv(str(path), old)
    written = append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="after the update"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(old[0]) == list(written[0])
    assert [r["label"] for r in rows] == [""] * 4 + ["after the update"] * 4
    other = [{**row, "extra": 1} for row in old]  # any other difference is still refused, and named
    with pytest.raises(ValueError, match="only the file has: nothing; only the trace has: extra.*another BiasMap"):
        append_csv(str(path), other)


def test_reductions_pair_each_guided_image_with_its_unguided_row_and_give_both_of_the_papers_figures(tmp_path):
    # nurse: IoU 1/3 and 1 at λ = 0, 1/3 and 1/3 guided → of the means (2/3 − 1/3) / (2/3) = 0.5, per image (0 + 2/3) / 2.
    base = halves_trace()
    base.settings = {"scale": 0.0, "guided_stages": None}
    guided = halves_trace()
    for stage in guided.stages:
        guided.maps[stage][:, 1, 3] = guided.maps[stage][:, 1, 2]  # image 1's nurse moves to doctor's place
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(guided, q=0.5, size=(8, 8), label="λ 100"))
    append_csv(str(path), audit_rows(base, q=0.5, size=(8, 8), label="λ 0"))  # logged after: order does not matter
    with open(path, newline="", encoding="utf-8-sig") as f:
        read_back = list(csv.DictReader(f))
    for rows in (read_back, audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))):
        figures = {r["semantic"]: r for r in reductions(rows)}
        assert figures["nurse"]["images"] == 2 and figures["nurse"]["guidance_scale"] == 100.0
        assert (figures["nurse"]["base"], figures["nurse"]["guided"]) == pytest.approx((2 / 3, 1 / 3), abs=1e-5)
        assert figures["nurse"]["reduction"] == pytest.approx(0.5, abs=1e-5)
        assert figures["nurse"]["mean_image_reduction"] == pytest.approx(1 / 3, abs=1e-5)
        assert figures["doctor"]["reduction"] == pytest.approx(0.0, abs=1e-6)
    (overall,) = reductions(read_back, by=None)
    assert overall["images"] == 4 and overall["reduction"] == pytest.approx((1 / 2 - 1 / 3) / (1 / 2), abs=1e-5)


def test_reductions_pair_nothing_across_seeds_and_name_the_column_that_kept_them_apart():
    base = halves_trace()
    base.settings = {"scale": 0.0, "guided_stages": None}
    base.run = {**base.run, "seed": 43}  # the seed left on increment: the λ = 0 runs got the next seeds
    with pytest.raises(ValueError, match=r"differ in every value of seed; log λ = 0 runs with the guided runs' seed, "
                                         r"changing guidance_scale alone \(set the seed, or Audit Prompts' run, back "
                                         r"to the first run's\)$"):
        reductions(audit_rows(base) + audit_rows(halves_trace()))
    with pytest.raises(ValueError, match="no column.*fid"):
        reductions(audit_rows(halves_trace()), metric="fid")
    with pytest.raises(ValueError, match="no guided row"):
        reductions(audit_rows(base))
    with pytest.raises(ValueError, match="no rows"):
        reductions([])


def _baseline_and_guided(**run):
    base, guided = halves_trace(), halves_trace()
    base.settings = {"scale": 0.0, "guided_stages": None}
    base.run = guided.run = {**RUN, **run}
    for stage in guided.stages:
        guided.maps[stage][:, 1, 3] = guided.maps[stage][:, 1, 2]  # image 1's nurse moves to doctor's place
    return base, guided


def test_reductions_count_each_image_once_and_say_what_they_left_out():
    base, guided = _baseline_and_guided()
    unmatched = halves_trace()
    unmatched.run = {**RUN, "seed": 99}  # no λ = 0 run of this seed
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8), label="queued") * 2
    rows += audit_rows(unmatched, q=0.5, size=(8, 8))
    rows[0] = {**rows[0], "iou": float("nan")}  # the λ = 0 doctor of image 0: n/a, no maps to threshold
    figures = {r["semantic"]: r for r in reductions(rows)}
    assert figures["doctor"]["not_measured"] == 2 and figures["doctor"]["images"] == 1  # image 0, logged twice
    assert figures["nurse"]["images"] == 2 and figures["nurse"]["duplicates"] == 2 and figures["nurse"]["unpaired"] == 2
    assert figures["nurse"]["reduction"] == pytest.approx(0.5, abs=1e-5)
    assert figures["nurse"]["images_with_overlap"] == 2 and figures["nurse"]["not_measured"] == 0


def test_reductions_refuse_two_different_baselines_of_one_image_and_pair_by_a_column_when_told():
    # Two wildcard prompts in the label (the generation prompt is blank then): their baselines would be one image's.
    rows = []
    for prompt in ("a nurse", "a doctor"):
        base, guided = _baseline_and_guided()
        if prompt == "a doctor":
            for trace in (base, guided):
                for stage in trace.stages:
                    trace.maps[stage][:, :, 3] = trace.maps[stage][:, :, 4]  # nurse where gender is: IoU 1
        rows += audit_rows(base, q=0.5, size=(8, 8), label=prompt) + audit_rows(guided, q=0.5, size=(8, 8),
                                                                                 label=prompt)
    with pytest.raises(ValueError, match=r"two λ = 0 rows of the same image \(seed 42, image 0, gender and "
                                         r"nurse\) give iou .* differ in label: if those tell two images apart .*, "
                                         r"log each prompt's runs to a file of its own, or pass .*; if they are one "
                                         r"image made twice .*, delete one of the two rows$"):
        reductions(rows)
    figures = {r["label"]: r for r in reductions(rows, match=("label",), by="label")}
    assert figures["a doctor"]["reduction"] == pytest.approx(0.0, abs=1e-6)  # both 1 there: nothing moved
    assert figures["a nurse"]["images"] == 4  # doctor and nurse pairs of its 2 images


def test_reductions_refuse_lambda_0_rows_of_one_image_a_ten_thousandth_apart_but_not_the_csvs_rounding():
    # The CSV writes figures to 6 decimals: an image logged again reads back within that, another measure does not.
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    rounded = [{**r, "iou": r["iou"] - 5e-7} for r in audit_rows(base, q=0.5, size=(8, 8))]
    assert {r["semantic"]: r for r in reductions(rows + rounded)}["nurse"]["images"] == 2
    measured_otherwise = [{**r, "iou": r["iou"] - 1e-4} for r in audit_rows(base, q=0.5, size=(8, 8))]
    with pytest.raises(ValueError, match=r"two λ = 0 rows of the same image \(seed .*\) give iou"):
        reductions(rows + measured_otherwise)
    assert "start_latent" not in str(pytest.raises(ValueError, reductions, rows + measured_otherwise).value)
    # In a file started before the start latent, two img2img sources of one seed read as one image.
    older = [{k: v for k, v in r.items() if k != "start_latent"} for r in rows + measured_otherwise]
    with pytest.raises(ValueError, match=r"delete one of the two rows; rows of a file started before BiasMap wrote "
                                         r"start_latent do not tell apart runs from other latents \(img2img from other "
                                         r"images, second passes after other first passes\): give such an audit a new "
                                         r"file name$"):
        reductions(older)


@pytest.mark.parametrize("column, value", [("negative_prompt", "blurry"), ("generation_prompt", "a photo of a nurse"),
                                           ("model", "other.safetensors"), ("cfg", 5.0)])
def test_reductions_pair_nothing_across_prompts_models_or_cfg_and_name_the_column(column, value):
    # Another negative prompt, prompt, model or cfg makes another picture: its guided row has no λ = 0 row here.
    base, guided = _baseline_and_guided()
    guided.run = {**guided.run, column: value}
    with pytest.raises(ValueError, match=rf"differ in every value of {column}; log λ = 0 runs with the guided "
                                         rf"runs' {column}, changing guidance_scale alone$"):
        reductions(audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8)))


def test_an_inpainted_image_pairs_only_with_one_under_the_same_noise_mask_and_its_report_names_the_mask():
    # Set Latent Noise Mask keeps part of the latent: the seed's inpainted image is not its text-to-image one.
    base, guided = _baseline_and_guided()
    guided.run = {**guided.run, "noise_mask": ["50.0 % (3fa2c1d9)"] * 2}
    rows = audit_rows(guided, q=0.5, size=(8, 8))
    assert [r["noise_mask"] for r in rows[:2]] == ["50.0 % (3fa2c1d9)"] * 2
    assert {r["noise_mask"] for r in audit_rows(base, q=0.5, size=(8, 8))} == {""}
    with pytest.raises(ValueError, match=r"differ in every value of noise_mask; log λ = 0 runs with the guided runs' "
                                         r"noise_mask, changing guidance_scale alone$"):
        reductions(audit_rows(base, q=0.5, size=(8, 8)) + rows)
    masked_base = copy.deepcopy(base)
    masked_base.run = {**base.run, "noise_mask": ["50.0 % (3fa2c1d9)"] * 2}  # the same mask at λ = 0: they pair
    assert {r["semantic"]: r["images"] for r in reductions(audit_rows(masked_base, q=0.5, size=(8, 8)) + rows)} == {
        "doctor": 2, "nurse": 2}
    # Inpainted and text-to-image pairs in one file: made otherwise, so averaged apart.
    unmasked = copy.deepcopy(guided)
    unmasked.run = dict(base.run)
    every = [audit_rows(t, q=0.5, size=(8, 8)) for t in (masked_base, guided, base, unmasked)]
    assert sorted((f["semantic"], f.get("noise_mask", ""), f["images"]) for f in reductions(sum(every, []))) == [
        ("doctor", "", 2), ("doctor", "50.0 % (3fa2c1d9)", 2), ("nurse", "", 2), ("nurse", "50.0 % (3fa2c1d9)", 2)]
    unmasked = halves_trace()
    unmasked.settings, unmasked.run = base.settings, RUN
    report = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8)).against(
        measure_entanglement(unmasked, "gender", "nurse", 0.5, (8, 8)))
    assert report.splitlines()[-1] == ("note: the baseline differs in noise mask (none, this run 50.0 % (3fa2c1d9)): "
                                       "the change is not guidance's alone (compare runs that differ only in λ)")
    guided.run["noise_mask"] = ["50.0 % (3fa2c1d9)", "25.0 % (0b1c2d3e)"]  # one mask per image
    report = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8)).report
    assert "run: seed 42 · euler/normal · 2 steps · noise mask 50.0 % (3fa2c1d9) / 25.0 % (0b1c2d3e) · " in report


def test_an_image_pairs_only_with_one_of_the_same_precision_and_a_sweep_in_another_is_summarised_apart():
    # fp16 and fp32 round the maps, and so the IoUs, otherwise: --fp16-unet at λ = 0 and fp32 guided is no pair.
    base, guided = _baseline_and_guided(precision="fp16")
    rows = audit_rows(guided, q=0.5, size=(8, 8))
    assert {r["precision"] for r in rows} == {"fp16"}
    wider = copy.deepcopy(base)
    wider.run = {**base.run, "precision": "fp32"}
    with pytest.raises(ValueError, match=r"differ in every value of precision; log λ = 0 runs with the guided "
                                         r"runs' precision, changing guidance_scale alone$"):
        reductions(audit_rows(wider, q=0.5, size=(8, 8)) + rows)
    both = [audit_rows(t, q=0.5, size=(8, 8)) for t in (base, guided, wider)]
    wider_guided = copy.deepcopy(guided)
    wider_guided.run = wider.run
    both.append(audit_rows(wider_guided, q=0.5, size=(8, 8)))
    lines = reductions_text([row for rows_ in both for row in rows_]).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [f"λ 100 · precision {p} · {w}" for p in ("fp16", "fp32")
                                                      for w in ("doctor", "nurse")]


def test_rows_say_which_environment_computed_them_and_images_of_other_machines_still_pair():
    # A machine's rounding moves an IoU in its last digits, far less than guidance: the column says which machine made
    # a row that does not reproduce; an audit spread over several GPUs (or a CPU and a GPU) pairs as one.
    base, guided = _baseline_and_guided()
    cpu, gpu = "BiasMap 0.1.0 · ComfyUI 0.8.0 · torch 2.14.1+cpu · CPU, 2 threads · pytorch attention", \
        "BiasMap 0.1.0 · ComfyUI 0.8.0 · torch 2.14.1 · NVIDIA H200 · pytorch attention"
    base.run, guided.run = {**base.run, "environment": cpu}, {**guided.run, "environment": gpu}
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    assert [r["environment"] for r in rows] == [cpu] * 4 + [gpu] * 4
    assert list(rows[0]).index("environment") == list(rows[0]).index("precision") + 1
    assert {r["semantic"]: r["images"] for r in reductions(rows)} == {"doctor": 2, "nurse": 2}


def test_an_img2img_image_pairs_only_with_one_from_the_same_start_latent_and_its_report_names_it():
    # One seed from two source images (img2img), or a second pass after two first passes that differ: other images.
    base, guided = _baseline_and_guided(start_latent=None)  # the baseline from an empty latent
    guided.run = {**guided.run, "start_latent": ["1a2b3c4d", "5e6f7a8b"]}
    rows = audit_rows(guided, q=0.5, size=(8, 8))
    assert [r["start_latent"] for r in rows[:2]] == ["1a2b3c4d", "5e6f7a8b"]
    assert {r["start_latent"] for r in audit_rows(base, q=0.5, size=(8, 8))} == {""}
    with pytest.raises(ValueError, match=r"differ in every value of start_latent; log λ = 0 runs with the guided "
                                         r"runs' start_latent, changing guidance_scale alone$"):
        reductions(audit_rows(base, q=0.5, size=(8, 8)) + rows)
    same_start = copy.deepcopy(base)
    same_start.run = {**base.run, "start_latent": ["1a2b3c4d", "5e6f7a8b"]}  # the same source images at λ = 0
    assert {r["semantic"]: r["images"] for r in reductions(audit_rows(same_start, q=0.5, size=(8, 8)) + rows)} == {
        "doctor": 2, "nurse": 2}
    other_start = copy.deepcopy(base)
    other_start.run = {**base.run, "start_latent": ["1a2b3c4d", "00000000"]}  # image 1 from another source
    text = reductions_text(audit_rows(other_start, q=0.5, size=(8, 8)) + rows)
    assert ("left out: 1 unpaired (the first, seed 42 image 1: its λ = 0 row differs in start_latent: 00000000 at "
            "λ = 0, 5e6f7a8b guided)") in text
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    assert after.baseline_notes(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8))) == [
        "the baseline differs in start latent (empty, this run 1a2b3c4d / 5e6f7a8b): the change is not guidance's "
        "alone (compare runs that differ only in λ)"]
    assert after.baseline_notes(measure_entanglement(same_start, "gender", "nurse", 0.5, (8, 8))) == []
    unsaid = copy.deepcopy(base)
    unsaid.run = dict(RUN)  # a trace saved before the start latent was recorded: not known to differ
    assert after.baseline_notes(measure_entanglement(unsaid, "gender", "nurse", 0.5, (8, 8))) == []
    assert "· 2 steps · start latent 1a2b3c4d / 5e6f7a8b · cfg 7 ·" in after.report
    assert "start latent" not in measure_entanglement(base, "gender", "nurse", 0.5, (8, 8)).report


def test_a_baseline_at_this_runs_lambda_that_differs_otherwise_is_said_to_differ_in_that_not_in_guidance():
    # Second passes at λ = 0 after a guided and an unguided first pass: the change is the first passes', one note.
    base, _ = _baseline_and_guided(start_latent=["1a2b3c4d", "1a2b3c4d"])
    other = copy.deepcopy(base)
    other.run = {**base.run, "start_latent": ["5e6f7a8b", "5e6f7a8b"]}
    after = measure_entanglement(other, "gender", "nurse", 0.5, (8, 8))
    assert after.baseline_notes(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8))) == [
        "the baseline has this run's λ (0) and differs in start latent (1a2b3c4d, this run 5e6f7a8b): the change is "
        "of those, not of guidance in this run (compare runs that differ only in λ)"]


def test_runs_at_one_lambda_guided_against_other_concepts_or_with_the_middle_block_compare_guidance():
    _, guided = _baseline_and_guided()
    at_100 = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    against_race = copy.deepcopy(guided)
    against_race.demographic = ["gender", "race"]  # guided against both: not "nothing of the change is guidance's"
    assert measure_entanglement(against_race, "gender", "nurse", 0.5, (8, 8)).baseline_notes(at_100) == []
    middle = copy.deepcopy(guided)
    middle.settings = {**guided.settings, "include_middle": True}  # guided there too, and its maps summed too
    assert measure_entanglement(middle, "gender", "nurse", 0.5, (8, 8)).baseline_notes(at_100) == [
        "the baseline differs in include_middle (n/a, this run on): the change is not guidance's alone (compare "
        "runs that differ only in λ)"]
    retyped = copy.deepcopy(guided)
    retyped.semantic = ["Nurse", "doctor"]  # the same concepts to guidance, in another order and case
    assert measure_entanglement(retyped, "gender", "nurse", 0.5, (8, 8)).baseline_notes(at_100)[0].startswith(
        "the baseline has this run's λ (100), so nothing of the change is guidance's")
    at_zero = copy.deepcopy(against_race)
    at_zero.settings = {"scale": 0.0, "guided_stages": None}  # λ = 0: the concepts guide nothing
    assert measure_entanglement(at_zero, "gender", "nurse", 0.5, (8, 8)).baseline_notes(
        measure_entanglement(at_zero, "gender", "nurse", 0.5, (8, 8)))[0].startswith(
        "the baseline has this run's λ (0), so nothing of the change is guidance's")


def test_audits_of_other_attribution_prompts_in_one_file_are_averaged_apart_and_count_each_image_once():
    # A word's map is its share of the prompt's words: an audit against gender and one against gender and race
    # measure the same pictures otherwise, while an audit's professions share one prompt but for the profession.
    base, guided = _baseline_and_guided()
    wider_base, wider = _baseline_and_guided(attribution_prompt="a doctor, nurse and gender and race")
    for trace in (wider_base, wider):
        for stage in trace.stages:
            trace.maps[stage][:, 0, 3] = trace.maps[stage][:, 0, 4]  # image 0's nurse where gender is: IoU 1
    at_zero = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(wider_base, q=0.5, size=(8, 8))
    lines = reductions_text(at_zero).splitlines()[1:]
    assert [line.split(": ")[0] for line in lines] == [
        f"attribution_template a {{}}, {{}} and gender{race} · {word}" for race in ("", " and race")
        for word in ("doctor", "nurse")]
    assert all(line.endswith("over 2 image(s)") for line in lines)  # not 4: each audit's 2 pictures once
    rows = at_zero + audit_rows(guided, q=0.5, size=(8, 8)) + audit_rows(wider, q=0.5, size=(8, 8))
    figures = reductions(rows)
    assert sorted((f["attribution_template"], f["semantic"], f["images"], f["baselines_unpaired"])
                  for f in figures) == [
        ("a {}, {} and gender", "doctor", 2, 0), ("a {}, {} and gender", "nurse", 2, 0),
        ("a {}, {} and gender and race", "doctor", 2, 0), ("a {}, {} and gender and race", "nurse", 2, 0)]
    nurse = {f["attribution_template"]: f["base"] for f in figures if f["semantic"] == "nurse"}
    assert nurse == pytest.approx({"a {}, {} and gender": 2 / 3, "a {}, {} and gender and race": 1.0})
    (pooled,) = reductions(audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8)), by=None)
    assert pooled["images"] == 4  # one audit's professions, each in its own place of the prompt, pool
    with pytest.raises(ValueError, match=r"differ in every value of attribution_prompt; log λ = 0 runs with the "
                                         r"guided runs' attribution_prompt, changing"):  # not the template made of it
        reductions(audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(wider, q=0.5, size=(8, 8)))


def test_concepts_typed_in_another_case_or_spacing_pair_as_clip_reads_them():
    # 'Nurse' typed into Audit Log on one pass and the trace's 'nurse' on the other are one concept to CLIP.
    base, guided = _baseline_and_guided()
    retyped = [{**row, "demographic": "Gender", "semantic": {"nurse": " Nurse", "doctor": "DOCTOR"}[row["semantic"]]}
               for row in audit_rows(guided, q=0.5, size=(8, 8))]
    figures = reductions(audit_rows(base, q=0.5, size=(8, 8)) + retyped)
    assert sorted((f["semantic"], f["images"], f["unpaired"]) for f in figures) == [(" Nurse", 2, 0), ("DOCTOR", 2, 0)]
    assert all("demographic" not in f for f in figures)  # one demographic concept: not a column of the figures
    curly = [{**row, "semantic": row["semantic"].replace("nurse", "nurse’s aide")}  # as ftfy straightens it
             for row in audit_rows(guided, q=0.5, size=(8, 8))]
    straight = [{**row, "semantic": row["semantic"].replace("nurse", "nurse's aide")}
                for row in audit_rows(base, q=0.5, size=(8, 8))]
    assert {f["semantic"]: f["images"] for f in reductions(straight + curly)} == {"doctor": 2, "nurse’s aide": 2}
    lonely = [{**row, "seed": 7} for row in retyped]  # no λ = 0 row of seed 7: the reason names both by values
    text = reductions_text(audit_rows(base, q=0.5, size=(8, 8)) + retyped + lonely, by=("demographic", "semantic"))
    assert "(the first: no λ = 0 row of Gender · DOCTOR at seed 7 yet)" in text


def test_rows_of_other_batch_sizes_are_averaged_apart_and_named_by_their_batch_size():
    # A batch of 2 at seed s starts its first image from the noise a batch of 1 at seed s starts from: with a sampler
    # that draws no noise as it goes they are one image, which a mean over both batch sizes would count twice.
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    alone = [{**r, "batch_size": 1} for r in rows if r["image"] == 0]
    assert sorted((f["semantic"], f["batch_size"], f["images"]) for f in reductions(rows + alone)) == [
        ("doctor", 1, 1), ("doctor", 2, 2), ("nurse", 1, 1), ("nurse", 2, 2)]
    assert [line.split(":")[0] for line in reductions_text(rows + alone).splitlines()[1:]] == [
        f"λ 100 · batch_size {b} · {w}" for b in (2, 1) for w in ("doctor", "nurse")]
    assert [line.split(":")[0] for line in reductions_text(rows).splitlines()[1:]] == [
        "λ 100 · doctor", "λ 100 · nurse"]


@pytest.mark.parametrize("column, value, read_as, started_before", [
    ("noise_mask", "50.0 % (3fa2c1d9)", "sampled without a noise mask",
     ("noise_mask", "start_latent", "precision", "environment")),
    ("start_latent", "1a2b3c4d", "sampled from an empty latent", ("start_latent", "precision", "environment"))],
    ids=["an inpainted run", "an img2img run"])
def test_rows_are_refused_by_a_file_started_before_the_column_that_tells_their_run_apart(tmp_path, column, value,
                                                                                       read_as, started_before):
    path = tmp_path / "audit.csv"
    append_csv(str(path), [{k: v for k, v in row.items() if k not in started_before}
                           for row in audit_rows(halves_trace(), q=0.5)])
    made_so = halves_trace()
    made_so.run = {**made_so.run, column: [value] * 2}
    with pytest.raises(OlderFileError, match=rf"before BiasMap wrote the column\(s\) {column}, without which these "
                                             rf"rows would read as rows {read_as}, and pair with"):
        append_csv(str(path), audit_rows(made_so, q=0.5), needed=(column,))


def test_reductions_text_says_which_rows_it_left_out_duplicates_too():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8)) * 2  # queued twice
    rows[0] = {**rows[0], "iou": float("nan")}  # the λ = 0 doctor of image 0: n/a by IoU, measured by mBIoU
    doctor, nurse = reductions_text(rows).splitlines()[1:]
    assert doctor.endswith("(0.0 %, per image 0.0 %) over 1 image(s) (left out: 2 not measured, 1 duplicates); mbiou "
                           "0.3333 → 0.3333 (0.0 %, per image 0.0 %) over 2 image(s) (left out: 2 duplicates)")
    assert nurse.endswith("; 2 image(s); left out: 2 duplicates")
    every = [{**row, "iou": float("nan")} if row["semantic"] == "doctor" else row for row in rows]
    assert reductions_text(every).splitlines()[1] == (  # all n/a by IoU: not "none paired yet"
        "λ 100 · doctor: iou n/a (no figure of its paired images) over 0 image(s) (left out: 4 not measured); mbiou "
        "0.3333 → 0.3333 (0.0 %, per image 0.0 %) over 2 image(s) (left out: 2 duplicates)")
    assert reductions_text(every, metrics=("iou",)).splitlines()[1] == (
        "λ 100 · doctor: n/a (no figure of its paired images); 0 image(s); left out: 4 not measured")


def test_reductions_count_the_lambda_0_rows_of_an_image_logged_again_as_they_count_the_guided_ones():
    # Audit Log logs a cached λ = 0 run again when only its label changes: one row of each image counts, and the
    # summary says how many it left out, as it does for guided rows.
    base, guided = _baseline_and_guided()
    base_rows = audit_rows(base, q=0.5, size=(8, 8))
    relabelled = [{**row, "label": "again"} for row in base_rows if row["semantic"] == "nurse"]
    unpaired = [{**row, "seed": 99} for row in audit_rows(guided, q=0.5, size=(8, 8)) if row["semantic"] == "nurse"]
    rows = base_rows + relabelled + audit_rows(guided, q=0.5, size=(8, 8))
    figures = {f["semantic"]: f for f in reductions(rows + unpaired)}  # rows without a λ = 0 row add none
    assert (figures["nurse"]["unpaired"], figures["nurse"]["baseline_duplicates"]) == (2, 2)
    assert figures["doctor"]["baseline_duplicates"] == 0
    once = {f["semantic"]: f for f in reductions(base_rows + audit_rows(guided, q=0.5, size=(8, 8)))}
    assert figures["nurse"]["reduction"] == once["nurse"]["reduction"] and once["nurse"]["baseline_duplicates"] == 0
    doctor, nurse = reductions_text(rows).splitlines()[1:]
    assert nurse.endswith("; 2 image(s); left out: 2 λ = 0 duplicates") and "left out" not in doctor
    assert {row["baseline_duplicates"] for row in reductions_table(rows) if row["semantic"] == "nurse"} == {2}


def test_seeds_a_spreadsheet_saved_in_scientific_notation_are_refused_not_read_as_one_seed(tmp_path):
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    shortened = [{**row, "seed": "1.56680E+14"} for row in rows]  # 156680000000001 and …002 alike
    fix = "seeds shortened to scientific notation, which loses their last digits; give the audit another file name"
    with pytest.raises(ValueError, match=rf"a seed in the rows reads 1.56680E\+14, not a whole number: .*{fix}"):
        reductions(shortened)
    assert reductions_report(shortened)[0].startswith("entanglement over the file: none: a seed in the rows reads")
    assert reductions_report([r for r in shortened if r["guidance_scale"] == 0])[0].startswith(
        "entanglement over the file: none: a seed in the rows reads")  # the means count images by seed too
    decimals = [{**row, "seed": "156680000000001.0"} for row in rows]  # read as floats by a tool, written so
    with pytest.raises(ValueError, match=r"reads 156680000000001.0, not a whole number: BiasMap writes seeds as whole "
                                         r"numbers, and a tool that read them as decimals wrote them back so"):
        reductions(decimals)
    for typed in ("=HYPERLINK(1)", "seven"):  # text, with an e or not: no spreadsheet's notation
        with pytest.raises(ValueError, match=rf"reads {re.escape(typed)}, not a whole number: it is no number \(typed "
                                             rf"or pasted into the file by hand\?\); write that row's seed back"):
            reductions([{**row, "seed": typed} for row in rows])
    path = str(tmp_path / "audit.csv")
    append_csv(path, rows)
    assert reductions(read_csv(path))[0]["images"] == 2  # whole numbers as the file writes them
    unseeded = [{**row, "seed": ""} for row in read_csv(path)]  # a notebook's trace without a seed: no seed to check
    assert reductions(unseeded)[0]["images"] == 2


def test_reductions_count_the_lambda_0_images_of_a_group_that_no_guided_row_of_it_has():
    # A guided run interrupted, or a λ of a sweep not yet run for every seed: its λ = 0 images are named, not dropped.
    base, guided = _baseline_and_guided()
    base_rows, guided_rows = audit_rows(base, q=0.5, size=(8, 8)), audit_rows(guided, q=0.5, size=(8, 8))
    other_seed = [{**row, "seed": 7} for row in base_rows]  # its guided run never logged
    half = copy.deepcopy(guided)
    half.settings = {**guided.settings, "scale": 200.0}  # λ 200 of image 0 only
    swept = [row for row in audit_rows(half, q=0.5, size=(8, 8)) if row["image"] == 0]
    heun = [{**row, "sampler": "heun", "seed": 8} for row in base_rows]  # made otherwise: no group's
    figures = {(f["guidance_scale"], f["semantic"]): f for f in reductions(base_rows + other_seed + heun + guided_rows
                                                                         + swept)}
    assert {k: f["baselines_unpaired"] for k, f in figures.items()} == {
        (100.0, "doctor"): 2, (100.0, "nurse"): 2, (200.0, "doctor"): 3, (200.0, "nurse"): 3}
    assert figures[100.0, "nurse"]["images"] == 2 and figures[200.0, "nurse"]["images"] == 1
    masked = [{**row, "seed": 9, "noise_mask": "50.0 % (3fa2c1d9)"} for row in base_rows]  # inpainted: no group's
    assert {f["semantic"]: f["baselines_unpaired"] for f in reductions(base_rows + masked + guided_rows)} == {
        "doctor": 0, "nurse": 0}
    lines = reductions_text(base_rows + other_seed + guided_rows).splitlines()[1:]
    assert [line.split("; left out: ")[1] for line in lines] == ["2 λ = 0 unpaired"] * 2
    assert all("left out" not in line for line in reductions_text(base_rows + guided_rows).splitlines()[1:])


def test_reductions_name_only_the_columns_in_which_no_guided_row_meets_a_lambda_0_row():
    # The λ = 0 pass got the next seed and logged nurse alone: the seed kept the rows apart, not the concept.
    _, guided = _baseline_and_guided()
    other_seed = halves_trace()
    other_seed.run, other_seed.settings = {**RUN, "seed": 43}, {"scale": 0.0, "guided_stages": None}
    nurse_only = [r for r in audit_rows(other_seed) if r["semantic"] == "nurse"]
    with pytest.raises(ValueError, match=r": the guided and λ = 0 rows differ in every value of seed; log"):
        reductions(nurse_only + audit_rows(guided))


def test_reductions_that_pair_nothing_name_where_the_nearest_lambda_0_row_differs_when_no_column_keeps_all_apart():
    # An image guided again alone (Latent From Batch) is image 0 of its batch: its noise's λ = 0 row is image 2 of its
    # own batch, which sampled it batched with others. The seed and the noise match; the position does not.
    base = halves_trace()
    base.settings = {"scale": 0.0, "guided_stages": None}
    base_rows = [{**r, "noise_index": r["image"]} for r in audit_rows(base)]
    guided_rows = [{**r, "noise_index": 1} for r in audit_rows(halves_trace()) if r["image"] == 0]
    later = {**guided_rows[0], "steps": 9}  # a row after it, whose nearest λ = 0 row differs elsewhere
    with pytest.raises(ValueError, match=r"same image: the λ = 0 row nearest the first guided row differs from it in "
                                         r"image: 1 at λ = 0, 0 guided; log λ = 0 runs that differ from the guided "
                                         r"ones in guidance_scale alone$"):
        reductions(base_rows + guided_rows + [later])
    # Long values are cut around where they differ, not at the same place: a model named again with its CLIP.
    model = "v1-5.safetensors + detail_lora_v2_final.safetensors (0.8)"
    with_clip = model + " · clip: v1-5.safetensors + d.pt (0.5)"
    with pytest.raises(ValueError, match=r"in model: …al.safetensors \(0.8\) at λ = 0, …al.safetensors \(0.8\) · "
                                         r"clip: v1-5.safete… guided; log"):
        reductions([{**r, "model": model} for r in base_rows] + [{**base_rows[0], "model": with_clip, "seed": 7}]
                   + [{**r, "noise_index": r["image"], "model": with_clip} for r in audit_rows(halves_trace())])
    # Every guided image has its λ = 0 row, but no figure: said so, not an empty list of columns.
    with pytest.raises(ValueError, match=r": the first guided row has its λ = 0 row, but one of the two has no figure "
                                         r"\(n/a: no maps to threshold\)$"):
        reductions(base_rows + [{**r, "noise_index": r["image"], "iou": float("nan")}
                                for r in audit_rows(halves_trace())])


def test_reductions_refuse_a_column_to_match_that_the_rows_lack_naming_it():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    with pytest.raises(ValueError, match="the rows have no column\\(s\\) lable:"):
        reductions(rows, match=("lable",))  # a typo would otherwise pair every image as if it matched


def test_reductions_pair_rows_measured_over_the_same_steps_only():
    base, guided = _baseline_and_guided()
    late = audit_rows(guided, q=0.5, size=(8, 8), steps=(1, 1))
    with pytest.raises(ValueError, match=r"differ in every value of first_step; log"):
        reductions(audit_rows(base, q=0.5, size=(8, 8)) + late)
    figures = {r["semantic"]: r for r in reductions(audit_rows(base, q=0.5, size=(8, 8), steps=(1, 1)) + late)}
    assert figures["nurse"]["images"] == 2 and figures["nurse"]["reduction"] == pytest.approx(0.5, abs=1e-5)


def test_reductions_keep_runs_of_other_samplers_apart_and_name_the_sampler():
    # Each guided image was paired with its own sampler's baseline; one mean over both samplers mixed two conditions.
    rows = []
    for sampler, moved in (("euler", True), ("heun", False)):
        base, guided = _baseline_and_guided(sampler=sampler)
        if not moved:
            guided = copy.deepcopy(base)
            guided.settings = {"scale": 100.0, "guided_stages": None}
        rows += audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    figures = {(r["sampler"], r["semantic"]): r for r in reductions(rows)}
    assert len(figures) == 4 and figures["euler", "nurse"]["images"] == figures["heun", "nurse"]["images"] == 2
    assert figures["euler", "nurse"]["reduction"] == pytest.approx(0.5, abs=1e-5)
    assert figures["heun", "nurse"]["reduction"] == pytest.approx(0.0, abs=1e-6)
    lines = reductions_text(rows).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [f"λ 100 · sampler {s} · {w}" for s in ("euler", "heun")
                                                      for w in ("doctor", "nurse")]


def test_reductions_text_gives_each_configuration_and_concept_its_change_both_ways(tmp_path):
    base, guided = _baseline_and_guided()
    other = halves_trace()  # λ 50 on down_1 only: image 1's nurse stays where it was
    other.settings = {"scale": 50.0, "guided_stages": ["down_1"]}
    path = str(tmp_path / "audit.csv")
    for trace in (base, guided, other):
        append_csv(path, audit_rows(trace, q=0.5, size=(8, 8)))
    lines = reductions_text(read_csv(path)).splitlines()
    assert lines[0].startswith("reductions over the file")
    # Named by what tells the configurations apart; nurse: (2/3 − 1/3) / (2/3), per image (0 + 2/3) / 2.
    assert lines[1:] == [
        "λ 100 · guided_stages all · doctor: iou 0.3333 → 0.3333 (0.0 %, per image 0.0 %); "
        "mbiou 0.3333 → 0.3333 (0.0 %, per image 0.0 %); 2 image(s)",
        "λ 100 · guided_stages all · nurse: iou 0.6667 → 0.3333 (−50.0 %, per image −33.3 %); "
        "mbiou 0.6667 → 0.3333 (−50.0 %, per image −33.3 %); 2 image(s)",
        "λ 50 · guided_stages down_1 · doctor: iou 0.3333 → 0.3333 (0.0 %, per image 0.0 %); "
        "mbiou 0.3333 → 0.3333 (0.0 %, per image 0.0 %); 2 image(s)",
        "λ 50 · guided_stages down_1 · nurse: iou 0.6667 → 0.6667 (0.0 %, per image 0.0 %); "
        "mbiou 0.6667 → 0.6667 (0.0 %, per image 0.0 %); 2 image(s)"]
    unpaired = halves_trace()
    unpaired.run = {**RUN, "seed": 99}
    append_csv(path, audit_rows(unpaired, q=0.5, size=(8, 8)))
    assert reductions_text(read_csv(path), by=None).splitlines()[1] == (
        "λ 100 · guided_stages all: iou 0.5000 → 0.3333 (−33.3 %, per image −16.7 %); "
        "mbiou 0.5000 → 0.3333 (−33.3 %, per image −16.7 %); 4 image(s); left out: 4 unpaired (the first: no λ = 0 "
        "row at seed 99 yet)")
    other_seed = halves_trace()
    other_seed.run, other_seed.settings = {**RUN, "seed": 99}, {"scale": 0.0, "guided_stages": None}
    assert reductions_text(audit_rows(guided) + audit_rows(other_seed)).endswith(
        "the guided and λ = 0 rows differ in every value of seed; log λ = 0 runs with the guided runs' seed, changing "
        "guidance_scale alone (set the seed, or Audit Prompts' run, back to the first run's)")  # why, and what to do
    # Guided runs alone, their baselines still to come: each concept's means meanwhile, and what to log next.
    assert reductions_text(audit_rows(guided, q=0.5, size=(8, 8))).splitlines() == [
        "entanglement over the file (guided runs only so far; for the reductions, log the same seeds at λ = 0: set "
        "the seed, or Audit Prompts' run, back to the first run's; in brackets a 95 % bootstrap interval of the mean, "
        "given from 10 images on):",
        "λ 100 · doctor: iou 0.3333 · mbiou 0.3333 over 2 image(s)",
        "λ 100 · nurse: iou 0.3333 · mbiou 0.3333 over 2 image(s)"]
    # The λ = 0 pass under way: nurse's baselines logged, doctor's not yet.
    midway = [r for r in audit_rows(base, q=0.5, size=(8, 8)) if r["semantic"] == "nurse"]
    assert reductions_text(midway + audit_rows(guided, q=0.5, size=(8, 8))).splitlines()[1] == (
        "λ 100 · doctor: none paired yet (no λ = 0 row of its images); 0 image(s); left out: 2 unpaired (the first: "
        "no λ = 0 row of doctor at seed 42 yet)")


def test_reductions_text_keeps_demographic_concepts_apart_and_refuses_rows_without_a_scale():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    race = [{**row, "demographic": "race", "iou": 0.5} for row in rows]  # no change for race
    lines = reductions_text(rows + race).splitlines()
    measured_on_gender = "λ 100 · guided against demographic gender; semantic doctor, nurse · race"  # guided: gender
    assert [line.split(":")[0] for line in lines[1:]] == [
        "λ 100 · guided against semantic doctor, nurse · gender · doctor",
        "λ 100 · guided against semantic doctor, nurse · gender · nurse",
        f"{measured_on_gender} · doctor", f"{measured_on_gender} · nurse"]
    assert "iou 0.6667 → 0.3333 (−50.0 %" in lines[2] and "iou 0.5000 → 0.5000 (0.0 %" in lines[4]
    for by in (("demographic", "semantic"), "semantic"):  # apart also when not asked: a notebook's figures too
        (race_nurse,) = [f for f in reductions(rows + race, by=by) if f["demographic"] == "race"
                         and f["semantic"] == "nurse"]
        assert race_nurse["images"] == 2 and race_nurse["reduction"] == 0
    notebook = [{**rows[0], "guidance_scale": ""}]  # a trace made without the sampler's settings
    assert reductions_text(rows + notebook).endswith("1 row(s) have no number as guidance_scale (made from traces "
                                                     "without the sampler's settings): leave them out of the rows")


def test_a_file_of_lambda_0_rows_alone_keeps_configurations_apart_and_counts_images_of_other_labels():
    base, _ = _baseline_and_guided()
    coarse = audit_rows(base, q=0.5, pairs=[("gender", "nurse")], size=(8, 8))
    fine = audit_rows(base, q=0.9, pairs=[("gender", "nurse")], size=(8, 8))
    assert reductions_text(coarse + fine).splitlines()[1:] == [
        "q 0.5 · nurse: iou 0.6667 · mbiou 0.6667 over 2 image(s)", "q 0.9 · nurse: iou 0.0000 · mbiou 0.0000 over "
        "2 image(s)"]  # masks of another quantile are another figure: not averaged together
    wildcard = [{**row, "label": "a nurse, smiling"} for row in coarse]  # another prompt, in the label
    assert reductions_text(coarse + wildcard).splitlines()[1] == ("nurse: iou 0.6667 · mbiou 0.6667 over 4 image(s)")


def test_a_file_of_lambda_0_rows_alone_gets_each_concepts_means_each_image_once():
    base, _ = _baseline_and_guided()  # nurse: IoU 1/3 and 1; doctor 1/3 and 1/3
    rows = audit_rows(base, q=0.5, size=(8, 8))
    rows[1] = {**rows[1], "iou": float("nan")}  # doctor's image 1: n/a
    lines = reductions_text(rows + rows[2:3]).splitlines()  # nurse's image 0 logged twice
    assert lines == ["entanglement over the file (λ = 0 only; log guided runs of the same seeds for the reductions; in "
                     "brackets a 95 % bootstrap interval of the mean, given from 10 images on):",
                     "doctor: iou 0.3333 · mbiou 0.3333 over 2 image(s), 1 of them n/a",
                     "nurse: iou 0.6667 · mbiou 0.6667 over 2 image(s)"]
    # Label changed while the sampler's result was cached: the same run (prompt id, time, figures) is the same image.
    ran = [{**row, "prompt_id": "p1", "time": "2026-12-01T01:00:00.000001+00:00"} for row in rows]
    relabelled = [{**row, "label": "typo fixed"} for row in ran[2:3]]
    another_run = [{**row, "label": "a nurse, smiling", "prompt_id": "p2"} for row in ran[2:3]]  # made in the graph
    assert reductions_text(ran + relabelled).splitlines()[2] == "nurse: iou 0.6667 · mbiou 0.6667 over 2 image(s)"
    assert reductions_text(ran + another_run).splitlines()[2] == "nurse: iou 0.5556 · mbiou 0.5556 over 3 image(s)"
    # Two prompts made while one queued prompt ran, sampled in the same second: their figures tell them apart.
    same_second = [{**row, "label": "a nurse, smiling", "iou": 1.0, "mbiou": 1.0} for row in ran[2:3]]
    assert reductions_text(ran + same_second).splitlines()[2] == "nurse: iou 0.7778 · mbiou 0.7778 over 3 image(s)"
    as_pandas_reads = [{**row, "time": float("nan"), "label": "typo fixed"} for row in rows[2:3]]  # no time: a prompt
    assert reductions_text(rows + as_pandas_reads).splitlines()[2] == "nurse: iou 0.5556 · mbiou 0.5556 over 3 image(s)"


def test_a_result_against_its_baseline_gives_the_change_and_names_whatever_else_differs():
    base, guided = _baseline_and_guided()  # nurse: IoU 1/3 and 1 at λ = 0, 1/3 and 1/3 guided
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    lines = after.against(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8))).splitlines()
    assert lines == ["against the baseline (seed 42 · euler/normal · 2 steps · cfg 7 · λ 0): mIoU 0.6667 → 0.3333 "
                     "(−50.0 %) · mBIoU 0.6667 → 0.3333 (−50.0 %)",
                     "IoU per image: image 0 0.0 %, image 1 −66.7 %"]  # only λ differs: no note
    other = halves_trace()
    other.run = {**RUN, "seed": 7}
    note = after.against(measure_entanglement(other, "gender", "nurse", 0.5, (16, 16), steps=(1, 1))).splitlines()[-1]
    assert note == ("note: the baseline has this run's λ (100) and differs in seed (7, this run 42); masks (16×16, "
                    "this run 8×8); steps measured (1–1, this run all): the change is of those, not of guidance in "
                    "this run (compare runs that differ only in λ)")
    other.run = {**RUN, "seed": 2 ** 64 - 1}  # a seed in full, not 1.84467e+19
    note = after.against(measure_entanglement(other, "gender", "nurse", 0.5, (8, 8))).splitlines()[-1]
    assert note.startswith("note: the baseline has this run's λ (100) and differs in seed (18446744073709551615, this "
                           "run 42): the change")
    unnamed, named = halves_trace(), halves_trace()
    unnamed.run, named.run = {**RUN, "model": ""}, {**RUN, "model": "v1-5.safetensors"}  # "": a merged model
    unnamed.settings = dict(base.settings)
    assert measure_entanglement(named, "gender", "nurse", 0.5, (8, 8)).against(measure_entanglement(
        unnamed, "gender", "nurse", 0.5, (8, 8))).splitlines()[-1].startswith(
        "note: the baseline differs in model (—, this run v1-5.safetensors): the change")
    assert len(after.against(measure_entanglement(unnamed, "gender", "nurse", 0.5, (8, 8))).splitlines()) == 2
    scheduled, stock = halves_trace(), halves_trace()
    scheduled.run, stock.run = {**RUN, "sigmas": [14.6, 1.0, 0.0]}, {**RUN, "sigmas": [14.6, 3.2, 0.0]}  # custom
    scheduled.settings = dict(base.settings)
    assert measure_entanglement(stock, "gender", "nurse", 0.5, (8, 8)).against(
        measure_entanglement(scheduled, "gender", "nurse", 0.5, (8, 8))).endswith(
        "note: the baseline differs in the sampler's sigmas: the change is not guidance's alone (compare runs that "
        "differ only in λ)")
    recorded_otherwise = halves_trace(stages=("down_1", "mid_2", "up_1"))  # other maps: the mBIoU has a stage more
    recorded_otherwise.model_family = "SDXL"
    recorded_otherwise.settings = {"scale": 0.0, "include_middle": True, "branch": "cond"}
    for trace in (base, guided):
        trace.settings |= {"include_middle": False, "branch": "uncond"}
    note = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8)).against(
        measure_entanglement(recorded_otherwise, "gender", "nurse", 0.5, (8, 8))).splitlines()[-1]
    assert note.startswith("note: the baseline differs in model family (SDXL, this run SD15); include_middle (on, "
                           "this run off); branch (cond, this run uncond); stages (down_1 mid_2 up_1, this run "
                           "down_1 up_1): the change")
    drawn_apart = halves_trace()
    drawn_apart.run = {**RUN, "batch_index": [1, 2], "add_noise": False}  # Repeat Latent Batch of noise 1
    drawn_apart.settings = dict(guided.settings)
    guided.run = {**RUN, "add_noise": True}
    assert measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8)).against(
        measure_entanglement(drawn_apart, "gender", "nurse", 0.5, (8, 8))).splitlines()[-1] == (
        "note: the baseline has this run's λ (100) and differs in add_noise (off, this run on); the seed's noises "
        "(1 2, this run 0 1): the change is of those, not of guidance in this run (compare runs that differ only in "
        "λ)")
    apart = halves_trace()
    for stage in apart.stages:
        apart.maps[stage][:, :, 3] = apart.maps[stage][:, :, 4].flip(-1)  # nurse right, gender left: no overlap
    assert "mIoU 0.0000 → 0.3333 (n/a)" in after.against(measure_entanglement(apart, "gender", "nurse", 0.5, (8, 8)))
    flat = halves_trace()
    for stage in flat.stages:
        flat.maps[stage][:, :, 3] = 0  # no nurse anywhere: no mask to compare, not a mask that overlaps nothing
    assert "mIoU n/a → 0.3333" in after.against(measure_entanglement(flat, "gender", "nurse", 0.5, (8, 8)))


def test_a_baseline_that_was_guided_or_has_this_runs_lambda_is_said_to_measure_no_guidance():
    base, guided = _baseline_and_guided()
    guided.settings = {"scale": 100.0, "guided_stages": None}
    at_zero, at_100 = (measure_entanglement(t, "gender", "nurse", 0.5, (8, 8)) for t in (base, guided))
    assert at_zero.baseline_notes(at_100) == [  # the two links swapped
        "the baseline was guided (λ 100) and this run not: connect the trace of the same seed at λ = 0 as the baseline "
        "(if the two traces are swapped, swap their links)"]
    same = ("the baseline has this run's λ (0), so nothing of the change is guidance's (connect the trace of the same "
            "seed at λ = 0 as the baseline, and a guided run's as the trace)")
    assert at_zero.baseline_notes(at_zero) == [same] and at_zero.against(at_zero).endswith(f"\nnote: {same}")
    assert at_100.baseline_notes(at_zero) == []
    exact = halves_trace()  # as guided, at λ 100, but with the exact soft top-k: the change is guidance's
    exact.run, exact.settings = dict(RUN), {**guided.settings, "mode": "exact"}
    assert at_100.baseline_notes(measure_entanglement(exact, "gender", "nurse", 0.5, (8, 8))) == []
    assert measure_entanglement(exact, "gender", "nurse", 0.5, (8, 8)).baseline_notes(at_100) == []
    again = ("the baseline has this run's λ (100), so nothing of the change is guidance's (connect the trace of the "
             "same seed at λ = 0 as the baseline, and a guided run's as the trace)")
    assert at_100.baseline_notes(at_100) == [again]
    unsaid = halves_trace()  # made in a notebook: no λ to compare
    unsaid.run, unsaid.settings = dict(RUN), {}
    unsaid_result = measure_entanglement(unsaid, "gender", "nurse", 0.5, (8, 8))
    assert unsaid_result.baseline_notes(at_zero) == [] == unsaid_result.baseline_notes(at_100)


def test_a_result_against_its_baseline_averages_over_the_images_with_a_figure_and_pairs_images_of_equal_batches_only():
    base, guided = _baseline_and_guided()  # nurse: IoU 1/3 and 1 at λ = 0, 1/3 and 1/3 guided
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    for stage in base.stages:
        base.maps[stage][:, 1, 4, 0, 0] = float("nan")  # the baseline's image 1 overflowed: n/a
    lines = after.against(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8))).splitlines()
    assert "mIoU 0.3333 → 0.3333 (0.0 %)" in lines[0]  # image 0's figure, not n/a
    assert lines[1] == "IoU per image: image 0 0.0 %, image 1 n/a"
    one = halves_trace()  # the baseline's first image alone: no image to pair with image 1
    one.settings = {"scale": 0.0, "guided_stages": None}
    one.maps = {s: m[:, :1] for s, m in one.maps.items()}
    one.guidance = {k: v[:, :1] for k, v in one.guidance.items()}
    one.latent_shape = [1, 4, 8, 8]
    lines = after.against(measure_entanglement(one, "gender", "nurse", 0.5, (8, 8))).splitlines()
    assert not any(line.startswith("IoU per image") for line in lines) and "images (1, this run 2)" in lines[-1]


def test_read_csv_reads_back_the_rows_as_appended(tmp_path):
    path = str(tmp_path / "audit.csv")
    rows = audit_rows(halves_trace(), q=0.5, label="=1+1, \"quoted\"\nnew line")
    append_csv(path, rows)
    read = read_csv(path)
    assert list(read[0]) == list(rows[0]) and len(read) == len(rows)
    assert read[0]["label"] == "=1+1, \"quoted\"\nnew line" and read[3]["iou"] == str(rows[3]["iou"])


def test_reductions_tell_apart_seeds_beyond_floats_and_images_of_a_file_without_noise_index(tmp_path):
    base, guided = _baseline_and_guided(seed=2**63 + 1)
    other_base, other_guided = _baseline_and_guided(seed=2**63 + 2)  # a float takes both seeds for one
    for stage in other_guided.stages:  # this seed's guided images moved nothing
        other_guided.maps[stage] = other_base.maps[stage].clone()
    rows = [r for t in (base, guided, other_base, other_guided) for r in audit_rows(t, q=0.5, size=(8, 8))]
    path = tmp_path / "audit.csv"
    append_csv(str(path), [{k: v for k, v in r.items() if k != "noise_index"} for r in rows])  # an older file
    with open(path, newline="", encoding="utf-8-sig") as f:
        nurse = {r["semantic"]: r for r in reductions(csv.DictReader(f))}["nurse"]
    assert (nurse["images"], nurse["duplicates"]) == (4, 0)  # both images of both seeds, none taken for another
    assert nurse["reduction"] == pytest.approx((2 / 3 - 1 / 2) / (2 / 3), abs=1e-5)


def test_reductions_read_a_csv_opened_without_utf_8_sig_with_the_fix_named(tmp_path):
    base, guided = _baseline_and_guided()
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(base) + audit_rows(guided))
    with open(path, newline="", encoding="utf-8") as f:
        with pytest.raises(ValueError, match="encoding='utf-8-sig'"):
            reductions(csv.DictReader(f))
    with open(path, newline="", encoding="utf-8-sig") as f:
        (doctor, nurse) = reductions(csv.DictReader(f))
    assert (doctor["guidance_scale"], doctor["guided_stages"]) == (100.0, "all")  # as set, not as CSV text


def test_the_mean_of_per_image_reductions_leaves_out_images_without_overlap_at_lambda_0():
    # nurse: λ = 0 IoU 1/3 and 1, guided 1/3 and 1/3. With image 0's baseline at 0 (no overlap to reduce), the
    # per-image mean is image 1's alone, (1 − 1/3) / 1, not the average with a 0 for image 0.
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    rows = [{**r, "iou": 0.0} if (r["guidance_scale"], r["semantic"], r["image"]) == (0.0, "nurse", 0) else r
            for r in rows]
    nurse = {r["semantic"]: r for r in reductions(rows)}["nurse"]
    assert nurse["images"] == 2 and nurse["images_with_overlap"] == 1
    assert nurse["mean_image_reduction"] == pytest.approx(2 / 3, abs=1e-5)
    assert nurse["reduction"] == pytest.approx((1 / 2 - 1 / 3) / (1 / 2), abs=1e-5)


def test_audit_rows_of_a_wide_image_give_its_width_height_and_mask_size_as_width_by_height():
    tokens = ["<|startoftext|>", "a</w>", "doctor</w>", "and</w>", "gender</w>", "<|endoftext|>"]
    rec = TraceRecorder()
    rec.begin(torch.tensor(1.0), torch.tensor(0))
    rec.add("down_1", torch.rand(1, len(tokens), 8, 12, generator=torch.Generator().manual_seed(0)))
    rec.end()
    trace = rec.finish(tokens=tokens, latent_shape=[1, 4, 8, 12], demographic=["gender"], semantic=["doctor"],
                       run=RUN)
    (row,) = audit_rows(trace)
    assert (row["width"], row["height"], row["mask_size"]) == (96, 64, "96x64")
    assert audit_rows(trace, size=(8, 12))[0]["mask_size"] == "12x8"


def test_a_file_from_before_the_latest_columns_that_a_spreadsheet_reordered_takes_rows_in_its_order(tmp_path):
    path = tmp_path / "audit.csv"
    older = [{k: v for k, v in row.items() if k not in _LATEST} for row in audit_rows(halves_trace(), label="old")]
    order = sorted(older[0])
    append_csv(str(path), [{k: row[k] for k in order} for row in older])
    written = append_csv(str(path), audit_rows(halves_trace(), label="new"))
    assert list(written[0]) == order and [r["label"] for r in read_csv(str(path))] == ["old"] * 4 + ["new"] * 4


def test_append_csv_writes_each_value_under_its_heading_in_a_file_whose_columns_are_in_another_order(tmp_path):
    path = tmp_path / "audit.csv"
    path.write_bytes(b"iou,label\r\n0.5,a\r\n")
    append_csv(str(path), [{"label": "b", "iou": 0.25}])
    assert path.read_bytes() == b"iou,label\r\n0.5,a\r\n0.25,b\r\n"
    path.write_bytes(b"iou,label,iou\r\n0.5,a,0.5\r\n")  # a column named twice: refused, not guessed
    with pytest.raises(ValueError, match=r"names the column\(s\) 'iou' twice in its header: delete one of each"):
        append_csv(str(path), [{"label": "b", "iou": 0.25}])
    assert path.read_bytes() == b"iou,label,iou\r\n0.5,a,0.5\r\n"


def test_reductions_keep_the_earliest_logged_row_of_an_image_logged_twice_whatever_the_rows_order():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    again = [{**r, "iou": 1.0} for r in audit_rows(guided, q=0.5, size=(8, 8))]  # logged at the same time
    nurse = {r["semantic"]: r for r in reductions(rows + again)}["nurse"]
    assert nurse["duplicates"] == 2 and nurse["guided"] == pytest.approx(1 / 3, abs=1e-5)
    assert reductions(again + rows) == reductions(rows + again)  # of two logged at once, the lower figure
    near = [[{**r, "iou": r["iou"] + step * 8e-7, "time": f"2000-01-0{3 - step}"} for r in audit_rows(
        guided, q=0.5, size=(8, 8))] for step in range(3)]  # each within the CSV's rounding of the next, not of all
    orders = [reductions(rows + a + b + c) for a, b, c in itertools.permutations(near)]
    assert all(order[1]["guided"] == orders[0][1]["guided"] for order in orders)  # the earliest, in every order
    later = [{**r, "time": "2099-01-01T00:00:00+00:00"} for r in again]  # made again later (another thread count)
    assert {r["semantic"]: r for r in reductions(later + rows)}["nurse"]["guided"] == pytest.approx(1 / 3, abs=1e-5)
    timed = [{**r, "time": "2050-01-01T00:00:00+00:00"} for r in rows]
    earlier = [{**r, "time": "2000-01-01T00:00:00+00:00"} for r in again]
    assert {r["semantic"]: r for r in reductions(timed + earlier)}["nurse"]["guided"] == pytest.approx(1.0)
    # Said, not silent: a row whose figure differs from the one counted was made otherwise (another machine), or is
    # of another image that no column tells apart.
    assert nurse["differing_duplicates"] == 2
    assert reductions_text(rows + again).splitlines()[2] == (  # mbiou's rows logged again have its figures
        "λ 100 · nurse: iou 0.6667 → 0.3333 (−50.0 %, per image −33.3 %) over 2 image(s) (left out: 2 duplicates, 2 "
        "of them with other figures than the row counted); mbiou 0.6667 → 0.3333 (−50.0 %, per image −33.3 %) over 2 "
        "image(s) (left out: 2 duplicates)")
    same = {r["semantic"]: r for r in reductions(rows + audit_rows(guided, q=0.5, size=(8, 8)))}["nurse"]
    assert (same["duplicates"], same["differing_duplicates"]) == (2, 0)


@pytest.mark.parametrize("column, guided_measured", [("mask_size", {"size": None}), ("q", {"q": 0.7})])
def test_reductions_pair_rows_thresholded_alike_only(column, guided_measured):
    base, guided = _baseline_and_guided()
    with pytest.raises(ValueError, match=rf"differ in every value of {column}; log"):
        reductions(audit_rows(base, q=0.5, size=(8, 8))
                   + audit_rows(guided, **{"q": 0.5, "size": (8, 8)} | guided_measured))


def test_reductions_keep_a_sweep_of_gamma_apart():
    base, guided = _baseline_and_guided()
    base.settings = {"scale": 0.0, "guided_stages": None, "gamma": 0.01}
    rows = audit_rows(base, q=0.5, size=(8, 8))
    for gamma in (0.01, 0.02):
        guided.settings = {"scale": 100.0, "guided_stages": None, "gamma": gamma}
        rows += audit_rows(guided, q=0.5, size=(8, 8))
    nurse = [f for f in reductions(rows) if f["semantic"] == "nurse"]
    assert sorted(f["gamma"] for f in nurse) == [0.01, 0.02] and all(f["duplicates"] == 0 for f in nurse)


def test_reductions_give_a_boolean_setting_read_from_a_csv_back_as_a_boolean(tmp_path):
    base, guided = _baseline_and_guided()
    for trace in (base, guided):
        trace.settings = {**trace.settings, "include_middle": False}
    path = str(tmp_path / "audit.csv")
    append_csv(path, audit_rows(base) + audit_rows(guided))
    doctor, _ = reductions(read_csv(path))
    assert doctor["include_middle"] is False  # the text "False" would read as true


def test_reductions_text_of_guided_rows_with_one_row_without_a_scale_says_to_leave_it_out():
    _, guided = _baseline_and_guided()
    rows = audit_rows(guided, q=0.5, size=(8, 8))
    assert reductions_text(rows + [{**rows[0], "guidance_scale": ""}]).endswith("leave them out of the rows")


def test_the_report_says_when_lambda_was_set_but_no_evaluation_was_guided():
    trace = halves_trace()
    trace.guidance["status"] = torch.full_like(trace.guidance["status"], STATUS["not_guided"])
    report = measure_entanglement(trace, "gender", "doctor", 0.5, (8, 8)).report
    assert "no evaluation was guided although λ = 100" in report and "(λ = 0)" not in report


def test_a_result_against_its_baseline_names_another_negative_prompt_and_other_token_pieces():
    base, guided = _baseline_and_guided()
    base.run, guided.run = {**RUN, "negative_prompt": "blurry"}, {**RUN, "negative_prompt": "lowres"}
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    assert "negative (blurry, this run lowres)" in after.against(measure_entanglement(base, "gender", "nurse", 0.5,
                                                                                      (8, 8)))
    other = halves_trace()
    other.tokens = ["<|startoftext|>", "doctor</w>", "nur", "se</w>", "gender</w>", "<|endoftext|>"]
    assert "tokens of 'nurse' (nur se</w>, this run nurse</w>)" in after.against(
        measure_entanglement(other, "gender", "nurse", 0.5, (8, 8)))


def test_the_report_of_a_one_step_run_says_one_step():
    trace = halves_trace()
    trace.run = {**RUN, "steps": 1}
    assert " · 1 step · " in measure_entanglement(trace, "gender", "doctor", 0.5, (8, 8)).report


def test_biou_is_each_stages_own_iou_mbiou_their_mean_and_iou_that_of_the_summed_maps():
    # Every stage of halves_trace holds the same maps, where BIoU, mBIoU and IoU coincide whatever they are made of.
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    top = left.t()
    rec = TraceRecorder()
    rec.begin(torch.tensor(10.0), torch.tensor(0))
    for stage, (gender, doctor) in {"down_1": (left, top), "up_1": (left, left)}.items():
        maps = torch.zeros(1, len(TOKENS), 8, 8)
        maps[0, 4], maps[0, 2] = gender, doctor
        rec.add(stage, maps)
    rec.end()
    trace = rec.finish(tokens=TOKENS, latent_shape=[1, 4, 8, 8], demographic=["gender"], semantic=["doctor"],
                       model_family="SD15", settings={}, notes=[], run={})
    result = measure_entanglement(trace, "gender", "doctor", 0.5, (8, 8))
    # down_1: left against top, 16 of 48 pixels; up_1: left against left. Summed, gender is 2 on the left half and
    # doctor 2 on the top-left quarter, 1 on the top-right and bottom-left: its top half (> the median, 1) is that
    # quarter, 16 of gender's 32 pixels.
    assert {s: v.item() for s, v in result.block_ious.items()} == pytest.approx({"down_1": 1 / 3, "up_1": 1.0})
    assert result.mbiou.item() == pytest.approx(2 / 3) and result.ious.item() == pytest.approx(0.5)
    row = audit_rows(trace, q=0.5, size=(8, 8))[0]
    assert (row["biou_down_1"], row["biou_up_1"], row["mbiou"], row["iou"]) == pytest.approx((1 / 3, 1, 2 / 3, 0.5))


def test_an_older_file_refuses_rows_needing_its_missing_columns_with_an_older_file_error_of_those_alone(tmp_path):
    from biasmap_engine import OlderFileError

    path = tmp_path / "audit.csv"  # started after mask_size, before the step window
    append_csv(str(path), [{k: v for k, v in row.items() if k not in ("first_step", "last_step", *_LATEST)}
                           for row in audit_rows(halves_trace(), q=0.5)])
    with pytest.raises(ValueError) as refused:  # a ValueError, as the nodes' plain_errors and callers expect
        append_csv(str(path), audit_rows(halves_trace(), q=0.5), needed=("first_step", "last_step", "mask_size"))
    assert isinstance(refused.value, OlderFileError) and refused.value.lost == ["first_step", "last_step"]
    older = tmp_path / "older.csv"
    later, rows = ("sigmas", "mask_size", "first_step", "last_step", *_LATEST), audit_rows(halves_trace(), q=0.5)
    append_csv(str(older), [{k: v for k, v in row.items() if k not in later} for row in rows])
    with pytest.raises(OlderFileError, match="column\\(s\\) sigmas, first_step, last_step, mask_size, without which "
                                             "these rows would read as rows on the schedule of every other run of "
                                             "custom sigmas, of every step and at the image's size, and pair"):
        append_csv(str(older), audit_rows(halves_trace(), q=0.5), needed=("sigmas", "first_step", "last_step",
                                                                            "mask_size"))


def test_a_file_started_between_first_step_and_last_step_refuses_a_window_with_an_older_file_error(tmp_path):
    # The header check takes a file that lacks last_step alone as an older one; its refusal must still be a message.
    from biasmap_engine import OlderFileError

    path = tmp_path / "audit.csv"
    rows = audit_rows(halves_trace(), q=0.5)
    append_csv(str(path), [{k: v for k, v in row.items() if k not in ("last_step", *_LATEST)} for row in rows])
    with pytest.raises(OlderFileError, match=r"column\(s\) last_step, without which these rows would read as rows of "
                                             r"every step"):
        append_csv(str(path), audit_rows(halves_trace(), q=0.5), needed=("first_step", "last_step"))


def _seeds_audit(reductions_by_seed, base=lambda seed: 0.4 + 0.01 * (seed % 10)):
    """Rows of one concept pair over seeds: each seed's λ = 0 IoU and its guided IoU, reduced by the given fraction."""
    rows = []
    for seed, reduction in enumerate(reductions_by_seed):
        rows.append({"guidance_scale": 0.0, "iou": base(seed), "semantic": "nurse", "seed": seed})
        rows.append({"guidance_scale": 100.0, "iou": base(seed) * (1 - reduction), "semantic": "nurse", "seed": seed})
    return rows


def test_reductions_give_a_bootstrap_interval_around_each_figure_that_narrows_as_seeds_are_added():
    spread = [0.2 + 0.04 * (seed % 11) for seed in range(44)]  # per-image reductions 0.2 … 0.6, four of each
    (few,) = reductions(_seeds_audit(spread))
    (many,) = reductions(_seeds_audit(spread * 4))  # the same images' spread over four times the seeds
    for figures in (few, many):
        for name in ("reduction", "mean_image_reduction"):
            low, high = figures[f"{name}_interval"]
            assert low < figures[name] < high
    width = {n: [f[f"{n}_interval"][1] - f[f"{n}_interval"][0] for f in (few, many)]
             for n in ("reduction", "mean_image_reduction")}
    # A mean's interval shrinks as 1/√n: about half as wide from four times the seeds.
    assert all(0.35 < narrow / wide < 0.65 for wide, narrow in width.values())
    # The per-image mean's: ± 1.96 standard errors of the 44 reductions (bootstrap's rounding aside).
    sd = torch.tensor(spread, dtype=torch.float64).std(correction=0).item()
    assert width["mean_image_reduction"][0] == pytest.approx(2 * 1.96 * sd / 44 ** 0.5, rel=0.15)


def test_the_same_rows_give_the_same_interval_and_images_reduced_alike_an_interval_of_no_width():
    spread = [0.1 * (seed % 7) for seed in range(30)]
    assert reductions(_seeds_audit(spread)) == reductions(_seeds_audit(spread))
    (alike,) = reductions(_seeds_audit([0.4] * 30))
    assert alike["reduction_interval"] == pytest.approx((0.4, 0.4)) and alike["reduction"] == pytest.approx(0.4)
    assert alike["mean_image_reduction_interval"] == pytest.approx((0.4, 0.4))
    # Images without overlap at λ = 0 have nothing to reduce: left out of each resample's per-image mean too.
    (some_apart,) = reductions(_seeds_audit([0.4] * 30, base=lambda seed: 0.5 if seed % 3 else 0.0))
    assert some_apart["mean_image_reduction_interval"] == pytest.approx((0.4, 0.4))


def test_an_interval_needs_ten_paired_images_and_for_the_per_image_mean_ten_with_overlap():
    spread = [0.05 * seed for seed in range(12)]
    (nine,) = reductions(_seeds_audit(spread[:9]))
    assert all(math.isnan(v) for v in nine["reduction_interval"] + nine["mean_image_reduction_interval"])
    (ten,) = reductions(_seeds_audit(spread[:10]))
    assert all(math.isfinite(v) for v in ten["reduction_interval"] + ten["mean_image_reduction_interval"])
    # Twelve images, three without overlap at λ = 0: the reduction of the means has an interval, the per-image mean
    # (over nine images) not; with two without overlap it has one (over ten).
    for apart, with_interval in ((3, False), (2, True)):
        (some,) = reductions(_seeds_audit(spread, base=lambda seed, apart=apart: 0.0 if seed < apart else 0.5))
        assert some["images"] == 12 and some["images_with_overlap"] == 12 - apart
        assert all(math.isfinite(v) for v in some["reduction_interval"])
        assert all(math.isfinite(v) == with_interval for v in some["mean_image_reduction_interval"])


def test_the_intervals_do_not_depend_on_the_order_in_which_rows_were_logged():
    rows = _seeds_audit([0.1 * (seed % 7) for seed in range(30)])
    (logged,) = reductions(rows)
    (reversed_,) = reductions(rows[::-1])
    assert reversed_["reduction_interval"] == logged["reduction_interval"]
    assert reversed_["mean_image_reduction_interval"] == logged["mean_image_reduction_interval"]
    discovery = [row for row in _seeds_audit([0.0] * 30, base=lambda seed: (seed * 37 % 101) / 101)
                 if row["guidance_scale"] == 0]  # IoUs in no order
    assert reductions_text(discovery[::-1], metrics=("iou",)) == reductions_text(discovery, metrics=("iou",))


def test_reductions_text_gives_the_interval_in_brackets_as_changes_from_ten_images_on():
    rows = _seeds_audit([0.2 + 0.04 * (seed % 11) for seed in range(44)])
    lines = reductions_text(rows, metrics=("iou",)).splitlines()
    assert ("in brackets a 95 % bootstrap interval over the images, given from 10 images on, for the per-image "
            "figure 10 with overlap at λ = 0") in lines[0]
    (figures,) = reductions(rows)
    low, high, per_image_low, per_image_high = (
        f"{-100 * v:.1f}".replace("-", "−")
        for v in figures["reduction_interval"][::-1] + figures["mean_image_reduction_interval"][::-1])
    assert lines[1] == (f"λ 100 · nurse: iou 0.4423 → 0.2650 (−40.1 % [{low}, {high}], per image −40.0 % "
                        f"[{per_image_low}, {per_image_high}]); 44 image(s)")
    assert float(low.replace("−", "-")) < -40.1 < float(high.replace("−", "-"))
    assert "[" not in reductions_text(rows[:18], metrics=("iou",)).splitlines()[1]  # 9 images: no interval


def test_a_discovery_audits_means_come_with_an_interval_from_ten_measured_images_on():
    rows = [row for row in _seeds_audit([0.0] * 12) if row["guidance_scale"] == 0]  # IoU 0.40 … 0.49, 0.40, 0.41
    rows[-1] = {**rows[-1], "iou": float("nan")}  # n/a: left out of the mean (0.4409) and of its interval
    line = reductions_text(rows, metrics=("iou",)).splitlines()[1]
    low, high = map(float, re.fullmatch(r"nurse: iou 0\.4409 \[(0\.\d{4}), (0\.\d{4})\] over 12 image\(s\), 1 of "
                                        r"them n/a", line).groups())
    assert 0.42 < low < 0.4409 < high < 0.47
    assert abs((low + high) / 2 - 0.4409) < 0.1 * (high - low) / 2  # about the mean: these IoUs spread evenly
    assert "[" in reductions_text(rows[:10], metrics=("iou",)).splitlines()[1]
    assert "[" not in reductions_text(rows[:9], metrics=("iou",)).splitlines()[1]


def test_rows_made_in_python_pair_with_rows_read_back_from_the_csv_whatever_values_python_holds_equal(tmp_path):
    # λ = 0 rows as audit_rows makes them (cfg 1.0, add_noise True: a float and a bool), the guided ones read back
    # from the file (both text): True and 1.0 are one value to Python, not to the pairing.
    base, guided = _baseline_and_guided(cfg=1.0, add_noise=True)
    path = str(tmp_path / "audit.csv")
    append_csv(path, audit_rows(guided, q=0.5, size=(8, 8)))
    rows = audit_rows(base, q=0.5, size=(8, 8)) + read_csv(path)
    assert {f["semantic"]: f["images"] for f in reductions(rows)} == {"doctor": 2, "nurse": 2}


def test_rows_pair_by_a_value_that_is_not_a_number_or_not_hashable_as_by_any_other():
    # cfg NaN (a run whose cfg was no number) in both, and sigmas as a list in rows made by hand: each pairs with its
    # like, as a value of text does, whichever rows were seen before.
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    for odd in ({"cfg": float("nan")}, {"cfg": "nan"}, {"sigmas": [14.6, 0.0]}):
        odd_rows = [{**row, **odd} for row in rows]
        assert {f["semantic"]: f["images"] for f in reductions(odd_rows)} == {"doctor": 2, "nurse": 2}
    mixed = [{**row, "cfg": float("nan") if row["guidance_scale"] == 0 else "nan"} for row in rows]
    assert {f["semantic"]: f["images"] for f in reductions(mixed)} == {"doctor": 2, "nurse": 2}


def test_the_reductions_table_gives_a_row_per_metric_and_group_with_each_interval_in_two_columns():
    rows = _seeds_audit([0.2 + 0.04 * (seed % 11) for seed in range(44)])
    rows += [{**row, "semantic": "doctor", "gamma": 0.02} for row in rows]  # a setting the nurse rows lack
    for row in rows:
        row["mbiou"] = row["iou"]
    table = reductions_table(rows)
    assert [(r["metric"], r["semantic"]) for r in table] == [("iou", "nurse"), ("iou", "doctor"), ("mbiou", "nurse"),
                                                             ("mbiou", "doctor")]
    assert all(list(r) == list(table[0]) for r in table) and [r["gamma"] for r in table] == ["", 0.02, "", 0.02]
    columns = list(table[0])
    assert columns.index("reduction") + 1 == columns.index("reduction_low") == columns.index("reduction_high") - 1
    (figures,) = [f for f in reductions(rows) if f["semantic"] == "nurse"]
    assert (table[0]["reduction_low"], table[0]["reduction_high"]) == figures["reduction_interval"]
    assert (table[0]["mean_image_reduction_low"], table[0]["mean_image_reduction_high"]) == (
        figures["mean_image_reduction_interval"])


def test_write_csv_replaces_the_file_whole_as_audit_files_are_written_and_leaves_nothing_when_it_cannot(tmp_path,
                                                                                                        monkeypatch):
    path = tmp_path / "table.csv"
    path.write_text("old", encoding="utf-8")
    write_csv(str(path), [{"metric": "iou", "model": "=cmd", "reduction": 0.4}])
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and read_csv(str(path)) == [
        {"metric": "iou", "model": "=cmd", "reduction": "0.4"}]  # a formula start escaped, as in audit files
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(PermissionError(13, "in use")))
    with pytest.raises(PermissionError):
        write_csv(str(path), [{"metric": "mbiou"}])
    assert read_csv(str(path))[0]["metric"] == "iou" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_write_csv_removes_what_a_killed_write_of_the_same_table_left_and_keeps_a_write_under_way(tmp_path,
                                                                                                   monkeypatch):
    left, under_way, unhidden = (tmp_path / f"{dot}table.csv.{char * 32}.partial" for dot, char in
                                 ((".", "a"), (".", "b"), ("", "d")))  # unhidden: as BiasMap named them before
    other, longer = tmp_path / f".other.csv.{'c' * 32}.partial", tmp_path / f".x.table.csv.{'e' * 32}.partial"
    for partial in (left, under_way, unhidden, other, longer):
        partial.write_text("metric\r\ni", encoding="utf-8")
    folder = tmp_path / f".table.csv.{'f' * 32}.partial"  # named like one, but a folder: left, and no stop
    folder.mkdir()
    an_hour_ago = time.time() - 3600
    for partial in (left, unhidden, other, longer, folder):
        os.utime(partial, (an_hour_ago, an_hour_ago))
    written = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: written.append(source) or replace(source, target))
    monkeypatch.chdir(tmp_path)  # a table named without its folder
    write_csv("table.csv", [{"metric": "iou"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [under_way.name, other.name, longer.name, folder.name, "table.csv"])
    (source,) = written  # its own partial file is one the next write would find, were it left
    assert re.fullmatch(r"\.table\.csv\.[0-9a-f]{32}\.partial", os.path.basename(source))


def test_the_reductions_table_leaves_a_figure_that_is_no_number_blank_and_keeps_settings_before_figures():
    rows = _seeds_audit([0.1, 0.2, 0.3])  # 3 images: no interval
    rows += [{**row, "semantic": "doctor", "gamma": 0.02} for row in _seeds_audit([0.1] * 12)]
    for row in rows:
        row["mbiou"] = row["iou"]
    nurse, doctor = reductions_table(rows, metrics=("iou",))
    assert (nurse["reduction_low"], nurse["reduction_high"], nurse["gamma"]) == ("", "", "")
    assert doctor["reduction_low"] == pytest.approx(0.1) and doctor["gamma"] == 0.02
    columns = list(nurse)
    assert columns.index("gamma") < columns.index("semantic") < columns.index("images")


def test_write_csv_against_an_audit_file_writes_only_while_that_file_is_as_the_rows_were_made_from(tmp_path):
    audit, table = tmp_path / "audit.csv", tmp_path / "audit_reductions.csv"
    audit.write_text("label,iou\na,0.5\n", encoding="utf-8")
    size = audit.stat().st_size
    assert write_csv(str(table), [{"metric": "iou"}], unless_grown=(str(audit), size))
    with open(audit, "a", encoding="utf-8") as f:
        f.write("b,0.4\n")  # another ComfyUI appended since: its own run writes the newer table
    assert not write_csv(str(table), [{"metric": "mbiou"}], unless_grown=(str(audit), size))
    assert read_csv(str(table)) == [{"metric": "iou"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.csv", "audit_reductions.csv"]
    # Made as any file is: as readable to others sharing the folder as the audit file (a temporary file is not).
    assert table.stat().st_mode == audit.stat().st_mode


@pytest.mark.parametrize("appended", [b"", b"b,0.4\n"])
def test_write_csv_waits_for_the_audit_files_lock_and_checks_its_size_once_it_holds_it(tmp_path, appended):
    # Another ComfyUI appending holds the lock: the table waits, and is written only if the file stayed as it was.
    fcntl = pytest.importorskip("fcntl")  # flock locks conflict across open files, also within one process
    import threading
    audit, table = tmp_path / "audit.csv", tmp_path / "audit_reductions.csv"
    audit.write_bytes(b"label,iou\na,0.5\n")
    size, written = audit.stat().st_size, []
    with open(audit, "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(target=lambda: written.append(
            write_csv(str(table), [{"metric": "iou"}], unless_grown=(str(audit), size))))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not table.exists()  # waiting for the lock, nothing written
        other.write(appended)
        other.flush()
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    writer.join(timeout=30)
    assert written == [not appended] and table.exists() == (not appended)


def test_the_reductions_report_is_the_text_and_the_table_from_one_computation_and_no_table_without_reductions():
    rows = _seeds_audit([0.2 + 0.04 * (seed % 11) for seed in range(12)])
    for row in rows:
        row["mbiou"] = row["iou"]
    assert reductions_report(rows) == (reductions_text(rows), reductions_table(rows))
    baselines = [row for row in rows if row["guidance_scale"] == 0]
    assert reductions_report(baselines) == (reductions_text(baselines), None)  # a discovery audit: means only
    unscaled = rows + [{**rows[0], "guidance_scale": ""}]
    assert reductions_report(unscaled) == (reductions_text(unscaled), None)  # none, and why


def test_reductions_pair_images_within_batches_of_one_size_only():
    # An ancestral or SDE sampler draws its noise for the whole batch: image 0 of a batch of 2 is another picture than
    # the seed's image sampled alone, so neither pairs with the other, nor are two λ = 0 rows of it refused as one.
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8))
    assert {row["batch_size"] for row in rows} == {2}
    alone = [{**row, "batch_size": 1, "iou": row["iou"] + 1e-4} for row in rows if row["image"] == 0]
    figures = {f["semantic"]: f for f in reductions(rows + alone + audit_rows(guided, q=0.5, size=(8, 8)))}
    assert figures["nurse"]["images"] == 2 and figures["nurse"]["baseline_duplicates"] == 0
    with pytest.raises(ValueError, match=r"differ in every value of batch_size; log λ = 0 runs with the guided "
                                         r"runs' batch_size"):
        reductions(alone + audit_rows(guided, q=0.5, size=(8, 8)))


def test_reductions_keep_runs_guided_against_other_demographic_concepts_apart():
    # The energy is the mean over every pair of the sampler's concepts: guided against gender and race together is
    # another configuration than against gender alone, even for the gender pair.
    base, guided = _baseline_and_guided()
    both = halves_trace()
    both.demographic = ["gender", "race"]
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    rows += audit_rows(both, q=0.5, size=(8, 8), pairs=[("gender", "nurse")])
    assert {row["sampler_demographic"] for row in rows} == {"gender", "gender, race"}
    nurse = [f for f in reductions(rows) if f["semantic"] == "nurse"]
    assert sorted((f["guided_concepts"], f["images"]) for f in nurse) == [
        ("demographic gender, race; semantic doctor, nurse", 2), ("semantic doctor, nurse", 2)]
    assert "guided against demographic gender, race; semantic doctor, nurse · nurse: " in reductions_text(rows)
    unguided = copy.deepcopy(both)
    unguided.settings = {"scale": 0.0, "guided_stages": None}  # at λ = 0 the lists guide nothing: one group
    discovery = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(unguided, q=0.5, size=(8, 8), label="again",
                                                                  pairs=[("gender", "doctor"), ("gender", "nurse")])
    assert [line.split(":")[0] for line in reductions_text(discovery).splitlines()[1:]] == ["doctor", "nurse"]
    both.demographic = ["Race", "gender"]  # typed in another order and case: the same guidance
    again = rows + audit_rows(both, q=0.5, size=(8, 8), pairs=[("gender", "nurse")], label="again")
    assert [f["images"] for f in reductions(again) if f["semantic"] == "nurse"] == [2, 2]


def test_reductions_read_a_spreadsheets_true_and_false_as_the_files_own(tmp_path):
    # Excel and LibreOffice save True as TRUE: rows appended after such a save still pair with it, in one group.
    base, guided = _baseline_and_guided()
    path = tmp_path / "audit.csv"
    append_csv(str(path), [{**row, "add_noise": "TRUE"} for row in audit_rows(guided, q=0.5, size=(8, 8))])
    append_csv(str(path), [{**row, "add_noise": True} for row in audit_rows(base, q=0.5, size=(8, 8))])
    append_csv(str(path), [{**row, "add_noise": True, "seed": 7} for row in audit_rows(base, q=0.5, size=(8, 8))]
               + [{**row, "add_noise": True, "seed": 7} for row in audit_rows(guided, q=0.5, size=(8, 8))])
    figures = reductions(read_csv(str(path)))
    assert sorted((f["semantic"], f["images"], f["add_noise"]) for f in figures) == [("doctor", 4, True),
                                                                                      ("nurse", 4, True)]


def test_a_file_of_lambda_0_rows_resaved_by_a_spreadsheet_keeps_its_means_in_one_group_each():
    # TRUE for True and 7 for 7.0, as a spreadsheet saves them: the same settings, one line a concept.
    base, _ = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8))
    resaved = [{**row, "add_noise": "TRUE", "cfg": "7", "seed": 7} for row in rows]
    lines = reductions_text([{**row, "add_noise": True} for row in rows] + resaved).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["doctor", "nurse"] and "over 4 image(s)" in lines[0]


def test_labels_of_digit_like_characters_are_text_not_numbers_that_fail_to_read():
    base, guided = _baseline_and_guided()
    rows = [{**row, "label": label} for row, label in zip(audit_rows(base, q=0.5, size=(8, 8))
                                                          + audit_rows(guided, q=0.5, size=(8, 8)), ["10²", "①"] * 4)]
    assert "λ = 0 only" in reductions_text(rows[:4])
    assert {f["semantic"]: f["images"] for f in reductions(rows, match=("label",))} == {"doctor": 2, "nurse": 2}


def test_a_summary_line_names_a_blank_setting_with_a_dash_not_nothing():
    # The Advanced sampler after a node other than BasicScheduler logs no denoise: "denoise  ·" read as a typo.
    base, guided = _baseline_and_guided()
    custom = {"scheduler": "custom sigmas", "denoise": ""}
    rows = (audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
            + [{**row, **custom} for row in audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5,
                                                                                             size=(8, 8))])
    lines = reductions_text(rows).splitlines()[1:]
    assert any(line.startswith("λ 100 · scheduler custom sigmas · denoise — · nurse:") for line in lines), lines
    assert any(line.startswith("λ 100 · scheduler normal · denoise 1 · nurse:") for line in lines), lines


def test_rows_that_pair_nothing_for_a_column_an_older_file_lacks_are_told_so_not_to_log_its_values():
    # A notebook pairing an older file's baselines (no batch_size) with new guided rows: the fix is not "log λ = 0 runs
    # with the guided runs' batch_size", which that file cannot hold.
    base, guided = _baseline_and_guided()
    older = [{k: v for k, v in row.items() if k != "batch_size"} for row in audit_rows(base, q=0.5, size=(8, 8))]
    with pytest.raises(ValueError, match=r"differ in every value of batch_size; every λ = 0 row lacks batch_size, as "
                                         r"rows of a file started before BiasMap wrote it do: leave batch_size out of "
                                         r"the other rows to pair them as that file did, or log the λ = 0 runs into "
                                         r"the guided runs' file$"):
        reductions(older + audit_rows(guided, q=0.5, size=(8, 8)))
    elsewhere = [{**row, "seed": 7} for row in audit_rows(guided, q=0.5, size=(8, 8))]  # and another seed: both said
    with pytest.raises(ValueError, match=r"differ in every value of seed, batch_size; log λ = 0 runs with the guided "
                                         r"runs' seed, changing guidance_scale alone \(set the seed.*; every λ = 0 row "
                                         r"lacks batch_size"):
        reductions(older + elsewhere)
    newer = [{k: v for k, v in row.items() if k != "batch_size"} for row in audit_rows(guided, q=0.5, size=(8, 8))]
    assert {f["semantic"]: f["images"] for f in reductions(older + newer)} == {"doctor": 2, "nurse": 2}  # as told


def test_the_per_image_interval_leaves_out_images_without_overlap_at_lambda_0_even_where_guidance_made_some():
    rows = _seeds_audit([0.4] * 12, base=lambda seed: 0.0 if seed < 2 else 0.5)
    rows = [{**r, "iou": 0.2} if r["seed"] < 2 and r["guidance_scale"] else r for r in rows]  # overlap only guided
    (nurse,) = reductions(rows)
    assert nurse["images_with_overlap"] == 10 and nurse["mean_image_reduction"] == pytest.approx(0.4)
    assert nurse["mean_image_reduction_interval"] == pytest.approx((0.4, 0.4))


@pytest.mark.parametrize("guided_without_overlap, interval", [(0.0, (0.4, 0.4)), (0.2, None)])
def test_resamples_that_draw_no_image_with_overlap_at_lambda_0_are_left_out_of_the_reductions_interval(
        guided_without_overlap, interval):
    # One image of ten overlaps at λ = 0: about a third of the resamples draw none of it and have no reduction.
    rows = _seeds_audit([0.4] * 10, base=lambda seed: 0.5 if seed == 0 else 0.0)
    rows = [{**r, "iou": guided_without_overlap} if r["seed"] and r["guidance_scale"] else r for r in rows]
    (nurse,) = reductions(rows)
    low, high = nurse["reduction_interval"]
    assert math.isfinite(low) and math.isfinite(high) and low <= nurse["reduction"] <= high
    if interval is not None:
        assert (low, high) == pytest.approx(interval)


def test_reductions_refuse_lambda_0_rows_of_one_image_two_units_apart_in_the_csvs_sixth_decimal():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    again = [{**r, "iou": r["iou"] - 2e-6} for r in audit_rows(base, q=0.5, size=(8, 8))]
    with pytest.raises(ValueError, match=r"two λ = 0 rows of the same image \(seed .*\) give iou"):
        reductions(rows + again)


def test_reductions_give_a_whole_number_setting_read_from_a_csv_back_as_an_int(tmp_path):
    base, guided = _baseline_and_guided()
    path = str(tmp_path / "audit.csv")
    append_csv(path, audit_rows(base) + audit_rows(guided))
    doctor, _ = reductions(read_csv(path))
    assert type(doctor["steps"]) is int and type(doctor["cfg"]) is float
    assert str(reductions_table(read_csv(path))[0]["steps"]) == "2"  # the table's cell as written: not "2.0"


def test_append_csv_adds_no_blank_line_to_a_file_whose_last_line_ends_in_a_carriage_return(tmp_path):
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(halves_trace(), q=0.5))
    path.write_bytes(path.read_bytes()[:-1])  # "\r\n" cut to "\r", as a classic-Mac line end
    append_csv(str(path), audit_rows(halves_trace(), q=0.5, label="next"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        records = list(csv.reader(f))
    assert [] not in records and len(records) == 9


def test_a_one_image_result_against_its_baseline_gives_no_per_image_line():
    base, guided = _baseline_and_guided()
    for trace in (base, guided):
        trace.maps = {s: m[:, :1] for s, m in trace.maps.items()}
        trace.guidance = {k: v[:, :1] for k, v in trace.guidance.items()}
        trace.latent_shape = [1, 4, 8, 8]
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    lines = after.against(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8))).splitlines()
    assert len(lines) == 1 and not any(line.startswith("IoU per image") for line in lines)


def test_reductions_take_rows_made_by_hand_with_the_traces_own_lists_as_concepts():
    # A trace's concept lists are lists: rows built from one by hand may hold them as they are.
    base, guided = _baseline_and_guided()
    rows = [{**row, "sampler_demographic": ["gender"], "sampler_semantic": ["doctor", "nurse"]}
            for row in audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))]
    assert {f["semantic"]: f["guided_concepts"] for f in reductions(rows)} == {"doctor": "semantic doctor, nurse",
                                                                             "nurse": "semantic doctor, nurse"}


def test_a_baseline_from_another_copy_of_the_engine_compares_as_one_of_this_copys(tmp_path):
    # A pip-installed engine beside the pack's own copy in one process (a notebook): two classes of one trace.
    folder = Path(__file__).resolve().parents[2] / "biasmap_engine"
    spec = importlib.util.spec_from_file_location("biasmap_engine_again", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    again = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = again
    try:
        spec.loader.exec_module(again)
        base, guided = _baseline_and_guided()
        base.save(str(tmp_path / "base.safetensors"))
        other = again.BiasMapTrace.load(str(tmp_path / "base.safetensors"))
        assert not isinstance(other, type(base))
        after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
        assert after.against(measure_entanglement(other, "gender", "nurse", 0.5, (8, 8))) == after.against(
            measure_entanglement(base, "gender", "nurse", 0.5, (8, 8)))
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]


def test_summary_lines_name_settings_that_differ_in_value_not_in_spelling():
    # cfg "7" (a spreadsheet's) and 7.0 (the node's) in two λ's lines: cfg is not what tells them apart.
    base, guided = _baseline_and_guided()
    half = copy.deepcopy(guided)
    half.settings = {**half.settings, "scale": 50.0}
    rows = (audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
            + [{**row, "cfg": "7"} for row in audit_rows(half, q=0.5, size=(8, 8))])
    names = [line.split(":")[0] for line in reductions_text(rows).splitlines()[1:]]
    assert names == ["λ 100 · doctor", "λ 100 · nurse", "λ 50 · doctor", "λ 50 · nurse"]
    half.settings = {**half.settings, "scale": 100.0001}  # two λ that six digits would show as one
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8)) + audit_rows(half, q=0.5,
                                                                                                    size=(8, 8))
    names = [line.split(":")[0] for line in reductions_text(rows).splitlines()[1:]]
    assert names == ["λ 100 · doctor", "λ 100 · nurse", "λ 100.0001 · doctor", "λ 100.0001 · nurse"]
    # 0.7 as the page may store it (70 × 0.01): another group, so another name, not a second "denoise 0.7".
    rows = [{**row, "denoise": d} for d in (0.7, 0.7000000000000001) for trace in (base, guided)
            for row in audit_rows(trace, q=0.5, size=(8, 8))]
    names = [line.split(":")[0] for line in reductions_text(rows).splitlines()[1:]]
    assert names[:2] == ["λ 100 · denoise 0.7 · doctor", "λ 100 · denoise 0.7 · nurse"]
    assert names[2:4] == ["λ 100 · denoise 0.7000000000000001 · doctor", "λ 100 · denoise 0.7000000000000001 · nurse"]


def test_a_settings_number_reads_short_where_that_is_the_number_and_in_full_where_not():
    assert [shown_number(v) for v in (100.0, 0.7, 7.5, 1e-4, 2 ** 64 - 1, 0)] == ["100", "0.7", "7.5", "0.0001",
                                                                                "18446744073709551615", "0"]
    assert [shown_number(v) for v in (100.0001, 1 / 3, 1234567.0)] == ["100.0001", "0.333333333333333", "1234567"]
    assert [shown_number(v) for v in (0.7000000000000001, True, False)] == ["0.7", "on", "off"]  # 0.7 and rounding
    assert [shown_number(v, exact=True) for v in (0.7000000000000001, 100.0001, 7.0)] == ["0.7000000000000001",
                                                                                        "100.0001", "7"]


def test_a_line_of_runs_guided_against_the_rows_pair_alone_says_so_beside_one_guided_against_more():
    base, guided = _baseline_and_guided()
    alone = copy.deepcopy(guided)
    alone.semantic = ["nurse"]
    rows = (audit_rows(base, q=0.5, size=(8, 8), pairs=[("gender", "nurse")])
            + audit_rows(guided, q=0.5, size=(8, 8), pairs=[("gender", "nurse")])
            + audit_rows(alone, q=0.5, size=(8, 8), pairs=[("gender", "nurse")], label="alone"))
    names = [line.split(":")[0] for line in reductions_text(rows).splitlines()[1:]]
    assert names == ["λ 100 · guided against semantic doctor, nurse · nurse",
                     "λ 100 · guided against the pair alone · nurse"]


def test_the_summary_says_why_a_guided_row_is_unpaired_and_names_the_lambda_0_images_no_guided_run_pairs_with():
    base, guided = _baseline_and_guided()
    base_rows, guided_rows = audit_rows(base, q=0.5, size=(8, 8)), audit_rows(guided, q=0.5, size=(8, 8))
    # Steps changed midway through the λ = 0 pass: image 1's baselines came at 3 steps, the guided runs' at 2.
    moved = [{**row, "steps": 3} if row["image"] == 1 else row for row in base_rows]
    lines = reductions_text(moved + guided_rows).splitlines()
    assert lines[1].endswith("; 1 image(s); left out: 1 unpaired (the first, seed 42 image 1: its λ = 0 row differs "
                             "in steps: 3 at λ = 0, 2 guided)")
    assert lines[3] == ("λ = 0 images that no guided run pairs with, left out: doctor: 1 image(s) made otherwise than "
                        "the guided runs (steps 3 at λ = 0, 2 guided); nurse: 1 image(s) made otherwise than the "
                        "guided runs (steps 3 at λ = 0, 2 guided)")
    # A profession none of whose guided runs is logged (a pass subject by subject stopped early): its baselines said.
    doctor_only = [row for row in guided_rows if row["semantic"] == "doctor"]
    lines = reductions_text(base_rows + doctor_only).splitlines()
    assert lines[1:] == ["λ 100 · doctor: iou 0.3333 → 0.3333 (0.0 %, per image 0.0 %); mbiou 0.3333 → 0.3333 "
                         "(0.0 %, per image 0.0 %); 2 image(s)",
                         "λ = 0 images that no guided run pairs with, left out: nurse: 2 image(s) (no guided run of "
                         "it logged)"]
    assert "λ = 0 images that no guided run" not in reductions_text(base_rows + guided_rows)
    labelled = [{**row, "label": "baseline"} for row in base_rows] + [{**row, "label": "guided"} for row in guided_rows]
    assert "λ = 0 images that no guided run" not in reductions_text(labelled, by="label")  # paired across labels
    assert "why_unpaired" not in reductions_table(moved + guided_rows)[0]  # words for the summary, not the table


@pytest.mark.parametrize("cell, said", [
    ("0,5", r"has iou 0,5, not a number: a spreadsheet set to a region that writes decimal commas saved it so"),
    ("1_0", r"has iou 1_0, not a number: edited by hand\?: write the figure back, or delete the row"),
    ("-3", r"has iou -3, outside 0–1, where every overlap is"),
    ("7", r"has iou 7, outside 0–1"),
])
def test_a_figure_no_overlap_can_be_is_refused_not_read_as_a_reduction_or_as_n_a(cell, said):
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    edited = [{**row, "iou": str(row["iou"])} for row in rows]
    edited[2]["iou"] = cell
    # Found in the file by its row in a spreadsheet (under the header), and by its seed and concepts once sorted.
    place = re.escape(f"row 2 of the rows (row 4 of its file in a spreadsheet; seed {edited[2]['seed']}, "
                      f"{edited[2]['demographic']} × {edited[2]['semantic']}) ")
    with pytest.raises(ValueError, match=place + said):
        reductions(edited)
    assert re.match(r"entanglement over the file: none: " + place + said, reductions_text(edited))
    blank = [{**row, "iou": ""} if i == 2 else row for i, row in enumerate(edited)]
    assert sum(group["not_measured"] for group in reductions(blank)) == 1  # blank or nan: n/a, as the file writes it
    for missing in (None, float("nan"), np.float32("nan")):  # a blank as pandas' records give it
        assert reductions([{**row, "iou": missing} if i == 2 else row for i, row in enumerate(edited)]) == reductions(
            blank)


def test_text_a_summary_quotes_stays_on_its_line_and_in_its_order():
    # A prompt typed on several lines, and a shared trace's text made to read as a line of the summary or to reverse it.
    base, guided = _baseline_and_guided()
    guided.notes = ["x\nreductions over the file: λ 100 · doctor: iou 0.5 → 0.1 (−80.0 %)", "a \u202egnirts"]
    base_rows, guided_rows = audit_rows(base, q=0.5, size=(8, 8)), audit_rows(guided, q=0.5, size=(8, 8))
    typed = [{**row, "generation_prompt": "a photo\nof a doctor"} for row in base_rows + guided_rows]
    typed[1]["generation_prompt"] = "a photo\r\nof a nurse"  # image 1's λ = 0 row, at another prompt
    text = reductions_text(typed)
    assert "x⏎reductions over the file" in text and "a \\u202egnirts" in text
    assert "generation_prompt: a photo⏎of a nurse at λ = 0, a photo⏎of a doctor guided" in text
    assert all(line.startswith(("entanglement", "reductions", "λ", "notes")) for line in text.splitlines())


def test_values_that_differ_only_where_one_line_hides_it_are_named_with_their_escapes():
    # A prompt saved on Windows (\r\n) and the same one typed elsewhere (\n) read alike on one line: shown escaped.
    base, guided = _baseline_and_guided()
    rows = [{**row, "generation_prompt": "a photo\nof a doctor"}
            for row in audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))]
    rows[1]["generation_prompt"] = "a photo\r\nof a doctor"  # λ = 0, doctor, image 1 (guided: rows[5])
    rows[2]["generation_prompt"] = "a photo\tof a doctor"  # λ = 0, nurse, image 0: a tab, one line's space
    rows[6]["generation_prompt"] = "a photo of a doctor"
    text = reductions_text(rows)
    assert "generation_prompt: a photo\\r\\nof a doctor at λ = 0, a photo\\nof a doctor guided" in text
    assert "generation_prompt: a photo\\tof a doctor at λ = 0, a photo of a doctor guided" in text
    assert all(line.startswith(("reductions", "λ")) for line in text.splitlines())


def test_the_columns_known_as_biasmaps_are_those_audit_rows_writes_so_that_only_a_researchers_own_are_left_blank():
    trace = halves_trace()
    trace.settings = BiasMapSettings().to_dict()  # every setting a sampler's trace holds
    assert {c for c in audit_rows(trace)[0] if not c.startswith("biou_")} == audit._COLUMNS
    assert set(audit._ALWAYS) <= audit._COLUMNS


def test_the_summary_ends_with_the_notes_the_rows_carry_most_frequent_first():
    base, guided = _baseline_and_guided()
    said = "the semantic concept(s) nurse are not in the generation prompt " + "(a long note that goes on) " * 4
    guided.notes = [said, "cfg = 1 skips the unconditional pass"]
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))
    last = reductions_text(rows).splitlines()[-1]
    assert last == ("notes in the rows (the notes column): 4 row(s): " + said[:89].rstrip() + "…; 4 row(s): cfg = 1 "
                    "skips the unconditional pass")
    base.notes = [f"note {i}" for i in range(4)]
    last = reductions_report(audit_rows(base, q=0.5, size=(8, 8)))[0].splitlines()[-1]  # the means' summary too
    assert last == ("notes in the rows (the notes column): 4 row(s): note 0; 4 row(s): note 1; 4 row(s): note 2; and "
                    "1 other note(s)")
    assert "notes in the rows" not in reductions_text(audit_rows(halves_trace(), q=0.5, size=(8, 8)))
    blank = [{**row, "notes": float("nan")} for row in rows]  # a pandas DataFrame's blank
    assert "notes in the rows" not in reductions_text(blank)


def test_a_result_against_a_baseline_names_another_q_refuses_other_words_and_reads_a_missing_field_as_unknown():
    base, guided = _baseline_and_guided()
    after = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8))
    assert after.against(measure_entanglement(base, "gender", "nurse", 0.7, (8, 8))).splitlines()[-1] == (
        "note: the baseline differs in q (0.7, this run 0.5): the change is not guidance's alone (compare runs that "
        "differ only in λ)")
    other_words = measure_entanglement(base, "gender", "doctor", 0.5, (8, 8))
    with pytest.raises(ValueError, match=r"the baseline measures 'gender' and 'doctor', this result 'gender' and "
                                         r"'nurse': measure the same two words in both \(measure_entanglement\("
                                         r"baseline_trace, 'gender', 'nurse'\)\)"):
        after.against(other_words)
    for each in (after.change_from, after.baseline_notes):  # each a way in of its own
        with pytest.raises(ValueError, match=r"the baseline measures 'gender' and 'doctor'"):
            each(other_words)
    typed = measure_entanglement(base, "Gender", "Nurse ", 0.5, (8, 8))  # the same words, as CLIP reads them
    assert after.against(typed) == after.against(measure_entanglement(base, "gender", "nurse", 0.5, (8, 8)))
    two_words = measure_entanglement(guided, "gender", "a doctor", 0.5, (8, 8))
    spaced = measure_entanglement(base, "gender", "A  doctor", 0.5, (8, 8))  # two spaces: one concept to CLIP
    assert two_words.against(spaced) == two_words.against(measure_entanglement(base, "gender", "a doctor", 0.5, (8, 8)))
    older = halves_trace()  # saved before traces kept their run: no field of it is known to differ
    older.run, older.settings = {}, dict(base.settings)
    assert len(after.against(measure_entanglement(older, "gender", "nurse", 0.5, (8, 8))).splitlines()) == 2


def test_a_step_window_is_one_step_or_a_pair_and_one_past_the_last_step_is_read_as_ending_there():
    _, guided = _baseline_and_guided()
    one = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8), steps=1)
    assert one.steps == (1, 1) and "steps 1–1 of 0–1" in one.report.splitlines()[0]
    whole = measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8), steps=(0, 9))  # the README's (0, 9)
    assert whole.steps is None and whole.report == measure_entanglement(guided, "gender", "nurse", 0.5, (8, 8)).report
    assert {(r["first_step"], r["last_step"]) for r in audit_rows(guided, q=0.5, steps=1)} == {(1, 1)}
    assert audit_rows(guided, q=0.5, steps=(0, 9)) == audit_rows(guided, q=0.5)  # they pair with the nodes' rows
    assert guided.step_window((1, 10000)) == (1, 1) and guided.step_window((-3, 0)) == (0, 0)
    with pytest.raises(ValueError, match=r"no recorded step in the window 5\.\.9"):  # as asked, not as cut
        audit_rows(guided, q=0.5, steps=(5, 9))


def test_reductions_take_a_dataframes_records_one_metric_or_match_by_name_and_refuse_blank_lambdas_and_decimal_seeds():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8)) + audit_rows(guided, q=0.5, size=(8, 8))

    class Table:  # as a pandas DataFrame gives its rows
        def to_dict(self, orient):
            return [dict(row) for row in rows] if orient == "records" else None

    assert reductions_text(Table()) == reductions_text(rows) and len(reductions(Table())) == 2
    assert reductions_table(Table(), metrics="iou") == reductions_table(rows, metrics=("iou",))
    assert reductions_text(rows, metrics="iou") == reductions_text(rows, metrics=("iou",))
    assert reductions_table(rows, match="label") == reductions_table(rows, match=("label",))
    with pytest.raises(ValueError, match=r"1 row\(s\) have no number as guidance_scale"):
        reductions(rows + [{**rows[-1], "guidance_scale": float("nan")}])  # pandas' blank
    with pytest.raises(ValueError, match=r"a seed in the rows reads 1.4, not a whole number"):
        reductions([{**row, "seed": 1.4} for row in rows])
    assert reductions_text([{**row, "seed": 42.0} for row in rows]) == reductions_text(rows)  # pandas' floats
    with pytest.raises(ValueError, match=r"reads 1.8446744073709552e\+19 as a floating-point number, which loses the "
                                         r"last digits of seeds from 2\^53 on .*dtype=\{'seed': str\}"):
        reductions([{**row, "seed": float(2 ** 64 - 1)} for row in rows])  # ComfyUI's largest seed
    assert reductions_text([{**row, "seed": float("nan")} for row in rows]) == reductions_text(
        [{**row, "seed": ""} for row in rows])  # a seed not recorded, blank or NaN
    fewer = [{k: v for k, v in row.items() if k != "biou_up_1"} for row in rows[:2]]
    with pytest.raises(ValueError, match=rf"row {len(rows)} of the rows \(row {len(rows) + 2} of its file in a "
                                         rf"spreadsheet; seed {fewer[0]['seed']}, .*\) has no column\(s\) biou_up_1, "
                                         rf"which the first row has"):
        reductions(rows + fewer, metric="biou_up_1")


def test_rows_of_traces_of_other_stages_appended_in_one_call_are_refused_before_any_file_is_made(tmp_path):
    path = tmp_path / "audit.csv"
    three, two = audit_rows(halves_trace(stages=("down_1", "down_2", "up_1"))), audit_rows(halves_trace())
    for rows in (three + two, two + three):  # a missing column or one more: each refused, as appended apart
        with pytest.raises(ValueError, match=r"row 4 of the rows to append has other columns than the first .*"
                                             r"biou_down_2.*: append each trace's rows \(audit_rows of one trace\) in "
                                             r"a call of its own"):
            append_csv(str(path), rows)
        assert not path.exists()
    header, *lines = csv_text(three + two).splitlines()  # shown, blank where a row has no such column
    assert "biou_down_2" in header.split(",") and len(lines) == 8
    assert list(csv.DictReader([header, *lines]))[4]["biou_down_2"] == ""


def test_a_notebook_may_give_one_pair_or_one_row_and_is_told_which_image_a_trace_lacks(tmp_path):
    trace = halves_trace()
    assert audit_rows(trace, q=0.5, pairs=("gender", "nurse")) == audit_rows(trace, q=0.5, pairs=[("gender", "nurse")])
    path = tmp_path / "audit.csv"
    row = audit_rows(trace)[0]
    assert append_csv(str(path), row) == [row] and read_csv(str(path))[0]["semantic"] == "doctor"
    with pytest.raises(IndexError, match=r"image 2 is not one of this trace's 2 \(0 to 1\)"):
        trace.guidance_counts(2)
    with pytest.raises(IndexError, match=r"image -1 is not one of this trace's 2"):
        trace.noise_index(-1)


def test_a_files_biasmap_columns_the_rows_lack_refuse_them_and_only_unknown_columns_are_the_researchers_own(tmp_path):
    full = halves_trace()
    full.settings = BiasMapSettings().to_dict()  # every setting a sampler's trace holds
    path = tmp_path / "audit.csv"
    append_csv(str(path), audit_rows(full))
    with pytest.raises(ValueError, match=r"only the file has: branch, .*include_middle.*another BiasMap version"):
        append_csv(str(path), audit_rows(halves_trace()))  # a notebook's trace of fewer settings: not left blank
    rows = audit_rows(halves_trace())
    columns = list(rows[0])
    for header, why in (([c for c in columns if c != "iou"] + ["gamma"], "another BiasMap version"),
                        ([c for c in columns if c != "width"], "another BiasMap version"),  # not one removed by hand
                        (columns + ["reduction"], None)):  # a column of the researcher's own named so
        other = tmp_path / f"{len(header)}-{why}.csv"
        other.write_text(",".join(header) + "\r\n", encoding="utf-8")
        if why is None:
            check_appendable(str(other))
            assert list(append_csv(str(other), rows)[0]) == header
        else:
            with pytest.raises(ValueError, match=why):
                append_csv(str(other), rows)
    clipped = tmp_path / "clipped.csv"
    clipped.write_text(",".join(c for c in columns if c != "clipped") + "\r\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks BiasMap's column\(s\) clipped, which every row has"):
        check_appendable(str(clipped))
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"label,iou\r\n1,2\r\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"in the row starting in line 1\)"):
        check_appendable(str(quoted))


def test_csv_text_takes_every_rows_columns_whichever_comes_first_and_audit_rows_takes_a_list_of_two_pairs():
    three, two = audit_rows(halves_trace(stages=("down_1", "down_2", "up_1"))), audit_rows(halves_trace())
    assert "biou_down_2" in csv_text(two + three).splitlines()[0].split(",")
    pairs = (("gender", "doctor"), ("gender", "nurse"))  # two pairs in a tuple: not one pair
    assert len(audit_rows(halves_trace(), pairs=pairs)) == 4


def test_the_summary_names_the_first_unpaired_row_of_a_group_and_the_reason_match_columns_give():
    base, guided = _baseline_and_guided()
    base_rows = [{**row, "steps": 3} if row["image"] == 0 else row for row in audit_rows(base, q=0.5, size=(8, 8))]
    later = halves_trace()
    later.run = {**RUN, "seed": 43}
    rows = base_rows + audit_rows(guided, q=0.5, size=(8, 8)) + audit_rows(later, q=0.5, size=(8, 8))
    unpaired = {f["semantic"]: f["why_unpaired"] for f in reductions(rows)}
    assert unpaired["doctor"].startswith("the first, seed 42 image 0: its λ = 0 row differs in steps: 3 at λ = 0")
    labelled = [{**row, "label": "b" if row["guidance_scale"] and row["image"] == 0 else "a"}
                for row in audit_rows(base, q=0.5) + audit_rows(guided, q=0.5)]
    why = {f["semantic"]: f["why_unpaired"] for f in reductions(labelled, match=("label",))}
    assert "label: a at λ = 0, b guided" in why["doctor"]
    moved = [{**row, "steps": 5} if row["image"] == 1 else row for row in audit_rows(base, q=0.5, size=(8, 8))]
    last = reductions_text(moved + audit_rows(guided, q=0.5, size=(8, 8)), by=None).splitlines()[-1]
    assert last == ("λ = 0 images that no guided run pairs with, left out: all: 2 image(s) made otherwise than the "
                    "guided runs (steps 5 at λ = 0, 2 guided)")


def test_the_notes_line_counts_a_note_once_a_row_shows_a_note_of_90_characters_whole_and_cuts_a_longer_one():
    base, guided = _baseline_and_guided()
    rows = audit_rows(base, q=0.5, size=(8, 8))
    noted = [{**row, "notes": " | ".join(notes)} for row, notes in zip(rows, (
        ["a", "a"], ["x" * 90], ["y" * 100], ["z"]))]
    assert reductions_text(noted).splitlines()[-1] == (
        f"notes in the rows (the notes column): 1 row(s): a; 1 row(s): {'x' * 90}; 1 row(s): {'y' * 89}…; and 1 "
        f"other note(s)")
    three = [{**row, "notes": note} for row, note in zip(rows, ("a", "b", "c", "c"))]
    last = reductions_text(three).splitlines()[-1]
    assert last.endswith("1 row(s): b") and "other note" not in last


def test_rows_that_log_an_image_the_file_held_already_are_found_with_how_often(tmp_path):
    # A run repeated (a fixed seed; Audit Prompts bypassed, its sampler left on the values last stored) logs the same
    # image again, which the summary counts once: Audit Log says so.
    path = str(tmp_path / "audit.csv")
    base, guided = _baseline_and_guided()
    first = append_csv(path, audit_rows(guided, q=0.5, size=(8, 8)))
    assert logged_before(first, read_csv(path)) is None
    assert logged_before(append_csv(path, audit_rows(base, q=0.5, size=(8, 8))), read_csv(path)) is None  # λ = 0
    for times, label in ((1, ""), (2, "B")):  # counted once by the figures whatever its label
        again = append_csv(path, audit_rows(guided, q=0.5, size=(8, 8), label=label))
        row, before = logged_before(again, read_csv(path))
        assert before == times and (row["seed"], row["guidance_scale"], row["label"]) == ("42", "100.0", label)
    guided.run = {**guided.run, "negative_prompt": "-blurry, lowres"}  # a cell the file marks as text
    marked = str(tmp_path / "marked.csv")
    append_csv(marked, audit_rows(guided, q=0.5, size=(8, 8)))
    row, before = logged_before(append_csv(marked, audit_rows(guided, q=0.5, size=(8, 8))), read_csv(marked))
    assert before == 1 and row["negative_prompt"] == "-blurry, lowres"
