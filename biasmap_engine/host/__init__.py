"""The one adapter between the BiasMap engine and ComfyUI internals: the only code of the pack that imports ``comfy``
or reads ComfyUI's executor and server (the nodes, ComfyUI nodes themselves, use ``folder_paths`` and ``comfy_api``
alone)."""

from .attribution import encode_attribution, prompt_text_words, tokenizer_words
from .guidance_window import SIGMA_CAP
from .sampling import (CUSTOM_SIGMAS, interrupted, sample_with_sampler, sample_with_scheduler, sampler_names,
                       scheduler_names, start_session)
from .server import executing_context, metadata_disabled, prompt_server, queued_outputs
from .session import BiasMapSession
from .unet import UnsupportedModelError, cross_attention_layers, deinference_

__all__ = ["BiasMapSession", "CUSTOM_SIGMAS", "SIGMA_CAP", "UnsupportedModelError", "cross_attention_layers",
           "deinference_", "encode_attribution", "executing_context", "interrupted", "metadata_disabled",
           "prompt_server", "prompt_text_words", "queued_outputs", "sample_with_sampler", "sample_with_scheduler",
           "sampler_names", "scheduler_names", "start_session", "tokenizer_words"]
