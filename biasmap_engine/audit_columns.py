"""What the reductions read in an audit row (BiasMap, arXiv 2509.13496, §3): which columns tell an image, a guided
configuration and a way of measuring apart, and how two rows' cells compare.

Rows come as ``audit_rows`` makes them (numbers) or as ``read_csv`` reads the file back (every value a string), also
from a spreadsheet that saved True as TRUE; a cell is compared as the value it stands for.
"""

import functools
import math
import re

from .tokens import concept_key, one_line

__all__ = ["DERIVED", "IMAGE", "MEASURED", "MEASURED_AT", "SETTINGS", "as_clip_reads", "cell", "check_figures",
           "check_seeds", "parsed_number", "row_key", "row_place", "same_figure", "typed"]

# What makes two rows the same image of the same concept pair, recorded and measured the same way.
IMAGE = ("seed", "noise_index", "image", "batch_size", "noise_mask", "start_latent", "steps", "cfg", "sampler",
         "scheduler", "denoise", "sigmas", "add_noise", "width", "height", "generation_prompt", "negative_prompt",
         "attribution_prompt", "attribution_template", "model", "precision", "model_family", "branch",
         "include_middle", "demographic", "semantic", "q", "mask_size", "first_step", "last_step")

# Compared as CLIP reads them (concept_key): 'Black woman' and 'black  woman' are one concept.
_AS_CLIP_READS = ("demographic", "semantic")

# Columns the reductions make of others (reductions' _with_derived): a message names the columns they are made of,
# not these.
DERIVED = ("attribution_template",)

# What tells one guided configuration from another (a sweep of λ, or of the stages guided; guided_concepts, which
# reductions' _with_derived adds, the sampler's concepts that the row's pair does not say).
_GUIDED_BY = ("guidance_scale", "branch", "include_middle", "soft_topk", "soft_topk_keep", "gamma", "gate",
              "guided_stages", "start", "end", "sinkhorn_iters", "guided_concepts")

# How images were made and measured, apart from which image they are: rows that differ in these are not averaged.
# batch_size too: a batch's first image starts from the noise of a batch of one at its seed, so with a sampler that
# draws no noise as it goes, a mean over both batch sizes would count that image twice.
# Not start_latent: a source image (img2img), like a seed, is which image a row is of. attribution_template (which
# reductions' _with_derived adds): the attribution prompt with the rows' semantic concepts taken out, since a word's
# map is its share of the prompt's words: an audit against 'gender' and one against 'gender, race, age' measure
# otherwise, while an audit's professions, each in a prompt of its own, share one.
MEASURED = ("model", "precision", "model_family", "steps", "cfg", "sampler", "scheduler", "denoise", "add_noise", "noise_mask",
            "batch_size", "width", "height", "attribution_template", "branch", "include_middle", "q", "mask_size",
            "first_step", "last_step")

SETTINGS = tuple(dict.fromkeys(_GUIDED_BY + MEASURED))  # each once, in order

MEASURED_AT = tuple(IMAGE.index(c) for c in MEASURED)  # each is a column of the image's too: read from its key


def row_key(row: dict, columns: tuple) -> tuple:
    """A row's cells of ``columns``, as :func:`cell` compares them: two rows with equal keys match in those columns."""
    return tuple(cell(row, c) for c in columns)


def cell(row: dict, column: str):
    """A row's value, compared as a number where it is one (a CSV read back gives strings, audit_rows numbers);
    whole numbers exactly, as seeds reach 2⁶⁴ where floats would take two for one; not a number as the text "nan", so
    that two rows' NaN match (a NaN float equals nothing, itself included)."""
    value = row.get(column, "")
    if column in _AS_CLIP_READS and isinstance(value, str):
        value = as_clip_reads(value)
    try:
        comparable = _comparable(value)
    except TypeError:  # a value the cache cannot hold (a list, in rows made by hand): compared as its text
        return str(value)
    return "nan" if comparable != comparable else comparable


as_clip_reads = functools.lru_cache(maxsize=1 << 12)(concept_key)  # each of a file's concepts read once


# Kept for values seen before: an audit file repeats its settings in every row, and the Audit Log's summary reads the
# whole file again after each run. typed: True and 1.0 would share a key otherwise (they are equal in Python).
@functools.lru_cache(maxsize=1 << 16, typed=True)
def _comparable(value):
    """``value`` as :func:`cell` compares it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _is_whole(value):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):  # a spreadsheet saves True as TRUE
        return value.capitalize()
    return parsed_number(value) if _is_number(value) else str(value)


def same_figure(a: float, b: float) -> bool:
    """Equal as the CSV writes figures (6 decimals)."""
    return abs(a - b) <= 1e-6 or (math.isnan(a) and math.isnan(b))


def typed(value):
    """A setting as it was set: CSV text back to a bool, an int or a float."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and _is_number(value):
        return int(value) if _is_whole(value) else float(value)
    return value


def _is_whole(text: str) -> bool:
    """ASCII digits, signed or not: text int() reads (not "²" or "①", which str.isdigit() takes too)."""
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def parsed_number(value) -> float:
    """A cell as a number (a CSV's text too); NaN where it holds none (blank, a word, a bool)."""
    return float(value) if _is_number(value) else math.nan


# A number as a CSV cell writes one: Python's float() takes "1_0" and "infinity" too, which no file of BiasMap's holds.
_NUMBER_TEXT = re.compile(r"\s*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf)\s*", re.IGNORECASE)


def _is_number(value) -> bool:
    if isinstance(value, str):
        return _NUMBER_TEXT.fullmatch(value) is not None
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def row_place(i: int, row: dict) -> str:
    """Where row ``i`` of some rows is, for a message: its index, its row in a spreadsheet (the file's header is row
    1), and its seed and concept pair, which find it in a file also when sorted."""
    pair = " × ".join(one_line(str(row.get(c, "")))[:40] for c in ("demographic", "semantic"))
    seed = one_line(str(row.get("seed", "")))[:40]
    return f"row {i} of the rows (row {i + 2} of its file in a spreadsheet; seed {seed}, {pair})"


def check_figures(rows, metrics: tuple[str, ...]) -> None:
    """Refuse rows whose figures (IoU, mBIoU, a BIoU) are no overlap: a number outside 0–1, or text other than a
    blank or nan (n/a), such as a decimal comma a spreadsheet wrote, which would otherwise read as n/a."""
    for i, row in enumerate(rows):
        for metric in metrics:
            value = row.get(metric, "")
            if isinstance(value, str):
                if value.strip().lower() in ("", "nan"):
                    continue
                number = parsed_number(value)
                if math.isnan(number):
                    comma = re.fullmatch(r"\s*[0-9]*,[0-9]+\s*", value)
                    why = ("a spreadsheet set to a region that writes decimal commas saved it so: save the file again "
                           "as CSV UTF-8 with decimal points" if comma else
                           "edited by hand?: write the figure back, or delete the row")
                    raise ValueError(f"{row_place(i, row)} has {metric} {value[:40]}, not a number: {why}")
            else:
                try:
                    number = float(value)
                except (TypeError, ValueError):  # a blank as pandas gives it (None, pd.NA)
                    continue
            if not (math.isnan(number) or 0 <= number <= 1):
                raise ValueError(f"{row_place(i, row)} has {metric} {str(value)[:40]}, outside 0–1, where every "
                                 f"overlap is (edited by hand?): write the figure back, or delete the row")


def check_seeds(rows) -> None:
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
        if _SCIENTIFIC.fullmatch(rounded.strip()):
            why = ("a spreadsheet saved the file with seeds shortened to scientific notation, which loses their last "
                   "digits; give the audit another file name, or save it again with the seed column formatted as "
                   "whole numbers (from a copy that still holds them)")
        elif _is_number(rounded):
            why = ("BiasMap writes seeds as whole numbers, and a tool that read them as decimals wrote them back so "
                   "(and may have rounded them); write them back as whole numbers, or give the audit another file "
                   "name")
        else:
            why = ("it is no number (typed or pasted into the file by hand?); write that row's seed back, or delete "
                   "the row")
        raise ValueError(f"a seed in the rows reads {rounded[:40]}, not a whole number: {why}")


_SCIENTIFIC = re.compile(r"[+-]?[0-9]+([.,][0-9]+)?[eE][+-]?[0-9]+")  # 1.5668E+14, as a spreadsheet shows a seed


def _not_whole(seed) -> bool:
    """Whether a seed cell holds a number that is not a whole one: text as a CSV gives it, or a float as pandas reads
    a column with blanks (a blank, or pandas' NaN for one, is a seed not recorded)."""
    if isinstance(seed, str):
        return bool(seed.strip()) and not seed.strip().isdigit()
    return isinstance(seed, float) and math.isfinite(seed) and not seed.is_integer()
