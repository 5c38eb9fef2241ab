"""Real safetensors files on disk: load, fuse_file, verify, unfuse, sharding, atomicity."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import hf_whisper_shapes, openai_whisper_shapes, random_tensors
from naive import same_bits, whisper_reference
from safetensors import safe_open
from safetensors.numpy import save_file

import fastfuse
from fastfuse import FuseError, KeyConflictError, MalformedFileError, MissingTensorError, fuse_file, unfuse, verify

pytestmark = pytest.mark.usefixtures("engine", "poisoned_outputs")

# Real layer counts of every Whisper size, with a small d and vocab to keep files tiny.
LAYOUTS = {
    "tiny": (4, 4),
    "base": (6, 6),
    "small": (12, 12),
    "medium": (24, 24),
    "large-v3": (32, 32),
    "large-v3-turbo": (32, 4),
    "distil-large-v3": (32, 2),
}
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def read(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open, not a dict)


@pytest.mark.parametrize("size", LAYOUTS)
def test_round_trip_every_size_layout(tmp_path: Path, size: str) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, *LAYOUTS[size], 11), np.float16)
    src = write(tmp_path / "src.safetensors", tensors)
    plan = fuse_file(src, tmp_path / "dst.safetensors", cross_kv=True, logits=True)
    assert plan.layers == {
        "encoder_qkv": LAYOUTS[size][0],
        "decoder_qkv": LAYOUTS[size][1],
        "cross_kv": LAYOUTS[size][1],
        "logits": 1,
    }
    written = read(tmp_path / "dst.safetensors")
    expected = tensors | whisper_reference(tensors, cross_kv=True, logits=True)
    assert written.keys() == expected.keys()
    assert all(same_bits(written[k], expected[k]) for k in expected)
    assert verify(tmp_path / "dst.safetensors") == []


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("naming", ["hf", "openai"])
def test_fuse_drop_then_unfuse_is_bit_exact(tmp_path: Path, dtype: object, naming: str) -> None:
    shapes = hf_whisper_shapes(16, 2, 2, 20) if naming == "hf" else openai_whisper_shapes(16, 2, 20)
    tensors = random_tensors(shapes, dtype)
    src = write(tmp_path / "src.safetensors", tensors)
    fuse_file(src, tmp_path / "fused.safetensors", keep_originals=False, cross_kv=True)
    fused_only = read(tmp_path / "fused.safetensors")
    dropped = set(tensors) - set(fused_only)
    # per layer: self-attention q,k,v weights + q,v biases (encoder and decoder), cross k,v + v bias
    assert len(dropped) == 2 * 5 + 2 * 5 + 2 * 3
    rebuilt = unfuse(tmp_path / "fused.safetensors", tmp_path / "back.safetensors")
    assert set(rebuilt) == dropped
    back = read(tmp_path / "back.safetensors")
    assert back.keys() == tensors.keys()
    assert all(same_bits(back[k], tensors[k]) for k in tensors)


def test_metadata_kept_and_recorded(tmp_path: Path) -> None:
    src = write(tmp_path / "src.safetensors", random_tensors(hf_whisper_shapes(8, 1, 1, 10)))
    fuse_file(src, tmp_path / "dst.safetensors")
    with safe_open(str(tmp_path / "dst.safetensors"), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["fastfuse.layout"] == "in_out" and metadata["fastfuse.scheme"] == "hf-whisper"
    assert metadata["fastfuse.version"] == fastfuse.__version__
    recipe = json.loads(metadata["fastfuse.fused"])
    assert recipe["fused.enc.0.self_attn.qkv.bias"]["sources"][1] is None


def test_output_order_is_deterministic_and_aligned(tmp_path: Path) -> None:
    src = write(
        tmp_path / "src.safetensors", random_tensors(hf_whisper_shapes(8, 1, 1, 10)) | {"odd": np.ones(3, np.int8)}
    )
    fuse_file(src, tmp_path / "a.safetensors")
    fuse_file(src, tmp_path / "b.safetensors")
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    header_length = int.from_bytes(a[:8], "little")
    assert (8 + header_length) % 8 == 0
    header = json.loads(a[8 : 8 + header_length])
    for key, entry in header.items():
        if key != "__metadata__":
            itemsize = {"F32": 4, "I8": 1}[entry["dtype"]]
            assert entry["data_offsets"][0] % itemsize == 0


def test_readable_by_torch_loader(tmp_path: Path) -> None:
    torch_file = pytest.importorskip("safetensors.torch")
    src = write(tmp_path / "src.safetensors", random_tensors(hf_whisper_shapes(8, 1, 1, 10)))
    fuse_file(src, tmp_path / "dst.safetensors")
    loaded = torch_file.load_file(str(tmp_path / "dst.safetensors"))
    assert tuple(loaded["fused.dec.0.self_attn.qkv.weight"].shape) == (8, 24)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_load_is_zero_copy_and_fused(tmp_path: Path, dtype: object) -> None:
    tensors = random_tensors(hf_whisper_shapes(16, 2, 2, 20), dtype)
    src = write(tmp_path / "src.safetensors", tensors)
    loaded = fastfuse.load(src, cross_kv=True)
    expected = tensors | whisper_reference(tensors, cross_kv=True)
    assert loaded.keys() == expected.keys()
    assert all(same_bits(loaded[k], expected[k]) for k in expected)
    original = loaded["model.encoder.layers.0.self_attn.q_proj.weight"]
    assert not original.flags.writeable and not original.flags.owndata
    assert loaded["fused.enc.0.self_attn.qkv.weight"].flags.writeable


def shard(tmp_path: Path, tensors: dict[str, np.ndarray], assign: dict[str, int], shards: int) -> Path:
    """Write ``tensors`` into ``shards`` files with an index, key k going to shard assign.get(k, 0)."""
    names = [f"model-{n + 1:05d}-of-{shards:05d}.safetensors" for n in range(shards)]
    for n, name in enumerate(names):
        write(tmp_path / name, {k: v for k, v in tensors.items() if assign.get(k, 0) == n})
    weight_map = {k: names[assign.get(k, 0)] for k in tensors}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_input_with_q_k_v_in_different_shards(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 2, 2, 10), np.float16)
    prefix = "model.encoder.layers.1.self_attn."
    index = shard(
        tmp_path, tensors, {prefix + "k_proj.weight": 1, prefix + "v_proj.weight": 2, prefix + "v_proj.bias": 1}, 3
    )
    expected = tensors | whisper_reference(tensors)
    for source in (index, tmp_path):
        loaded = fastfuse.load(source)
        assert all(same_bits(loaded[k], expected[k]) for k in expected)
    fuse_file(tmp_path, tmp_path / "one.safetensors", single_file=True)
    written = read(tmp_path / "one.safetensors")
    assert all(same_bits(written[k], expected[k]) for k in expected)


def test_sharded_input_gives_sharded_output(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 2, 2, 10), np.float16)
    source = tmp_path / "source"
    source.mkdir()
    index = shard(source, tensors, {k: 1 for k in tensors if ".decoder." in k}, 2)
    out = tmp_path / "fused"
    fuse_file(index, out, max_shard_size="2KB")
    written_index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(written_index["weight_map"].values()) == set(shards)
    expected = tensors | whisper_reference(tensors)
    assert written_index["metadata"]["total_size"] == sum(a.nbytes for a in expected.values())
    for name in shards:  # each shard loads on its own, within the size limit unless one tensor is bigger
        part = read(out / name)
        assert sum(a.nbytes for a in part.values()) <= 2000 or len(part) == 1
    loaded = fastfuse.load(out)
    assert loaded.keys() == expected.keys() and all(same_bits(loaded[k], expected[k]) for k in expected)
    assert verify(out / "model.safetensors.index.json") == []
    with pytest.raises(FuseError, match="exists; pass --force"):
        fuse_file(index, out, max_shard_size="2KB")


def test_max_shard_size_shards_a_single_file(tmp_path: Path, source: Path) -> None:
    fuse_file(source, tmp_path / "out", max_shard_size=10**9)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]


@pytest.mark.parametrize("size", ["5XB", "-1", "0"])
def test_bad_max_shard_size(tmp_path: Path, source: Path, size: str) -> None:
    with pytest.raises(FuseError, match=f"max shard size '{size}'"):
        fuse_file(source, tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_index_naming_a_key_its_shard_lacks(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 1, 1, 10))
    index = shard(tmp_path, tensors, {}, 1)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        MalformedFileError,
        match="weight_map names 'ghost.weight' in .*model-00001-of-00001.safetensors, which does not hold it",
    ):
        fastfuse.load(index)


def test_key_in_two_shards(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 1, 1, 10))
    write(tmp_path / "a.safetensors", tensors)
    write(
        tmp_path / "b.safetensors", {"model.decoder.embed_tokens.weight": tensors["model.decoder.embed_tokens.weight"]}
    )
    weight_map = {k: "a.safetensors" for k in tensors} | {"model.decoder.embed_tokens.weight": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MalformedFileError, match="tensor 'model.decoder.embed_tokens.weight' is in two shards"):
        fastfuse.load(tmp_path)


def test_folder_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        FuseError,
        match=r"no checkpoint in the folder \(expected model.safetensors.index.json, model.safetensors, "
        r"pytorch_model.bin.index.json, pytorch_model.bin or one file ending in .safetensors, .bin, .pt, .pth\)",
    ):
        fastfuse.load(tmp_path)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write(tmp_path / "src.safetensors", random_tensors(hf_whisper_shapes(8, 2, 2, 10)))


def test_existing_destination_needs_overwrite(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FuseError, match="exists"):
        fuse_file(source, dst)
    assert dst.read_bytes() == b"precious"
    fuse_file(source, dst, overwrite_destination=True)
    assert verify(dst) == []


def test_destination_equal_to_source_is_refused(source: Path) -> None:
    before = source.read_bytes()
    with pytest.raises(FuseError, match="is the source checkpoint or its folder; write to a new path"):
        fuse_file(source, source, overwrite_destination=True)
    assert source.read_bytes() == before


def test_sharded_output_into_the_source_folder_is_refused(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 1, 1, 10))
    index = shard(tmp_path, tensors, {}, 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FuseError, match="is the source checkpoint or its folder"):
        fuse_file(index, tmp_path, overwrite_destination=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_destination_in_a_missing_folder(tmp_path: Path, source: Path) -> None:
    with pytest.raises(FuseError, match="missing"):
        fuse_file(source, tmp_path / "missing" / "dst.safetensors")
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_destination_in_a_read_only_folder(tmp_path: Path, source: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(FuseError):
            fuse_file(source, folder / "dst.safetensors")
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops from root to nobody with setpriv")
def test_destination_in_a_read_only_folder_for_an_unprivileged_user() -> None:
    with tempfile.TemporaryDirectory() as folder:  # pytest's own folders are private to root
        check_read_only_folder_as_nobody(Path(folder))


def check_read_only_folder_as_nobody(base: Path) -> None:
    base.chmod(0o755)
    src = write(base / "src.safetensors", random_tensors(hf_whisper_shapes(8, 1, 1, 10)))
    src.chmod(0o644)
    read_only = base / "ro"
    read_only.mkdir(mode=0o555)
    read_only.chmod(0o555)
    command = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-m",
        "fastfuse",
        "fuse",
        str(src),
        str(read_only / "dst.safetensors"),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=base)
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr
        == f"fastfuse: error: {read_only / 'dst.safetensors'}: destination folder {read_only} is not writable\n"
    )
    assert os.listdir(read_only) == []
    src.chmod(0o600)  # now the source is unreadable for nobody
    command[-1] = str(base / "dst.safetensors")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=base)
    assert result.returncode == 1
    assert result.stderr == f"fastfuse: error: {src}: permission denied (cannot read the file)\n"


def test_plan_errors_create_nothing(tmp_path: Path) -> None:
    tensors = random_tensors(hf_whisper_shapes(8, 2, 2, 10))
    del tensors["model.encoder.layers.1.self_attn.k_proj.weight"]
    src = write(tmp_path / "src.safetensors", tensors)
    with pytest.raises(MissingTensorError, match="model.encoder.layers.1.self_attn.k_proj.weight"):
        fuse_file(src, tmp_path / "dst.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def test_existing_fused_keys_conflict(tmp_path: Path, source: Path) -> None:
    fuse_file(source, tmp_path / "once.safetensors")
    with pytest.raises(KeyConflictError, match="the input already holds 'fused.enc.0.self_attn.qkv.weight'"):
        fuse_file(tmp_path / "once.safetensors", tmp_path / "twice.safetensors")
    assert not (tmp_path / "twice.safetensors").exists()


def test_progress_counts_every_byte_written(tmp_path: Path, source: Path) -> None:
    calls: list[tuple[int, int]] = []
    fuse_file(
        source, tmp_path / "dst.safetensors", cross_kv=True, progress=lambda done, total: calls.append((done, total))
    )
    written = read(tmp_path / "dst.safetensors")
    total = sum(a.nbytes for a in written.values())
    assert {t for _, t in calls} == {total} and sum(d for d, _ in calls) == total


def test_interrupt_mid_write_leaves_nothing(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"precious")

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuse_file(source, dst, overwrite_destination=True, progress=interrupt)
    assert dst.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["dst.safetensors", "src.safetensors"]


def test_sigkill_mid_write_leaves_destination_intact(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"precious")
    child = textwrap.dedent(f"""
        import sys, time
        from fastfuse import fuse_file
        def stall(done, total):
            print("ready", flush=True)
            time.sleep(60)
        fuse_file({str(source)!r}, {str(dst)!r}, overwrite_destination=True, progress=stall)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        if process.stdout:
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert dst.read_bytes() == b"precious"
    leftovers = sorted(set(os.listdir(tmp_path)) - {"dst.safetensors", "src.safetensors"})
    assert leftovers == []  # the temporary file is unnamed (O_TMPFILE) until it is complete


def test_verify_finds_a_changed_tensor(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    fuse_file(source, dst)
    tensors = read(dst)
    tensors["fused.dec.1.self_attn.qkv.weight"][3, 5] += 1
    with safe_open(str(dst), framework="numpy") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=metadata)
    assert verify(tmp_path / "tampered.safetensors") == ["fused.dec.1.self_attn.qkv.weight"]


def test_load_of_a_fused_file_returns_it_as_stored(tmp_path: Path, source: Path) -> None:
    fuse_file(source, tmp_path / "dst.safetensors", cross_kv=True)
    loaded = fastfuse.load(tmp_path / "dst.safetensors")
    assert loaded.keys() == read(tmp_path / "dst.safetensors").keys()
    assert not loaded["fused.dec.0.encoder_attn.kv.weight"].flags.writeable  # a view of the file
    with pytest.raises(
        FuseError, match=r"was already fused by fastfuse; load it without options \(got \['cross_kv'\]\)"
    ):
        fastfuse.load(tmp_path / "dst.safetensors", cross_kv=True)


def test_verify_and_unfuse_need_a_recipe(tmp_path: Path, source: Path) -> None:
    message = (
        f"^{re.escape(str(source))} was not written by fastfuse fuse \\(no fastfuse.fused metadata\\); "
        "fuse it first or pass the fused file$"
    )
    with pytest.raises(MalformedFileError, match=message):
        verify(source)
    with pytest.raises(MalformedFileError, match=message):
        unfuse(source, tmp_path / "back.safetensors")
    assert not (tmp_path / "back.safetensors").exists()


def test_hostile_source_creates_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(MalformedFileError):
        fuse_file(bad, tmp_path / "dst.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
