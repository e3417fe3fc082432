"""Audit rows: one line per image and concept pair of a trace, gathered into a CSV over many prompts and seeds.

An audit in ComfyUI is a queue of runs (seeds, prompts, λ); each run's trace adds its rows to one CSV, which a
spreadsheet or pandas reads as it is. Every row carries how the run was made (the trace's ``run``: ComfyUI's prompt
id, seed, sampler, attribution prompt; the settings), so the file says which run gave which IoU. The generation
prompt, which the sampler gets as conditioning, not text, is the one the graph types into CLIP Text Encode (the
sampler nodes read it from ComfyUI's prompt, as the negative prompt and the checkpoint and LoRAs of the model); text
made while the graph runs comes in through the label.
"""

import collections
import contextlib
import csv
import io
import os
import re
import time
import unicodedata
import uuid

from .audit_columns import IMAGE, SETTINGS, row_key
from .guidance import STATUS
from .report import measure_entanglement
from .settings import SETTING_NAMES
from .trace import BiasMapTrace

__all__ = ["OlderFileError", "append_csv", "audit_rows", "check_appendable", "csv_text", "file_on_the_way",
           "is_reductions_table", "logged_before", "read_csv", "write_csv"]

# Columns added since the first audit files, in the order they came: a file written before some of them takes new
# rows under its own header.
_ADDED = ("noise_index", "generation_prompt", "negative_prompt", "model", "width", "height", "sigmas", "mask_size",
          "first_step", "last_step", "batch_size", "sampler_demographic", "sampler_semantic", "noise_mask",
          "start_latent", "precision", "environment")
# What rows would read as in a file without a column that ``append_csv`` was told they need.
_READ_WITHOUT = {"sigmas": "on the schedule of every other run of custom sigmas", "first_step": "of every step",
                 "last_step": "of every step", "mask_size": "at the image's size",
                 "noise_mask": "sampled without a noise mask", "start_latent": "sampled from an empty latent"}
# The settings as the sampler node names its inputs (keep = 1 − its q; the rows' own q is the masks').
_SETTING_COLUMNS = {"scale": "guidance_scale", "mode": "soft_topk", "keep": "soft_topk_keep",
                    "iters": "sinkhorn_iters"}
_RUN = ("prompt_id", "time", "seed", "steps", "cfg", "sampler", "scheduler", "denoise", "sigmas", "add_noise",
        "attribution_prompt", "generation_prompt", "negative_prompt", "model", "precision", "environment")
# Every column audit_rows writes but the stages' biou_<stage>: a column of a file that is none of these is the
# researcher's own (notes typed in a spreadsheet), which rows appended later leave blank.
_COLUMNS = frozenset(("label", *_RUN, "width", "height", "model_family",
                      *(_SETTING_COLUMNS.get(name, name) for name in SETTING_NAMES), "image", "noise_index",
                      "batch_size", "noise_mask", "start_latent", "sampler_demographic", "sampler_semantic",
                      "demographic", "semantic", "q", "mask_size", "first_step", "last_step", "iou", "mbiou", *STATUS,
                      "notes"))
# The columns of every row of every file BiasMap appends to, whatever its version and the trace.
_ALWAYS = ("label", *(c for c in _RUN if c not in _ADDED), "model_family", "image", "demographic", "semantic", "q",
           "iou", "mbiou", *STATUS, "notes")


def audit_rows(trace: BiasMapTrace, q: float = 0.7, pairs=None, size=None, label: str = "",
               steps=None) -> list[dict]:
    """Per concept pair (``pairs``, or one pair; default: every demographic × semantic pair of the trace) and image:
    IoU, mBIoU, BIoU per stage and the image's guidance counts, with the run's settings; masks at ``size`` (default:
    the image's), of the maps of the sampler steps ``steps`` (one step or an inclusive pair; default: all)."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(word, str) for word in pairs):
        pairs = [pairs]  # one pair given as such: ("gender", "doctor")
    pairs = list(pairs) if pairs is not None else [(a, b) for a in trace.demographic for b in trace.semantic]
    if not pairs:
        raise ValueError("the trace names no demographic and semantic concept pair: give the two words to audit "
                         "(the Audit Log's concept_a and concept_b)")
    counts = [trace.guidance_counts(i) or dict.fromkeys(STATUS, "") for i in range(trace.num_images)]
    run = {key: trace.run.get(key, "") for key in _RUN}
    run["sigmas"] = " ".join(f"{s:g}" for s in run["sigmas"])  # the schedule: tells custom sigmas apart
    width, height = trace.image_size[::-1]
    # BiasMap's settings only: a key of a trace made in a notebook could take the place of a column ("label").
    settings = {"model_family": trace.model_family,
                **{_SETTING_COLUMNS.get(k, k): " ".join(v or ["all"]) if k == "guided_stages" else v
                   for k, v in trace.settings.items() if k in SETTING_NAMES}}
    # The sampler's concept lists, which λ > 0 guides against all at once: the pair measured may be one of several.
    concepts = {"sampler_demographic": ", ".join(trace.demographic), "sampler_semantic": ", ".join(trace.semantic)}
    steps = trace.step_window(steps)  # logged as every step where it covers them: such rows pair with the nodes'
    first, last = steps if steps is not None else (0, trace.num_steps - 1)
    rows = []
    for a, b in pairs:
        result = measure_entanglement(trace, a, b, q, size=size, steps=steps)
        mask_size = "{1}x{0}".format(*result.masks[0].shape[-2:])  # W×H where the masks were thresholded
        for i in range(trace.num_images):
            rows.append({"label": label, **run, "width": width, "height": height, **settings, "image": i,
                         "noise_index": trace.noise_index(i), "batch_size": trace.num_images,
                         **{name: (trace.run.get(name) or [""] * trace.num_images)[i]
                            for name in ("noise_mask", "start_latent")}, **concepts,
                         "demographic": a, "semantic": b, "q": q,
                         "mask_size": mask_size, "first_step": first, "last_step": last,
                         "iou": round(float(result.ious[i]), 6), "mbiou": round(float(result.mbiou[i]), 6),
                         **{f"biou_{s}": round(float(v[i]), 6) for s, v in result.block_ious.items()}, **counts[i],
                         "notes": " | ".join(trace.notes)})
    return rows


class OlderFileError(ValueError):
    """An audit file started before columns that the rows to append need (``.lost``)."""

    def __init__(self, message: str, lost: list[str]):
        super().__init__(message)
        self.lost = lost


def append_csv(path: str, rows: list[dict], needed: tuple[str, ...] = ()) -> list[dict]:
    """Append ``rows`` (or one row) to the CSV at ``path``, writing the header when the file is new; → the rows as
    written (a file started before the latest columns takes them without those, but refuses rows whose ``needed``
    columns it lacks: custom sigmas, a step window, latent-size masks or an inpainting run's noise mask, which would
    otherwise be paired with other schedules, with whole runs at image size or with images sampled without a mask).

    Rows of a file share its columns: a trace whose stages differ from the file's (another model family) is refused,
    rather than written under the wrong headings. The file is locked while it is read and written, so ComfyUI
    instances sharing an output folder (one per GPU) append whole rows under one header.
    """
    if isinstance(rows, dict):  # one row
        rows = [rows]
    if not rows:
        return rows
    columns = list(rows[0])
    other = next((row for row in rows if row.keys() != rows[0].keys()), None)
    if other is not None:  # rows of traces of other stages, which no one header holds: refused before any file is made
        raise ValueError(f"row {rows.index(other)} of the rows to append has other columns than the first (only it "
                         f"has: {_only_in(other, columns)}; only the first has: {_only_in(columns, other)}): append "
                         f"each trace's rows (audit_rows of one trace) in a call of its own")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+b") as f, _locked(f):
        f.seek(0)
        header = _header(_parsed(f.read(), path), path)  # a file that cannot be read back takes no rows
        if header is None:  # new, or only a byte-order mark or blank lines left
            f.truncate(0)
        else:
            own = [c for c in header if c not in columns and c not in _COLUMNS and not c.startswith("biou_")]
            if own:  # the researcher's own columns (notes typed in a spreadsheet): blank in these rows
                rows, columns = [{**row, **dict.fromkeys(own, "")} for row in rows], columns + own
            # A file written before the latest columns (its columns maybe put in another order): kept as it is.
            if any(sorted(header) == sorted(c for c in columns if c not in _ADDED[i:]) for i in range(len(_ADDED))):
                lost = [c for c in needed if c not in header]
                if lost:
                    reasons = list(dict.fromkeys(_READ_WITHOUT[c] for c in lost if c in _READ_WITHOUT))
                    read_as = " and ".join(filter(None, [", ".join(reasons[:-1]), reasons[-1]]))
                    raise OlderFileError(f"{path} was started before BiasMap wrote the column(s) {', '.join(lost)}, "
                                         f"without which these rows would read as rows {read_as}, and pair with such "
                                         f"rows in the summary: give this audit another file name", lost)
                rows, columns = [{c: row[c] for c in header} for row in rows], header
            elif sorted(header) == sorted(columns):  # the same columns, put in another order by a spreadsheet
                rows, columns = [{c: row[c] for c in header} for row in rows], header
            if header != columns:
                raise ValueError(f"{path} holds rows with other columns than this trace's (only the file has: "
                                 f"{_only_in(header, columns)}; only the trace has: {_only_in(columns, header)}). "
                                 f"{_why_other_columns(header, columns)}")
        long = next((k for row in rows for k, v in row.items() if len(str(v)) > csv.field_size_limit()), None)
        if long is not None:  # written, it would leave a file that no later run could read back or append to
            raise ValueError(f"this trace's {long} is longer than Python's csv module reads back "
                             f"({csv.field_size_limit()} characters): shorten it (a label linked from a long text, "
                             f"a schedule of that many steps), or measure the trace with Entanglement IoU")
        text = _csv(rows, "\r\n", with_header=header is None)
        if header is None:
            # A new file starts with a byte-order mark, as Excel needs to read UTF-8 (accents, CJK) as such; pandas
            # reads it as it is, Python's csv module with encoding="utf-8-sig". Rows appended later add none.
            data = text.encode("utf-8-sig")
        else:
            data = text.encode("utf-8")
            f.seek(-1, os.SEEK_END)
            if f.read(1) not in (b"\n", b"\r"):  # a file saved again without its last line break
                data = b"\r\n" + data
        _append(f, data)
    return rows


def _append(f, data: bytes) -> None:
    """``data`` at the end of the open file ``f`` (append mode), or none of it: a disk that fills up mid-row leaves no
    part of a row, at which every later summary of the file would stop."""
    end = f.seek(0, os.SEEK_END)
    rest = memoryview(data)
    try:
        while rest:  # unbuffered: a write the disk refused is not written again when the file is closed
            rest = rest[os.write(f.fileno(), rest):]
        os.fsync(f.fileno())  # a network drive may refuse the write only now
    except OSError:
        os.ftruncate(f.fileno(), end)
        raise


def check_appendable(path: str) -> None:
    """Refuse an audit file that could take no rows, before a run samples for it: one that cannot be written to or
    made, that is not UTF-8 text, has ; between cells or cannot be read back, or whose header no rows can go under
    (see _header), or lacks a column every row has. Columns that depend on the trace (its stages, the columns of later
    versions) are checked when rows come (append_csv)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give the audit a file name")
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{path} is a link to a file that is not there: remove the link, or give the audit another "
                         f"file name")
    if not os.path.exists(path):
        folder = _first_there(path)  # append_csv makes the rest
        if not os.path.isdir(folder):
            raise ValueError(f"{path} cannot be made: {os.path.basename(folder)!r} on its way is a file, not a folder; "
                             f"give the audit another file name")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{path} cannot be made: the first of its folders that is there is not one this "
                             f"ComfyUI may write to; give the audit another file name, or change the folder's "
                             f"permissions")
        return
    try:
        # Opened as append_csv opens it, and locked (nothing written): refused where the file is read-only, and on
        # Windows where a spreadsheet has it open, which locks it; read whole, not mid-way through another append.
        with open(path, "a+b") as f, _locked(f):
            stat = os.fstat(f.fileno())
            seen = (stat.st_size, stat.st_mtime_ns)
            if _CHECKED.get(path) == seen:  # read when a prompt was queued before, and not changed since
                return
            f.seek(0)
            data = f.read()
    except OSError as err:
        raise ValueError(f"{path} cannot be opened to append rows ({err.strerror or err}): close it where it is open "
                         f"(a spreadsheet on Windows locks it), make it writable, or give the audit another file "
                         f"name") from err
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1  # the object: the bytes after any byte-order mark
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} in line {line}): a spreadsheet saved it in another "
                         f"encoding; save it as CSV UTF-8, or give the audit another file name") from err
    # Rows come only after the run has sampled: a file they could not go under is refused now, and said why (one
    # saved with ; between cells too, by _parsed or _header).
    header = _header(_parsed(data, path), path)
    if header is not None and (lacking := [c for c in _ALWAYS if c not in header]):
        raise ValueError(f"{path} {_removed(lacking)}")
    _CHECKED[path] = seen


# Audit files that passed check_appendable, by path, with their size and time of change then: a queue of many prompts
# to one large file reads it once.
_CHECKED: dict[str, tuple[int, int]] = {}


def file_on_the_way(path: str) -> str | None:
    """The name of a file where a folder of ``path`` would be made (an output/biasmap that is a file), or None."""
    folder = _first_there(path)
    return None if os.path.isdir(folder) else os.path.basename(folder)


def _first_there(path: str) -> str:
    """The first of the folders ``path`` lies in that is there (or a file in its place)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def write_csv(path: str, rows: list[dict], unless_grown: tuple[str, int] | None = None) -> bool:
    """``rows`` as the whole CSV at ``path``, written as audit files are (header, UTF-8 with a byte-order mark, text
    a spreadsheet would run escaped) and put in place in one step: a reader never finds half a file; → whether written.

    ``unless_grown``: the audit file the rows were made from and its size then. They are written while that file is
    locked, and only if it has not grown since: another ComfyUI appending to it meanwhile writes its own, newer rows.
    """
    with contextlib.ExitStack() as stack:
        if unless_grown is not None:
            audit, size = unless_grown
            stack.enter_context(_locked(stack.enter_context(open(audit, "a+b"))))
            if os.path.getsize(audit) != size:
                return False
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        _remove_left_partials(folder, name)
        # A name no other process picks, also one of another machine writing to a shared folder, made as any file is
        # (readable as the folder's other files are, where a temporary file would be its owner's alone); hidden, as a
        # killed write leaves it until the table is written again.
        partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "xb") as f:
                f.write(_csv(rows, "\r\n", with_header=True).encode("utf-8-sig"))
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):  # not put in place (the file open in a spreadsheet, on Windows)
                os.remove(partial)
    return True


# A table's write takes milliseconds: a partial file of it older than this was left by a write that was killed.
_PARTIAL_LEFT_S = 600


def _remove_left_partials(folder: str, name: str) -> None:
    """Remove the partial files of the table ``name`` that writes killed midway left in ``folder``."""
    # Also under the name before it was hidden (table.csv.<hex>.partial).
    pattern = re.compile(rf"\.?{re.escape(name)}\.[0-9a-f]{{32}}\.partial")
    # A folder that cannot be listed, a file gone meanwhile (another ComfyUI writing the table removed it) or not
    # ours to remove: the table is written all the same.
    with contextlib.suppress(OSError), os.scandir(folder or ".") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if pattern.fullmatch(entry.name) and time.time() - entry.stat().st_mtime > _PARTIAL_LEFT_S:
                    os.remove(entry.path)


def read_csv(path: str) -> list[dict]:
    """The rows of the audit CSV at ``path`` (every value a string), read while the file is locked: rows another
    ComfyUI instance is appending are read whole or not at all."""
    with open(path, "rb") as f, _locked(f):
        data = f.read()
    records = _parsed(data, path)
    skipped = 0
    while records and not records[0]:  # blank lines before the header, as csv.DictReader skips them
        records.pop(0)
        skipped += 1
    if not records:
        return []
    header, rows, damaged, headers = records[0], [], [], []
    _check_names(header, path)  # a dict of a row would keep one of two columns of one name
    for number, record in enumerate(records[1:], start=2 + skipped):  # rows as a spreadsheet numbers them
        if not any(cell.strip() for cell in record):  # a blank line, or a spreadsheet's empty row (,,,): no image
            continue
        if [record[0].lstrip("\ufeff"), *record[1:]] == header:
            headers.append(str(number))
        elif len(record) != len(header):
            damaged.append(f"{number} ({len(record)} cells)")
        else:
            rows.append(dict(zip(header, map(_as_written, record))))
    if headers:
        raise ValueError(f"{path} repeats its header in row(s) {_first_five(headers)} (two audit files joined into "
                         f"one?): delete those rows")
    if damaged:  # read with cells missing, such a row would count as an image of other settings
        raise ValueError(f"{path} has rows with another number of cells than its header's {len(header)}: row(s) "
                         f"{_first_five(damaged)}, as a spreadsheet numbers them (a write cut short, or cells added or "
                         f"removed by hand): delete or mend them")
    return rows


def _first_five(rows: list[str]) -> str:
    """Rows of a file as a message names them: the first five, and whether there are more."""
    return ", ".join(rows[:5]) + (" and more" if len(rows) > 5 else "")


def _semicolons(path: str) -> ValueError:
    """A file saved again by a spreadsheet set to a region that writes decimal commas (Excel then puts ; between
    cells)."""
    return ValueError(f"{path} was saved with ; between cells (a spreadsheet set to a region that writes decimal "
                      f"commas): save it as comma-separated CSV UTF-8, or give the audit another file name")


def _semicolon_separated(data: bytes) -> bool:
    """Whether an audit file's first line has ; between cells and no comma (see _semicolons)."""
    first = data.split(b"\n", 1)[0]
    return b";" in first and b"," not in first


def _parsed(data: bytes, path: str) -> list[list[str]]:
    """The records of an audit file's bytes (after any byte-order marks), read strictly: a quote left open would take
    every row appended after it into one cell."""
    records, start = [], 1  # the line the record being read starts in: where a quote left open is
    try:
        # Any number of byte-order marks: a tool that adds one to a file that has one leaves two.
        text = data.decode("utf-8-sig").lstrip("\ufeff")
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        for record in reader:
            records.append(record)
            start = reader.line_num + 1
        return records
    except (UnicodeDecodeError, csv.Error) as err:
        if _semicolon_separated(data):
            raise _semicolons(path) from err
        where = f" in the row starting in line {start}" if isinstance(err, csv.Error) else ""
        raise ValueError(f"{path} cannot be read as an audit CSV ({err}{where}): a spreadsheet saved it in another "
                         f"encoding than UTF-8, a line was damaged (a quote left open), or a cell is longer than "
                         f"Python's csv module reads; save it as CSV UTF-8 or mend the line, or give the audit another "
                         f"file name") from err


def csv_text(rows: list[dict]) -> str:
    """``rows`` as CSV text, header first (quoted as the file is: prompts hold commas); rows of other columns (traces
    of other stages) under every row's columns, blank where a row has none."""
    return _csv(rows, "\n", with_header=True)


def _csv(rows: list[dict], lineterminator: str, with_header: bool) -> str:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(column for row in rows for column in row))  # each row's, blank in rows without it
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator=lineterminator)
    if with_header:
        writer.writeheader()
    writer.writerows(_inert(rows))
    return buffer.getvalue()


@contextlib.contextmanager
def _locked(f):
    """An exclusive lock on the open file ``f`` (POSIX ``flock``; on Windows its first byte, waited for)."""
    if os.name == "nt":
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
        try:
            yield
        finally:
            f.flush()
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            f.flush()  # the rows on disk before another process may read the file
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): an audit file passed around
# could carry a label or prompt such as '=HYPERLINK(…)', also after spaces or line breaks (which an import may trim)
# or invisible format characters, or in full width (＝, as a Japanese keyboard types it). Such text cells get a
# leading apostrophe, which spreadsheets show as text and hide, and read_csv takes off again; a cell whose text after
# its own apostrophes is such gets one more, so that every cell reads back as it was. Numbers keep their sign, also
# typed as text (a label '-1.5' reads back as typed).
_FORMULA_STARTS = frozenset("=+-@＝＋－＠")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII digits: a number to a spreadsheet


def _marked(text: str) -> bool:
    """Whether a text cell gets the apostrophe (see _FORMULA_STARTS)."""
    text = text.lstrip("'")
    start = next((i for i, c in enumerate(text) if not (c.isspace() or unicodedata.category(c) == "Cf")), len(text))
    shown = text[start:]  # after the spaces and format characters an import may trim
    if _NUMBER.fullmatch(shown.rstrip()):
        return False
    return shown[:1] in _FORMULA_STARTS or text[:1] in ("\t", "\r", "\n")


def _inert(rows: list[dict]) -> list[dict]:
    return [{k: "'" + v if isinstance(v, str) and _marked(v) else v for k, v in row.items()} for row in rows]


def _as_written(cell: str) -> str:
    """A cell read back as the row held it: without the apostrophe _inert put before it, or that BiasMap put before
    2026-12-01 (before = + - @, a tab or a carriage return, such as `'-1.5 `, which is now a number)."""
    marked_before = cell[1:2] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.fullmatch(cell[1:])
    return cell[1:] if cell.startswith("'") and (_marked(cell[1:]) or marked_before) else cell


def _only_in(columns, others) -> str:
    return ", ".join(c for c in columns if c not in others) or "nothing"


def _why_other_columns(header: list[str], columns: list[str]) -> str:
    """Why a file's ``header`` and the rows' ``columns`` differ, and what to do."""
    if any(c.startswith("biou_") for c in set(header) ^ set(columns)):
        return ("BIoU columns follow the recorded stages, which differ between model families, with include_middle, "
                "and with a node that changes the U-Net's grids (Deep Shrink) at some image sizes: give this audit "
                "another file name")
    removed = [c for c in columns if c not in header and c in _COLUMNS and c not in _ADDED]
    if removed and set(header) <= set(columns):
        return f"The file {_removed(removed)}"
    return "The file was started by another BiasMap version, or the trace was saved by one: give this audit another " \
           "file name"


def _removed(columns: list[str]) -> str:
    """What a file lacking BiasMap's ``columns`` is told."""
    return (f"lacks BiasMap's column(s) {', '.join(columns)}, which every row has (removed in a spreadsheet, or an "
            f"early BiasMap version's file?): put them back from a copy of the file, or give the audit another file "
            f"name")


def _check_names(header: list[str], path: str) -> None:
    """Refuse a header that names a column twice: which of the two would a row's value be?"""
    named_twice = sorted({c for c in header if header.count(c) > 1})
    if named_twice:
        raise ValueError(f"{path} names the column(s) {', '.join(map(repr, named_twice))} twice in its header: delete "
                         f"one of each, or give the audit another file name")


def _header(records: list[list[str]], path: str) -> list[str] | None:
    """The header an audit file's ``records`` give rows to go under; None for a file of no rows (new, or blank lines
    alone). Refused: a first line blank, or of cells separated by ;, a column named twice, the reductions table Audit
    Log writes beside an audit file, or a header of none of BiasMap's columns."""
    if not any(records):
        return None
    header = records[0]
    if not header:
        raise ValueError(f"the first line of {path} is blank, not an audit header: give this audit another file name, "
                         f"or remove the blank line")
    if _names_reductions(header) or len(header) == 1 and _names_reductions(header[0].split(";")):
        raise ValueError(f"{path} is the table of reductions that Audit Log writes beside an audit file, not an "
                         f"audit file: give the audit's own file name (without _reductions)")
    if len(header) == 1 and ";" in header[0]:
        raise _semicolons(path)
    _check_names(header, path)
    if not set(header) & set(_ALWAYS):
        raise ValueError(f"{path} is not an audit file of BiasMap's (its header names none of the columns BiasMap "
                         f"writes): give the audit another file name")
    return header


def is_reductions_table(path: str) -> bool:
    """Whether the file at ``path`` is the table of reductions Audit Log writes beside an audit file, also as a
    spreadsheet saves it again (with ; between cells, or its columns in another order)."""
    with open(path, "rb") as f:
        first = f.readline()
    delimiter = ";" if _semicolon_separated(first) else ","
    return _names_reductions(next(csv.reader([first.decode("utf-8-sig", errors="replace")], delimiter=delimiter), []))


def _names_reductions(header: list[str]) -> bool:
    """Whether a header is a reductions table's (Audit Log's ``…_reductions.csv``), whatever its columns' order."""
    return {"metric", "reduction"} <= set(header)


# What makes two rows one image logged twice, as the reductions count duplicates: the same image and concept pair,
# made and measured alike (whatever their labels).
_LOGGED_AS = tuple(dict.fromkeys((*IMAGE, *SETTINGS)))


def logged_before(rows: list[dict], file_rows: list[dict]) -> tuple[dict, int] | None:
    """The row of ``rows`` (as :func:`append_csv` wrote them) that ``file_rows`` (the file read back, these rows in
    it) holds most often, with how many times it held it before: a run repeated (a fixed seed, a prompt list that did
    not advance) logs an image again, which the summary counts once. None where no row was logged before."""
    times = collections.Counter(row_key(row, _LOGGED_AS) for row in file_rows)
    # Every value a string, as read_csv gives the file's (without the mark before a formula start).
    as_read = [{k: _as_written(v) for k, v in row.items()}
               for row in csv.DictReader(io.StringIO(csv_text(rows), newline=""))]
    row, count = max(((row, times[row_key(row, _LOGGED_AS)]) for row in as_read), key=lambda pair: pair[1],
                     default=(None, 0))
    return (row, count - 1) if count > 1 else None
