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

import torch

from .guidance import STATUS
from .report import figure, percent_change
from .tokens import concept_key, straightened

__all__ = ["reductions", "reductions_report", "reductions_table", "reductions_text"]

# What makes two rows the same image of the same concept pair, recorded and measured the same way.
_IMAGE = ("seed", "noise_index", "image", "batch_size", "noise_mask", "start_latent", "steps", "cfg", "sampler",
          "scheduler", "denoise", "sigmas", "add_noise", "width", "height", "generation_prompt", "negative_prompt",
          "attribution_prompt", "attribution_template", "model", "model_family", "branch", "include_middle",
          "demographic", "semantic", "q", "mask_size", "first_step", "last_step")
# Compared as CLIP reads them (concept_key): 'Black woman' and 'black  woman' are one concept.
_AS_CLIP_READS = ("demographic", "semantic")
# Columns the reductions make of others (_with_derived): a message names the columns they are made of, not these.
_DERIVED = ("attribution_template",)
# What tells one guided configuration from another (a sweep of λ, or of the stages guided; guided_concepts, which
# _with_derived adds, the sampler's concepts that the row's pair does not say).
_GUIDED_BY = ("guidance_scale", "branch", "include_middle", "soft_topk", "soft_topk_keep", "gamma", "gate",
             "guided_stages", "start", "end", "sinkhorn_iters", "guided_concepts")
# How images were made and measured, apart from which image they are: rows that differ in these are not averaged.
# batch_size too: a batch's first image starts from the noise of a batch of one at its seed, so with a sampler that
# draws no noise as it goes, a mean over both batch sizes would count that image twice.
# Not start_latent: a source image (img2img), like a seed, is which image a row is of. attribution_template (which
# _with_derived adds): the attribution prompt with the rows' semantic concepts taken out, since a word's map is its
# share of the prompt's words: an audit against 'gender' and one against 'gender, race, age' measure otherwise, while
# an audit's professions, each in a prompt of its own, share one.
_MEASURED = ("model", "model_family", "steps", "cfg", "sampler", "scheduler", "denoise", "add_noise", "noise_mask",
             "batch_size", "width", "height", "attribution_template", "branch", "include_middle", "q", "mask_size",
             "first_step", "last_step")
_SETTINGS = tuple(dict.fromkeys(_GUIDED_BY + _MEASURED))  # each once, in order
_MEASURED_AT = tuple(_IMAGE.index(c) for c in _MEASURED)  # each is a column of the image's too: read from its key
# The intervals: percentile bootstrap over the paired images, from resamples drawn by a generator seeded alike every
# time and of images in a fixed order, so the same rows in any order give the same interval; none from fewer images
# than this, where a percentile bootstrap's 95 % interval covers the mean markedly less often than it says (about
# 85 % at 5 images, 90 % at 10).
_RESAMPLES, _LEVEL, _FEWEST_FOR_INTERVAL = 2000, 0.95, 10
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
    return _paired(_records(rows), metric, by, match)[0]


def _records(rows) -> list[dict]:
    """``rows`` as a list of dicts: a pandas DataFrame's records too (``df.to_dict("records")``)."""
    return rows.to_dict("records") if callable(getattr(rows, "to_dict", None)) and not isinstance(rows, dict) else rows


def _paired(rows, metric: str, by, match) -> tuple[list[dict], list[str]]:
    """:func:`reductions`, and the λ = 0 images that no guided configuration pairs with, as the summary names them
    (made otherwise than every guided run, or of a ``by`` value that has none)."""
    rows = _with_derived(rows)
    by, match = _apart_by_demographic(rows, _columns(by)), _columns(match)
    _check_columns(rows, metric, by, match)
    # Blank (a notebook's NaN too): made from traces without the sampler's settings.
    unscaled = sum(not math.isfinite(_parsed_number(row["guidance_scale"])) for row in rows)
    if unscaled:
        raise ValueError(f"{unscaled} row(s) have no number as guidance_scale (made from traces without the "
                         f"sampler's settings): leave them out of the rows")
    image = _IMAGE + match
    baselines, guided = {}, [row for row in rows if _parsed_number(row["guidance_scale"]) != 0]
    logged = collections.Counter()  # rows of each λ = 0 image
    for row in rows:
        if _parsed_number(row["guidance_scale"]) == 0:
            key, value = _key(row, image), _parsed_number(row[metric])
            logged[key] += 1
            kept = baselines.setdefault(key, (value, row))
            if not _same(kept[0], value):
                raise ValueError(f"two λ = 0 rows of the same image ({_image_named(row)}) give {metric} "
                                 f"{kept[0]:g} and {value:g}; they differ in {_differing_columns(kept[1], row)}: if "
                                 f"those tell two images apart (a prompt made while the graph ran, in the label), log "
                                 f"each prompt's runs to a file of its own, or pass the columns as match=(…) to "
                                 f"reductions() in Python; if they are one image made twice (on another machine or "
                                 f"ComfyUI version, which rounds otherwise), delete one of the two rows"
                                 + ("" if "start_latent" in row else
                                    "; rows of a file started before BiasMap wrote start_latent do not tell apart "
                                    "runs from other latents (img2img from other images, second passes after other "
                                    "first passes): give such an audit a new file name"))
    if not guided:
        raise ValueError("no guided row (guidance_scale > 0) in the rows: log the guided runs into the file too")
    groups: dict[tuple, dict] = {}
    for row in guided:
        name = _key(row, _SETTINGS) + _key(row, by)
        group = groups.setdefault(name, {"row": row, "pairs": {}, "unpaired": 0, "not_measured": 0, "duplicates": 0,
                                         "differing_duplicates": 0, "baseline_duplicates": 0,
                                         "images_guided": set(), "first_unpaired": None})
        key = _key(row, image)
        group["images_guided"].add(key)
        base, after = baselines.get(key, (None, None))[0], _parsed_number(row[metric])
        if base is None:
            group["unpaired"] += 1
            group["first_unpaired"] = group["first_unpaired"] or row
        elif not (math.isfinite(base) and math.isfinite(after)):  # n/a: no maps to threshold
            group["not_measured"] += 1
        elif key in group["pairs"]:  # queued again, or logged again from ComfyUI's cache
            group["duplicates"] += 1
            group["differing_duplicates"] += not _same(group["pairs"][key][1], after)
        else:
            group["pairs"][key] = (base, after)
            group["baseline_duplicates"] += logged[key] - 1  # its λ = 0 image logged again: one row counts
    if not any(g["pairs"] for g in groups.values()):
        raise ValueError(f"no guided row has a λ = 0 row of the same image: "
                         f"{_mismatch(guided, [row for _, row in baselines.values()], image)}")
    made_alike = collections.defaultdict(list)  # λ = 0 images by how they were made and measured
    of_seed = collections.defaultdict(list)  # λ = 0 rows by seed and by value: where an unpaired row's would be
    for key, (_, row) in baselines.items():
        made_alike[tuple(key[i] for i in _MEASURED_AT) + _key(row, by)].append(key)
        of_seed[_key(row, ("seed", *by))].append(row)
    guided_alike = {}  # in the rows' order: the nearest of equally near ones is the same in every process
    for group in groups.values():
        alike = _key(group["row"], _MEASURED) + _key(group["row"], by)
        guided_alike.setdefault(alike, None)
        group["baselines_unpaired"] = sum(key not in group["images_guided"] for key in made_alike.get(alike, []))
        first = group["first_unpaired"]
        group["why_unpaired"] = _why_unpaired(first, of_seed, image, by) if first is not None else ""
    # λ = 0 images no group counts: neither paired in one (also across by values, e.g. by label) nor made alike one.
    matched = set().union(*(group["images_guided"] for group in groups.values()))
    alone = [_made_otherwise(alike, len(unmatched), guided_alike, by) for alike, keys in made_alike.items()
             if alike not in guided_alike and (unmatched := [key for key in keys if key not in matched])]
    return [_summary(g, by) for g in groups.values()], alone


def _why_unpaired(row: dict, of_seed: dict, columns: tuple[str, ...], by: tuple[str, ...]) -> str:
    """Why a guided ``row`` has no λ = 0 row of its image: there is none of its seed (and ``by`` value) yet, or the
    columns in which the nearest such row differs from it."""
    named = " · ".join(str(row.get(c, "")) for c in by)
    candidates = of_seed.get(_key(row, ("seed", *by)), [])
    if not candidates:
        return f"the first: no λ = 0 row {f'of {named} ' if named else ''}at seed {row.get('seed', '')} yet"
    nearest = min(candidates, key=lambda base: _distance(base, row, columns))
    return (f"the first, seed {row.get('seed', '')} image {row.get('image', '')}: its λ = 0 row differs in "
            f"{'; '.join(_differences(nearest, row, columns))}")


def _made_otherwise(alike: tuple, images: int, guided_alike: dict, by: tuple[str, ...]) -> str:
    """λ = 0 images made and measured as no guided configuration (``alike``: their _MEASURED and ``by`` values), as
    the summary names them: the columns in which the nearest guided configuration differs, or that their ``by`` value
    has none."""
    nearest = min(guided_alike, key=lambda other: sum(a != b for a, b in zip(alike, other)))
    differing = [f"{c} {' at λ = 0, '.join(_apart(str(mine), str(theirs)))} guided"
                 for c, mine, theirs in zip(_MEASURED, alike, nearest) if mine != theirs]
    named = " · ".join(str(v) for v in alike[len(_MEASURED):]) or "all"
    if not differing:  # apart by their by value alone
        return f"{named}: {images} image(s) (no guided run of it logged)"
    return f"{named}: {images} image(s) made otherwise than the guided runs ({'; '.join(differing)})"


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
    rows = _records(rows)
    return _table({metric: reductions(rows, metric, by, match) for metric in _columns(metrics)})


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
    return note if len(note) <= _NOTE_WIDTH else note[:_NOTE_WIDTH - 1].rstrip() + "…"


def _report(rows, metrics: tuple[str, ...], by: tuple[str, ...]) -> tuple[str, list[dict] | None]:
    try:
        _check_seeds(rows)  # the means, too, count images by their seeds
    except ValueError as err:
        return f"entanglement over the file: none: {err}", None
    scales = {_parsed_number(row.get("guidance_scale")) for row in rows}
    if scales == {0.0}:
        return _means_text(rows, metrics, by, "λ = 0 only; log guided runs of the same seeds for the reductions"), None
    if scales and 0.0 not in scales and all(math.isfinite(v) for v in scales):
        why = "guided runs only so far; for the reductions, log the same seeds at λ = 0: set the seed, or Audit Prompts' "
        return _means_text(rows, metrics, by, why + "run, back to the first run's"), None
    try:
        paired = {metric: _paired(rows, metric, by, ()) for metric in metrics}
    except ValueError as err:
        return f"reductions over the file: none: {err}", None
    figures = {metric: groups for metric, (groups, _) in paired.items()}
    first = figures[metrics[0]]
    # A configuration is named by the settings in which the file's guided configurations differ (λ at least).
    named = ["guidance_scale"] + [c for c in _SETTINGS[1:] if len({_cell(f, c) for f in first}) > 1]
    lines = ["reductions over the file (each guided image against its λ = 0 row; a negative change is less overlap; in "
             f"brackets a {_LEVEL * 100:g} % bootstrap interval over the images, given from {_FEWEST_FOR_INTERVAL} "
             f"images on, for the per-image figure {_FEWEST_FOR_INTERVAL} with overlap at λ = 0):"]
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
        lines.append(" · ".join([setting, *(str(group[c]) for c in by)]) + f": {changes}")
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
    settings = [c for c in _SETTINGS if c in seen]
    columns = ["metric", *settings, *(c for c in seen if c != "metric" and c not in settings)]
    return [{column: row.get(column, "") for column in columns} for row in table]


def _means_text(rows, metrics: tuple[str, ...], by: tuple[str, ...], why: str) -> str:
    """Each metric's mean per ``by`` value and configuration (named by λ where it is not 0, and by the columns in which
    the rows differ) over the images that have a figure, each image once."""
    rows = _with_derived(rows)
    # Settings compared as the pairing compares them: a spreadsheet's TRUE and 7 are the file's True and 7.0.
    named = [c for c in _SETTINGS if len({_cell(row, c) for row in rows}) > 1
             or (c == "guidance_scale" and _parsed_number(rows[0][c]) != 0)]
    groups: dict[tuple, dict] = {}
    for row in rows:
        name = tuple(_label(c, _typed(row.get(c, ""))) for c in named) + tuple(str(row[c]) for c in by)
        group = groups.setdefault(_key(row, named + list(by)), {"name": name, "images": set(),
                                                                 **{m: [] for m in metrics}})
        key = _key(row, _IMAGE + ("label",))  # the label may carry the prompt, as made while the graph ran
        if key not in group["images"]:  # an image logged again counts once
            group["images"].add(key)
            for metric in metrics:
                group[metric].append(_parsed_number(row.get(metric)))
    lines = [f"entanglement over the file ({why}; in brackets a {_LEVEL * 100:g} % bootstrap interval of the mean, "
             f"given from {_FEWEST_FOR_INTERVAL} images on):"]
    for group in groups.values():
        means = " · ".join(f"{metric} {figure(_finite_mean(group[metric]), 4)}{_mean_interval(group[metric])}"
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


def _mean_interval(values: list[float]) -> str:
    """The bootstrap interval of the finite values' mean, in brackets; nothing from fewer than 10 values."""
    finite = torch.tensor(sorted(v for v in values if math.isfinite(v)), dtype=torch.float64)  # in any row order
    if len(finite) < _FEWEST_FOR_INTERVAL:
        return ""
    low, high = _percentiles(_resampled_counts(len(finite)) @ finite / len(finite))
    return f" [{figure(low, 4)}, {figure(high, 4)}]"


def _label(column: str, value) -> str:
    """A setting as a summary line names it: λ 100, sampler heun."""
    if column == "guidance_scale":
        return f"λ {_parsed_number(value):g}"
    if value == "":  # blank: denoise, which custom sigmas do not carry; guided_concepts of a sampler of one pair
        return "guided against the pair alone" if column == "guided_concepts" else f"{column} —"
    return f"{column} {value}"


def _with_derived(rows) -> list[dict]:
    """``rows``, each with ``attribution_template`` (see _MEASURED) and ``guided_concepts``: the sampler's concept lists
    (``sampler_demographic``, ``sampler_semantic``) where they say more than the row's pair, lower case as CLIP reads
    them and sorted (the energy, the mean over every pair, is the same in any order): "demographic gender, race" for a
    run guided against both, which is not gender's guidance alone; "semantic doctor, nurse" for two professions guided
    together, whose rows pool (by=None) as one run's; "demographic gender" for race measured on a run guided against
    gender. Blank for a sampler of the row's pair alone, so that an audit's professions, one a run, pool; at λ = 0,
    where the lists guide nothing; and in a file without them."""
    # A row without guided_concepts reads as blank (_cell), and each text is read once (the Audit Log's summary reads
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
    concepts = {_as_clip_reads(str(row.get("semantic", ""))) for row in rows} - {""}
    words = sorted((concept.split() for concept in concepts), key=len, reverse=True)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, w)) for w in words) + r")(?!\w)",
                         flags=re.IGNORECASE) if words else None
    prompts = {str(row.get("attribution_prompt", "")) for row in rows}
    return {prompt: pattern.sub("{}", straightened(prompt)) if pattern else prompt for prompt in prompts}


def _listed(value):
    """A cell as :func:`_guided_concepts` takes it: a list (a trace's own, in rows made by hand) as the CSV writes it."""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=1 << 12, typed=True)
def _guided_concepts(scale, *lists_and_pair) -> str:
    """:func:`_with_derived`'s guided_concepts of one row: from λ, then each list with the row's concept of it."""
    if _parsed_number(scale) == 0:
        return ""
    said = []
    for kind, listed, measured in zip(("demographic", "semantic"), lists_and_pair[::2], lists_and_pair[1::2]):
        concepts = {_as_clip_reads(c) for c in str(listed).split(",")} - {""}
        if concepts and concepts != {_as_clip_reads(str(measured))}:
            said.append(f"{kind} {', '.join(sorted(concepts))}")
    return "; ".join(said)


def _columns(by: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``by`` as a tuple of columns: none, one or several."""
    return () if by is None else (by,) if isinstance(by, str) else tuple(by)


def _apart_by_demographic(rows, by: tuple[str, ...]) -> tuple[str, ...]:
    """``by``, led by the demographic concept where the rows hold several: gender and race figures are not one."""
    if rows and len({_cell(row, "demographic") for row in rows}) > 1 and "demographic" not in by:
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
    of_means, per_image_mean = _intervals(values, len(per_image))
    return {**{c: _typed(row[c]) for c in _SETTINGS if row.get(c, "") != ""}, **{c: row[c] for c in by},
            "images": len(values), "base": before, "guided": after,
            "reduction": (before - after) / before if before > 0 else math.nan, "reduction_interval": of_means,
            "mean_image_reduction": sum(per_image) / len(per_image) if per_image else math.nan,
            "mean_image_reduction_interval": per_image_mean,
            "images_with_overlap": len(per_image), **{k: group[k] for k in _LEFT_OUT},
            "why_unpaired": group["why_unpaired"]}


def _intervals(values: list[tuple[float, float]], with_overlap: int) -> tuple[tuple, tuple]:
    """Percentile bootstrap intervals of both reductions (of the means, mean per image) over the paired images
    ``values`` ((base, guided) each): resamples of the images with replacement, each giving both reductions as
    :func:`_summary` does."""
    nan = (math.nan, math.nan)
    if len(values) < _FEWEST_FOR_INTERVAL:
        return nan, nan
    base, guided = torch.tensor(values, dtype=torch.float64).unbind(-1)
    overlap = (base > 0).double()
    per_image = torch.where(base > 0, (base - guided) / torch.where(base > 0, base, 1.0), 0.0)
    # Each resample's sums, as the counts of each image drawn times its figures: one product for all resamples.
    sums = _resampled_counts(len(values)) @ torch.stack([base, guided, per_image, overlap], dim=1)
    before, after, reduced, overlapping = sums.unbind(-1)
    return (_percentiles(torch.where(before > 0, (before - after) / before, math.nan)),
            _percentiles(reduced / overlapping) if with_overlap >= _FEWEST_FOR_INTERVAL else nan)  # 0/0: NaN, left out


def _resampled_counts(n: int) -> torch.Tensor:
    """:func:`_drawn_counts`, kept for the next call up to 1000 items (16 MB): an audit's summary is made again after
    every run, for each metric and group of equal size, where a notebook's pooled figures over a whole file are not."""
    return _kept_counts(n) if n <= 1000 else _drawn_counts(n)


def _drawn_counts(n: int) -> torch.Tensor:
    """``[_RESAMPLES, n]``: how often each of n items is drawn in each resample with replacement, by a generator seeded
    alike every time."""
    picks = torch.randint(n, (_RESAMPLES, n), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(_RESAMPLES, n, dtype=torch.float64)
    return torch.zeros_like(ones).scatter_add_(1, picks, ones)


_kept_counts = functools.lru_cache(maxsize=4)(_drawn_counts)


def _percentiles(estimates: torch.Tensor) -> tuple[float, float]:
    """The central ``_LEVEL`` of the resamples' estimates (those that have one)."""
    tail = (1 - _LEVEL) / 2
    low, high = torch.nanquantile(estimates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def _check_columns(rows, metric, by, match) -> None:
    if not rows:
        raise ValueError("no rows: read them from a BiasMap audit CSV with read_csv(path)")
    if any(c.startswith("\ufeff") for c in rows[0]):
        raise ValueError("the first column's name starts with a byte-order mark: read the CSV with read_csv(path), or "
                         "open it with encoding='utf-8-sig'")
    needed = {"guidance_scale", metric, *by, *match}
    missing = [c for c in ("guidance_scale", metric, *by, *match) if c not in rows[0]]
    if missing:
        raise ValueError(f"the rows have no column(s) {', '.join(missing)}: give rows of a BiasMap audit CSV and a "
                         f"metric such as iou, mbiou or biou_down_1")
    lacking = next(((i, sorted(needed - row.keys())) for i, row in enumerate(rows) if not row.keys() >= needed), None)
    if lacking is not None:  # rows of traces of other stages put together (a file's rows all have every column)
        raise ValueError(f"row {lacking[0]} of the rows has no column(s) {', '.join(lacking[1])}, which the first row "
                         f"has: give rows of one audit file (read_csv), or leave out the rows without it")
    _check_seeds(rows)


def _check_seeds(rows) -> None:
    """Refuse rows whose seeds are not whole numbers: saved by a spreadsheet as shown (1.5668E+14), a 15-digit seed has
    lost its last digits, and written back as a decimal by a tool it may have been rounded; two seeds' images would
    read as one."""
    inexact = next((seed for row in rows if isinstance(seed := row.get("seed"), float) and abs(seed) >= 2 ** 53), None)
    if inexact is not None:  # pandas reads a seed column with a blank as floats, which hold 15–16 digits
        raise ValueError(f"a seed in the rows reads {inexact:.17g} as a floating-point number, which loses the last "
                         f"digits of seeds from 2^53 on (two seeds could read as one): read the file with "
                         f"read_csv(path), or in pandas with dtype={{'seed': str}}")
    rounded = next((str(seed) for row in rows if _not_whole(seed := row.get("seed", ""))), None)
    if rounded is not None:
        why = ("a spreadsheet saved the file with seeds shortened to scientific notation, which loses their last "
               "digits; give the audit another file name, or save it again with the seed column formatted as whole "
               "numbers (from a copy that still holds them)" if "e" in rounded.lower() else
               "BiasMap writes seeds as whole numbers, and a tool that read them as decimals wrote them back so (and "
               "may have rounded them); write them back as whole numbers, or give the audit another file name")
        raise ValueError(f"a seed in the rows reads {rounded}, not a whole number: {why}")


def _not_whole(seed) -> bool:
    """Whether a seed cell holds a number that is not a whole one: text as a CSV gives it, or a float as pandas reads
    a column with blanks (a blank, or pandas' NaN for one, is a seed not recorded)."""
    if isinstance(seed, str):
        return bool(seed.strip()) and not seed.strip().isdigit()
    return isinstance(seed, float) and math.isfinite(seed) and not seed.is_integer()


def _mismatch(guided, baselines, columns) -> str:
    """Why no guided row pairs, then what to log: the columns in which no guided row's value is any λ = 0 row's, or
    else those in which the λ = 0 row nearest the first guided row differs from it (e.g. the image's place in its
    batch, where the same noise was sampled in another batch)."""
    seeds = "set the seed, or Audit Prompts' run, back to the first run's"
    if not baselines:
        return (f"the rows hold no λ = 0 row; log the same seeds ({seeds}), prompts and settings with guidance_scale "
                f"0 into the file too")
    apart = [c for c in columns if c not in _DERIVED
             and not {_cell(r, c) for r in guided} & {_cell(r, c) for r in baselines}]
    if apart:
        named = ", ".join(apart)
        # Rows of two files, one started before a column, which its rows lack (not blank: a merged model's is).
        lacking = {c: side for c in apart for side, rows in (("λ = 0", baselines), ("guided", guided))
                   if all(c not in r for r in rows)}
        rest = [c for c in apart if c not in lacking]
        fixes = [f"log λ = 0 runs with the guided runs' {', '.join(rest)}, changing guidance_scale alone"
                 + (f" ({seeds})" if "seed" in rest else "")] if rest else []
        if lacking:
            said = "; ".join(f"every {side} row lacks {c}" for c, side in lacking.items())
            fixes.append(f"{said}, as rows of a file started before BiasMap wrote it do: leave {', '.join(lacking)} "
                         f"out of the other rows to pair them as that file did, or log the λ = 0 runs into the guided "
                         f"runs' file")
        return f"the guided and λ = 0 rows differ in every value of {named}; " + "; ".join(fixes)
    first = guided[0]
    nearest = min(baselines, key=lambda row: _distance(row, first, columns))
    differing = _differences(nearest, first, columns)
    if not differing:  # its image's λ = 0 row is there: one of the two has no figure
        return "the first guided row has its λ = 0 row, but one of the two has no figure (n/a: no maps to threshold)"
    return (f"the λ = 0 row nearest the first guided row differs from it in {'; '.join(differing)}; log λ = 0 runs "
            f"that differ from the guided ones in guidance_scale alone")


def _distance(base: dict, guided: dict, columns: tuple[str, ...]) -> tuple[int, list[bool]]:
    """How far a λ = 0 row is from a guided one: the fewest differing columns; of those, the later (less telling)."""
    differs = [value != wanted for value, wanted in zip(_key(base, columns), _key(guided, columns))]
    return sum(differs), differs


def _differences(base: dict, guided: dict, columns: tuple[str, ...]) -> list[str]:
    """The columns in which a λ = 0 row and a guided one differ, with both values (long ones cut where they differ)."""
    shown = []
    for column, differ in zip(columns, _distance(base, guided, columns)[1]):
        if differ and column not in _DERIVED:
            base_value, guided_value = _apart(str(base.get(column, "")), str(guided.get(column, "")))
            shown.append(f"{column}: {base_value} at λ = 0, {guided_value} guided")
    return shown


def _apart(a: str, b: str, width: int = 40) -> tuple[str, str]:
    """Two texts as a message shows them: whole up to ``width`` characters, else cut to ``width`` around the first
    character in which they differ, so that two long values do not read alike."""
    differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, min(differ - width // 2, max(len(a), len(b)) - width))

    def cut(text: str) -> str:
        return ("…" if start else "") + text[start:start + width] + ("…" if len(text) > start + width else "")

    return cut(a), cut(b)


def _image_named(row: dict) -> str:
    """Which image a row is of, as a summary names it: seed, place in the batch, concept pair."""
    return (f"seed {row.get('seed', '')}, image {row.get('image', '')}, {row.get('demographic')} and "
            f"{row.get('semantic')}")


def _differing_columns(a: dict, b: dict) -> str:
    """The columns other than figures in which two rows differ."""
    figures = {"iou", "mbiou", "notes", *STATUS}
    columns = [c for c in a if c in b and c not in figures and not c.startswith("biou_") and _cell(a, c) != _cell(b, c)]
    return ", ".join(columns) or "no column but the figures"


def _key(row: dict, columns: tuple) -> tuple:
    return tuple(_cell(row, c) for c in columns)


def _cell(row: dict, column: str):
    """A row's value, compared as a number where it is one (a CSV read back gives strings, audit_rows numbers);
    whole numbers exactly, as seeds reach 2⁶⁴ where floats would take two for one; not a number as the text "nan", so
    that two rows' NaN match (a NaN float equals nothing, itself included)."""
    value = row.get(column, "")
    if column in _AS_CLIP_READS and isinstance(value, str):
        value = _as_clip_reads(value)
    try:
        comparable = _comparable(value)
    except TypeError:  # a value the cache cannot hold (a list, in rows made by hand): compared as its text
        return str(value)
    return "nan" if comparable != comparable else comparable


_as_clip_reads = functools.lru_cache(maxsize=1 << 12)(concept_key)  # each of a file's concepts read once


# Kept for values seen before: an audit file repeats its settings in every row, and the Audit Log's summary reads the
# whole file again after each run. typed: True and 1.0 would share a key otherwise (they are equal in Python).
@functools.lru_cache(maxsize=1 << 16, typed=True)
def _comparable(value):
    """``value`` as :func:`_cell` compares it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _is_whole(value):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):  # a spreadsheet saves True as TRUE
        return value.capitalize()
    return _parsed_number(value) if _is_number(value) else str(value)


def _same(a: float, b: float) -> bool:
    """Equal as the CSV writes figures (6 decimals)."""
    return abs(a - b) <= 1e-6 or (math.isnan(a) and math.isnan(b))


def _typed(value):
    """A setting as it was set: CSV text back to a bool, an int or a float."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and _is_number(value):
        return int(value) if _is_whole(value) else float(value)
    return value


def _is_whole(text: str) -> bool:
    """ASCII digits, signed or not: text int() reads (not "²" or "①", which str.isdigit() takes too)."""
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def _parsed_number(value) -> float:
    return float(value) if _is_number(value) else math.nan


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
