"""Attribution-prompt embeddings from the same CLIP object the model is conditioned with (BiasMap §2.1)."""

import functools
import re
import weakref

import torch

from ..tokens import prompt_words

__all__ = ["encode_attribution", "prompt_text_words", "tokenizer_words", "weighted_parts"]

_END_OF_TEXT = "<|endoftext|>"
_EMBEDDING = "<|embedding|>"  # a textual-inversion vector: no vocabulary entry, and never part of a word
_EMBEDDING_PREFIX = "embedding:"  # ComfyUI's prompt syntax for one
# CLIP → {(prompt, the CLIP's encoding state): (embeddings, names)}. ComfyUI caches a CLIP Text Encode node's output
# while its inputs stay the same, but the BiasMap node runs again for every new seed: an audit over many seeds would
# otherwise encode the same attribution prompt each time. Entries go with their CLIP object.
_ENCODED = weakref.WeakKeyDictionary()
_PROMPTS_PER_CLIP = 8


def encode_attribution(clip, text: str) -> tuple[torch.Tensor, list[str]]:
    """Per-token embeddings ``[1, N, D]`` and token strings of ``text``, start/end kept, padding dropped.

    Encoding through ``clip`` itself keeps clip-skip and LoRA patches identical to the generation prompt's; the
    result is kept for the next run with the same CLIP and prompt (callers must not modify it in place). Prompts
    longer than 75 tokens span several 77-token chunks; each chunk's real tokens are kept in order, so a word that
    ComfyUI cut at a chunk boundary has ``<|endoftext|>``, ``<|startoftext|>`` between its pieces (the word lookup
    skips markers).
    """
    if clip is None:
        raise ValueError("the attribution prompt needs the CLIP the model is conditioned with; connect the "
                         "checkpoint's CLIP output (after any LoRA or CLIP Set Last Layer node)")
    if not text.strip():
        raise ValueError("the attribution prompt is empty; write the generation prompt plus the demographic word, "
                         "e.g. 'A photo of the face of a doctor and gender'")
    try:
        cached = _ENCODED.setdefault(clip, {})
    except TypeError:  # an object standing in for a CLIP that cannot be weakly referenced: not kept
        return _encode(clip, text)
    key = (text, *_encoding_state(clip))
    if key not in cached:
        if len(cached) >= _PROMPTS_PER_CLIP:
            del cached[next(iter(cached))]  # the oldest
        cached[key] = _encode(clip, text)
    embeddings, names = cached[key]
    return embeddings, list(names)


def _encoding_state(clip) -> tuple:
    """What else decides ``clip``'s encoding: clip skip, tokenizer options, weight patches (LoRA) and hooks.

    ComfyUI's nodes change these on a clone, which is another cache entry anyway; this also catches a change made to
    the same object.
    """
    patcher = getattr(clip, "patcher", None)
    return (getattr(clip, "layer_idx", None), repr(sorted(getattr(clip, "tokenizer_options", {}).items())),
            getattr(patcher, "patches_uuid", None), getattr(patcher, "forced_hooks", None))  # hooks by identity


def _encode(clip, text: str) -> tuple[torch.Tensor, list[str]]:
    tokens = clip.tokenize(text)
    embeddings = clip.encode_from_tokens(tokens)
    stream = tokens["g"] if "g" in tokens else next(iter(tokens.values()))  # SDXL: CLIP-G's names, same positions
    keep, names = [], []
    for c, chunk in enumerate(stream):
        for p, pair in enumerate(chunk):
            name = clip.tokenizer.untokenize([pair])[0][1] if isinstance(pair[0], int) else _EMBEDDING
            keep.append(c * len(chunk) + p)
            names.append(name)
            if name == _END_OF_TEXT:
                break
    return embeddings[:, keep], names


def prompt_text_words(text: str) -> list[str]:
    """The words CLIP tokenizes from a ComfyUI prompt, without a CLIP: for checking concepts before a run.

    ComfyUI's tokenizer first takes out "(text:1.2)" weights (its own parser, with "\\(" escapes) and
    "embedding:name" vectors; the words are the installed CLIP tokenizer's of what is left (tokenizer_words).
    Embedding names are assumed to exist.
    """
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    words = []
    for segment, _weight in token_weights(escape_important(text), 1.0):
        first, *embedded = re.split(" embedding:|\nembedding:", unescape_important(segment))
        for part in [first, *(_EMBEDDING_PREFIX + e for e in embedded)]:
            if part.startswith(_EMBEDDING_PREFIX):  # the name runs to the first whitespace; the rest is text again
                name_and_rest = part[len(_EMBEDDING_PREFIX):].split(None, 1)
                if not name_and_rest:  # ComfyUI's tokenizer fails on it with a bare IndexError
                    raise ValueError("the attribution prompt has 'embedding:' with no name after it: write the "
                                     "embedding's file name after it, or remove it")
                part = (name_and_rest + [""])[1]
            words += tokenizer_words(part)
    return words


def weighted_parts(text: str) -> list[tuple[str, float]]:
    """The parts of a ComfyUI prompt that its emphasis weights other than 1, as its tokenizer parses them:
    ``(doctor:1.5)`` → ``[("doctor", 1.5)]``, ``(doctor)`` → ``[("doctor", 1.1)]``; escaped brackets weigh nothing."""
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    return [(unescape_important(segment).strip(), weight) for segment, weight in
            token_weights(escape_important(text), 1.0) if weight != 1.0 and segment.strip()]


def tokenizer_words(text: str) -> list[str]:
    """``text``'s words as the installed CLIP tokenizer reads them, final sigma folded as clip_words folds it.

    Which text that is depends on the installed transformers and ftfy, as the words the run looks up do: ftfy
    straightens quotes and unfolds ligatures and full-width letters; transformers 4.x's slow tokenizer without it
    drops invisible characters (a soft hyphen, an emoji's joiner) and makes each CJK ideograph a word.
    """
    if not text.strip():
        return []
    return [word.replace("ς", "σ") for word in prompt_words(_installed_tokenizer().tokenize(text))]


@functools.cache
def _installed_tokenizer():
    """The CLIP tokenizer ComfyUI loads for SD 1.x, SD 2.x and SDXL's CLIP-L and CLIP-G (one vocabulary)."""
    from comfy.sd1_clip import SDTokenizer

    return SDTokenizer().tokenizer
