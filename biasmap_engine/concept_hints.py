"""Why typed concepts are not words of a prompt: the typing habits that explain it (escaped brackets, a phrase not
in a row, an apostrophe CLIP reads as a contraction, part of a word, an embedding), and the plural a prompt may draw
instead. Plain text over the words CLIP reads in the prompt (``tokenizer_words``, ``prompt_words``)."""

import re
import unicodedata

from .tokens import covered_words

__all__ = ["absent", "plurals", "why_absent", "word_holding"]


def why_absent(missing: list[str], prompt: str, words: list[str],
               bracketed: set[str] | frozenset[str] = frozenset()) -> str:
    """Why words that the prompt seems to hold are not its words (``words``), where a typing habit explains it; else
    ''. ``bracketed``: the missing concepts that were typed with brackets (a list read without them)."""
    hints = []
    spelled = {concept: _escaped_in(concept, prompt) for concept in missing}
    escaped = next(filter(None, spelled.values()), None)
    if escaped:  # "person (elderly)" against a prompt's "person \(elderly\)": brackets CLIP reads as words
        hints.append(f"The prompt escapes brackets ({escaped}), which CLIP reads as words of their own between the "
                     f"others: type the concept as the prompt spells it, {escaped}.")
    elif "\\(" in prompt and bracketed & set(missing):  # "\(" is a bracket the prompt spells
        hints.append("The prompt escapes its brackets, \\( and \\): a concept typed with brackets is read without "
                     "them, as ComfyUI reads emphasis, unless they are escaped there too.")
    phrases = [concept for concept in missing if len(concept.split()) > 1 and not spelled[concept]
               and all(covered_words(word, words) for word in concept.split())]
    if phrases:  # "gender race": each a word of the prompt, not the two in a row
        hints.append(f"A concept of several words is looked up as one phrase, and the prompt does not hold "
                     f"{phrases[0]!r} in a row: type it as the prompt has it or, in a list of concepts, separate "
                     f"them with commas ({', '.join(phrases[0].split())}).")
    if any(re.search(f"['‘’]{re.escape(word)}", prompt, re.IGNORECASE) for word in missing):  # ftfy straightens ‘’
        hints.append("The prompt puts the word after an apostrophe ('doctor'): CLIP reads 'd, 's, 't, 'm, 're, 've "
                     "and 'll as contractions there, so 'doctor is 'd + octor; remove the single quotes around it.")
    inside = next(((concept, word) for concept in missing for word in [word_holding(concept, words)] if word), None)
    if inside:  # "doctor" in "doctors"; 医生 in a line of ideographs typed without spaces
        concept, word = inside
        hints.append(f"{concept!r} is part of the prompt's word {word!r}: CLIP reads letters (or ideographs) written "
                     f"together as one word, and a part of a word has no map of its own; type the whole word, or "
                     f"write {concept!r} apart in the attribution prompt, with spaces around it.")
    hidden = next(((concept, char) for concept in missing for char in concept if _invisible(char)
                   and covered_words("".join(c for c in concept if not _invisible(c)), words)), None)
    if hidden:  # pasted from a web page or a document: a zero-width space, a soft hyphen
        concept, char = hidden
        hints.append(f"{concept!r} holds a character that does not show, U+{ord(char):04X} "
                     f"{unicodedata.name(char, 'control character')}, pasted with it: type the concept again.")
    names = [name.lower() for name in re.findall(r"embedding:([^\s,()]+)", prompt, re.IGNORECASE)]
    if any(word.lower().removeprefix("embedding:") in name for word in missing for name in names):
        hints.append("A textual-inversion embedding (embedding:name) is no word of the prompt and has no map by name.")
    return "".join(" " + hint for hint in hints)


def _invisible(char: str) -> bool:
    """A character that shows as nothing: format and control characters (spaces of any kind part words, as the space
    bar's does)."""
    return unicodedata.category(char) in ("Cf", "Cc") and not char.isspace()


def _escaped_in(concept: str, prompt: str) -> str | None:
    r"""The text of ``prompt`` that spells ``concept``'s words with escaped brackets among them (``person \(elderly\)``
    for the concept ``person elderly``, as a concept list reads ``person (elderly)``); None where there is none."""
    parts = [re.escape(word) for word in concept.split()]
    found = re.search(r"(?<!\w)(?:\\\()?" + r"[\s\\()]*".join(parts) + r"(?:\\\))?(?!\w)", prompt, re.IGNORECASE)
    return found.group(0) if found and "\\(" in found.group(0) else None


# English plurals that change more than an ending, of the words audits are about.
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "person": "people", "child": "children"}


def plurals(concept: str) -> list[str]:
    """``concept`` with its last word in the plural, as prompts write it ("Doctors at work" draws doctors): a guess
    from the spelling (doctor → doctors, nurse → nurses, nanny → nannies, woman → women), for a note, not a lookup."""
    *head, last = concept.split() or [""]
    last = last.lower()
    forms = [last + "s", last + "es"] + ([last[:-1] + "ies"] if last.endswith("y") else [])
    forms += [_IRREGULAR_PLURALS[last]] if last in _IRREGULAR_PLURALS else []
    forms += [last[:-3] + "men"] if last.endswith("man") else []  # fireman → firemen
    return [" ".join([*head, form]) for form in forms]


def word_holding(concept: str, words: list[str]) -> str | None:
    """The first of the prompt's ``words`` that holds ``concept`` as a part, ignoring case as CLIP does (lower)."""
    return next((word for word in words if concept.lower() in word.lower()), None)


def absent(concepts: list[str], words: list[str]) -> list[str]:
    """The concepts that are not words of the prompt's ``words``."""
    return [c for c in concepts if not covered_words(c, words)]
