"""Tests of fastfuse.formats.torch_zip on real torch.save archives: every value bit-exact with torch.load.

Files are written here by torch itself (openai-whisper and Hugging Face layouts, every dtype,
shared storages, strided/offset/expanded views, Parameters, empty and 0-d tensors); the
reader's arrays are compared with ``torch.load(weights_only=True)`` byte for byte. One test
reads them in a subprocess where torch cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import openai_whisper_shapes, tiny_whisper_config

from fastfuse.errors import FuseFileNotFoundError, MalformedFileError
from fastfuse.formats import zip_archive
from fastfuse.formats.stored import StoredFile, map_arrays
from fastfuse.formats.torch_zip import LEGACY_MAGIC, claims, read_torch, torch_dtype, verify_crcs

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
DTYPES = {  # torch dtype name -> numpy dtype the reader must give
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "uint16": np.dtype("<u2"),  # the rest: torch >= 2.1 pickles them with _rebuild_tensor_v3
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> Any:
    """Random bits of ``dtype`` (NaN payloads, -0.0 and all), made by torch."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dt.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == "bool":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def torch_bytes(t: Any) -> bytes:
    """The bytes of ``t``'s elements in C order."""
    flat = t.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def array_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def save(path: Path, obj: Any, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def assert_same_as_torch(path: Path, weights_only: bool = True) -> StoredFile:
    """read_torch + map_arrays give exactly torch.load's keys, order, shapes, dtypes and bytes."""
    stored = read_torch(path)
    loaded = torch.load(path, weights_only=weights_only)
    reference = loaded["model_state_dict"] if "dims" in stored.metadata else loaded
    arrays = map_arrays(stored)
    assert list(arrays) == list(reference)
    for name, a in arrays.items():
        t = reference[name]
        assert a.shape == tuple(t.shape), name
        assert a.dtype == DTYPES[str(t.dtype).removeprefix("torch.")], name
        assert array_bytes(a) == torch_bytes(t), name
        assert not a.flags.writeable
    assert stored.format == "torch" and stored.file_size == path.stat().st_size
    verify_crcs(path)
    return stored


# ----------------------------------------------------------------------------- layouts


def test_openai_whisper_layout(tmp_path: Path) -> None:
    shapes = openai_whisper_shapes(16, 2, 50)
    state = {k: random_tensor("float16", s, i) for i, (k, s) in enumerate(shapes.items())}
    dims = {
        "n_mels": 80,
        "n_vocab": 50,
        "n_audio_ctx": 1500,
        "n_audio_state": 16,
        "n_audio_head": 2,
        "n_audio_layer": 2,
        "n_text_ctx": 448,
        "n_text_state": 16,
        "n_text_head": 2,
        "n_text_layer": 2,
    }
    path = save(tmp_path / "tiny.pt", {"dims": dims, "model_state_dict": state})
    stored = assert_same_as_torch(path)
    assert stored.metadata == {"dims": json.dumps(dims, sort_keys=True, separators=(",", ":"))}
    assert list(stored.tensors) == list(shapes)
    assert "encoder.blocks.0.attn.query.weight" in stored.tensors
    assert "decoder.blocks.1.cross_attn.key.weight" in stored.tensors


def test_hugging_face_whisper_state_dict_with_tied_weights(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_whisper_config(d=64, heads=2, vocab=100)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    path = save(tmp_path / "pytorch_model.bin", model.state_dict())
    stored = assert_same_as_torch(path)
    assert stored.metadata == {}
    tied, embed = stored.tensors["proj_out.weight"], stored.tensors["model.decoder.embed_tokens.weight"]
    assert tied.offset == embed.offset and tied.shape == embed.shape == (100, 64)
    q = stored.tensors["model.encoder.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (64, 64) and q.contiguous and q.offset % 64 == 0  # torch aligns storages to 64 bytes


def test_ordered_dict_and_order_is_kept(tmp_path: Path) -> None:
    state = OrderedDict((name, random_tensor("float32", (2,), i)) for i, name in enumerate("zyxabc"))
    stored = assert_same_as_torch(save(tmp_path / "o.pt", state))
    assert list(stored.tensors) == list("zyxabc")


def test_empty_state_dict(tmp_path: Path) -> None:
    stored = read_torch(save(tmp_path / "e.pt", {}))
    assert stored.tensors == {} and stored.metadata == {} and map_arrays(stored) == {}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    state = {"w": random_tensor("float32", (3, 4)), "b": random_tensor("bfloat16", (4,))}
    state["wt"] = state["w"].t()
    # torch's weights_only loader refuses FRAME (protocol >= 4); this file is our own, so trusted
    assert_same_as_torch(save(tmp_path / "p.pt", state, pickle_protocol=protocol), weights_only=protocol == 2)


# ----------------------------------------------------------------------------- dtypes and views


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype(tmp_path: Path, dtype: str) -> None:
    base = random_tensor(dtype, (5, 6), seed=len(dtype))
    state = {
        "c": base,
        "t": base.t(),
        "slice": base[1:4, 2:],
        "step": base[::2, 1::3],
        "row": base[3],
        "scalar": base[2, 5],
        "empty": base[:0],
        "param": torch.nn.Parameter(base.clone(), requires_grad=False),
    }
    stored = assert_same_as_torch(save(tmp_path / f"{dtype}.pt", state))
    assert all(t.dtype == DTYPES[dtype] for t in stored.tensors.values())
    assert stored.tensors["c"].offset == stored.tensors["t"].offset  # one storage, zero copies
    assert not stored.tensors["t"].contiguous and stored.tensors["c"].contiguous
    item = DTYPES[dtype].itemsize
    assert stored.tensors["slice"].offset == stored.tensors["c"].offset + (1 * 6 + 2) * item


def test_views_and_shared_storages(tmp_path: Path) -> None:
    base = random_tensor("float32", (4, 5, 6))
    other = random_tensor("float16", (7, 3))
    state = {
        "base": base,
        "permuted": base.permute(2, 0, 1),
        "narrowed": base.narrow(1, 2, 3)[:, :, 1:5],
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "strided": torch.arange(20.0)[2:17:3],
        "diagonal": base[0].diagonal(),
        "as_strided": torch.arange(12.0).as_strided((3, 3), (2, 1), 1),  # overlapping rows
        "scalar_view": base[1, 2, 3],
        "size_one": base[1:2, 3:4, :],
        "empty_offset": base[2:2, 1:],
        "empty_3d": torch.zeros(0, 3, 4),
        "zero_d": torch.tensor(2.5),
        "other_t": other.t(),
        "other": other,
        "fresh": torch.zeros(2, 2, dtype=torch.int64),
    }
    stored = assert_same_as_torch(save(tmp_path / "views.pt", state))
    t = stored.tensors
    assert t["permuted"].offset == t["base"].offset and t["other"].offset == t["other_t"].offset
    assert t["expanded"].strides == (0, 4) and t["zero_d"].shape == () and t["empty_3d"].nbytes == 0
    assert t["size_one"].shape == (1, 1, 6)


def test_parameters_and_requires_grad(tmp_path: Path) -> None:
    layer = torch.nn.Linear(3, 2)
    state = {"weight": layer.weight, "bias": layer.bias, "grad": torch.ones(2, requires_grad=True)}
    assert_same_as_torch(save(tmp_path / "param.pt", state))


def test_whole_module_state_dict_has_metadata_build(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 3))
    model[2].weight = model[0].weight  # a tie inside one module tree
    state = model.state_dict()
    assert hasattr(state, "_metadata")  # written with BUILD after the items
    stored = assert_same_as_torch(save(tmp_path / "m.pt", state))
    assert stored.tensors["0.weight"].offset == stored.tensors["2.weight"].offset


def test_torch_dtype_names() -> None:
    for name, dtype in DTYPES.items():
        assert torch_dtype(name) == dtype


# ----------------------------------------------------------------------------- claims, crc, paths


def test_claims_real_heads(tmp_path: Path) -> None:
    new = save(tmp_path / "new.pt", {"a": torch.ones(1)})
    legacy = save(tmp_path / "old.pt", {"a": torch.ones(1)}, _use_new_zipfile_serialization=False)
    assert claims(new.read_bytes()[:16]) and claims(legacy.read_bytes()[:16])
    assert legacy.read_bytes()[:14] == LEGACY_MAGIC
    for head in [b"", b"PK\x05\x06" + bytes(12), b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"\x80\x02}q\x00."]:
        assert not claims(head)


def test_verify_crcs_reads_storage_data(tmp_path: Path) -> None:
    path = save(tmp_path / "c.pt", {"a": torch.arange(100.0)})
    verify_crcs(path)
    data = bytearray(path.read_bytes())
    offset = read_torch(path).tensors["a"].offset
    data[offset + 17] ^= 0x01
    path.write_bytes(bytes(data))
    read_torch(path)  # storage data is not read by read_torch...
    with pytest.raises(MalformedFileError, match=r"member 'c/data/0' \[\d+, \d+\) has CRC-32 [0-9a-f]{8}, the dire"):
        verify_crcs(path)  # ...verify_crcs reads it all


def test_verify_crcs_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zip_archive, "_CHUNK", 1000)
    path = save(tmp_path / "big.pt", {"a": torch.arange(3000, dtype=torch.int32), "b": torch.ones(3)})
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    verify_crcs(path)  # 12 chunks for member 'a'
    data = bytearray(path.read_bytes())
    data[read_torch(path).tensors["a"].offset + 11_999] ^= 0x80  # in the last chunk
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedFileError, match="member 'big/data/0'"):
        verify_crcs(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FuseFileNotFoundError, match="no such file"):
        read_torch(tmp_path / "absent.pt")
    with pytest.raises(MalformedFileError, match="is a directory; expected a torch.save file"):
        read_torch(tmp_path)


# ----------------------------------------------------------------------------- without torch


CHILD = r"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import json, numpy as np
from pathlib import Path
from fastfuse.formats.stored import map_arrays
from fastfuse.formats.torch_zip import read_torch, verify_crcs
folder = Path(sys.argv[1])
reference = json.loads((folder / "reference.json").read_text())
for file, tensors in reference.items():
    stored = read_torch(folder / file)
    verify_crcs(folder / file)
    arrays = map_arrays(stored)
    assert list(arrays) == list(tensors), (file, list(arrays))
    for name, (dtype, shape, npy) in tensors.items():
        a = arrays[name]
        assert str(a.dtype) == dtype and list(a.shape) == shape, (name, a.dtype, a.shape)
        expected = np.load(folder / npy)
        assert np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes() == expected.tobytes(), name
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert loaded == ["torch"] and sys.modules["torch"] is None, loaded
print("ok", len(reference))
"""


def test_reads_without_torch(tmp_path: Path) -> None:
    base = random_tensor("bfloat16", (6, 4), 3)
    files = {
        "hf.bin": {"w": base, "w.T": base.t(), "tied": base, "f8": random_tensor("float8_e4m3fn", (3, 2))},
        "openai.pt": {"dims": {"n_mels": 80}, "model_state_dict": {"x": random_tensor("float16", (2, 3))[:, 1:]}},
    }
    reference: dict[str, dict[str, Any]] = {}
    for file, obj in files.items():
        torch.save(obj, tmp_path / file)
        state = obj.get("model_state_dict", obj)
        reference[file] = {}
        for i, (name, t) in enumerate(state.items()):
            npy = f"{file}.{i}.npy"
            np.save(tmp_path / npy, np.frombuffer(torch_bytes(t), np.uint8))
            dtype = str(DTYPES[str(t.dtype).removeprefix("torch.")])
            reference[file][name] = [dtype, list(t.shape), npy]
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok 2"
