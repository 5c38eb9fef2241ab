"""Planning on names and shapes only: every Whisper size, both namings, every error message."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import Meta, hf_whisper_shapes, metas, openai_whisper_shapes

import fastfuse
from fastfuse import (
    DtypeMismatchError,
    FuseError,
    KeyConflictError,
    MissingTensorError,
    SchemeNotDetectedError,
    ShapeMismatchError,
)

# d, encoder layers, decoder layers, vocab: the published Whisper sizes.
SIZES = {
    "tiny": (384, 4, 4, 51865),
    "base": (512, 6, 6, 51865),
    "small": (768, 12, 12, 51865),
    "medium": (1024, 24, 24, 51865),
    "large-v3": (1280, 32, 32, 51866),
    "large-v3-turbo": (1280, 32, 4, 51866),
    "distil-large-v3": (1280, 32, 2, 51866),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("prefix", ["model.", ""])
def test_every_whisper_size_real_shapes(size: str, prefix: str) -> None:
    d, enc, dec, vocab = SIZES[size]
    plan = fastfuse.plan(metas(hf_whisper_shapes(d, enc, dec, vocab, prefix)), cross_kv=True, logits=True)
    assert (plan.scheme, plan.prefix, plan.d) == ("hf-whisper", prefix, d)
    assert plan.layers == {"encoder_qkv": enc, "decoder_qkv": dec, "cross_kv": dec, "logits": 1}
    shapes = {t.key: t.shape for t in plan.fused}
    assert shapes[f"fused.enc.{enc - 1}.self_attn.qkv.weight"] == (d, 3 * d)
    assert shapes["fused.enc.0.self_attn.qkv.bias"] == (3 * d,)
    assert shapes[f"fused.dec.{dec - 1}.self_attn.qkv.weight"] == (d, 3 * d)
    assert shapes["fused.dec.0.encoder_attn.kv.weight"] == (d, 2 * d)
    assert shapes["fused.dec.0.encoder_attn.kv.bias"] == (2 * d,)
    assert shapes["fused.dec.logits.weight"] == (d, vocab)
    assert "fused.dec.logits.bias" not in shapes
    assert len(shapes) == 2 * enc + 4 * dec + 1
    assert plan.nbytes == 2 * sum(int(np.prod(s)) for s in shapes.values())


def test_large_v3_self_attention_bytes() -> None:
    d, enc, dec, vocab = SIZES["large-v3"]
    plan = fastfuse.plan(metas(hf_whisper_shapes(d, enc, dec, vocab)))
    weights = [t for t in plan.fused if t.kind == "weight"]
    assert len(weights) == 64 and sum(t.nbytes for t in weights) == 64 * 3 * 1280**2 * 2


def test_sources_and_zero_filled_k_bias() -> None:
    plan = fastfuse.plan(metas(hf_whisper_shapes(8, 1, 1, 10)))
    bias = next(t for t in plan.fused if t.key == "fused.enc.0.self_attn.qkv.bias")
    assert bias.sources == (
        "model.encoder.layers.0.self_attn.q_proj.bias",
        None,
        "model.encoder.layers.0.self_attn.v_proj.bias",
    )
    assert bias.rows == (8, 8, 8)


def test_defaults_fuse_self_attention_only() -> None:
    plan = fastfuse.plan(metas(hf_whisper_shapes(8, 2, 1, 10)))
    assert plan.layers == {"encoder_qkv": 2, "decoder_qkv": 1}
    assert plan.dropped == frozenset()


def test_keep_originals_false_drops_sources_but_not_the_embedding() -> None:
    plan = fastfuse.plan(metas(hf_whisper_shapes(8, 1, 1, 10)), keep_originals=False, logits=True)
    assert "model.encoder.layers.0.self_attn.k_proj.weight" in plan.dropped
    assert "model.encoder.layers.0.self_attn.q_proj.bias" in plan.dropped
    assert "model.encoder.layers.0.self_attn.out_proj.weight" not in plan.dropped
    assert "model.decoder.embed_tokens.weight" not in plan.dropped


def test_untied_proj_out_is_the_logits_source() -> None:
    shapes = hf_whisper_shapes(8, 1, 1, 10) | {"proj_out.weight": (10, 8)}
    plan = fastfuse.plan(metas(shapes), logits=True)
    assert next(t for t in plan.fused if t.group == "logits").sources == ("proj_out.weight",)


def test_openai_naming() -> None:
    plan = fastfuse.plan(metas(openai_whisper_shapes(16, 3, 40)), cross_kv=True, logits=True)
    assert plan.scheme == "openai-whisper"
    assert plan.layers == {"encoder_qkv": 3, "decoder_qkv": 3, "cross_kv": 3, "logits": 1}
    qkv = next(t for t in plan.fused if t.key == "fused.dec.2.self_attn.qkv.bias")
    assert qkv.sources == ("decoder.blocks.2.attn.query.bias", None, "decoder.blocks.2.attn.value.bias")


def test_custom_names() -> None:
    plan = fastfuse.plan(metas(hf_whisper_shapes(8, 2, 1, 10)), names={"encoder_qkv": "enc{i}.wqkv.{kind}"})
    assert {"enc0.wqkv.weight", "enc1.wqkv.bias", "fused.dec.0.self_attn.qkv.weight"} <= {t.key for t in plan.fused}


def test_dtype_option_widens_mixed_parts() -> None:
    tensors = metas(hf_whisper_shapes(8, 1, 1, 10))
    tensors["model.encoder.layers.0.self_attn.k_proj.weight"] = Meta((8, 8), np.float32)
    plan = fastfuse.plan(tensors, dtype="float32")
    assert {t.dtype for t in plan.fused} == {np.dtype(np.float32)}


def test_to_dict_is_json_ready() -> None:
    import json

    described = fastfuse.plan(metas(hf_whisper_shapes(8, 1, 1, 10))).to_dict()
    assert json.loads(json.dumps(described))["layers"] == {"encoder_qkv": 1, "decoder_qkv": 1}
    assert described["layout"] == "in_out" and described["dtype"] == "float16"


def without(shapes: dict[str, tuple[int, ...]], *keys: str) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in shapes.items() if k not in keys}


def renamed(shapes: dict[str, tuple[int, ...]], old: str, new: str) -> dict[str, tuple[int, ...]]:
    return {(new if k == old else k): v for k, v in shapes.items()}


BASE = hf_whisper_shapes(8, 3, 2, 10)
ENC = "model.encoder.layers.{}.self_attn.{}_proj.{}"


@pytest.mark.parametrize(
    ("shapes", "options", "error", "message"),
    [
        (
            without(BASE, ENC.format(1, "k", "weight")),
            {},
            MissingTensorError,
            "missing tensor 'model.encoder.layers.1.self_attn.k_proj.weight' of group encoder_qkv layer 1",
        ),
        (
            without(BASE, *[k for k in BASE if ".layers.1." in k and "encoder" in k]),
            {},
            MissingTensorError,
            "missing tensor 'model.encoder.layers.1.self_attn.q_proj.weight': layers run 0..2 but layer 1 is absent",
        ),
        (
            renamed(BASE, ENC.format(2, "q", "weight"), ENC.format("02", "q", "weight")),
            {},
            FuseError,
            "'model.encoder.layers.02.self_attn.q_proj.weight': layer index '02' is not canonical; expected 2",
        ),
        (
            BASE | {ENC.format(1, "v", "weight"): (8, 9)},
            {},
            ShapeMismatchError,
            (
                "'model.encoder.layers.1.self_attn.v_proj.weight': expected [8, 8] (d of the model, from "
                "'model.encoder.layers.0.self_attn.q_proj.weight'), found [8, 9]"
            ),
        ),
        (
            BASE | {"model.decoder.layers.0.self_attn.q_proj.weight": (16, 16)},
            {},
            ShapeMismatchError,
            "'model.decoder.layers.0.self_attn.q_proj.weight': expected [8, 8] (d of the model",
        ),
        (
            BASE | {ENC.format(0, "k", "weight"): (8, 8, 1)},
            {},
            ShapeMismatchError,
            "'model.encoder.layers.0.self_attn.k_proj.weight': expected 2 dimensions [out, in], found shape [8, 8, 1]",
        ),
        (
            BASE | {ENC.format(0, "v", "bias"): (7,)},
            {},
            ShapeMismatchError,
            (
                "'model.encoder.layers.0.self_attn.v_proj.bias': expected shape [8] (the rows of "
                "'model.encoder.layers.0.self_attn.v_proj.weight'), found [7]"
            ),
        ),
        (
            BASE | {"fused.enc.0.self_attn.qkv.weight": (8, 24)},
            {},
            KeyConflictError,
            "the input already holds 'fused.enc.0.self_attn.qkv.weight', a key fastfuse would write; pass overwrite=True",
        ),
        (
            {"lm_head.weight": (4, 4), "x": (1,)},
            {},
            SchemeNotDetectedError,
            (
                "no fusion scheme matches the 2 keys (first: 'lm_head.weight', 'x'); expected keys like: "
                "hf-whisper (model.encoder.layers.0.self_attn.q_proj.weight)"
            ),
        ),
        ({}, {}, SchemeNotDetectedError, "no fusion scheme matches the 0 keys (first: none)"),
        (
            BASE,
            {"scheme": "llama"},
            SchemeNotDetectedError,
            "unknown scheme 'llama'; expected 'auto' or one of ['hf-whisper', 'openai-whisper', 'hf-llama', 'hf-phi3', 'gpt2']",
        ),
        (
            BASE | hf_whisper_shapes(8, 3, 2, 10, prefix=""),
            {},
            SchemeNotDetectedError,
            "ambiguous checkpoint: keys match hf-whisper with prefix 'model.', hf-whisper with prefix '' equally; pass scheme=",
        ),
        (
            without(BASE, *[k for k in BASE if "encoder_attn" in k]),
            {"cross_kv": True},
            MissingTensorError,
            "cross_kv=True but the checkpoint has no cross_kv group: missing 'model.decoder.layers.0.encoder_attn.k_proj.weight'",
        ),
        (
            without(BASE, "model.decoder.embed_tokens.weight"),
            {"logits": True},
            MissingTensorError,
            "missing tensor 'model.decoder.embed_tokens.weight' of group logits",
        ),
        (
            BASE,
            {"names": {"encoder_qkv": "same.{kind}"}},
            KeyConflictError,
            "two fused tensors would be called 'same.weight'",
        ),
        (
            BASE,
            {"names": {"attention": "x.{i}.{kind}"}},
            FuseError,
            "names: unknown group(s) ['attention']; hf-whisper has",
        ),
        (BASE, {"dtype": "float64"}, DtypeMismatchError, "cannot fuse float16 parts into float64"),
    ],
)
def test_plan_errors(shapes: dict[str, tuple[int, ...]], options: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        fastfuse.plan(metas(shapes), **options)  # type: ignore[arg-type]


def test_mixed_dtypes_name_the_keys() -> None:
    tensors = metas(BASE)
    tensors[ENC.format(0, "k", "weight")] = Meta((8, 8), np.float32)
    with pytest.raises(
        DtypeMismatchError,
        match=re.escape(
            "parts of one group must share a dtype: 'model.encoder.layers.0.self_attn.q_proj.weight' is float16, "
            "'model.encoder.layers.0.self_attn.k_proj.weight' is float32, "
        ),
    ):
        fastfuse.plan(tensors)


def test_overwrite_allows_existing_fused_keys() -> None:
    plan = fastfuse.plan(metas(BASE | {"fused.enc.0.self_attn.qkv.weight": (8, 24)}), overwrite=True)
    assert plan.layers["encoder_qkv"] == 3


def test_plan_rejects_non_mapping() -> None:
    with pytest.raises(FuseError, match="expected a mapping of name -> array or a path, found list"):
        fastfuse.plan([1, 2])  # type: ignore[arg-type]
