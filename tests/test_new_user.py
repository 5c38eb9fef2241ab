"""What a new user tripped on (issue 20): each case through the real CLI where the CLI is the subject."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_whisper_shapes, random_tensors, run_cli
from safetensors.numpy import load_file, save_file

import fastfuse


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "hf"
    src.mkdir()
    save_file(random_tensors(hf_whisper_shapes(16, 2, 2, 30), np.float16), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"encoder_attention_heads": 4}))
    (src / "tokenizer.json").write_text("{}")
    return src


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a)


def test_cli_validates_tp_heads_and_unknown_options(tmp_path: Path, folder: Path) -> None:
    src = folder / "model.safetensors"
    assert (
        "--tp 0: expected a positive" in run_cli("fuse", src, tmp_path / "a.safetensors", "--tp", "0", check=1).stderr
    )
    assert not (tmp_path / "a.safetensors").exists()
    err = run_cli("fuse", src, tmp_path / "b.safetensors", "--heads", "8", check=2).stderr
    assert "--heads and --kv-heads split attention for --tp" in err
    err = run_cli("fuse", src, tmp_path / "c.safetensors", "--bogus", check=2).stderr
    assert err.startswith("usage: fastfuse fuse") and "unrecognized arguments: --bogus" in err
    assert "--overwrite" not in run_cli("inspect", "--help", check=0).stdout
    err = run_cli("fuse", src, tmp_path / "d.safetensors", "--target", "vllm", "--logits", check=1).stderr
    assert "--logits with --target vllm" in err and "layout 'out_in'" not in err


def test_cli_small_messages(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "file").write_text("")
    err = run_cli("demo", "--out", tmp_path / "file", check=1).stderr
    assert "--out" in err and "exists and is not a folder" in err and "Errno" not in err
    fused = tmp_path / "f.safetensors"
    run_cli("fuse", folder / "model.safetensors", fused, check=0)
    assert "rebuilt  nothing" in run_cli("unfuse", fused, tmp_path / "u.safetensors", check=0).stdout
    err = run_cli("fuse", folder / "model.safetensors", str(tmp_path) + "/", check=1).stderr
    assert f"pass {tmp_path}/model.safetensors" in err.splitlines()[-1] and "is a folder" in err


def test_api_messages() -> None:
    assert {"load", "verify", "unfuse", "fuse_file"} <= set(dir(fastfuse))
    with pytest.raises(fastfuse.FuseError, match="use load"):
        fastfuse.fuse("/path/base.pt")  # type: ignore[arg-type]
    torch = pytest.importorskip("torch")
    sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(2, dtype=np.float16) for p in "qkv"}
    assert fastfuse.fuse(sd, dtype=torch.float32)["fused.enc.0.self_attn.qkv.weight"].dtype == np.float32
    with pytest.raises(fastfuse.FuseError, match="'float32', 'float16' or 'bfloat16'"):
        fastfuse.fuse(sd, dtype="float33")


def test_framework_pt_without_torch_says_what_to_install(folder: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\nimport fastfuse\n"
        f"try: fastfuse.load({str(folder)!r}, framework='pt')\nexcept fastfuse.FuseError as e: print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "fastfuse[torch]"' in out


def test_tensor_parallel_folder_is_a_checkpoint(tmp_path: Path, folder: Path) -> None:
    original = load_file(str(folder / "model.safetensors"))
    for target in ("fastfuse", "vllm"):
        tp = tmp_path / f"tp-{target}"
        run_cli("fuse", folder, tp, "--tp", "2", "--target", target, "--cross-kv", check=0)
        assert (tp / "config.json").exists()
        run_cli("unfuse", tp, tmp_path / f"back-{target}.safetensors", check=0)
        assert same(load_file(str(tmp_path / f"back-{target}.safetensors")), original)
        assert "ok" in run_cli("verify", tp, "--source", folder / "model.safetensors", check=0).stdout
        rank1 = fastfuse.load(tp, rank=1)
        assert same(rank1, load_file(str(tp / "rank-1-of-2.safetensors")))
        info = json.loads(run_cli("inspect", tp, "--json", check=0).stdout)
        assert info["already_fused"] and info["tp"] == 2 and info["target"] == target
    with pytest.raises(fastfuse.FuseError, match="rank="):
        fastfuse.load(tmp_path / "tp-vllm")


def test_inspect_describes_what_fastfuse_wrote(tmp_path: Path, folder: Path) -> None:
    unfused = json.loads(run_cli("inspect", folder, "--json", check=0).stdout)
    assert unfused["opt_in"] == ["cross_kv", "logits"] and not unfused["already_fused"]
    for target in ("fastfuse", "vllm"):
        out = tmp_path / f"{target}.safetensors"
        run_cli("fuse", folder / "model.safetensors", out, "--target", target, check=0)
        info = json.loads(run_cli("inspect", out, "--json", check=0).stdout)
        assert info["already_fused"] and info["target"] == target and info["written_by_fastfuse"]
        assert info["layers"] == {"encoder_qkv": 2, "decoder_qkv": 2} and "output_bytes" not in info
        text = run_cli("inspect", out, check=0).stdout
        assert "written  by fastfuse" in text and "output   about" not in text
    shards = tmp_path / "shards"
    run_cli("fuse", folder, shards, "--max-shard-size", "20KB", check=0)
    assert len(list(shards.glob("*.safetensors"))) > 1
    info = json.loads(run_cli("inspect", shards, "--json", check=0).stdout)
    assert info["already_fused"] and info["target"] == "fastfuse" and info["written_by_fastfuse"]


def test_tensor_parallel_without_head_counts_names_the_flags(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    save_file(random_tensors(hf_whisper_shapes(16, 2, 2, 30), np.float16), str(src))  # no config.json
    err = run_cli("fuse", src, tmp_path / "tp", "--tp", "2", check=1).stderr
    assert "pass --heads (and --kv-heads for GQA)" in err and "heads=" not in err
    assert not (tmp_path / "tp").exists()


def test_model_folder_gets_config_and_tokenizer(tmp_path: Path, folder: Path) -> None:
    dst = tmp_path / "out"
    run_cli("fuse", folder, dst, check=0)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "exists" in run_cli("fuse", folder, dst, check=1).stderr


def test_openai_whisper_dims_give_head_counts(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from conftest import openai_whisper_shapes

    sd = {k: torch.from_numpy(v) for k, v in random_tensors(openai_whisper_shapes(16, 2, 30)).items()}
    dims = {"n_audio_head": 4, "n_text_head": 4, "n_audio_state": 16}
    torch.save({"dims": dims, "model_state_dict": sd}, tmp_path / "base.pt")
    run_cli("fuse", tmp_path / "base.pt", tmp_path / "tp", "--tp", "2", check=0)
    err = run_cli("fuse", tmp_path / "base.pt", tmp_path / "v.safetensors", "--target", "vllm", check=1).stderr
    assert "--target fastfuse" in err and "convert_openai_to_hf" in err


def test_a_target_without_names_for_the_naming_says_what_it_supports() -> None:
    """openai-whisper names with the vllm target: what the target supports, how to convert, the way out."""
    import numpy as np

    import fastfuse

    state = {f"encoder.blocks.0.attn.{p}.weight": np.eye(4, dtype=np.float16) for p in ("query", "key", "value")}
    expected = (
        "target='vllm' has no name for group 'encoder_qkv' of openai-whisper checkpoints; the target supports "
        "['gpt2', 'hf-llama', 'hf-phi3', 'hf-whisper'] checkpoints: convert it to one of those (vLLM loads Whisper in "
        "Hugging Face naming: convert_openai_to_hf.py in transformers); or use target='fastfuse', or in Python "
        "pass names={'encoder_qkv': ...}"
    )
    with pytest.raises(fastfuse.FuseError) as caught:
        fastfuse.plan(state, target="vllm")
    assert str(caught.value) == expected


def test_ctrl_c_while_the_originals_copy_stops_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20, 8g: a Ctrl-C during the fused computation stops the file copy of the originals
    running beside it; the chunks not started are never copied (before the fix the interrupt
    waited for the whole copy), and nothing is left behind."""
    from fastfuse.sinks import atomic, file_writer
    from fastfuse.sinks.atomic import AtomicWriter

    shapes = hf_whisper_shapes(16, 1, 1, 30)
    shapes["model.encoder.embed_positions.weight"] = (64, 1 << 14)  # 4 MiB of originals: 32 chunks
    save_file(random_tensors(shapes, np.float32), str(tmp_path / "src.safetensors"))
    monkeypatch.setattr(atomic, "_COPY_CHUNK", 128 << 10)
    started, cancelled = threading.Event(), threading.Event()
    copied: list[int] = []
    real_copy_from, real_cancel = AtomicWriter.copy_from, AtomicWriter.cancel

    def held_copy_from(self: AtomicWriter, src: int, src_offset: int, start: int, length: int) -> None:
        copied.append(length)
        started.set()
        cancelled.wait(2)  # hold each chunk until the interrupt has cancelled the copy
        real_copy_from(self, src, src_offset, start, length)

    def noted_cancel(self: AtomicWriter) -> None:
        real_cancel(self)
        cancelled.set()

    def interrupted_execute(*args: object, **kwargs: object) -> None:
        started.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(AtomicWriter, "copy_from", held_copy_from)
    monkeypatch.setattr(AtomicWriter, "cancel", noted_cancel)
    monkeypatch.setattr(file_writer, "execute", interrupted_execute)
    with pytest.raises(KeyboardInterrupt):
        fastfuse.fuse_file(tmp_path / "src.safetensors", tmp_path / "dst.safetensors")
    assert cancelled.is_set()
    assert 1 <= len(copied) <= atomic._COPY_THREADS < 32  # only the chunks in flight at the interrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
