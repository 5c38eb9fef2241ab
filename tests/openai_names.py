"""openai-whisper's tensor names for Hugging Face's, as transformers' ``convert_openai_to_hf.py``
maps them: an independent table (not fastfuse's own), shared by the tests' and the benchmarks'
generated ``.pt`` files.

>>> openai_name("model.encoder.layers.3.self_attn.q_proj.weight")
'encoder.blocks.3.attn.query.weight'
"""

from __future__ import annotations

import re

__all__ = ["openai_name"]

OPENAI_NAMES = (
    (r"^model\.", ""),
    (r"\.layers\.", ".blocks."),
    (r"self_attn_layer_norm", "attn_ln"),
    (r"encoder_attn_layer_norm", "cross_attn_ln"),
    (r"final_layer_norm", "mlp_ln"),
    (r"encoder_attn\.", "cross_attn."),
    (r"self_attn\.", "attn."),
    (r"q_proj", "query"),
    (r"k_proj", "key"),
    (r"v_proj", "value"),
    (r"out_proj", "out"),
    (r"fc1", "mlp.0"),
    (r"fc2", "mlp.2"),
    (r"^encoder\.layer_norm", "encoder.ln_post"),
    (r"^decoder\.layer_norm", "decoder.ln"),
    (r"embed_positions\.weight", "positional_embedding"),
    (r"embed_tokens", "token_embedding"),
)


def openai_name(key: str) -> str:
    """The openai-whisper name of a Hugging Face Whisper key."""
    for pattern, name in OPENAI_NAMES:
        key = re.sub(pattern, name, key)
    return key
