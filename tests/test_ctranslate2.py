"""target="ctranslate2" against CTranslate2's own converter and runtime, on tiny random models.

Every output file is compared with ``ct2-transformers-converter``'s (its command line's
semantics; one run of the real command line checks that the in-process conversion is it),
model.bin byte for byte; then ``ctranslate2.models.Whisper`` loads both folders and must
generate the same tokens.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import numpy as np
import pytest

pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")

import ct2_models
from conftest import run_cli

from fastfuse import FuseError, fuse_file

QUANTIZATIONS = [
    None,
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int8_float16",
    "int8_float32",
    "int8_bfloat16",
    "int16",
]
FILES = ["config.json", "model.bin", "preprocessor_config.json", "tokenizer.json", "vocabulary.json"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct2")
    folders = {
        "tiny": {},
        "default_init": {"perturb": False},  # ones and zeros everywhere: aliases of every kind
        "untied_no_generation": {"tied": False, "timestamps": True, "generation_config": False},
        "float16": {"dtype": "float16"},
        "bfloat16": {"dtype": "bfloat16"},
        "sharded": {"max_shard_size": "100KB"},
        "turbo_shape": {"layers": 3, "decoder_layers": 1},  # large-v3-turbo: 32 + 4, distil: 32 + 2
    }
    made = {name: ct2_models.make_tiny(root / name, **kw) for name, kw in folders.items()}
    made["torch_bin"] = ct2_models.as_torch_bin(made["tiny"], root / "torch_bin")
    made["torch_bin_sharded"] = ct2_models.as_torch_bin(made["float16"], root / "torch_bin_sharded", shards=3)
    return made


def _same_folder(mine: Path, theirs: Path) -> None:
    assert sorted(p.name for p in mine.iterdir()) == FILES
    assert sorted(p.name for p in theirs.iterdir()) == FILES
    for name in FILES:
        if name.endswith(".json"):
            assert json.loads((mine / name).read_text()) == json.loads((theirs / name).read_text()), name
        assert filecmp.cmp(mine / name, theirs / name, shallow=False), name


def _both(models: dict[str, Path], tmp_path: Path, model: str, quantization: str | None) -> tuple[Path, Path]:
    theirs = ct2_models.convert(models[model], tmp_path / "theirs", quantization)
    mine = tmp_path / "mine"
    fuse_file(models[model], mine, target="ctranslate2", quantization=quantization)
    return mine, theirs


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_quantization_is_the_converters(
    models: dict[str, Path], tmp_path: Path, quantization: str | None
) -> None:
    _same_folder(*_both(models, tmp_path, "tiny", quantization))


@pytest.mark.parametrize(
    ("model", "quantization"),
    [
        ("default_init", None),
        ("default_init", "int8"),
        ("default_init", "int8_float16"),
        ("untied_no_generation", None),
        ("untied_no_generation", "int8_bfloat16"),
        ("float16", None),
        ("float16", "int8"),
        ("bfloat16", None),
        ("bfloat16", "float16"),
        ("sharded", "float16"),
        ("torch_bin", None),
        ("torch_bin_sharded", "int8_float16"),
        ("turbo_shape", None),
        ("turbo_shape", "int8"),
    ],
)
def test_every_input_is_the_converters(
    models: dict[str, Path], tmp_path: Path, model: str, quantization: str | None
) -> None:
    _same_folder(*_both(models, tmp_path, model, quantization))


def test_the_command_line_converter_matches_the_in_process_one(models: dict[str, Path], tmp_path: Path) -> None:
    """ct2-transformers-converter itself (int8_float16: where its command line differs from its API)."""
    theirs = tmp_path / "cli"
    command = [sys.executable, "-c", "from ctranslate2.converters.transformers import main; main()"]
    subprocess.run(
        [*command, "--model", models["tiny"], "--output_dir", theirs, "--quantization", "int8_float16"]
        + ["--copy_files", *ct2_models.COPIED],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    mine = tmp_path / "mine"
    run_cli("fuse", models["tiny"], mine, "--target", "ctranslate2", "--quantization", "int8_float16", check=0)
    _same_folder(mine, theirs)


@pytest.mark.parametrize(("quantization", "compute"), [(None, "float32"), ("int8", "int8"), ("float16", "float32")])
def test_ctranslate2_generates_the_same_tokens(
    models: dict[str, Path], tmp_path: Path, quantization: str | None, compute: str
) -> None:
    import ctranslate2

    features = ctranslate2.StorageView.from_array(np.random.default_rng(0).standard_normal((1, 80, 3000), np.float32))
    prompt = [["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]]
    results = []
    for folder in _both(models, tmp_path, "tiny", quantization):
        whisper = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type=compute)
        results.append(whisper.generate(features, prompt, max_length=12, beam_size=2)[0].sequences_ids)
    assert results[0] == results[1]
    assert len(results[0][0]) > 0


def test_an_openai_pt_with_tokenizer_from_is_the_converters_hf_folder(models: dict[str, Path], tmp_path: Path) -> None:
    pt = ct2_models.save_openai_pt(models["tiny"], tmp_path / "tiny.pt")
    theirs = ct2_models.convert(models["tiny"], tmp_path / "theirs", "float16")
    mine = tmp_path / "mine"
    run_cli(
        "fuse",
        pt,
        mine,
        "--target",
        "ctranslate2",
        "--quantization",
        "float16",
        "--tokenizer-from",
        models["tiny"],
        check=0,
    )
    _same_folder(mine, theirs)


def test_a_pt_without_tokenizer_from_names_the_option(models: dict[str, Path], tmp_path: Path) -> None:
    pt = ct2_models.save_openai_pt(models["tiny"], tmp_path / "tiny.pt")
    with pytest.raises(FuseError, match=r"config\.json: not found.*--tokenizer-from"):
        fuse_file(pt, tmp_path / "out", target="ctranslate2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["tokenizer.json", "preprocessor_config.json"])
def test_a_folder_without_a_file_the_model_needs_names_it(
    models: dict[str, Path], tmp_path: Path, missing: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for path in models["tiny"].iterdir():
        if path.name != missing:
            (folder / path.name).write_bytes(path.read_bytes())
    result = run_cli("fuse", folder, tmp_path / "out", "--target", "ctranslate2", check=1)
    assert f"{missing}: not found" in result.stderr and "--tokenizer-from" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_non_whisper_checkpoint_names_the_supported_families(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    sd = {f"model.layers.0.self_attn.{p}_proj.weight": np.zeros((4, 4), np.float32) for p in "qkv"}
    save_file(sd, tmp_path / "llama.safetensors")
    with pytest.raises(FuseError, match=r"'ctranslate2'.*supports \['hf-whisper', 'openai-whisper'\]"):
        fuse_file(tmp_path / "llama.safetensors", tmp_path / "out", target="ctranslate2")


def test_ctranslate2_options_are_refused_elsewhere(tmp_path: Path) -> None:
    with pytest.raises(FuseError, match="quantization='int8' is for target 'ctranslate2', not 'fastfuse'"):
        fuse_file(tmp_path / "x.safetensors", tmp_path / "out.safetensors", quantization="int8")
    with pytest.raises(FuseError, match=r"quantization 'int4': expected one of \['float32'"):
        fuse_file(tmp_path / "x.safetensors", tmp_path / "out", target="ctranslate2", quantization="int4")


def test_an_existing_folder_is_kept_unless_forced(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FuseError, match="exists; pass --force"):
        fuse_file(models["tiny"], out, target="ctranslate2")
    assert (out / "old.txt").exists()
    fuse_file(models["tiny"], out, target="ctranslate2", overwrite_destination=True)
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def test_a_failure_while_writing_leaves_no_folder(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastfuse.sinks import ctranslate2_writer

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ctranslate2_writer, "int8_rows", broken)
    with pytest.raises(OSError, match="disk full"):
        fuse_file(models["tiny"], tmp_path / "out", target="ctranslate2", quantization="int8")
    assert list(tmp_path.iterdir()) == []


def test_verify_recomputes_a_ctranslate2_folder_and_names_a_corrupted_variable(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from fastfuse import verify
    from fastfuse.formats.ctranslate2_bin import read_model_bin

    for quantization in (None, "int8_float16"):
        out = tmp_path / f"out-{quantization}"
        fuse_file(models["tiny"], out, target="ctranslate2", quantization=quantization)
        assert verify(out, source=models["tiny"]) == []
        with pytest.raises(FuseError, match="keeps no originals; pass the checkpoint"):
            verify(out)
    name = "decoder/layer_1/attention/linear_1/weight"  # a fused k|v
    _, _, data = read_model_bin(out / "model.bin").variables[name]
    offset = bytes((out / "model.bin").read_bytes()).find(bytes(data))
    corrupted = bytearray((out / "model.bin").read_bytes())
    corrupted[offset + 5] ^= 1
    (out / "model.bin").write_bytes(bytes(corrupted))
    assert verify(out, source=models["tiny"]) == [name]
    result = run_cli("verify", out, "--source", models["tiny"], check=1)
    assert name in result.stdout + result.stderr
