"""fastfuse.fuse on Whisper-shaped dicts: the math, the originals, the options."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import hf_whisper_shapes, openai_whisper_shapes, random_tensors
from naive import original_loop, same_bits

import fastfuse
from fastfuse import FuseError

pytestmark = pytest.mark.usefixtures("engine", "poisoned_outputs")

ENC = "model.encoder.layers.{}.self_attn.{}_proj.{}"
DEC = "model.decoder.layers.{}.{}.{}_proj.{}"


def projections(tensors: dict[str, np.ndarray], template: str, parts: str, x: np.ndarray) -> np.ndarray:
    """concat_j(x @ W_j.T + b_j), with a missing bias counted as zero."""
    outs = []
    for p in parts:
        w = tensors[template.format(p, "weight")]
        b = tensors.get(template.format(p, "bias"), np.zeros(w.shape[0], w.dtype))
        outs.append(x @ w.T + b)
    return np.concatenate(outs, axis=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_matmul_equals_three_projections(tiny_hf, dtype) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf(dtype)
    fused = fastfuse.fuse(tensors, cross_kv=True, logits=True)
    x = np.random.default_rng(9).standard_normal((5, 24)).astype(dtype)
    groups = [(f"fused.enc.{i}.self_attn.qkv", f"model.encoder.layers.{i}.self_attn", "qkv") for i in range(2)]
    groups += [(f"fused.dec.{i}.self_attn.qkv", f"model.decoder.layers.{i}.self_attn", "qkv") for i in range(3)]
    groups += [(f"fused.dec.{i}.encoder_attn.kv", f"model.decoder.layers.{i}.encoder_attn", "kv") for i in range(3)]
    for key, block, parts in groups:
        got = x @ fused[f"{key}.weight"] + fused[f"{key}.bias"]
        expected = projections(tensors, block + ".{}_proj.{}", parts, x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=key)
    logits = x @ tensors["model.decoder.embed_tokens.weight"].T
    np.testing.assert_allclose(x @ fused["fused.dec.logits.weight"], logits, rtol=1e-5, atol=1e-5)


def test_same_weights_as_the_original_loop(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf(np.float16)
    fused = fastfuse.fuse(tensors)
    q, k, v = (tensors[ENC.format(1, p, "weight")] for p in "qkv")
    assert same_bits(fused["fused.enc.1.self_attn.qkv.weight"], original_loop(q, k, v))


def test_bias_zero_fills_the_missing_k_bias(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf()
    bias = fastfuse.fuse(tensors)["fused.enc.0.self_attn.qkv.bias"]
    assert same_bits(bias[:24], tensors[ENC.format(0, "q", "bias")])
    assert same_bits(bias[24:48], np.zeros(24, np.float32))
    assert same_bits(bias[48:], tensors[ENC.format(0, "v", "bias")])


def test_no_bias_at_all_means_no_fused_bias(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = {k: v for k, v in tiny_hf().items() if not k.endswith("_proj.bias")}
    fused = fastfuse.fuse(tensors)
    assert "fused.enc.0.self_attn.qkv.weight" in fused and "fused.enc.0.self_attn.qkv.bias" not in fused


def test_input_untouched_and_originals_shared(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf()
    snapshot = {k: v.copy() for k, v in tensors.items()}
    keys = list(tensors)
    result = fastfuse.fuse(tensors)
    assert list(tensors) == keys and all(same_bits(tensors[k], snapshot[k]) for k in keys)
    assert result is not tensors and all(result[k] is tensors[k] for k in keys)
    assert list(result)[: len(keys)] == keys


def test_drop_originals(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf()
    result = fastfuse.fuse(tensors, keep_originals=False, logits=True)
    assert ENC.format(0, "q", "weight") not in result and ENC.format(0, "v", "bias") not in result
    assert ENC.format(0, "out", "weight") in result and "model.decoder.embed_tokens.weight" in result


def test_widening_to_float32(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    for dtype in (np.float16, ml_dtypes.bfloat16):
        tensors = tiny_hf(dtype)
        fused = fastfuse.fuse(tensors, dtype="float32")
        w = fused["fused.dec.2.self_attn.qkv.weight"]
        assert w.dtype == np.float32
        expected = np.concatenate(
            [tensors[DEC.format(2, "self_attn", p, "weight")].T.astype(np.float32) for p in "qkv"], 1
        )
        assert same_bits(w, expected)


def test_openai_state_dict() -> None:
    tensors = random_tensors(openai_whisper_shapes(16, 2, 30))
    fused = fastfuse.fuse(tensors, cross_kv=True)
    parts = [tensors[f"decoder.blocks.1.cross_attn.{p}.weight"] for p in ("key", "value")]
    assert same_bits(fused["fused.dec.1.encoder_attn.kv.weight"], np.concatenate([p.T for p in parts], 1))


def test_readonly_inputs(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_hf()
    for value in tensors.values():
        value.flags.writeable = False
    assert fastfuse.fuse(tensors)["fused.enc.0.self_attn.qkv.weight"].flags.writeable


def test_non_numpy_values_are_named() -> None:
    tensors: dict[str, object] = dict(random_tensors(hf_whisper_shapes(8, 1, 1, 10)))
    tensors[ENC.format(0, "q", "weight")] = [[0.0] * 8] * 8
    with pytest.raises(
        FuseError, match="'model.encoder.layers.0.self_attn.q_proj.weight': expected a numpy array, found list"
    ):
        fastfuse.fuse(tensors)  # type: ignore[arg-type]


def test_concurrent_calls_from_threads() -> None:
    """Loaders fuse from thread pools: concurrent kernel launches must neither crash nor mix results."""
    import threading

    from naive import fused_reference

    rng = np.random.default_rng(5)
    jobs = [[rng.standard_normal((2048, 1536)).astype(np.float32) for _ in range(3)] for _ in range(4)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = fastfuse.transpose_concat(jobs[i])  # 38 MB out: the numba kernel, not the numpy path

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(same_bits(results[i], fused_reference(jobs[i])) for i in range(4))
