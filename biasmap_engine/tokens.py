"""Finding a concept word's BPE pieces among an attribution prompt's tokens (BiasMap §2.6).

CLIP's BPE splits lowercased text into words first (letter runs, single digits, runs of other symbols, and the
contractions 's 't 're 've 'm 'll 'd) and encodes every word on its own, the last piece of a word carrying the
``</w>`` end marker. A word's pieces inside a prompt are therefore exactly the pieces of the word alone, and they
can be found from the token strings, without the tokenizer: a saved trace stays searchable outside ComfyUI. Token
strings spell a word's UTF-8 bytes in GPT-2's byte alphabet ("é" is "Ã©"), so words are compared in that spelling.

Two tokenizer behaviours change where words begin and end. ComfyUI fills 77-token chunks and cuts whatever it
tokenized in one go (in v0.8.0 a weighted text segment) where the chunk is full if that is 8 tokens or more, so a word
can straddle chunks as ``… "armad", "<|endoftext|>", "<|startoftext|>", "illo</w>" …``: markers are therefore
skipped, never taken as word boundaries.
Transformers 4.x's slow ``CLIPTokenizer`` without ftfy pre-splits text with BERT's ``BasicTokenizer``, which makes
every CJK ideograph a word of its own ("医生" → "医", "生"); a concept is therefore looked up in both splits.
"""

import re
import unicodedata

__all__ = ["ConceptNotFoundError", "clip_words", "concept_key", "covered_words", "find_word_positions",
           "is_ideographic", "listed_twice", "listed_words", "overlap_refusal", "overlapping", "prompt_words",
           "one_line", "quote_forms", "readable", "require_distinct_concepts", "split_concepts", "straightened",
           "typed_concepts", "typed_form"]

_WORD_END = "</w>"
_SEPARATOR = re.compile(r"[,，、;；\n\r]")
_CONTRACTION = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d")
# ComfyUI's emphasis weight, as in (doctor:1.2).
_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*(?=\))")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, which CLIP's vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_CHAR = _byte_alphabet()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}


def _spelling(word: str) -> str:
    """A word in the byte alphabet of CLIP's vocabulary."""
    return "".join(_BYTE_CHAR[b] for b in word.encode("utf-8"))


_FINAL_SIGMA, _SIGMA = _spelling("ς"), _spelling("σ")


class ConceptNotFoundError(ValueError):
    """A concept word whose tokens do not occur in the attribution prompt."""


_ADD_IT = "Add it to the attribution prompt (any word may be added there) or pick one of these"


def find_word_positions(prompt_tokens: list[str], word: str, fix: str = _ADD_IT) -> list[int]:
    """Positions of all BPE pieces of every occurrence of ``word`` (one or more words) among ``prompt_tokens``.

    ``word`` is matched as split by CLIP and as split per CJK ideograph, with its curly quotes as typed and
    straightened, whichever tokenizer made the prompt's tokens. The punctuation around the word is left out, as
    :func:`split_concepts` leaves it (``doctor.`` is ``doctor``: CLIP makes the full stop a token of its own, which
    would join the word's map); ComfyUI's emphasis is :func:`split_concepts`' to take out. Raises
    ConceptNotFoundError listing the prompt's words, so the user can pick one that is there, and ``fix``.
    """
    forms = {tuple(map(_spelling, form)) for form in _word_forms(_trimmed(word))}
    if forms == {()}:
        raise ConceptNotFoundError("a concept is empty; type a word that occurs in the attribution prompt")
    spans = _word_spans(prompt_tokens)
    positions = sorted({p for form in forms for p in _phrase_positions(spans, form)})
    if not positions:
        raise ConceptNotFoundError(
            f"the concept {word!r} is not in the attribution prompt, whose words are: "
            f"{listed_words(prompt_words(prompt_tokens))}. "
            f"{fix}"
            + (". ComfyUI's emphasis such as (word:1.2) is not part of a concept: type the word alone, or read the "
               "text with split_concepts" if _WEIGHT.search(word) or "(" in word else "."))
    return positions


def prompt_words(prompt_tokens: list[str]) -> list[str]:
    """The words spelled by BPE tokens (pieces joined at ``</w>``, readable), start/end markers left out."""
    return [readable(spelled) for spelled, _ in _word_spans(prompt_tokens)]


def listed_words(words: list[str]) -> str:
    """Words for a message, as a concept would be typed: each once, in prompt order, punctuation left out; a number's
    digits together (CLIP makes each digit a word, and reads 40 typed as a concept as 4, 0 too); words with hyphens
    between them also as one (``a, 40, year, old, 40-year-old, african, american, african-american, doctor, 👩``)."""
    numbers = []
    for word in words:
        if word.isdecimal() and numbers and numbers[-1].isdecimal():
            numbers[-1] += word
        else:
            numbers.append(word)
    listed, start = [], 0
    while start < len(numbers):
        end = start  # the last word of a chain a-b-c, which CLIP splits as it splits "a - b - c": either is typed so
        while (end + 2 < len(numbers) and numbers[end + 1] == "-" and _shown(numbers[end])
               and _shown(numbers[end + 2])):
            end += 2
        chain = numbers[start:end + 1:2]
        listed += chain + (["-".join(chain)] if len(chain) > 1 else [])
        start = end + 1
    unique = list(dict.fromkeys(w for w in listed if _shown(w)))
    more = f", and {len(unique) - _LISTED_AT_MOST} more" if len(unique) > _LISTED_AT_MOST else ""
    return ", ".join(unique[:_LISTED_AT_MOST]) + more


_LISTED_AT_MOST = 100  # words a message lists: a prompt of thousands would bury the fix


def _shown(word: str) -> bool:
    """A word a concept may name: letters or digits, or a symbol such as an emoji; not punctuation."""
    return any(ch.isalnum() or unicodedata.category(ch) == "So" for ch in word)


def listed_twice(concepts: list[str]) -> list[str]:
    """The concepts whose words, as CLIP reads them (Doctor is doctor, children’s children's), an earlier one of
    ``concepts`` has."""
    forms = [quote_forms(c) for c in concepts]
    return [c for i, c in enumerate(concepts) if any(forms[i] & earlier for earlier in forms[:i])]


def clip_words(text: str, split_ideographs: bool = False) -> list[str]:
    """``text`` split as CLIP splits it before BPE: ``"A woman's face."`` → ``["a", "woman", "'s", "face", "."]``.

    CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` on NFC-normalised lowercase
    text, scanned by Unicode category (Python's ``re`` has no \\p classes). A final sigma comes out as σ: CLIP's
    tokenizers lowercase Σ to one or the other depending on their version, so words are compared with ς folded.
    ``split_ideographs`` splits as transformers 4.x's slow tokenizer does without ftfy: every CJK ideograph is a
    word of its own (``"一个医生"`` → ``["一", "个", "医", "生"]``), as its ``BasicTokenizer`` spaces them out first.
    """
    text = unicodedata.normalize("NFC", text).lower().replace("ς", "σ")
    if split_ideographs:
        text = "".join(f" {char} " if _is_ideograph(char) else char for char in text)
    words, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        contraction = _CONTRACTION.match(text, i)
        kind = _char_class(text[i])
        end = contraction.end() if contraction else i + 1
        if not contraction and kind != "N":  # letters and other symbols come in runs; numerals one by one
            while end < len(text) and not text[end].isspace() and _char_class(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def readable(token: str) -> str:
    """A token string (or joined pieces) in plain text: ``"mÃ©decin</w>"`` → ``"médecin</w>"``."""
    if token.startswith("<|"):
        return token
    end = _WORD_END if token.endswith(_WORD_END) else ""
    spelled = token.removesuffix(_WORD_END)
    try:
        return bytes(_CHAR_BYTE[c] for c in spelled).decode("utf-8") + end
    except (KeyError, UnicodeDecodeError):  # not in the byte alphabet, or a piece of one character's bytes
        return token


# The code points BERT's BasicTokenizer (``_is_chinese_char``) isolates: the CJK Unified Ideographs, extensions
# A to E, and the compatibility ideographs. Kana and Hangul are not among them.
_IDEOGRAPHS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_ideograph(char: str) -> bool:
    """Whether transformers' slow CLIP tokenizer (without ftfy) makes ``char`` a word of its own."""
    return any(low <= ord(char) <= high for low, high in _IDEOGRAPHS)


def is_ideographic(text: str) -> bool:
    """Whether ``text`` is CJK ideographs only (医生): a language typed without spaces between its words."""
    return bool(text) and all(map(_is_ideograph, text))


# Curly quotes as ftfy straightens them: where it is installed, CLIP's tokenizer reads the prompt's so.
_STRAIGHT = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"'})


def straightened(text: str) -> str:
    """``text`` with curly quotes straight, as ftfy reads a prompt (children’s is children's)."""
    return text.translate(_STRAIGHT)


def concept_key(concept: str) -> str:
    """A typed concept as CLIP reads it, for comparing two typings: quotes straight, lower case, one space between
    words (Black  Woman and black woman are one)."""
    return " ".join(straightened(concept).lower().split())


def quote_forms(concept: str, split_ideographs: bool = False) -> set[tuple[str, ...]]:
    """``concept``'s words as CLIP splits them (clip_words), its curly quotes as typed and straightened: children’s
    is children + ’ + s in a prompt read as typed, children + 's in one that ftfy straightened."""
    return {tuple(clip_words(text, split_ideographs)) for text in {concept, straightened(concept)}}


def _word_forms(concept: str) -> set[tuple[str, ...]]:
    """``concept`` split as each tokenizer CLIP may run splits it: per ideograph or not, curly quotes as typed or
    straightened (quote_forms)."""
    return quote_forms(concept) | quote_forms(concept, split_ideographs=True)


def _char_class(char: str) -> str:
    """L (letter), N (numeral) or O (anything else), by Unicode category."""
    category = unicodedata.category(char)[0]
    return category if category in "LN" else "O"


def covered_words(concept: str, words: list[str]) -> set[int]:
    """Indices of a prompt's ``words`` (as a tokenizer reads them) that the occurrences of ``concept`` cover
    (consecutive words: a multi-word concept is looked up as a phrase), with the concept split as every lookup in the
    tokens splits it (find_word_positions: the sampler's, and the map nodes' in its trace)."""
    forms = _word_forms(concept)
    return {i + j for part in forms if part for i in range(len(words) - len(part) + 1)
            if tuple(words[i:i + len(part)]) == part for j in range(len(part))}


def split_concepts(text: str) -> list[str]:
    """A comma-separated concept list → its words, without ComfyUI's emphasis and the spaces and punctuation around
    them (``"woman, «man»., (doctor:1.2)"`` → ``["woman", "man", "doctor"]``). The commas a CJK keyboard types (，、),
    semicolons and line breaks (a list made one per line) separate too: no concept holds one, and CLIP would read it
    as a word of a phrase."""
    return [concept for _, concept in typed_concepts(text)]


def typed_concepts(text: str) -> list[tuple[str, str]]:
    """Each concept of a list (see split_concepts) with the text typed for it, without the spaces around it:
    ``" (doctor:1.2)"`` → ``("(doctor:1.2)", "doctor")``."""
    return [(part.strip(), concept) for part in _SEPARATOR.split(text)
            if (concept := _trimmed(_without_emphasis(part)))]


def typed_form(concept: str) -> str:
    r"""Text that a concept list reads back as ``concept``, a concept as split_concepts gives it: its brackets
    escaped, as ComfyUI spells brackets that are no emphasis (``person (elderly)`` → ``person \(elderly\)``)."""
    return concept.replace("(", r"\(").replace(")", r"\)")


def _trimmed(concept: str) -> str:
    """``concept`` without the punctuation around it ('doctor.', '"nurse"', '医生。'): CLIP makes those marks tokens
    of their own, which a lookup would add to the word's map. An apostrophe stays (doctors'), but not a pair of single
    quotes around the whole word ('gender'), and a bracket stays whose pair is inside but does not wrap the whole word
    ('(elderly) person', with brackets the prompt spells)."""
    start, end = 0, len(concept)
    while start < end:
        first, last, inner = concept[start], concept[end - 1], concept[start + 1:end - 1]
        if end - start > 1 and first in "'‘" and last in "'’" and not any(q in inner for q in "'‘’"):  # 'gender'
            start, end = start + 1, end - 1
        elif first.isspace() or _mark(first) and first not in "'’" and not _pairs_in(first, inner + last):
            start += 1
        elif last.isspace() or _mark(last) and last not in "'’" and not _pairs_in(last, first + inner):
            end -= 1
        elif end - start > 1 and _BRACKETS.get(first) == last:  # a pair around the whole word
            start, end = start + 1, end - 1
        else:
            return concept[start:end]
    return ""


def _mark(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _without_emphasis(text: str) -> str:
    r"""A concept as ComfyUI's tokenizer reads a prompt: emphasis brackets and their weights go (``(doctor:1.2)`` →
    ``doctor``, ``person (elderly)`` → ``person elderly``), while ``\(`` and ``\)`` are brackets the prompt spells."""
    text, plain, i = _WEIGHT.sub("", text), [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in ("(", ")"):
            plain.append(text[i + 1])
            i += 2
            continue
        if text[i] not in "()":
            plain.append(text[i])
        i += 1
    return "".join(plain)


_BRACKETS = {"(": ")", "[": "]", "{": "}", "「": "」", "《": "》", "（": "）"}
_PAIRED = _BRACKETS | {closing: opening for opening, closing in _BRACKETS.items()}


def _pairs_in(bracket: str, text: str) -> bool:
    """Whether ``text`` holds the other bracket of ``bracket``'s pair (False for any other mark)."""
    return bracket in _PAIRED and _PAIRED[bracket] in text


def _word_spans(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Each word of the prompt as (spelling without ``</w>``, positions of its pieces), in order.

    Markers (``<|startoftext|>``, ``<|endoftext|>``, ``<|embedding|>``) are skipped rather than ending a word: a
    word cut by a chunk boundary continues in the next chunk, and a piece after ``<|startoftext|>`` may be the
    middle of that word.
    """
    spans, spelled, positions = [], "", []
    for i, token in enumerate(tokens):
        if token.startswith("<|"):
            continue
        spelled += token.removesuffix(_WORD_END)
        positions.append(i)
        if token.endswith(_WORD_END):
            spans.append((spelled, positions))
            spelled, positions = "", []
    return spans + ([(spelled, positions)] if positions else [])


def _phrase_positions(spans: list[tuple[str, list[int]]], words: tuple[str, ...]) -> list[int]:
    """Positions of the pieces of every run of consecutive prompt words spelling ``words`` (ς folded as clip_words)."""
    positions = []
    for start in range(len(spans) - len(words) + 1):
        run = spans[start:start + len(words)]
        if all(spelled.replace(_FINAL_SIGMA, _SIGMA) == word for (spelled, _), word in zip(run, words)):
            positions += [p for _, piece_positions in run for p in piece_positions]
    return positions


def overlapping(concepts: list[str], words: list[str]) -> tuple[str, str] | None:
    """The first two of ``concepts`` at a shared place of a prompt's ``words`` (covered_words), or None."""
    return next(((a, b) for i, a in enumerate(concepts) for b in concepts[i + 1:]
                 if covered_words(a, words) & covered_words(b, words)), None)


def overlap_refusal(label: str, a: str, b: str) -> str:
    """Why two concepts of one list are refused: the lookup takes every place of a phrase, so the map of 'woman'
    beside 'black woman' would be of both places of 'woman'."""
    return (f"the {label} concepts '{a}' and '{b}' share a place of the attribution prompt, so the map of each would "
            f"take in the other's: list {label} concepts that the prompt holds at separate places (e.g. 'black woman, "
            f"white woman', not 'black woman, woman')")


def require_distinct_concepts(demographic: list[str], semantic: list[str], positions: dict[str, list[int]]) -> None:
    """Refuse concepts listed twice, concepts of one list sharing tokens, and a demographic and a semantic concept
    sharing tokens: a concept's overlap with itself is 1 whatever the image, a concept listed twice counts twice in the
    energy's mean, and the map of 'woman' beside 'black woman' would be of both places of 'woman'."""
    for label, concepts in (("demographic", demographic), ("semantic", semantic)):
        for i, a in enumerate(concepts):
            for b in concepts[i + 1:]:
                if positions[a] == positions[b]:
                    raise ValueError(f"the {label} concepts list '{a}' and '{b}', the same tokens of the attribution "
                                     f"prompt: list each concept once")
                if set(positions[a]) & set(positions[b]):
                    raise ValueError(overlap_refusal(label, a, b))
    for a in demographic:
        for b in semantic:
            if set(positions[a]) & set(positions[b]):
                raise ValueError(f"'{a}' and '{b}' share tokens of the attribution prompt, and a concept's overlap "
                                 f"with itself is 1 whatever the image: compare two words that do not overlap")


# Characters that reorder the text around them (a trace's text is another's input: U+202E would show 'doctor' as
# 'rotcod' and the figures after it reversed).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(text: str) -> str:
    """Text of a run, a row or a trace as a report or summary quotes it, on one line: line breaks as ⏎ (a prompt typed
    on several lines), other control characters as a space, bidirectional controls as their code (\\u202e), so that
    no value reads as a line of its own or reorders the text after it."""
    return "".join("⏎" if c in _LINE_BREAKS else f"\\u{ord(c):04x}" if c in _BIDI_CONTROLS
                   else " " if unicodedata.category(c) == "Cc" else c for c in text.replace("\r\n", "\n"))
