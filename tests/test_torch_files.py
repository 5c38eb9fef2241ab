"""End to end: real ``torch.save`` files through fastfuse's public API and its real command line.

Every file here is written by torch itself (openai-whisper ``.pt``, Hugging Face
``pytorch_model.bin`` with tied weights, sharded ``.bin`` with an index, strided and offset
views, legacy and TorchScript archives, a hostile pickle); nothing is downloaded. References
are independent of fastfuse: ``torch.load(weights_only=True)`` of the same file, the torch
modules themselves, and numpy transposes (``np.concatenate([q.T, k.T, v.T], 1)``).
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import ml_dtypes
import numpy as np
import pytest
from conftest import hf_whisper_shapes, openai_whisper_shapes, random_tensors, tiny_whisper_config
from naive import same_bits
from safetensors import safe_open

import fastfuse
from fastfuse import FuseError, MalformedFileError, fuse_file, verify

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
OPENAI = {"q": "query", "k": "key", "v": "value"}
HF = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}


# ----------------------------------------------------------------------------- references


def as_numpy(t: Any) -> np.ndarray:
    """A tensor's values as a C-ordered numpy array (bf16 as ml_dtypes.bfloat16), bit for bit."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_reference(*paths: Path) -> dict[str, np.ndarray]:
    """What torch.load(weights_only=True) reads from ``paths`` (openai's model_state_dict unwrapped)."""
    state: dict[str, np.ndarray] = {}
    for path in paths:
        obj = torch.load(path, weights_only=True)
        obj = obj.get("model_state_dict", obj)
        state |= {key: as_numpy(value) for key, value in obj.items()}
    return state


def expected_fused(
    ref: dict[str, np.ndarray],
    naming: str,
    encoder: int,
    decoder: int,
    *,
    cross_kv: bool = False,
    logits: str | None = None,
) -> dict[str, np.ndarray]:
    """The fused tensors by numpy transposes of the reference (a missing k bias is zeros)."""

    def key(side: str, i: int, block: str, part: str, kind: str) -> str:
        if naming == "openai":
            return f"{side}.blocks.{i}.{'attn' if block == 'self' else 'cross_attn'}.{OPENAI[part]}.{kind}"
        return f"model.{side}.layers.{i}.{'self_attn' if block == 'self' else 'encoder_attn'}.{HF[part]}.{kind}"

    def group(side: str, i: int, block: str, parts: str) -> tuple[np.ndarray, np.ndarray]:
        weight = np.concatenate([ref[key(side, i, block, p, "weight")].T for p in parts], 1)
        q_bias = ref[key(side, i, block, "v", "bias")]
        biases = [ref.get(key(side, i, block, p, "bias"), np.zeros_like(q_bias)) for p in parts]
        assert key(side, i, block, "k", "bias") not in ref  # Whisper's key/k_proj has no bias
        return weight, np.concatenate(biases)

    out: dict[str, np.ndarray] = {}
    for side, short, layers in (("encoder", "enc", encoder), ("decoder", "dec", decoder)):
        for i in range(layers):
            w, b = group(side, i, "self", "qkv")
            out[f"fused.{short}.{i}.self_attn.qkv.weight"], out[f"fused.{short}.{i}.self_attn.qkv.bias"] = w, b
            if cross_kv and side == "decoder":
                w, b = group(side, i, "cross", "kv")
                out[f"fused.dec.{i}.encoder_attn.kv.weight"], out[f"fused.dec.{i}.encoder_attn.kv.bias"] = w, b
    if logits is not None:
        out["fused.dec.logits.weight"] = ref[logits].T
    return out


def read_safetensors(*paths: Path) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """Tensors and metadata as safetensors' own reader sees them."""
    tensors: dict[str, np.ndarray] = {}
    metadata = []
    for path in paths:
        with safe_open(str(path), framework="numpy") as f:
            assert not set(f.keys()) & set(tensors)
            tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata.append(f.metadata())
    return tensors, metadata


def assert_same(found: dict[str, Any], expected: dict[str, np.ndarray], keys: Any = None) -> None:
    """``found[k]`` equals ``expected[k]`` bit for bit (shape and dtype too) for every key."""
    different = [k for k in (expected if keys is None else keys) if not same_bits(np.asarray(found[k]), expected[k])]
    assert different == [], different


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- checkpoints


def openai_checkpoint(
    d: int = 16, layers: int = 2, vocab: int = 40, dtype: Any = torch.float16, seed: int = 0
) -> dict[str, Any]:
    """An openai-whisper ``{"dims", "model_state_dict"}`` with its attention keys and some others."""
    shapes = openai_whisper_shapes(d, layers, vocab) | {
        "encoder.conv1.weight": (d, 8, 3),
        "encoder.positional_embedding": (12, d),
        "decoder.positional_embedding": (10, d),
        "encoder.ln_post.weight": (d,),
        "decoder.ln.weight": (d,),
    }
    for i in range(layers):
        shapes[f"encoder.blocks.{i}.mlp.0.weight"] = (4 * d, d)
    state = {k: torch.from_numpy(v).to(dtype) for k, v in random_tensors(shapes, np.float32, seed).items()}
    dims = {
        "n_mels": 8,
        "n_vocab": vocab,
        "n_audio_ctx": 12,
        "n_audio_state": d,
        "n_audio_head": 2,
        "n_audio_layer": layers,
        "n_text_ctx": 10,
        "n_text_state": d,
        "n_text_head": 2,
        "n_text_layer": layers,
    }
    return {"dims": dims, "model_state_dict": state}


def hf_state(d: int = 16, encoder: int = 2, decoder: int = 2, vocab: int = 30, seed: int = 0) -> dict[str, Any]:
    return {
        k: torch.from_numpy(v)
        for k, v in random_tensors(hf_whisper_shapes(d, encoder, decoder, vocab), np.float16, seed).items()
    }


def save(path: Path, obj: Any, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def storage_member(path: Path, tensor: np.ndarray) -> str:
    """The archive member holding exactly ``tensor``'s bytes (found by content, not by fastfuse)."""
    with zipfile.ZipFile(path) as z:
        found = [n for n in z.namelist() if "/data/" in n and z.read(n) == tensor.tobytes()]
    assert len(found) == 1, found
    return found[0]


def flip_byte(path: Path, member: str, at: int) -> None:
    """XOR 0x01 into byte ``at`` of ``member``'s data; the zip directory (and its CRC) is left as is."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    assert 0 <= at < info.file_size
    data = bytearray(path.read_bytes())
    assert data[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_length + extra_length + at] ^= 0x01
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() == member  # the flip landed in that member's data, and only there


def flipped(array: np.ndarray, at: int) -> np.ndarray:
    raw = bytearray(np.ascontiguousarray(array).tobytes())
    raw[at] ^= 0x01
    return np.frombuffer(bytes(raw), array.dtype).reshape(array.shape)


# ----------------------------------------------------------------------------- the command line

TORCHLESS_CLI = r"""
import runpy, sys
sys.modules["torch"] = None  # any import of torch now fails
code = 0
try:
    runpy.run_module("fastfuse", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
if loaded != ["torch"] or sys.modules["torch"] is not None:
    raise SystemExit(f"torch was imported: {loaded}")
sys.exit(code)
"""


def cli(*args: str | Path, check: int | None = 0, torchless: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = ["-c", TORCHLESS_CLI] if torchless else ["-m", "fastfuse"]
    result = subprocess.run(
        [sys.executable, *prefix, *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        timeout=300,
    )
    if check is not None:
        assert result.returncode == check, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1, nothing on stdout, exactly one stderr line ``fastfuse: error: ...`` holding ``fragments``."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("fastfuse: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("\n") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


# ============================================================================= 1. openai-whisper .pt


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_openai_whisper_pt_plan_and_load(tmp_path: Path, engine: str, dtype: str) -> None:
    obj = openai_checkpoint(dtype=TORCH_DTYPES[dtype])
    path = save(tmp_path / "base.pt", obj)
    ref = torch_reference(path)
    assert ref.keys() == obj["model_state_dict"].keys()

    plan = fastfuse.plan(path, cross_kv=True)
    assert plan.scheme == "openai-whisper" and plan.d == 16
    assert plan.layers == {"encoder_qkv": 2, "decoder_qkv": 2, "cross_kv": 2}

    loaded = fastfuse.load(path, cross_kv=True)
    fused = expected_fused(ref, "openai", 2, 2, cross_kv=True)
    assert loaded.keys() == ref.keys() | fused.keys()
    assert_same(loaded, ref)
    assert_same(loaded, fused)
    assert loaded["fused.enc.1.self_attn.qkv.weight"].dtype == np.dtype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    )
    bias = loaded["fused.dec.0.self_attn.qkv.bias"].view(f"u{loaded['fused.dec.0.self_attn.qkv.bias'].itemsize}")
    assert not bias[16:32].any() and bias[:16].any()  # the missing key bias is zero-filled
    original = loaded["encoder.blocks.0.attn.query.weight"]
    assert not original.flags.owndata and not original.flags.writeable  # a view of the file's map


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_openai_whisper_pt_fuse_file(tmp_path: Path, engine: str, dtype: str) -> None:
    obj = openai_checkpoint(dtype=TORCH_DTYPES[dtype], seed=1)
    path = save(tmp_path / "base.pt", obj)
    ref = torch_reference(path)
    out = tmp_path / "base.fused.safetensors"

    plan = fuse_file(path, out, cross_kv=True)
    assert plan.scheme == "openai-whisper"
    tensors, (metadata,) = read_safetensors(out)
    fused = expected_fused(ref, "openai", 2, 2, cross_kv=True)
    assert tensors.keys() == ref.keys() | fused.keys()
    assert_same(tensors, ref)
    assert_same(tensors, fused)
    assert metadata["format"] == "pt"
    assert json.loads(metadata["dims"]) == obj["dims"]
    assert metadata["fastfuse.scheme"] == "openai-whisper"
    assert verify(out) == []
    assert fastfuse.load(out).keys() == tensors.keys()  # a fused file loads as stored


# ============================================================================= 2. Hugging Face pytorch_model.bin


@pytest.fixture(scope="module")
def hf_models() -> dict[int, Any]:
    """Two tiny random WhisperForConditionalGeneration (seeds 0 and 1); no download."""
    transformers = pytest.importorskip("transformers")
    config = tiny_whisper_config(d=32, heads=4, vocab=50)
    models = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        models[seed] = transformers.WhisperForConditionalGeneration(config).eval()
    return models


def save_bin(model: Any, folder: Path) -> Path:
    """``torch.save(model.state_dict())`` as transformers < 4.35 wrote pytorch_model.bin, plus config.json."""
    folder.mkdir(exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    return save(folder / "pytorch_model.bin", model.state_dict())


TIED = ("proj_out.weight", "model.decoder.embed_tokens.weight")


def test_hf_pytorch_model_bin_with_tied_weights(tmp_path: Path, engine: str, hf_models: dict[int, Any]) -> None:
    model = hf_models[0]
    path = save_bin(model, tmp_path / "whisper")
    loaded_by_torch = torch.load(path, weights_only=True)
    a, b = (loaded_by_torch[k] for k in TIED)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one storage in the file
    with zipfile.ZipFile(path) as z:
        assert len([n for n in z.namelist() if "/data/" in n]) == len(loaded_by_torch) - 1
    ref = torch_reference(path)
    fused = expected_fused(ref, "hf", 2, 2, cross_kv=True, logits="proj_out.weight")
    # the reference against the torch modules themselves: x @ W_fused is the three projections
    attn = model.model.encoder.layers[1].self_attn
    by_module = torch.cat([attn.q_proj.weight.T, attn.k_proj.weight.T, attn.v_proj.weight.T], 1)
    assert same_bits(as_numpy(by_module), fused["fused.enc.1.self_attn.qkv.weight"])

    loaded = fastfuse.load(path, cross_kv=True, logits=True)
    assert loaded.keys() == ref.keys() | fused.keys()
    assert_same(loaded, ref)
    assert_same(loaded, fused)

    out = tmp_path / "fused.safetensors"
    fuse_file(path, out, logits=True, cross_kv=True)
    tensors, (metadata,) = read_safetensors(out)
    assert tensors.keys() == ref.keys() | fused.keys()
    assert_same(tensors, ref)
    assert_same(tensors, fused)
    assert same_bits(tensors[TIED[0]], tensors[TIED[1]]) and same_bits(
        tensors[TIED[0]], as_numpy(model.proj_out.weight)
    )
    assert metadata["format"] == "pt" and "dims" not in metadata
    assert verify(out) == []

    as_torch = fastfuse.load(path, framework="pt", logits=True)
    assert all(torch.equal(as_torch[k], loaded_by_torch[k]) for k in TIED)


def test_hf_folder_holding_pytorch_model_bin(tmp_path: Path, engine: str, hf_models: dict[int, Any]) -> None:
    folder = tmp_path / "whisper"
    path = save_bin(hf_models[0], folder)
    ref = torch_reference(path)
    fused = expected_fused(ref, "hf", 2, 2, logits="proj_out.weight")
    loaded = fastfuse.load(folder, logits=True)
    assert loaded.keys() == ref.keys() | fused.keys()
    assert_same(loaded, ref | fused)
    fuse_file(folder, tmp_path / "fused.safetensors", logits=True)
    tensors, _ = read_safetensors(tmp_path / "fused.safetensors")
    assert_same(tensors, ref | fused)
    assert tensors.keys() == ref.keys() | fused.keys()
    result = json.loads(cli("inspect", folder, "--json").stdout)
    assert result["format"] == "torch" and result["tensors"] == len(ref) and result["scheme"] == "hf-whisper"


def test_hf_folder_with_safetensors_and_bin_reads_safetensors(
    tmp_path: Path, engine: str, hf_models: dict[int, Any]
) -> None:
    folder = tmp_path / "whisper"
    bin_ref = torch_reference(save_bin(hf_models[0], folder))
    hf_models[1].save_pretrained(folder)  # a different model as model.safetensors beside it
    assert (folder / "model.safetensors").is_file() and (folder / "pytorch_model.bin").is_file()
    st_ref, _ = read_safetensors(folder / "model.safetensors")
    key = "model.encoder.layers.0.self_attn.q_proj.weight"
    assert not same_bits(st_ref[key], bin_ref[key])

    loaded = fastfuse.load(folder)
    assert_same(loaded, st_ref)
    assert_same(loaded, expected_fused(st_ref, "hf", 2, 2))
    fuse_file(folder, tmp_path / "fused.safetensors")
    tensors, _ = read_safetensors(tmp_path / "fused.safetensors")
    assert_same(tensors, st_ref)
    assert set(tensors) - set(st_ref) == set(expected_fused(st_ref, "hf", 2, 2))
    assert json.loads(cli("inspect", folder, "--json").stdout)["format"] == "safetensors"


def test_folder_with_one_or_two_torch_files(tmp_path: Path, engine: str) -> None:
    state = hf_state()
    folder = tmp_path / "one"
    folder.mkdir()
    save(folder / "weights.pth", state)
    ref = torch_reference(folder / "weights.pth")
    assert_same(fastfuse.load(folder), ref | expected_fused(ref, "hf", 2, 2))
    save(folder / "other.pt", state)
    with pytest.raises(FuseError, match=r"holds 2 checkpoint files \(other\.pt, weights\.pth\); pass the one to read"):
        fastfuse.load(folder)


# ============================================================================= 3. sharded .bin


SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


def sharded(folder: Path, state: dict[str, Any], second: set[str]) -> Path:
    """Two torch.save shards (the keys in ``second`` in the second one) and pytorch_model.bin.index.json."""
    folder.mkdir(exist_ok=True)
    for n, name in enumerate(SHARDS):
        buffer = io.BytesIO()  # saved through a file object: both archives use the prefix 'archive/'
        torch.save({k: v for k, v in state.items() if (k in second) == bool(n)}, buffer)
        (folder / name).write_bytes(buffer.getvalue())
    weight_map = {k: SHARDS[k in second] for k in state}
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def split_layer_state() -> tuple[dict[str, Any], set[str]]:
    """A checkpoint whose encoder layer 1 has q in the first shard and k, v in the second."""
    state = hf_state(d=16, encoder=2, decoder=2, vocab=30, seed=3)
    prefix = "model.encoder.layers.1.self_attn."
    second = {f"{prefix}k_proj.weight", f"{prefix}v_proj.weight", f"{prefix}v_proj.bias"}
    second |= {k for k in state if k.startswith("model.decoder.layers.1.")}
    return state, second


def test_sharded_bin_load_and_sharded_output(tmp_path: Path, engine: str) -> None:
    state, second = split_layer_state()
    index = sharded(tmp_path / "src", state, second)
    with zipfile.ZipFile(index.parent / SHARDS[1]) as z:
        assert any(n.startswith("archive/data/") for n in z.namelist())
    ref = torch_reference(*(index.parent / name for name in SHARDS))
    assert ref.keys() == state.keys()
    assert "model.encoder.layers.1.self_attn.q_proj.weight" not in torch_reference(index.parent / SHARDS[1])
    fused = expected_fused(ref, "hf", 2, 2, cross_kv=True, logits="model.decoder.embed_tokens.weight")

    loaded = fastfuse.load(index, cross_kv=True, logits=True)
    assert loaded.keys() == ref.keys() | fused.keys()
    assert_same(loaded, ref | fused)

    out = tmp_path / "out"
    fuse_file(index, out, cross_kv=True, logits=True)
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    shard_names = sorted(set(out_index["weight_map"].values()))
    assert files == sorted([*shard_names, "model.safetensors.index.json"]) and len(shard_names) >= 2
    assert all(name.endswith(f"-of-{len(shard_names):05d}.safetensors") for name in shard_names)
    tensors, metadata = read_safetensors(*(out / name for name in shard_names))
    assert tensors.keys() == ref.keys() | fused.keys() == out_index["weight_map"].keys()
    for key, name in out_index["weight_map"].items():
        assert key in read_safetensors(out / name)[0]
    assert_same(tensors, ref | fused)
    assert all(m["format"] == "pt" for m in metadata)
    assert out_index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert verify(out) == []


def test_sharded_bin_single_file_from_folder(tmp_path: Path, engine: str) -> None:
    state, second = split_layer_state()
    index = sharded(tmp_path / "src", state, second)
    ref = torch_reference(*(index.parent / name for name in SHARDS))
    before = listing(tmp_path)
    with pytest.raises(FuseError, match="this output is a folder of files .*single_file"):
        fuse_file(index, tmp_path / "one.safetensors")
    assert listing(tmp_path) == before

    fuse_file(index.parent, tmp_path / "one.safetensors", single_file=True, cross_kv=True)
    tensors, (metadata,) = read_safetensors(tmp_path / "one.safetensors")
    fused = expected_fused(ref, "hf", 2, 2, cross_kv=True)
    assert tensors.keys() == ref.keys() | fused.keys()
    assert_same(tensors, ref | fused)
    assert metadata["format"] == "pt"
    assert verify(tmp_path / "one.safetensors") == []


def test_single_torch_file_with_max_shard_size(tmp_path: Path, engine: str) -> None:
    path = save(tmp_path / "base.pt", openai_checkpoint(seed=4))
    ref = torch_reference(path)
    fuse_file(path, tmp_path / "out", max_shard_size="8KB", cross_kv=True)
    names = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(names.values()))
    assert len(files) >= 3
    for f in files:  # shards hold at most 8000 bytes of tensor data
        assert sum(t.nbytes for t in read_safetensors(tmp_path / "out" / f)[0].values()) <= 8000
    tensors, metadata = read_safetensors(*(tmp_path / "out" / f for f in files))
    assert_same(tensors, ref | expected_fused(ref, "openai", 2, 2, cross_kv=True))
    assert all(json.loads(m["dims"])["n_text_state"] == 16 for m in metadata)
    assert verify(tmp_path / "out") == []


# ============================================================================= 4. strided and offset views


def strided_state() -> dict[str, Any]:
    d = 8
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3 * d, d + 3, generator=g)
    base = torch.randn(d, d, generator=g)
    rows = torch.randn(10, d, generator=g)
    attn = "model.encoder.layers.0.self_attn."
    return {
        f"{attn}q_proj.weight": base.t(),  # transposed: column-major
        f"{attn}k_proj.weight": big[d : 2 * d, 1 : d + 1],  # offset, row stride d + 3
        f"{attn}v_proj.weight": big[2 * d :, :d],
        f"{attn}q_proj.bias": torch.arange(3.0).repeat(3)[1 : d + 1].expand(d),  # stride 1, offset 1
        f"{attn}v_proj.bias": big[:, 0][:d],  # a column: stride d + 3
        f"{attn}out_proj.weight": big.t()[1:, 3 : 3 + d],  # pass-through, transposed and offset
        f"{attn}out_proj.bias": torch.ones(1).expand(d),  # stride 0
        "model.encoder.layers.0.fc1.weight": torch.arange(24.0).reshape(4, 6)[:, ::2],  # step 2
        "model.encoder.layer_norm.weight": big[:, 5],  # offset column of the fused parts' storage
        "model.encoder.embed_positions.weight": rows[3:7],  # contiguous, offset
        "model.encoder.embed_positions.bias": rows[5:9],  # overlaps the one before
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 3),
        "steps": torch.tensor([1, 2, 3], dtype=torch.int64)[::2],
    }


def test_strided_and_offset_views(tmp_path: Path, engine: str) -> None:
    path = save(tmp_path / "strided.pt", strided_state())
    by_torch = torch.load(path, weights_only=True)
    strided = [k for k, t in by_torch.items() if not t.is_contiguous()]
    offset = [k for k, t in by_torch.items() if t.storage_offset() > 0]
    assert len(strided) >= 7 and len(offset) >= 5  # the views survived torch.save
    ref = torch_reference(path)
    fused = expected_fused(ref, "hf", 1, 0)

    loaded = fastfuse.load(path)
    assert loaded.keys() == ref.keys() | fused.keys()
    assert_same(loaded, ref | fused)
    as_torch = fastfuse.load(path, framework="pt")
    assert [k for k in by_torch if not torch.equal(as_torch[k], by_torch[k])] == []

    progress: list[tuple[int, int]] = []
    out = tmp_path / "strided.fused.safetensors"
    fuse_file(path, out, progress=lambda done, total: progress.append((done, total)))
    tensors, (metadata,) = read_safetensors(out)
    assert tensors.keys() == ref.keys() | fused.keys()
    assert_same(tensors, ref | fused)
    assert metadata["format"] == "pt"
    assert verify(out) == []
    total = sum(t.nbytes for t in tensors.values())
    assert {t for _, t in progress} == {total} and sum(done for done, _ in progress) == total


def test_rezipped_archive_with_unaligned_members(tmp_path: Path, engine: str) -> None:
    """An archive rewritten by Python's zipfile (stored, no 64-byte padding): tensors at odd offsets."""
    original = save(tmp_path / "aligned.pt", hf_state(d=32, seed=12))
    path = tmp_path / "rezipped.pt"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with zipfile.ZipFile(path) as z:
        starts = []
        for info in z.infolist():
            if "/data/" in info.filename:
                n, e = struct.unpack_from("<HH", path.read_bytes(), info.header_offset + 26)
                starts.append(info.header_offset + 30 + n + e)
    assert any(start % 2 for start in starts)  # some f16 tensors are not even 2-byte aligned
    ref = torch_reference(path)
    fused = expected_fused(ref, "hf", 2, 2, cross_kv=True)
    assert_same(fastfuse.load(path, cross_kv=True), ref | fused)
    fuse_file(path, tmp_path / "out.safetensors", cross_kv=True)
    tensors, _ = read_safetensors(tmp_path / "out.safetensors")
    assert tensors.keys() == ref.keys() | fused.keys()
    assert_same(tensors, ref | fused)
    assert verify(tmp_path / "out.safetensors") == []


def test_tensor_parallel_from_a_bin_folder_with_config(tmp_path: Path, engine: str) -> None:
    folder = tmp_path / "whisper"
    folder.mkdir()
    path = save(folder / "pytorch_model.bin", hf_state(d=16, seed=13))
    (folder / "config.json").write_text(json.dumps({"encoder_attention_heads": 4, "decoder_attention_heads": 4}))
    ref = torch_reference(path)
    before = listing(tmp_path)
    with pytest.raises(FuseError, match="is the source checkpoint or its folder"):
        fuse_file(folder, folder, tp=2)
    assert listing(tmp_path) == before
    fuse_file(folder, tmp_path / "tp", tp=2)
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == [  # the folder's config.json comes along
        "config.json",
        "rank-0-of-2.safetensors",
        "rank-1-of-2.safetensors",
        "tensor_parallel.json",
    ]
    assert verify(tmp_path / "tp") == []
    for rank in (0, 1):
        tensors, (metadata,) = read_safetensors(tmp_path / "tp" / f"rank-{rank}-of-2.safetensors")
        assert metadata["format"] == "pt"
        assert_same(tensors, ref)
        rows = slice(8 * rank, 8 * rank + 8)  # 2 of 4 heads of 4 rows each
        for side, short in (("encoder", "enc"), ("decoder", "dec")):
            for i in range(2):
                attn = f"model.{side}.layers.{i}.self_attn."
                weight = np.concatenate([ref[f"{attn}{p}_proj.weight"][rows].T for p in "qkv"], 1)
                bias = np.concatenate(
                    [ref[f"{attn}q_proj.bias"][rows], np.zeros(8, np.float16), ref[f"{attn}v_proj.bias"][rows]]
                )
                assert same_bits(tensors[f"fused.{short}.{i}.self_attn.qkv.weight"], weight)
                assert same_bits(tensors[f"fused.{short}.{i}.self_attn.qkv.bias"], bias)


# ============================================================================= 5. the command line


def test_cli_inspect_fuse_verify(tmp_path: Path, engine: str) -> None:
    obj = openai_checkpoint(seed=6)
    save(tmp_path / "saved-as.pt", obj).rename(tmp_path / "base.pt")  # the archive's prefix is 'saved-as/'
    src = tmp_path / "base.pt"
    ref = torch_reference(src)
    inspected = json.loads(cli("inspect", src, "--json", "--cross-kv").stdout)
    assert inspected["format"] == "torch" and inspected["scheme"] == "openai-whisper"
    assert inspected["tensors"] == len(ref) and inspected["file_bytes"] == src.stat().st_size
    assert inspected["layers"] == {"encoder_qkv": 2, "decoder_qkv": 2, "cross_kv": 2} and inspected["d"] == 16
    assert "(torch, " in cli("inspect", src).stdout

    dst = tmp_path / "base.fused.safetensors"
    out = cli("fuse", src, dst, "--cross-kv").stdout
    assert "scheme   openai-whisper" in out and f"wrote    {dst}" in out
    assert cli("verify", dst).stdout == f"ok: every fused tensor of {dst} matches its originals bit for bit\n"
    tensors, (metadata,) = read_safetensors(dst)
    assert_same(tensors, ref | expected_fused(ref, "openai", 2, 2, cross_kv=True))
    assert json.loads(metadata["dims"]) == obj["dims"]


@pytest.mark.parametrize("name", ["out.bin", "out.pt", "out.pth", "out", "out.safetensors.bin", "OUT.PT"])
def test_cli_refuses_a_destination_not_named_safetensors(tmp_path: Path, name: str) -> None:
    src = save(tmp_path / "base.pt", openai_checkpoint(seed=7))
    before = listing(tmp_path)
    dst = tmp_path / name
    message = one_line_error(cli("fuse", src, dst, check=None), str(dst), "must be named *.safetensors")
    if name.lower().endswith((".bin", ".pt", ".pth")):
        assert "(fastfuse writes safetensors, never torch files)" in message
    assert listing(tmp_path) == before
    with pytest.raises(FuseError, match="must be named"):
        fuse_file(src, dst)
    assert listing(tmp_path) == before


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_cli_names_legacy_torchscript_and_foreign_files(tmp_path: Path) -> None:
    legacy = save(tmp_path / "legacy.pt", hf_state(), _use_new_zipfile_serialization=False)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), script)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x13\x37" + np.random.default_rng(8).bytes(4000))
    cases = {
        legacy: "is a legacy (pre-1.6) torch.save file; re-save it with torch >= 1.6 "
        "(torch.save(torch.load(path), new_path)) or convert it to safetensors",
        script: "is a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save",
        noise: "not a safetensors or PyTorch checkpoint (it starts with b'\\x137",
    }
    before = listing(tmp_path)
    for path, expected in cases.items():
        for command in (["inspect", path], ["fuse", path, tmp_path / "out.safetensors"]):
            message = one_line_error(cli(*command, check=None), f"fastfuse: error: {path}: ")
            assert expected in message
        with pytest.raises(MalformedFileError) as info:
            fastfuse.load(path)
        assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)
    assert listing(tmp_path) == before


# ============================================================================= 6. without torch

TORCHLESS_LOAD = r"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
import numpy as np
import fastfuse
src, reference = sys.argv[1], sys.argv[2]
expected = dict(np.load(reference))
loaded = fastfuse.load(src, cross_kv=True, logits=True)
assert sorted(loaded) == sorted(expected), sorted(set(loaded) ^ set(expected))
bad = [k for k, e in expected.items()
       if (loaded[k].dtype, loaded[k].shape) != (e.dtype, e.shape) or np.ascontiguousarray(loaded[k]).tobytes() != e.tobytes()]
assert not bad, bad
assert fastfuse.plan(src).scheme == "openai-whisper"
loaded_torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert loaded_torch == ["torch"] and sys.modules["torch"] is None, loaded_torch
print("ok", len(loaded))
"""


def test_without_torch(tmp_path: Path, engine: str) -> None:
    obj = openai_checkpoint(seed=9)
    src = save(tmp_path / "a.pt", obj)
    ref = torch_reference(src)
    expected = ref | expected_fused(ref, "openai", 2, 2, cross_kv=True, logits="decoder.token_embedding.weight")
    np.savez(tmp_path / "reference.npz", **expected)

    child = subprocess.run(
        [sys.executable, "-c", TORCHLESS_LOAD, str(src), str(tmp_path / "reference.npz")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"ok {len(expected)}\n"

    dst = tmp_path / "b.safetensors"
    cli("fuse", src, dst, "--cross-kv", "--logits", "--quiet", torchless=True)
    tensors, (metadata,) = read_safetensors(dst)
    assert tensors.keys() == expected.keys()
    assert_same(tensors, expected)
    assert json.loads(metadata["dims"]) == obj["dims"] and metadata["format"] == "pt"
    assert cli("verify", dst, torchless=True).stdout.startswith("ok: ")
    one_line_error(cli("fuse", src, tmp_path / "c.pt", check=None, torchless=True), "must be named *.safetensors")


# ============================================================================= 7. integrity


@pytest.mark.parametrize("which", ["passed-through", "fused-source"])
def test_corrupted_storage_is_refused_by_fuse_file(tmp_path: Path, engine: str, which: str) -> None:
    path = save(tmp_path / "base.pt", openai_checkpoint(seed=10))
    ref = torch_reference(path)
    key = "decoder.token_embedding.weight" if which == "passed-through" else "encoder.blocks.1.attn.query.weight"
    member = storage_member(path, ref[key])
    flip_byte(path, member, 37)
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.safetensors").write_bytes(b"keep me")
    before = listing(tmp_path)
    pattern = rf"^{path}: member '{member}' \[\d+, \d+\) has CRC-32 [0-9a-f]{{8}}, the directory says [0-9a-f]{{8}} \(corrupted file\)$"
    with pytest.raises(MalformedFileError, match=pattern):
        fuse_file(path, out / "fused.safetensors", cross_kv=True)
    with pytest.raises(MalformedFileError, match=pattern):
        fuse_file(path, out / "kept.safetensors", overwrite_destination=True)
    with pytest.raises(MalformedFileError, match=pattern):
        fuse_file(path, out / "sharded", max_shard_size="10KB")
    with pytest.raises(MalformedFileError, match=pattern):
        fuse_file(path, out / "dropped.safetensors", keep_originals=False)
    assert listing(tmp_path) == before  # no destination, no temporary, the existing file untouched
    assert (out / "kept.safetensors").read_bytes() == b"keep me"
    one_line_error(cli("fuse", path, out / "cli.safetensors", check=None), f"member '{member}'", "CRC-32")
    assert listing(tmp_path) == before

    # load does not read the CRCs of storage data (documented): it loads, and the flip shows
    loaded = fastfuse.load(path, cross_kv=True)
    changed = flipped(ref[key], 37)
    assert same_bits(loaded[key], changed) and not same_bits(loaded[key], ref[key])
    assert_same(loaded, expected_fused(ref | {key: changed}, "openai", 2, 2, cross_kv=True))


def test_corrupted_shard_is_refused_and_the_output_folder_removed(tmp_path: Path, engine: str) -> None:
    state, second = split_layer_state()
    index = sharded(tmp_path / "src", state, second)
    ref = torch_reference(index.parent / SHARDS[1])
    member = storage_member(index.parent / SHARDS[1], ref["model.encoder.layers.1.self_attn.k_proj.weight"])
    flip_byte(index.parent / SHARDS[1], member, 3)
    before = listing(tmp_path)
    with pytest.raises(MalformedFileError, match=rf"pytorch_model-00002-of-00002\.bin: member '{member}' .* CRC-32"):
        fuse_file(index, tmp_path / "out")
    with pytest.raises(MalformedFileError, match=rf"member '{member}' .* CRC-32"):
        fuse_file(index, tmp_path / "one.safetensors", single_file=True)
    assert listing(tmp_path) == before


def test_crc_checked_when_every_tensor_is_a_dropped_fused_source(tmp_path: Path, engine: str) -> None:
    """An attention-only checkpoint fused with keep_originals=False copies no original: its
    CRCs must still be checked (fuse_file: "A torch file's CRCs are checked")."""
    attn = "model.encoder.layers.0.self_attn."
    state = {k: v for k, v in hf_state(encoder=1, decoder=0).items() if k.startswith(attn) and "out_proj" not in k}
    assert len(state) == 5
    path = save(tmp_path / "attention.pt", state)
    ref = torch_reference(path)
    member = storage_member(path, ref[f"{attn}q_proj.weight"])
    flip_byte(path, member, 0)
    before = listing(tmp_path)
    with pytest.raises(MalformedFileError, match=rf"member '{member}' .* CRC-32"):
        fuse_file(path, tmp_path / "fused.safetensors", keep_originals=False)
    assert listing(tmp_path) == before


# ============================================================================= 8. a hostile pickle


class Shell:
    """Pickles as ``os.system(command)``: the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def hostile(path: Path, marker: Path) -> Path:
    """A real torch.save archive (right CRCs, real tensors) whose pickle calls os.system."""
    state: dict[str, Any] = dict(hf_state(encoder=1, decoder=0))
    state["model.encoder.layers.0.evil"] = Shell(f"touch {marker}")
    return save(path, state)


def test_hostile_pickle_runs_nothing(tmp_path: Path, engine: str) -> None:
    # the exploit is real: torch.load without weights_only runs it
    canary = tmp_path / "canary"
    torch.load(hostile(tmp_path / "canary.pt", canary), weights_only=False)
    assert canary.exists()

    pwned = tmp_path / "pwned"
    path = hostile(tmp_path / "model.pt", pwned)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(path.read_bytes())
    named = f"global '{os.system.__module__}.system' is refused"
    before = listing(tmp_path)
    for source in (path, folder, folder / "pytorch_model.bin"):
        for call in (
            functools.partial(fastfuse.load, source),
            functools.partial(fastfuse.plan, source),
            functools.partial(fuse_file, source, tmp_path / "out.safetensors"),
            functools.partial(fuse_file, source, tmp_path / "out", max_shard_size="1MB"),
        ):
            with pytest.raises(MalformedFileError) as info:
                call()
            message = str(info.value)
            assert "\n" not in message and named in message and "nothing was imported or called" in message
            assert "data.pkl' byte " in message
    for command in (
        ["fuse", path, tmp_path / "out.safetensors"],
        ["inspect", path],
        ["fuse", folder, tmp_path / "o.safetensors"],
    ):
        one_line_error(cli(*command, check=None), named)
    assert not pwned.exists()
    assert listing(tmp_path) == before


def test_existing_destination_is_untouched_and_the_hint_names_the_keyword(tmp_path: Path, engine: str) -> None:
    src = save(tmp_path / "base.pt", openai_checkpoint(seed=11))
    dst = tmp_path / "base.fused.safetensors"
    dst.write_bytes(b"keep")
    with pytest.raises(FuseError) as info:
        fuse_file(src, dst)
    assert dst.read_bytes() == b"keep"
    # the message tells how to replace it; following it must work (fuse_file's keyword, not the
    # fusion option `overwrite`, which allows replacing fused keys and leaves the destination alone)
    assert "overwrite_destination=True" in str(info.value), str(info.value)
    fuse_file(src, dst, overwrite_destination=True)
    assert verify(dst) == []
