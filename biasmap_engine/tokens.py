"""Finding a concept word's BPE pieces among an attribution prompt's tokens (BiasMap §2.6).

CLIP's BPE splits lowercased text into words first (letter runs, single digits, runs of other symbols, and the
contractions 's 't 're 've 'm 'll 'd) and encodes every word on its own, the last piece of a word carrying the
``</w>`` end marker. A word's pieces inside a prompt are therefore exactly the pieces of the word alone, and they
can be found from the token strings, without the tokenizer: a saved trace stays searchable outside ComfyUI. Token
strings spell a word's UTF-8 bytes in GPT-2's byte alphabet ("é" is "Ã©"), so words are compared in that spelling.
"""

import re
import unicodedata

__all__ = ["ConceptNotFoundError", "clip_words", "find_word_positions", "prompt_words", "readable", "split_concepts"]

_END = "</w>"
_CONTRACTION = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d")


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


def find_word_positions(prompt_tokens: list[str], word: str) -> list[int]:
    """Positions of all BPE pieces of every occurrence of ``word`` (one or more words) among ``prompt_tokens``.

    Raises ConceptNotFoundError listing the prompt's words, so the user can pick one that is there.
    """
    words = [_spelling(w) for w in clip_words(word)]
    if not words:
        raise ConceptNotFoundError("a concept is empty; type a word that occurs in the attribution prompt")
    positions = []
    for start in range(len(prompt_tokens)):
        end = _match_words(prompt_tokens, start, words)
        if end is not None:
            positions.extend(range(start, end))
    if not positions:
        raise ConceptNotFoundError(
            f"the concept {word!r} is not in the attribution prompt, whose words are: {', '.join(prompt_words(prompt_tokens))}. "
            f"Add it to the attribution prompt (any word may be added there) or pick one of these.")
    return positions


def prompt_words(prompt_tokens: list[str]) -> list[str]:
    """The words spelled by BPE tokens (pieces joined at ``</w>``, readable), start/end markers left out."""
    words, current = [], ""
    for token in prompt_tokens:
        if token.startswith("<|"):
            continue
        current += token.removesuffix(_END)
        if token.endswith(_END):
            words.append(readable(current))
            current = ""
    return words + ([readable(current)] if current else [])


def clip_words(text: str) -> list[str]:
    """``text`` split as CLIP splits it before BPE: ``"A woman's face."`` → ``["a", "woman", "'s", "face", "."]``.

    CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` on NFC-normalised lowercase
    text, scanned by Unicode category (Python's ``re`` has no \\p classes). A final sigma comes out as σ: CLIP's
    tokenizers lowercase Σ to one or the other depending on their version, so words are compared with ς folded.
    """
    text = unicodedata.normalize("NFC", text).lower().replace("ς", "σ")
    words, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        contraction = _CONTRACTION.match(text, i)
        kind = _kind(text[i])
        end = contraction.end() if contraction else i + 1
        if not contraction and kind != "N":  # letters and other symbols come in runs; numerals one by one
            while end < len(text) and not text[end].isspace() and _kind(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def readable(token: str) -> str:
    """A token string (or joined pieces) in plain text: ``"mÃ©decin</w>"`` → ``"médecin</w>"``."""
    if token.startswith("<|"):
        return token
    end = _END if token.endswith(_END) else ""
    spelled = token.removesuffix(_END)
    try:
        return bytes(_CHAR_BYTE[c] for c in spelled).decode("utf-8") + end
    except (KeyError, UnicodeDecodeError):  # not in the byte alphabet, or a piece of one character's bytes
        return token


def _kind(char: str) -> str:
    """L (letter), N (numeral) or O (anything else), by Unicode category."""
    category = unicodedata.category(char)[0]
    return category if category in "LN" else "O"


def split_concepts(text: str) -> list[str]:
    """A comma-separated concept list → stripped non-empty words (``"woman, man"`` → ``["woman", "man"]``)."""
    return [w.strip() for w in text.split(",") if w.strip()]


def _match_words(tokens: list[str], start: int, words: list[str]) -> int | None:
    """End index (exclusive) if the pieces from ``start`` spell ``words`` exactly, each ending at a word end."""
    if start > 0 and not (tokens[start - 1].endswith(_END) or tokens[start - 1].startswith("<|")):
        return None  # the middle of another word ("fighter" inside "fire fighter" written as one word)
    i = start
    for target in words:
        spelled = ""
        while i < len(tokens) and len(spelled) < len(target):
            spelled += tokens[i].removesuffix(_END)
            i += 1
            if tokens[i - 1].endswith(_END):
                break
        if spelled.replace(_FINAL_SIGMA, _SIGMA) != target or not tokens[i - 1].endswith(_END):  # as clip_words
            return None
    return i
