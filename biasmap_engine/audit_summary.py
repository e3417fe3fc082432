"""Relative reductions of entanglement from audit rows, as the paper reports them (BiasMap, arXiv 2509.13496, §3).

An audit CSV holds rows of guided runs and of the same images at λ = 0. Each guided row is paired with the λ = 0 row
of the same image (seed, noise, prompts, model, sampling and schedule, recorded branch, concept pair, q, mask size
and the steps whose maps were measured); the reduction is given both ways the paper gives it: of the means,
(mean_base − mean_guided) / mean_base, and the mean of per-image reductions, each with a 95 % bootstrap interval over
the paired images (the seeds are the sample: a reduction over 100 seeds says more than one over 5). Rows come as
``audit_rows`` makes them or as ``read_csv`` reads the file back (every value a string). Nothing is dropped unsaid:
each figure comes with the rows it could not use.
"""

import collections
import functools
import math
import re

from .audit_columns import (IMAGE, MEASURED, MEASURED_AT, SETTINGS, as_clip_reads, cell, check_figures, check_seeds,
                            parsed_number, row_key, row_place, same_figure, typed)
from .bootstrap import FEWEST_FOR_INTERVAL, LEVEL, mean_interval, reduction_intervals
from .report import figure, percent_change, shown_number
from .tokens import one_line, straightened
from .unpaired import differing_columns, image_named, made_otherwise, mismatch, why_unpaired

__all__ = ["reductions", "reductions_report", "reductions_table", "reductions_text"]

# The rows a reduction leaves out, as the summary names them: guided rows without a λ = 0 row of their image, with an
# n/a figure, or of an image logged again (queued again, or its label changed while the sampler's result was cached;
# the first row counts, and those whose figure differs from it are counted too: made on another machine, or of
# another image that no column tells apart);
# λ = 0 rows of a paired image logged again; and λ = 0 images made and measured as the group's, of none of its guided
# rows (a guided run interrupted, or a sweep's λ not yet run for every seed).
_LEFT_OUT = {"unpaired": "unpaired", "not_measured": "not measured", "duplicates": "duplicates",
             "differing_duplicates": "of them with other figures than the row counted",
             "baseline_duplicates": "λ = 0 duplicates", "baselines_unpaired": "λ = 0 unpaired"}


def reductions(rows, metric: str = "iou", by: str | tuple[str, ...] | None = "semantic",
               match: tuple[str, ...] = ()) -> list[dict]:
    """Per guided configuration and way of sampling and measuring (sampler, steps, model, q, …) and per value of column
    ``by`` (e.g. each profession, or of several columns; None: all rows together; and per demographic concept where
    the rows hold several): the images paired with their λ = 0 row, both means of ``metric``, both relative
    reductions with their 95 % bootstrap intervals (``reduction_interval``, ``mean_image_reduction_interval``: (low,
    high), NaN from fewer than 10 images, or with overlap at λ = 0 for the second), and the guided rows left out (no
    λ = 0 row of their image, n/a figures, the same image logged again; ``why_unpaired``: why the first unpaired
    one is).
    ``match``: more columns a pair must share, e.g. ``("label",)`` when the label carries the prompt (text made while
    the graph runs)."""
    return _paired(_records(rows), (metric,), by, match)[metric][0]


def _records(rows) -> list[dict]:
    """``rows`` as a list of dicts: a pandas DataFrame's records too (``df.to_dict("records")``)."""
    return rows.to_dict("records") if callable(getattr(rows, "to_dict", None)) and not isinstance(rows, dict) else rows


def _paired(rows, metrics: tuple[str, ...], by, match) -> dict[str, tuple[list[dict], list[str]]]:
    """:func:`reductions` of each metric, and the λ = 0 images that no guided configuration pairs with, as the summary
    names them (made otherwise than every guided run, or of a ``by`` value that has none). The rows' keys, most of the
    time an audit's summary takes after every run, are made once for all metrics."""
    rows = _with_derived(rows)
    by, match = _apart_by_demographic(rows, _columns(by)), _columns(match)
    for metric in metrics:
        _check_columns(rows, metric, by, match)
    # Blank (a notebook's NaN too): made from traces without the sampler's settings.
    unscaled = sum(not math.isfinite(parsed_number(row["guidance_scale"])) for row in rows)
    if unscaled:
        raise ValueError(f"{unscaled} row(s) have no number as guidance_scale (made from traces without the "
                         f"sampler's settings): leave them out of the rows")
    image = IMAGE + match
    baselines, guided = [], []  # (row, its image's key, its by values); (row, its image's key, its group's name)
    for row in rows:
        key = row_key(row, image)
        if parsed_number(row["guidance_scale"]) == 0:
            baselines.append((row, key, row_key(row, by)))
        else:
            guided.append((row, key, row_key(row, SETTINGS) + row_key(row, by)))
    return {metric: _paired_by(metric, baselines, guided, image, by) for metric in metrics}


def _paired_by(metric: str, baselines: list[tuple], guided: list[tuple], image: tuple[str, ...],
               by: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """:func:`_paired` of one metric, from the rows as it keyed them."""
    kept, logged = {}, collections.Counter()  # each λ = 0 image's first row; its rows
    for row, key, of in baselines:
        value = parsed_number(row[metric])
        logged[key] += 1
        first = kept.setdefault(key, (value, row, of))
        if not same_figure(first[0], value):
            raise ValueError(f"two λ = 0 rows of the same image ({image_named(row)}) give {metric} "
                             f"{first[0]:g} and {value:g}; they differ in {differing_columns(first[1], row)}: if "
                             f"those tell two images apart (a prompt made while the graph ran, in the label), log "
                             f"each prompt's runs to a file of its own, or pass the columns as match=(…) to "
                             f"reductions() in Python; if they are one image made twice (on another machine, "
                             f"ComfyUI version or number of CPU threads, which round otherwise), delete one of the "
                             f"two rows"
                             + ("" if "start_latent" in row else
                                "; rows of a file started before BiasMap wrote start_latent do not tell apart "
                                "runs from other latents (img2img from other images, second passes after other "
                                "first passes): give such an audit a new file name"))
    if not guided:
        raise ValueError("no guided row (guidance_scale > 0) in the rows: log the guided runs into the file too")
    groups: dict[tuple, dict] = {}
    for row, key, name in guided:
        group = groups.setdefault(name, {"row": row, "pairs": {}, "logged": {}, "unpaired": 0, "not_measured": 0,
                                         "duplicates": 0, "differing_duplicates": 0, "baseline_duplicates": 0,
                                         "images_guided": set(), "first_unpaired": None})
        group["images_guided"].add(key)
        base, after = kept.get(key, (None,))[0], parsed_number(row[metric])
        logged_at = (str(cell(row, "time")), after)
        if base is None:
            group["unpaired"] += 1
            group["first_unpaired"] = group["first_unpaired"] or row
        elif not (math.isfinite(base) and math.isfinite(after)):  # n/a: no maps to threshold
            group["not_measured"] += 1
        elif key in group["pairs"]:  # queued again, or logged again from ComfyUI's cache
            group["duplicates"] += 1
            group["differing_duplicates"] += not same_figure(group["pairs"][key][1], after)
            # The earliest logged counts, the lower figure of two logged at once (made again at another thread count,
            # say): the same rows in any order give the same reductions.
            if logged_at < group["logged"][key]:
                group["pairs"][key], group["logged"][key] = (base, after), logged_at
        else:
            group["pairs"][key], group["logged"][key] = (base, after), logged_at
            group["baseline_duplicates"] += logged[key] - 1  # its λ = 0 image logged again: one row counts
    if not any(g["pairs"] for g in groups.values()):
        raise ValueError(f"no guided row has a λ = 0 row of the same image: "
                         f"{mismatch([row for row, _, _ in guided], [row for _, row, _ in kept.values()], image)}")
    made_alike = collections.defaultdict(list)  # λ = 0 images by how they were made and measured
    of_seed = collections.defaultdict(list)  # λ = 0 rows by seed and by value: where an unpaired row's would be
    for key, (_, row, of) in kept.items():
        made_alike[tuple(key[i] for i in MEASURED_AT) + of].append(key)
        of_seed[key[_SEED_AT:_SEED_AT + 1] + of].append(row)
    guided_alike = {}  # in the rows' order: the nearest of equally near ones is the same in every process
    for group in groups.values():
        alike = row_key(group["row"], MEASURED) + row_key(group["row"], by)
        guided_alike.setdefault(alike, None)
        group["baselines_unpaired"] = sum(key not in group["images_guided"] for key in made_alike.get(alike, []))
        first = group["first_unpaired"]
        group["why_unpaired"] = why_unpaired(first, of_seed, image, by) if first is not None else ""
    # λ = 0 images no group counts: neither paired in one (also across by values, e.g. by label) nor made alike one.
    matched = set().union(*(group["images_guided"] for group in groups.values()))
    alone = [made_otherwise(alike, len(unmatched), guided_alike) for alike, keys in made_alike.items()
             if alike not in guided_alike and (unmatched := [key for key in keys if key not in matched])]
    return [_summary(g, by) for g in groups.values()], alone


_SEED_AT = IMAGE.index("seed")


def reductions_text(rows, metrics: tuple[str, ...] = ("iou", "mbiou"),
                    by: str | tuple[str, ...] = "semantic") -> str:
    """The reductions of ``rows`` (an audit file's) as report lines: per guided configuration and ``by`` value (and
    demographic concept, where the rows hold several), each metric's λ = 0 and guided means and both reductions; else
    why there are none (no guided row with a baseline). Rows of λ = 0 alone (a discovery audit), or of guided runs
    alone (their baselines still to come), get their means per ``by`` value and configuration instead."""
    return reductions_report(rows, metrics, by)[0]


def reductions_table(rows, metrics: tuple[str, ...] = ("iou", "mbiou"),
                     by: str | tuple[str, ...] | None = "semantic", match: tuple[str, ...] = ()) -> list[dict]:
    """:func:`reductions` of each metric as one table for a spreadsheet: a row per metric and group, each interval as
    two columns (``reduction_low``, ``reduction_high``, …), every row with every column in one order (settings, the
    ``by`` columns, the figures), blank where a group has no such setting or a figure is not a number (no interval
    below 10 images): a spreadsheet reads "nan" as text, and plots it as 0."""
    metrics = _columns(metrics)
    return _table({metric: groups for metric, (groups, _) in _paired(_records(rows), metrics, by, match).items()})


def reductions_report(rows, metrics: tuple[str, ...] = ("iou", "mbiou"),
                      by: str | tuple[str, ...] = "semantic") -> tuple[str, list[dict] | None]:
    """:func:`reductions_text` and :func:`reductions_table` of ``rows`` from one computation of the reductions (Audit
    Log makes both after every run); the table is None where the text gives no reductions (means, or why none). The
    text ends with the notes the rows carry (a concept not in the generation prompt, an fp16 overflow), which the
    figures do not show."""
    rows = _records(rows)
    text, table = _report(rows, _columns(metrics), _apart_by_demographic(rows, _columns(by)))
    return text + _notes_said(rows), table


def _notes_said(rows) -> str:
    """The notes of the runs that made ``rows``, each with how many rows carry it, the most frequent first: a line
    of the summary (empty where no row has a note)."""
    counted = collections.Counter(note for row in rows if isinstance(notes := row.get("notes"), str)  # not NaN
                                  for note in dict.fromkeys(notes.split(" | ")) if note)
    if not counted:
        return ""
    said = "; ".join(f"{count} row(s): {_cut(note)}" for note, count in counted.most_common(_NOTES_SAID))
    others = len(counted) - _NOTES_SAID
    return (f"\nnotes in the rows (the notes column): {said}"
            + (f"; and {others} other note(s)" if others > 0 else ""))


_NOTES_SAID, _NOTE_WIDTH = 3, 90  # the notes a summary names, and each one's characters


def _cut(note: str) -> str:
    """A note as a summary shows it: its start, up to _NOTE_WIDTH characters."""
    note = one_line(note)
    return note if len(note) <= _NOTE_WIDTH else note[:_NOTE_WIDTH - 1].rstrip() + "…"


def _report(rows, metrics: tuple[str, ...], by: tuple[str, ...]) -> tuple[str, list[dict] | None]:
    try:
        check_seeds(rows)  # the means, too, count images by their seeds
        check_figures(rows, tuple(m for m in metrics if rows and m in rows[0]))  # a missing one: said below
    except ValueError as err:
        return f"entanglement over the file: none: {err}", None
    scales = {parsed_number(row.get("guidance_scale")) for row in rows}
    if scales == {0.0}:
        return _means_text(rows, metrics, by, "λ = 0 only; log guided runs of the same seeds for the reductions"), None
    if scales and 0.0 not in scales and all(math.isfinite(v) for v in scales):
        why = ("guided runs only so far; for the reductions, log the same seeds at λ = 0: set the seed, or Audit "
               "Prompts' run, back to the first run's")
        return _means_text(rows, metrics, by, why), None
    try:
        paired = _paired(rows, metrics, by, ())
    except ValueError as err:
        return f"reductions over the file: none: {err}", None
    figures = {metric: groups for metric, (groups, _) in paired.items()}
    first = figures[metrics[0]]
    # A configuration is named by the settings in which the file's guided configurations differ (λ at least).
    named = ["guidance_scale"] + [c for c in SETTINGS[1:] if len({cell(f, c) for f in first}) > 1]
    lines = ["reductions over the file (each guided image against its λ = 0 row; a negative change is less overlap; in "
             f"brackets a {LEVEL * 100:g} % bootstrap interval over the images, given from {FEWEST_FOR_INTERVAL} "
             f"images on, for the per-image figure {FEWEST_FOR_INTERVAL} with overlap at λ = 0):"]
    for i, group in enumerate(first):
        setting = " · ".join(_label(c, group.get(c, "")) for c in named)
        each = [(metric, f[i], _left_out(f[i])) for metric, f in figures.items()]
        counts = {(g["images"], left_out) for _, g, left_out in each}
        if len(counts) == 1:  # the metrics' figures are of the same images: said once
            none = {_none_why(g) for _, g, _ in each if not g["images"]}
            changes = none.pop() if len(none) == 1 else "; ".join(_change(metric, g) for metric, g, _ in each)
            images, left_out = counts.pop()
            changes += f"; {images} image(s)" + (f"; left out: {left_out}" if left_out else "")
        else:  # an image n/a by one metric (a stage's maps not finite: IoU n/a, mBIoU over the other stages)
            changes = "; ".join(f"{_change(metric, g)} over {g['images']} image(s)"
                                + (f" (left out: {left_out})" if left_out else "") for metric, g, left_out in each)
        lines.append(" · ".join([setting, *(one_line(str(group[c])) for c in by)]) + f": {changes}")
    alone = paired[metrics[0]][1]
    if alone:
        lines.append("λ = 0 images that no guided run pairs with, left out: " + "; ".join(alone))
    return "\n".join(lines), _table(figures)


def _change(metric: str, group: dict) -> str:
    """A metric's means and reductions in a summary line, or why there are none."""
    if not group["images"]:
        return f"{metric} {_none_why(group)}"
    return (f"{metric} {figure(group['base'], 4)} → {figure(group['guided'], 4)} "
            f"({_with_interval(group, 'reduction')}, per image {_with_interval(group, 'mean_image_reduction')})")


def _none_why(group: dict) -> str:
    """Why a metric pairs no image of a group."""
    if group["not_measured"]:  # paired, but with no figure: no maps to threshold
        return "n/a (no figure of its paired images)"
    return "none paired yet (no λ = 0 row of its images)"  # a pass at λ = 0 under way


def _left_out(group: dict) -> str:
    """The rows a metric's figures left out, as a summary line names them (and why the first unpaired guided row is)."""
    return ", ".join(f"{group[k]} {name}" + (f" ({group['why_unpaired']})" if k == "unpaired" else "")
                     for k, name in _LEFT_OUT.items() if group[k])


def _table(figures: dict[str, list[dict]]) -> list[dict]:
    """Each metric's :func:`reductions` as the rows of :func:`reductions_table`."""
    table = []
    for metric, groups in figures.items():
        for group in groups:
            row = {"metric": metric}
            for key, value in group.items():
                if key == "why_unpaired":  # the summary's words, not a figure to chart
                    continue
                if key.endswith("_interval"):
                    row[key.replace("_interval", "_low")], row[key.replace("_interval", "_high")] = value
                else:
                    row[key] = value
            table.append({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
    seen = dict.fromkeys(column for row in table for column in row)
    settings = [c for c in SETTINGS if c in seen]
    columns = ["metric", *settings, *(c for c in seen if c != "metric" and c not in settings)]
    return [{column: row.get(column, "") for column in columns} for row in table]


def _means_text(rows, metrics: tuple[str, ...], by: tuple[str, ...], why: str) -> str:
    """Each metric's mean per ``by`` value and configuration (named by λ where it is not 0, and by the columns in which
    the rows differ) over the images that have a figure, each image once."""
    rows = _with_derived(rows)
    # Settings compared as the pairing compares them: a spreadsheet's TRUE and 7 are the file's True and 7.0.
    named = [c for c in SETTINGS if len({cell(row, c) for row in rows}) > 1
             or (c == "guidance_scale" and parsed_number(rows[0][c]) != 0)]
    groups: dict[tuple, dict] = {}
    for row in rows:
        name = tuple(_label(c, typed(row.get(c, ""))) for c in named) + tuple(str(row[c]) for c in by)
        group = groups.setdefault(row_key(row, named + list(by)),
                                  {"name": name, "images": set(), "runs": set(), **{m: [] for m in metrics}})
        image = row_key(row, IMAGE)
        key = image + (cell(row, "label"),)  # the label may carry the prompt, as made while the graph ran
        figures = tuple(parsed_number(row.get(metric)) for metric in metrics)
        # Its sampling run, where the row says when that was, with its figures: one logged again under a new label
        # (the sampler's result taken from ComfyUI's cache) is that image again, not another one. The figures too, as
        # the time is to the second and a queued prompt may sample several prompts made while it ran.
        timed = cell(row, "time") not in ("", "nan")
        run = (image + row_key(row, ("prompt_id", "time")), tuple(map(str, figures))) if timed else key
        if key not in group["images"] and run not in group["runs"]:  # an image logged again counts once
            group["images"].add(key)
            group["runs"].add(run)
            for metric, value in zip(metrics, figures):
                group[metric].append(value)
    lines = [f"entanglement over the file ({why}; in brackets a {LEVEL * 100:g} % bootstrap interval of the mean, "
             f"given from {FEWEST_FOR_INTERVAL} images on):"]
    for group in groups.values():
        means = " · ".join(f"{metric} {figure(_finite_mean(group[metric]), 4)}{_interval_text(group[metric])}"
                           for metric in metrics)
        unmeasured = sum(not math.isfinite(v) for v in group[metrics[0]])
        lines.append(f"{' · '.join(group['name']) or 'all'}: {means} over {len(group['images'])} image(s)"
                     + (f", {unmeasured} of them n/a" if unmeasured else ""))
    return "\n".join(lines)


def _with_interval(figures: dict, name: str) -> str:
    """A reduction as its change, then its interval's where there is one: −39.1 % [−44.0, −34.2]."""
    low, high = figures[f"{name}_interval"]
    interval = (f" [{percent_change(high).removesuffix(' %')}, {percent_change(low).removesuffix(' %')}]"
                if math.isfinite(low) and math.isfinite(high) else "")
    return percent_change(figures[name]) + interval


def _interval_text(values: list[float]) -> str:
    """The bootstrap interval of the finite values' mean, in brackets; nothing from fewer than 10 values."""
    low, high = mean_interval(values)
    return f" [{figure(low, 4)}, {figure(high, 4)}]" if math.isfinite(low) else ""


def _label(column: str, value) -> str:
    """A setting as a summary line names it: λ 100, sampler heun; a number in full where it is not short (two groups'
    values never read as one)."""
    if column == "guidance_scale":
        return f"λ {shown_number(parsed_number(value), exact=True)}"
    if column == "guided_concepts":  # blank: a sampler of the row's pair alone
        return f"guided against {value or 'the pair alone'}"
    if value == "":  # blank: denoise, which custom sigmas do not carry
        return f"{column} —"
    return f"{column} {shown_number(value, exact=True) if isinstance(value, (int, float)) else one_line(str(value))}"


def _with_derived(rows) -> list[dict]:
    """``rows``, each with ``attribution_template`` (see MEASURED) and ``guided_concepts``: the sampler's concept lists
    (``sampler_demographic``, ``sampler_semantic``) where they say more than the row's pair, lower case as CLIP reads
    them and sorted (the energy, the mean over every pair, is the same in any order): "demographic gender, race" for a
    run guided against both, which is not gender's guidance alone; "semantic doctor, nurse" for two professions guided
    together, whose rows pool (by=None) as one run's; "demographic gender" for race measured on a run guided against
    gender. Blank for a sampler of the row's pair alone, so that an audit's professions, one a run, pool; at λ = 0,
    where the lists guide nothing; and in a file without them."""
    # A row without guided_concepts reads as blank (cell), and each text is read once (the Audit Log's summary reads
    # the whole file again after every run).
    rows = list(rows)  # a csv.DictReader's, read once
    templates = _attribution_templates(rows)
    derived = []
    for row in rows:
        said = _guided_concepts(*(_listed(row.get(c, "")) for c in (
            "guidance_scale", "sampler_demographic", "demographic", "sampler_semantic", "semantic")))
        derived.append({**row, "attribution_template": templates[str(row.get("attribution_prompt", ""))],
                        **({"guided_concepts": said} if said else {})})
    return derived


def _attribution_templates(rows) -> dict[str, str]:
    """Each attribution prompt of ``rows`` with every place of any row's semantic concept made '{}' (as CLIP reads
    them, the longest first): one template for an audit's professions, in prompts of their own or of several."""
    concepts = {as_clip_reads(str(row.get("semantic", ""))) for row in rows} - {""}
    words = sorted((concept.split() for concept in concepts), key=len, reverse=True)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, w)) for w in words) + r")(?!\w)",
                         flags=re.IGNORECASE) if words else None
    prompts = {str(row.get("attribution_prompt", "")) for row in rows}
    return {prompt: pattern.sub("{}", straightened(prompt)) if pattern else prompt for prompt in prompts}


def _listed(value):
    """A cell as :func:`_guided_concepts` takes it: a list (a trace's own, in rows made by hand) as the CSV writes
    it."""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=1 << 12, typed=True)
def _guided_concepts(scale, *lists_and_pair) -> str:
    """:func:`_with_derived`'s guided_concepts of one row: from λ, then each list with the row's concept of it."""
    if parsed_number(scale) == 0:
        return ""
    said = []
    for kind, listed, measured in zip(("demographic", "semantic"), lists_and_pair[::2], lists_and_pair[1::2]):
        concepts = {as_clip_reads(c) for c in str(listed).split(",")} - {""}
        if concepts and concepts != {as_clip_reads(str(measured))}:
            said.append(f"{kind} {', '.join(sorted(concepts))}")
    return "; ".join(said)


def _columns(by: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``by`` as a tuple of columns: none, one or several."""
    return () if by is None else (by,) if isinstance(by, str) else tuple(by)


def _apart_by_demographic(rows, by: tuple[str, ...]) -> tuple[str, ...]:
    """``by``, led by the demographic concept where the rows hold several: gender and race figures are not one."""
    if rows and len({cell(row, "demographic") for row in rows}) > 1 and "demographic" not in by:
        return ("demographic", *by)
    return by


def _finite_mean(values: list[float]) -> float:
    """The mean of the finite values; NaN where there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _summary(group: dict, by: tuple[str, ...]) -> dict:
    # In a fixed order (the images' keys as text: a column may hold numbers and text), so that the intervals'
    # resamples do not depend on the order in which the rows were logged.
    values = [pair for _, pair in sorted(group["pairs"].items(), key=lambda item: repr(item[0]))]
    row = group["row"]
    before = sum(b for b, _ in values) / len(values) if values else math.nan
    after = sum(a for _, a in values) / len(values) if values else math.nan
    per_image = [(b - a) / b for b, a in values if b > 0]  # an image without overlap at λ = 0 has nothing to reduce
    of_means, per_image_mean = reduction_intervals(values, len(per_image))
    return {**{c: typed(row[c]) for c in SETTINGS if row.get(c, "") != ""}, **{c: row[c] for c in by},
            "images": len(values), "base": before, "guided": after,
            "reduction": (before - after) / before if before > 0 else math.nan, "reduction_interval": of_means,
            "mean_image_reduction": sum(per_image) / len(per_image) if per_image else math.nan,
            "mean_image_reduction_interval": per_image_mean,
            "images_with_overlap": len(per_image), **{k: group[k] for k in _LEFT_OUT},
            "why_unpaired": group["why_unpaired"]}


def _check_columns(rows, metric, by, match) -> None:
    if not rows:
        raise ValueError("no rows: read them from a BiasMap audit CSV with read_csv(path)")
    if any(c.startswith("\ufeff") for c in rows[0]):
        raise ValueError("the first column's name starts with a byte-order mark: read the CSV with read_csv(path), or "
                         "open it with encoding='utf-8-sig'")
    needed = dict.fromkeys(("guidance_scale", metric, *by, *match)).keys()  # a set, in the order refusals name them
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(f"the rows have no column(s) {', '.join(missing)}: give rows of a BiasMap audit CSV and a "
                         f"metric such as iou, mbiou or biou_down_1")
    lacking = next(((i, sorted(needed - row.keys())) for i, row in enumerate(rows) if not row.keys() >= needed), None)
    if lacking is not None:  # rows of traces of other stages put together (a file's rows all have every column)
        raise ValueError(f"{row_place(lacking[0], rows[lacking[0]])} has no column(s) {', '.join(lacking[1])}, which "
                         f"the first row has: give rows of one audit file (read_csv), or leave out the rows without it")
    check_seeds(rows)
    check_figures(rows, (metric,))
