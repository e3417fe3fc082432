"""Why audit rows do not pair (BiasMap, arXiv 2509.13496, §3): the columns in which a guided row and the λ = 0 row
nearest it differ, with both values, and what to log so that they pair; and how messages name an image and the columns
two rows differ in (two λ = 0 rows of one image with other figures).
"""

from .audit_columns import DERIVED, MEASURED, cell, row_key
from .guidance import STATUS
from .tokens import one_line

__all__ = ["differing_columns", "image_named", "made_otherwise", "mismatch", "why_unpaired"]


def why_unpaired(row: dict, of_seed: dict, columns: tuple[str, ...], by: tuple[str, ...]) -> str:
    """Why a guided ``row`` has no λ = 0 row of its image: there is none of its seed (and ``by`` value) yet, or the
    columns in which the nearest such row differs from it."""
    named = " · ".join(one_line(str(row.get(c, ""))) for c in by)
    candidates = of_seed.get(row_key(row, ("seed", *by)), [])
    if not candidates:
        return f"the first: no λ = 0 row {f'of {named} ' if named else ''}at seed {row.get('seed', '')} yet"
    nearest = min(candidates, key=lambda base: _distance(base, row, columns))
    return (f"the first, seed {row.get('seed', '')} image {row.get('image', '')}: its λ = 0 row differs in "
            f"{'; '.join(_differences(nearest, row, columns))}")


def made_otherwise(alike: tuple, images: int, guided_alike: dict) -> str:
    """λ = 0 images made and measured as no guided configuration (``alike``: their MEASURED and ``by`` values), as
    the summary names them: the columns in which the nearest guided configuration differs, or that their ``by`` value
    has none."""
    nearest = min(guided_alike, key=lambda other: sum(a != b for a, b in zip(alike, other)))
    differing = [f"{c} {' at λ = 0, '.join(_apart(str(mine), str(theirs)))} guided"
                 for c, mine, theirs in zip(MEASURED, alike, nearest) if mine != theirs]
    named = " · ".join(one_line(str(v)) for v in alike[len(MEASURED):]) or "all"
    if not differing:  # apart by their by value alone
        return f"{named}: {images} image(s) (no guided run of it logged)"
    return f"{named}: {images} image(s) made otherwise than the guided runs ({'; '.join(differing)})"


def mismatch(guided, baselines, columns) -> str:
    """Why no guided row pairs, then what to log: the columns in which no guided row's value is any λ = 0 row's, or
    else those in which the λ = 0 row nearest the first guided row differs from it (e.g. the image's place in its
    batch, where the same noise was sampled in another batch)."""
    seeds = "set the seed, or Audit Prompts' run, back to the first run's"
    if not baselines:
        return (f"the rows hold no λ = 0 row; log the same seeds ({seeds}), prompts and settings with guidance_scale "
                f"0 into the file too")
    apart = [c for c in columns if c not in DERIVED
             and not {cell(r, c) for r in guided} & {cell(r, c) for r in baselines}]
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
    differs = [value != wanted for value, wanted in zip(row_key(base, columns), row_key(guided, columns))]
    return sum(differs), differs


def _differences(base: dict, guided: dict, columns: tuple[str, ...]) -> list[str]:
    """The columns in which a λ = 0 row and a guided one differ, with both values (long ones cut where they differ)."""
    shown = []
    for column, differ in zip(columns, _distance(base, guided, columns)[1]):
        if differ and column not in DERIVED:
            base_value, guided_value = _apart(str(base.get(column, "")), str(guided.get(column, "")))
            shown.append(f"{column}: {base_value} at λ = 0, {guided_value} guided")
    return shown


def _apart(a: str, b: str, width: int = 40) -> tuple[str, str]:
    """Two texts as a message shows them: whole up to ``width`` characters, else cut to ``width`` around the first
    character in which they differ, so that two long values do not read alike."""
    if one_line(a) == one_line(b):  # they differ in what one line hides (\r\n against \n, a tab against a space)
        a, b = _escaped(a), _escaped(b)
    else:
        a, b = one_line(a), one_line(b)  # a prompt typed on several lines, on one
    differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, min(differ - width // 2, max(len(a), len(b)) - width))

    def cut(text: str) -> str:
        return ("…" if start else "") + text[start:start + width] + ("…" if len(text) > start + width else "")

    return cut(a), cut(b)


def _escaped(text: str) -> str:
    """Text with every character one line would hide or change written as Python writes it (``\\r\\n``, ``\\t``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def image_named(row: dict) -> str:
    """Which image a row is of, as a summary names it: seed, place in the batch, concept pair."""
    return one_line(f"seed {row.get('seed', '')}, image {row.get('image', '')}, {row.get('demographic')} and "
                    f"{row.get('semantic')}")


def differing_columns(a: dict, b: dict) -> str:
    """The columns other than figures in which two rows differ."""
    figures = {"iou", "mbiou", "notes", *STATUS}
    columns = [c for c in a if c in b and c not in figures and not c.startswith("biou_") and cell(a, c) != cell(b, c)]
    return ", ".join(columns) or "no column but the figures"
