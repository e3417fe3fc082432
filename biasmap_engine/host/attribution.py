"""Attribution-prompt embeddings from the same CLIP object the model is conditioned with (BiasMap §2.1)."""

import torch

__all__ = ["encode_attribution"]

_END = "<|endoftext|>"
_EMBEDDING = "<|embedding|>"  # a textual-inversion vector: no vocabulary entry, and never part of a word


def encode_attribution(clip, text: str) -> tuple[torch.Tensor, list[str]]:
    """Per-token embeddings ``[1, N, D]`` and token strings of ``text``, start/end kept, padding dropped.

    Encoding through ``clip`` itself keeps clip-skip and LoRA patches identical to the generation prompt's. Prompts
    longer than 75 tokens span several 77-token chunks; each chunk's real tokens are kept in order.
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
