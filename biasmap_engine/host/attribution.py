"""Attribution-prompt embeddings from the same CLIP object the model is conditioned with (BiasMap §2.1)."""

import re

import torch

from ..tokens import clip_words

__all__ = ["encode_attribution", "prompt_text_words"]

_END = "<|endoftext|>"
_EMBEDDING = "<|embedding|>"  # a textual-inversion vector: no vocabulary entry, and never part of a word
_EMBEDDING_PREFIX = "embedding:"  # ComfyUI's prompt syntax for one


def encode_attribution(clip, text: str) -> tuple[torch.Tensor, list[str]]:
    """Per-token embeddings ``[1, N, D]`` and token strings of ``text``, start/end kept, padding dropped.

    Encoding through ``clip`` itself keeps clip-skip and LoRA patches identical to the generation prompt's. Prompts
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
    tokens = clip.tokenize(text)
    embeddings = clip.encode_from_tokens(tokens)
    stream = tokens["g"] if "g" in tokens else next(iter(tokens.values()))  # SDXL: CLIP-G's names, same positions
    keep, names = [], []
    for c, chunk in enumerate(stream):
        for p, pair in enumerate(chunk):
            name = clip.tokenizer.untokenize([pair])[0][1] if isinstance(pair[0], int) else _EMBEDDING
            keep.append(c * len(chunk) + p)
            names.append(name)
            if name == _END:
                break
    return embeddings[:, keep], names


def prompt_text_words(text: str, split_ideographs: bool = False) -> list[str]:
    """The words CLIP tokenizes from a ComfyUI prompt, without a CLIP: for checking concepts before a run.

    ComfyUI's tokenizer first takes out "(text:1.2)" weights (its own parser, with "\\(" escapes) and
    "embedding:name" vectors; the words are CLIP's split of what is left (``split_ideographs``: the slow
    tokenizer's split, see clip_words). Embedding names are assumed to exist.
    """
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    words = []
    for segment, _weight in token_weights(escape_important(text), 1.0):
        first, *embedded = re.split(" embedding:|\nembedding:", unescape_important(segment))
        for part in [first, *(_EMBEDDING_PREFIX + e for e in embedded)]:
            if part.startswith(_EMBEDDING_PREFIX):  # the name runs to the first whitespace; the rest is text again
                part = (part[len(_EMBEDDING_PREFIX):].split(None, 1) + [""])[1]
            words += clip_words(part, split_ideographs=split_ideographs)
    return words
