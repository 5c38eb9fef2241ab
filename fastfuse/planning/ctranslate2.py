"""CTranslate2's Whisper model as data: its variables, their sources, dtypes and config.json.

What ``ct2-transformers-converter`` (CTranslate2 4.x, ``WhisperSpec`` revision 3) writes, learnt
from its source and checked byte for byte against it (tests/test_ctranslate2.py). The fused
variables (self-attention q|k|v, cross-attention k|v, each ``[sum(out), in]`` with a zero k
bias) come from the planner with target ``"ctranslate2"``; every other variable is a renamed
source tensor from :data:`WHISPER_TABLE`, plus the constant scalars of :data:`SCALARS`.

A variable is a list of row segments (source key or ``None`` for zeros, first row, rows), so
the sink streams it from the source maps in bounded blocks. Rules here never see bytes.

Example:
    >>> output_dtype("int8_float16", "float32", quantizable=True), output_dtype("int8_float16", "float32", quantizable=False)
    ('int8', 'float16')
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastfuse.aliases import TensorLike
from fastfuse.errors import FuseError, MissingTensorError
from fastfuse.planning.planner import Plan

__all__ = [
    "SCALARS",
    "SPEC_NAME",
    "SPEC_REVISION",
    "WHISPER_TABLE",
    "Segment",
    "Variable",
    "load_dtype",
    "output_dtype",
    "variables",
    "vocabulary",
    "whisper_config",
]

SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
FLOATS = ("float32", "float16", "bfloat16")

# CT2 name -> source key per scheme (``{p}``: the Hugging Face prefix, ``{i}``: the layer).
# Layer rows repeat for every encoder (``encoder/layer_{i}``) or decoder layer.
_LINEAR = ("weight", "bias")
_NORM = (("gamma", "weight"), ("beta", "bias"))


def _rows(ct2: str, hf: str, openai: str, kinds: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [(f"{ct2}/{mine}", f"{hf}.{theirs}", f"{openai}.{theirs}") for mine, theirs in kinds]


def _linear(ct2: str, hf: str, openai: str) -> list[tuple[str, str, str]]:
    return _rows(ct2, hf, openai, [(k, k) for k in _LINEAR])


def _norm(ct2: str, hf: str, openai: str) -> list[tuple[str, str, str]]:
    return _rows(ct2, hf, openai, _NORM)


_LAYER_COMMON = [
    *_linear("self_attention/linear_1", "self_attn.out_proj", "attn.out"),
    *_norm("self_attention/layer_norm", "self_attn_layer_norm", "attn_ln"),
    *_linear("ffn/linear_0", "fc1", "mlp.0"),
    *_linear("ffn/linear_1", "fc2", "mlp.2"),
    *_norm("ffn/layer_norm", "final_layer_norm", "mlp_ln"),
]
_CROSS = [
    *_linear("attention/linear_0", "encoder_attn.q_proj", "cross_attn.query"),
    *_linear("attention/linear_2", "encoder_attn.out_proj", "cross_attn.out"),
    *_norm("attention/layer_norm", "encoder_attn_layer_norm", "cross_attn_ln"),
]

WHISPER_TABLE: dict[str, list[tuple[str, str, str]]] = {
    # (CT2 name, Hugging Face key, openai-whisper key)
    "model": [
        *_linear("encoder/conv1", "{p}encoder.conv1", "encoder.conv1"),
        *_linear("encoder/conv2", "{p}encoder.conv2", "encoder.conv2"),
        ("encoder/position_encodings/encodings", "{p}encoder.embed_positions.weight", "encoder.positional_embedding"),
        *_norm("encoder/layer_norm", "{p}encoder.layer_norm", "encoder.ln_post"),
        ("decoder/embeddings/weight", "{p}decoder.embed_tokens.weight", "decoder.token_embedding.weight"),
        ("decoder/position_encodings/encodings", "{p}decoder.embed_positions.weight", "decoder.positional_embedding"),
        *_norm("decoder/layer_norm", "{p}decoder.layer_norm", "decoder.ln"),
    ],
    "encoder": [
        (f"encoder/layer_{{i}}/{c}", f"{{p}}encoder.layers.{{i}}.{h}", f"encoder.blocks.{{i}}.{o}")
        for c, h, o in _LAYER_COMMON
    ],
    "decoder": [
        (f"decoder/layer_{{i}}/{c}", f"{{p}}decoder.layers.{{i}}.{h}", f"decoder.blocks.{{i}}.{o}")
        for c, h, o in _LAYER_COMMON + _CROSS
    ],
}
PROJECTION = "decoder/projection/weight"
_UNTIED_PROJECTION = "proj_out.weight"

# Rank-0 variables: name -> (dtype, value, or the config.json key holding it).
SCALARS: dict[str, tuple[str, int | str]] = {
    "encoder/num_heads": ("int16", "encoder_attention_heads"),
    "decoder/num_heads": ("int16", "decoder_attention_heads"),
    "decoder/alignment_heads": ("int16", 1),
    "decoder/alignment_layer": ("int16", -1),
    "decoder/activation": ("int8", 3),  # GELU: the converter writes it whatever the config says
    "decoder/pre_norm": ("int8", 1),
    "decoder/scale_embeddings": ("int8", 0),
    "decoder/alibi": ("int8", 0),
    "decoder/alibi_use_positive_positions": ("int8", 0),
    "decoder/scale_alibi": ("int8", 0),
    "decoder/start_from_zero_embedding": ("int8", 0),
}


@dataclass(frozen=True)
class Segment:
    """Rows ``start:start+rows`` of source ``key`` (``None``: zeros) along the first axis."""

    key: str | None
    start: int
    rows: int


@dataclass(frozen=True)
class Variable:
    """One model.bin variable before aliasing: ``segments`` stacked along axis 0 give ``shape``.

    ``quantizable``: the converter quantizes it (linear, conv and embedding weights).
    ``scalar``: a rank-0 constant (``dtype`` and ``value``), never aliased or converted.
    """

    name: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...] = ()
    quantizable: bool = False
    scalar: int | None = None
    scalar_dtype: str = ""


def _whole(name: str, key: str, tensors: Mapping[str, TensorLike]) -> Variable:
    if key not in tensors:
        raise MissingTensorError(f"{key}: expected in the checkpoint for CTranslate2's {name}, not found")
    shape = tuple(tensors[key].shape)
    return Variable(name, shape, (Segment(key, 0, shape[0]),), quantizable=name.endswith("/weight"))


def variables(fusion: Plan, tensors: Mapping[str, TensorLike], config: Mapping[str, Any]) -> list[Variable]:
    """Every variable of the model, sorted by name as CTranslate2 writes them (Python ``str`` order).

    Args:
        fusion: the plan with target ``"ctranslate2"`` (its fused tensors become variables).
        tensors: key -> shape/dtype of the checkpoint.
        config: the Hugging Face ``config.json`` (head counts, ``tie_word_embeddings``).

    Raises:
        FuseError: a non-Whisper plan; MissingTensorError: a source key the table needs.
    """
    column = {"hf-whisper": 1, "openai-whisper": 2}.get(fusion.scheme)
    if column is None:
        raise FuseError(
            f"target 'ctranslate2' writes Whisper models (hf-whisper, openai-whisper checkpoints); "
            f"this checkpoint is {fusion.scheme}"
        )
    found: dict[str, Variable] = {}
    for t in fusion.fused:
        segments = tuple(Segment(k, s, r) for k, s, r in zip(t.sources, t.row_starts(), t.rows))
        found[t.key] = Variable(t.key, t.shape, segments, quantizable=t.kind == "weight")
    counts = {"model": 1, "encoder": fusion.layers["encoder_qkv"], "decoder": fusion.layers["decoder_qkv"]}
    for part, rows in WHISPER_TABLE.items():
        for i in range(counts[part]):
            for row in rows:
                name = row[0].format(i=i)
                found[name] = _whole(name, row[column].format(p=fusion.prefix, i=i), tensors)
    tied = column == 2 or config.get("tie_word_embeddings", True)
    embeddings = next(row for row in WHISPER_TABLE["model"] if row[0] == "decoder/embeddings/weight")
    projection = embeddings[column].format(p=fusion.prefix) if tied else _UNTIED_PROJECTION
    found[PROJECTION] = _whole(PROJECTION, projection, tensors)
    for name, (dtype, value) in SCALARS.items():
        number = config.get(value) if isinstance(value, str) else value
        if not isinstance(number, int):
            raise FuseError(f"config.json: {value!r} expected an integer for CTranslate2's {name}, found {number!r}")
        found[name] = Variable(name, (), scalar=number, scalar_dtype=dtype)
    return [found[name] for name in sorted(found)]


def load_dtype(quantization: str | None, config: Mapping[str, Any], first_float: str) -> str:
    """The dtype the converter loads the model in: every value is cast to it before aliasing.

    ``ct2-transformers-converter`` (its command line) loads float16 for ``float16`` and
    ``int8_float16``; otherwise ``config.json``'s ``dtype`` / ``torch_dtype``, and without
    one (transformers' ``"auto"``) the dtype of the first floating tensor (``first_float``).
    """
    if quantization in ("float16", "int8_float16"):
        return "float16"
    declared = str(config.get("dtype") or config.get("torch_dtype") or "auto").replace("torch.", "")
    if declared == "auto":
        return first_float
    if declared not in FLOATS:
        raise FuseError(f"config.json: dtype {declared!r}: expected one of {list(FLOATS)}")
    return declared


def output_dtype(quantization: str | None, loaded: str, *, quantizable: bool) -> str:
    """The dtype a variable is written in (the converter's ``LayerSpec._quantize``)."""
    if quantizable and quantization in ("int8", "int16"):
        return quantization
    if quantizable and quantization is not None and quantization.startswith("int8_"):
        return "int8"
    floats = {"int8_float16": "float16", "int8_bfloat16": "bfloat16", "int8_float32": "float32", "int16": "float32"}
    if quantization in FLOATS:
        return quantization
    return floats.get(quantization or "", loaded)


def whisper_config(config: Mapping[str, Any], generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """CTranslate2's ``config.json`` from Hugging Face's ``config.json`` and ``generation_config.json``.

    Without a generation config, transformers builds one from the model config (its
    ``suppress_tokens`` and ``begin_suppress_tokens``); ``lang_ids`` then is ``[]`` (transformers 5
    tokenizers have no ``additional_special_tokens``); ``alignment_heads`` default to every head
    of the second half of the decoder layers.
    """
    if generation is None:
        generation = {
            "suppress_tokens": config.get("suppress_tokens"),
            "begin_suppress_tokens": config.get("begin_suppress_tokens", [220, 50256]),
        }
    heads = generation.get("alignment_heads")
    if heads is None:
        layers, count = config["decoder_layers"], config["decoder_attention_heads"]
        heads = [list(pair) for pair in itertools.product(range(layers // 2, layers), range(count))]
    languages = generation.get("lang_to_id")
    return {
        "alignment_heads": heads,
        "lang_ids": sorted(languages.values()) if isinstance(languages, Mapping) else [],
        "suppress_ids": generation.get("suppress_tokens"),
        "suppress_ids_begin": generation.get("begin_suppress_tokens"),
    }


def vocabulary(tokens: list[str], vocab_size: int) -> list[str]:
    """The tokenizer's tokens (by id), cut or padded with timestamp names to ``vocab_size``."""
    tokens = tokens[:vocab_size]
    return tokens + ["<|%.2f|>" % (i * 0.02) for i in range(vocab_size - len(tokens))]
