"""target="ctranslate2" at disk speed and in bounded memory, and ``fastfuse inspect CT2_DIR``.

The writer copies pass-through variables file to file (checked by counting the bytes that go
through ``copy_file_range``, and by the output staying the converter's when the kernel refuses
the copy); its anonymous memory does not grow with the model (tracemalloc's peak, which counts
numpy's buffers and not the file maps, on models of 2 and 16 layers); inspect describes
fastfuse's folder and the converter's alike, through the real CLI.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import numpy as np
import pytest

pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")

import ct2_models
from conftest import run_cli
from test_ctranslate2 import _same_folder

from fastfuse import FuseError, fuse_file
from fastfuse.errors import MalformedFileError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct2io")
    folders: dict[str, dict[str, Any]] = {
        "float16": {"dtype": "float16"},
        "small": {"d_model": 256, "layers": 2},
        "large": {"d_model": 256, "layers": 16},
    }
    made = {name: ct2_models.make_tiny(root / name, **kw) for name, kw in folders.items()}
    made["torch_bin"] = ct2_models.as_torch_bin(made["float16"], root / "torch_bin")
    return made


def _copied_bytes(monkeypatch: pytest.MonkeyPatch, *, refuse: bool = False) -> list[int]:
    """Count what ``os.copy_file_range`` copies (or make it refuse, as between file systems)."""
    copied: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, *args: Any) -> int:
        if refuse:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        n = real(src, dst, count, *args)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", counting)
    return copied


@pytest.mark.parametrize("model", ["float16", "torch_bin"])
def test_pass_through_variables_are_copied_file_to_file(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    theirs = ct2_models.convert(models["float16"], tmp_path / "theirs", "float16")  # the same weights
    copied = _copied_bytes(monkeypatch)
    fuse_file(models[model], tmp_path / "mine", target="ctranslate2", quantization="float16")
    _same_folder(tmp_path / "mine", theirs)
    # Everything but the record headers, zero k biases, scalars and aliases is copied.
    assert sum(copied) > 0.95 * (tmp_path / "mine" / "model.bin").stat().st_size


def test_a_kernel_that_refuses_the_copy_gives_the_same_folder(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = ct2_models.convert(models["float16"], tmp_path / "theirs", "float16")
    _copied_bytes(monkeypatch, refuse=True)
    fuse_file(models["float16"], tmp_path / "mine", target="ctranslate2", quantization="float16")
    _same_folder(tmp_path / "mine", theirs)


def test_a_tied_embedding_holding_nan_is_no_alias_as_for_the_converter(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "nan"
    folder.mkdir()
    for path in models["float16"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    tensors["model.decoder.embed_tokens.weight"][3, 5] = np.nan
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    theirs = ct2_models.convert(folder, tmp_path / "theirs", "float16")
    fuse_file(folder, tmp_path / "mine", target="ctranslate2", quantization="float16")
    _same_folder(tmp_path / "mine", theirs)
    assert (
        "decoder/projection/weight" not in json.loads(run_cli("inspect", tmp_path / "mine", "--json").stdout)["aliases"]
    )


def test_a_torch_file_failing_its_crc_leaves_no_folder(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for path in models["torch_bin"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    raw = bytearray((folder / "pytorch_model.bin").read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside the tensor data
    (folder / "pytorch_model.bin").write_bytes(bytes(raw))
    with pytest.raises(MalformedFileError, match="CRC"):
        fuse_file(folder, tmp_path / "out", target="ctranslate2", quantization="float16")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt"]


def _peak_bytes(source: Path, out: Path, quantization: str | None) -> int:
    tracemalloc.start()
    try:
        fuse_file(source, out, target="ctranslate2", quantization=quantization)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("quantization", [None, "float16", "int8_float16"])
def test_memory_does_not_grow_with_the_model(models: dict[str, Path], tmp_path: Path, quantization: str | None) -> None:
    """Copied (float32), converted (float16) and quantized (int8) variables: 8x the layers (5x the
    source's bytes) adds bookkeeping per tensor (names, plans: about 2 KB each), not the bytes."""
    sizes, peaks = [], []
    for name in ("small", "large"):
        _peak_bytes(models[name], tmp_path / f"warm-{name}", quantization)  # imports and caches first
        peaks.append(_peak_bytes(models[name], tmp_path / name, quantization))
        sizes.append((models[name] / "model.safetensors").stat().st_size)
    assert sizes[1] > 5 * sizes[0]
    assert peaks[1] - peaks[0] < 0.05 * (sizes[1] - sizes[0]), (sizes, peaks)


# ---------------------------------------------------------------------------------------------
# inspect CT2_DIR


@pytest.mark.parametrize("quantization", ["float16", "int8_float16"])
def test_inspect_describes_a_ctranslate2_folder_as_the_converters(
    models: dict[str, Path], tmp_path: Path, quantization: str
) -> None:
    theirs = ct2_models.convert(models["float16"], tmp_path / "theirs", quantization)
    mine = tmp_path / "mine"
    run_cli("fuse", models["float16"], mine, "--target", "ctranslate2", "--quantization", quantization, check=0)
    described = [json.loads(run_cli("inspect", folder, "--json", check=0).stdout) for folder in (mine, theirs)]
    assert {**described[0], "folder": ""} == {**described[1], "folder": ""}
    model = described[0]
    config = json.loads((models["float16"] / "config.json").read_text())
    assert (model["format"], model["spec"], model["revision"]) == ("ctranslate2", "WhisperSpec", 3)
    assert model["quantization"] == quantization
    assert model["layers"] == {"encoder": 2, "decoder": 2}
    assert (model["d_model"], model["mels"], model["vocabulary"]) == (64, 80, config["vocab_size"])
    assert model["heads"] == {"encoder": 4, "decoder": 4}
    assert model["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    fused = model["fused"]
    assert len(fused["self-attention q|k|v"]) == 8 and len(fused["cross-attention k|v"]) == 4
    assert model["fused_shapes"] == {"self-attention q|k|v": [192, 64], "cross-attention k|v": [128, 64]}
    assert sum(model["dtypes"].values()) == model["variables"]
    weights = "int8" if quantization.startswith("int8") else "float16"
    assert weights in model["dtypes"] and "float16" in model["dtypes"]
    assert model["config"]["alignment_heads"] == 3 and model["config"]["lang_ids"] == len(ct2_models.LANGS)
    text = run_cli("inspect", mine, check=0).stdout
    assert "spec     WhisperSpec revision 3" in text and f"quantization {quantization}" in text
    assert "self-attention q|k|v x4 (weights 192x64, with biases)" in text
    assert "aliases  1: decoder/projection/weight -> decoder/embeddings/weight" in text


@pytest.fixture(scope="module")
def ct2_folder(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct2inspect") / "model"
    fuse_file(models["float16"], out, target="ctranslate2", quantization="float16")
    return out


def _broken_copy(ct2_folder: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    for path in ct2_folder.iterdir():
        (folder / path.name).write_bytes(data if path.name == name else path.read_bytes())
    return folder


def _first_type_id_offset(model_bin: bytes) -> int:
    """Where the first variable's type byte is (version, spec, revision, count, then the variable)."""
    at = 4
    at += 2 + struct.unpack_from("<H", model_bin, at)[0]  # spec name
    at += 8  # revision, count
    at += 2 + struct.unpack_from("<H", model_bin, at)[0]  # variable name
    rank = model_bin[at]
    return at + 1 + 4 * rank


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model.bin", lambda b: b[:100], r"model\.bin: truncated at byte \d+ \(needs \d+ more\)"),
        ("model.bin", lambda b: struct.pack("<I", 5) + b[4:], r"model\.bin: CTranslate2 binary version 5, expected 6"),
        (
            "model.bin",
            lambda b: b[: _first_type_id_offset(b)] + b"\x09" + b[_first_type_id_offset(b) + 1 :],
            r"model\.bin: [\w/]+: unknown type id 9",
        ),
        (
            "config.json",
            lambda b: b"{not json",
            r"config\.json: not readable as JSON .*expected CTranslate2's config\.json",
        ),
        ("config.json", lambda b: b"[1, 2]", r"config\.json: a list; expected an object"),
        ("vocabulary.json", lambda b: b'{"a": 1}', r"vocabulary\.json: a dict; expected a list of tokens"),
    ],
)
def test_inspect_names_what_is_wrong_with_a_ctranslate2_folder(
    ct2_folder: Path, tmp_path: Path, name: str, damage: Any, message: str
) -> None:
    import re

    folder = _broken_copy(ct2_folder, tmp_path, name, damage((ct2_folder / name).read_bytes()))
    for json_flag in ([], ["--json"]):
        result = run_cli("inspect", folder, *json_flag, check=1)
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1
        assert re.search(message, result.stderr), result.stderr


def test_inspect_without_config_or_vocabulary_says_so(ct2_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(ct2_folder, tmp_path, "", b"")
    (folder / "config.json").unlink()
    (folder / "vocabulary.json").unlink()
    model = json.loads(run_cli("inspect", folder, "--json", check=0).stdout)
    assert model["config"] is None and model["vocabulary"] is None
    assert "config   none (no config.json)" in run_cli("inspect", folder, check=0).stdout


def test_inspect_refuses_fusion_flags_for_a_ctranslate2_folder(ct2_folder: Path) -> None:
    result = run_cli("inspect", ct2_folder, "--tp", "2", check=1)
    assert "is a CTranslate2 model folder: inspect describes it as written; drop --tp" in result.stderr


def test_a_model_bin_without_weights_is_no_ctranslate2_model() -> None:
    from fastfuse.sinks.ctranslate2_folder import quantization_of

    with pytest.raises(FuseError, match=r"model\.bin: no variable named \*/weight; expected a CTranslate2 model"):
        quantization_of({"encoder/num_heads": "int16"})
