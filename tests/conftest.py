"""Shared test helpers: independent Whisper-shaped checkpoint factories.

These deliberately do not use ``fastfuse.cli.demo``: the tests must not trust the code under test
to spell the key names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


class Meta:
    """Shape and dtype only: planning must work without array data."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float16) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)


def hf_whisper_shapes(
    d: int, encoder_layers: int, decoder_layers: int, vocab: int, prefix: str = "model."
) -> dict[str, tuple[int, ...]]:
    """Attention, embedding and norm keys as transformers' WhisperForConditionalGeneration saves them."""
    shapes: dict[str, tuple[int, ...]] = {}
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        blocks = ["self_attn"] + (["encoder_attn"] if side == "decoder" else [])
        for i in range(layers):
            for block in blocks:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    shapes[f"{prefix}{side}.layers.{i}.{block}.{proj}.weight"] = (d, d)
                    if proj != "k_proj":  # Whisper's k_proj has no bias
                        shapes[f"{prefix}{side}.layers.{i}.{block}.{proj}.bias"] = (d,)
            shapes[f"{prefix}{side}.layers.{i}.fc1.weight"] = (4 * d, d)
            shapes[f"{prefix}{side}.layers.{i}.final_layer_norm.weight"] = (d,)
    shapes[f"{prefix}decoder.embed_tokens.weight"] = (vocab, d)
    shapes[f"{prefix}encoder.embed_positions.weight"] = (16, d)
    return shapes


def openai_whisper_shapes(d: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Keys of an openai-whisper state dict (``key`` has no bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for side in ("encoder", "decoder"):
        for i in range(layers):
            for block in ("attn", "cross_attn") if side == "decoder" else ("attn",):
                for proj in ("query", "key", "value", "out"):
                    shapes[f"{side}.blocks.{i}.{block}.{proj}.weight"] = (d, d)
                    if proj != "key":
                        shapes[f"{side}.blocks.{i}.{block}.{proj}.bias"] = (d,)
    shapes["decoder.token_embedding.weight"] = (vocab, d)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], dtype: Any = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def metas(shapes: dict[str, tuple[int, ...]], dtype: Any = np.float16) -> dict[str, Meta]:
    return {k: Meta(s, dtype) for k, s in shapes.items()}


@pytest.fixture
def tiny_hf() -> Callable[..., dict[str, np.ndarray]]:
    """A factory for a small random HF Whisper checkpoint (d=24, 2+3 layers)."""

    def make(dtype: Any = np.float32, prefix: str = "model.", seed: int = 0) -> dict[str, np.ndarray]:
        return random_tensors(hf_whisper_shapes(24, 2, 3, 50, prefix), dtype, seed)

    return make


ENGINES = ["numba", "numpy"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test on one engine, whatever the job size and what ran before (child processes too);
    in this process, only that engine may have run copies."""
    from fastfuse.kernels import engine as kernel_engine

    monkeypatch.setenv("FASTFUSE_ENGINE", request.param)
    before = kernel_engine.status()["copies_run"]
    yield request.param
    after = kernel_engine.status()["copies_run"]
    moved = {name: after[name] - before[name] for name in after}
    assert all(n == 0 for name, n in moved.items() if name != request.param), (request.param, moved)


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """New fused arrays start as 0xA5 bytes instead of whatever np.empty gives (often zeros), so a
    test cannot pass because memory happened to be clear (e.g. a zero-filled bias part)."""
    import fastfuse.fusion

    new_buffer = fastfuse.fusion._new_buffer

    def allocate(nbytes: int) -> np.ndarray:
        buffer = new_buffer(nbytes)
        buffer.fill(0xA5)
        return buffer

    monkeypatch.setattr(fastfuse.fusion, "_new_buffer", allocate)


def tiny_whisper_config(d: int = 64, layers: int = 2, heads: int = 4, vocab: int = 100) -> Any:
    """A tiny transformers ``WhisperConfig`` (no download): token ids inside the vocabulary,
    eager attention (the reference the tests compare with)."""
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperConfig(
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d,
        decoder_ffn_dim=2 * d,
        vocab_size=vocab,
        num_mel_bins=80,
        max_source_positions=30,
        max_target_positions=20,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        attn_implementation="eager",
    )


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, check: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI, ``python -m fastfuse ARGS``, in a child with warnings as errors (``env``
    added to the environment); asserts the exit status when ``check`` is given."""
    result = subprocess.run(
        [sys.executable, "-m", "fastfuse", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
        timeout=300,
    )
    if check is not None:
        assert result.returncode == check, result.stderr
    return result
