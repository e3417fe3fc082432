"""The one adapter between the BiasMap engine and ComfyUI internals: the only engine code that imports ``comfy``
(the nodes, ComfyUI nodes themselves, also use its folder and argument helpers and its server's queue)."""

from .attribution import encode_attribution, prompt_text_words, tokenizer_words
from .guidance_window import SIGMA_CAP
from .sampling import (CUSTOM_SIGMAS, interrupted, sample_with_sampler, sample_with_scheduler, sampler_names,
                       scheduler_names, start_session)
from .session import BiasMapSession
from .unet import UnsupportedModelError, cross_attention_layers, deinference_

__all__ = ["BiasMapSession", "CUSTOM_SIGMAS", "SIGMA_CAP", "UnsupportedModelError", "cross_attention_layers",
           "deinference_", "encode_attribution", "interrupted", "prompt_text_words", "sample_with_sampler",
           "sample_with_scheduler", "sampler_names", "scheduler_names", "start_session", "tokenizer_words"]
