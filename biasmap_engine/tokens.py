"""Finding a concept word's BPE pieces among an attribution prompt's tokens (BiasMap §2.6).

CLIP's BPE splits text into words first and encodes every word on its own, the last piece of a word carrying the
``</w>`` end marker. A word's pieces inside a prompt are therefore exactly the pieces of the word alone, and they
can be found from the token strings, without the tokenizer: a saved trace stays searchable outside ComfyUI.
"""

__all__ = ["ConceptNotFoundError", "find_word_positions", "prompt_words", "split_concepts"]

_END = "</w>"


class ConceptNotFoundError(ValueError):
    """A concept word whose tokens do not occur in the attribution prompt."""


def find_word_positions(prompt_tokens: list[str], word: str) -> list[int]:
    """Positions of all BPE pieces of every occurrence of ``word`` (one or more words) among ``prompt_tokens``.

    Raises ConceptNotFoundError listing the prompt's words, so the user can pick one that is there.
    """
    words = word.lower().split()
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
    """The words spelled by BPE tokens (pieces joined at ``</w>``), start/end markers left out."""
    words, current = [], ""
    for token in prompt_tokens:
        if token.startswith("<|"):
            continue
        current += token.removesuffix(_END)
        if token.endswith(_END):
            words.append(current)
            current = ""
    return words + ([current] if current else [])


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
        if spelled != target or not tokens[i - 1].endswith(_END):
            return None
    return i
