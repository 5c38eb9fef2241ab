"""What a mutation audit planted and the rest of the suite let through: the fsync before the file
is published, copy ranges merged only where both files are adjacent, whole kv heads per rank,
a target's layout, the message of data offsets one past the data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import hf_whisper_shapes, random_tensors
from filetools import raw_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import same_bits, whisper_reference
from safetensors import safe_open

import fastfuse
from fastfuse import FuseError, MalformedFileError, ShapeMismatchError
from fastfuse.sinks import atomic
from fastfuse.sinks.atomic import AtomicWriter

ST_DTYPES = {"uint8": "U8", "float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_file_is_synced_before_it_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    """fsync(file) < replace/link(name) < fsync(folder): a crash never publishes a name whose bytes
    are not on disk."""
    if overwrite:
        (tmp_path / "out.bin").write_bytes(b"old")
    calls: list[str] = []
    for name in ("fsync", "replace", "link"):
        real = getattr(os, name)

        def record(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(atomic.os, name, record)
    with AtomicWriter(tmp_path / "out.bin", b"head", 4, overwrite=overwrite) as writer:
        writer.view(0, 4, np.uint8, (4,))[...] = 7
        calls.clear()  # a named temporary may have been linked in at the start
    published = [i for i, name in enumerate(calls) if name in ("replace", "link")]
    assert published and "fsync" in calls[: published[0]], calls
    assert calls[published[-1] + 1 :] == ["fsync"], calls  # then the folder
    assert (tmp_path / "out.bin").read_bytes() == b"head" + bytes([7] * 4)


def hand_written(path: Path, tensors: dict[str, np.ndarray], order: list[str]) -> None:
    """A safetensors file whose data section holds ``tensors`` in ``order`` (not safetensors'
    own itemsize-then-name order), header in the same order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name in order:
        a = tensors[name]
        header[name] = {"dtype": ST_DTYPES[a.dtype.name], "shape": list(a.shape), "data_offsets": [len(data), 0]}
        data += a.tobytes()
        header[name]["data_offsets"][1] = len(data)
    path.write_bytes(raw_file(header, bytes(data)))


def check_fused_file(src: dict[str, np.ndarray], dst: Path) -> None:
    """Every original bit for bit and every fused tensor as numpy builds it, read by safetensors."""
    expected = src | whisper_reference(src)
    with safe_open(str(dst), "np") as f:
        assert set(f.keys()) == set(expected)
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            assert same_bits(f.get_tensor(key), expected[key]), key


def test_copies_merge_only_where_both_files_are_adjacent(tmp_path: Path) -> None:
    """Originals adjacent in the source but not in the output (reverse name order, and a 3-byte
    u8 tensor shifting what follows) are copied one by one, each to its own place."""
    tensors = random_tensors(hf_whisper_shapes(8, 1, 1, 10), np.float32)
    tensors["aaa.flags"] = np.array([1, 2, 3], np.uint8)
    tensors["zzz.steps"] = np.arange(5, dtype=np.int64)
    src = tmp_path / "src.safetensors"
    hand_written(src, tensors, sorted(tensors, reverse=True))
    fastfuse.fuse_file(src, tmp_path / "out.safetensors")
    check_fused_file(tensors, tmp_path / "out.safetensors")


EXTRA_DTYPES = st.sampled_from([np.uint8, np.float16, np.float32, np.int32, np.int64])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from([np.float32, np.float16]),
    d=st.sampled_from([4, 8, 12]),
    extras=st.lists(st.tuples(EXTRA_DTYPES, st.integers(0, 9)), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuse_file_over_random_layouts(
    tmp_path_factory: pytest.TempPathFactory, dtype: Any, d: int, extras: list[tuple[Any, int]], seed: int
) -> None:
    """Any dtype mix, odd sizes and data order in the source: the output read by safetensors holds
    the originals bit for bit and numpy's fused tensors."""
    rng = np.random.default_rng(seed)
    tensors = random_tensors(hf_whisper_shapes(d, 1, 1, 6), dtype, seed)
    for i, (extra, n) in enumerate(extras):
        tensors[f"extra.{i}"] = rng.integers(0, 100, size=n).astype(extra)
    order = list(tensors)
    rng.shuffle(order)
    folder = tmp_path_factory.mktemp("layout")
    hand_written(folder / "src.safetensors", tensors, order)
    fastfuse.fuse_file(folder / "src.safetensors", folder / "out.safetensors")
    check_fused_file(tensors, folder / "out.safetensors")


def test_kv_rows_must_be_whole_q_size_heads() -> None:
    """q of 32 rows is 4 heads of 8; k and v of 24 rows are not 2 such heads: refused, not split
    into 1.5 heads per rank."""
    d = 16
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (10, d), "lm_head.weight": (10, d)}
    for p, rows in {"q": 32, "k": 24, "v": 24}.items():
        shapes[f"model.layers.0.self_attn.{p}_proj.weight"] = (rows, d)
    shapes["model.layers.0.self_attn.o_proj.weight"] = (d, 32)
    for p in ("gate", "up"):
        shapes[f"model.layers.0.mlp.{p}_proj.weight"] = (32, d)
    shapes["model.layers.0.mlp.down_proj.weight"] = (d, 32)
    with pytest.raises(ShapeMismatchError) as caught:
        fastfuse.fuse(random_tensors(shapes), tp=2, rank=0, heads=4, kv_heads=2)
    assert str(caught.value) == (
        "'model.layers.0.self_attn.k_proj.weight': expected 2 kv heads of 8 rows (the q head size), found 24 rows"
    )


def test_a_target_fixes_its_layout() -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 1, 1, 10))
    with pytest.raises(FuseError) as caught:
        fastfuse.plan(tensors, target="vllm", layout="in_out")
    assert str(caught.value) == "target 'vllm' writes layout 'out_in'; drop layout='in_out'"
    fused = fastfuse.fuse(tensors, target="vllm", layout="out_in")
    assert fused["model.encoder.layers.0.self_attn.qkv_proj.weight"].shape == (24, 8)


def test_data_offsets_one_past_the_data(tmp_path: Path) -> None:
    path = tmp_path / "past.safetensors"
    header = {"a": {"dtype": "U8", "shape": [5], "data_offsets": [0, 5]}}
    path.write_bytes(raw_file(header, b"1234"))
    with pytest.raises(MalformedFileError) as caught:
        fastfuse.plan(path)
    assert str(caught.value) == (
        f"{path}: tensor 'a' data_offsets [0, 5] run past the end of the data section (4 bytes; is the file truncated?)"
    )


def test_header_order_is_not_safetensors_order(tmp_path: Path) -> None:
    """The hand-written files above really are out of safetensors' order (else they test nothing)."""
    tensors = {"b": np.zeros(2, np.float32), "a": np.array([1, 2, 3], np.uint8)}
    hand_written(tmp_path / "x.safetensors", tensors, ["a", "b"])
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8:-11])
    assert header["a"]["data_offsets"] == [0, 3] and header["b"]["data_offsets"] == [3, 11]
