"""The real ``fastfuse`` command in a subprocess: exit codes, output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_whisper_shapes, random_tensors, run_cli
from safetensors.numpy import save_file


def fastfuse(*args: str | Path, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, check=check)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "whisper.safetensors"
    save_file(random_tensors(hf_whisper_shapes(16, 2, 2, 30), np.float16), str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("command", [[], ["fuse"], ["inspect"], ["verify"], ["unfuse"], ["demo"], ["warmup"]])
def test_help_everywhere(command: list[str]) -> None:
    result = fastfuse(*command, "--help")
    assert result.stdout.startswith("usage: fastfuse")


def test_help_says_what_each_argument_is() -> None:
    fuse = " ".join(fastfuse("fuse", "--help").stdout.split())
    assert "destination: a new .safetensors file; a folder (no .safetensors suffix) with --tp" in fuse
    assert "--overwrite allow fused keys the input already holds to be replaced" in fuse
    assert "--target {fastfuse,vllm,ctranslate2}" in fuse
    assert "or --target ctranslate2 (a CTranslate2 model folder)" in fuse
    unfuse = " ".join(fastfuse("unfuse", "--help").stdout.split())
    assert "src a file written by `fastfuse fuse`" in unfuse and "dst the new .safetensors file" in unfuse
    inspect = " ".join(fastfuse("inspect", "--help").stdout.split())
    assert "--tp TP tensor-parallel ranks: plan one slice per rank" in inspect and "DST" not in inspect
    demo = " ".join(fastfuse("demo", "--help").stdout.split())
    assert "--size {tiny,base,small,medium,large-v3,large-v3-turbo,distil-large-v3}" in demo


def test_usage_errors_exit_2() -> None:
    assert "the following arguments are required" in fastfuse("fuse", check=2).stderr
    assert "invalid choice" in fastfuse("frobnicate", check=2).stderr


def test_fuse_inspect_verify_unfuse(tmp_path: Path, checkpoint: Path) -> None:
    inspected = json.loads(fastfuse("inspect", checkpoint, "--json", "--cross-kv").stdout)
    assert inspected["layers"] == {"encoder_qkv": 2, "decoder_qkv": 2, "cross_kv": 2}
    assert inspected["d"] == 16 and inspected["dtype"] == "float16"
    fused = tmp_path / "fused.safetensors"
    out = fastfuse("fuse", checkpoint, fused, "--cross-kv", "--logits").stdout
    assert "scheme   hf-whisper" in out and f"wrote    {fused}" in out
    assert "ok: every fused tensor" in fastfuse("verify", fused).stdout
    dropped = tmp_path / "dropped.safetensors"
    fastfuse("fuse", checkpoint, dropped, "--drop-originals", "--quiet")
    result = fastfuse("unfuse", dropped, tmp_path / "back.safetensors", "--json")
    assert len(json.loads(result.stdout)["rebuilt"]) == 2 * 5 + 2 * 5


def test_fuse_json(tmp_path: Path, checkpoint: Path) -> None:
    result = json.loads(fastfuse("fuse", checkpoint, tmp_path / "f.safetensors", "--json", "--dtype", "float32").stdout)
    assert result["dtype"] == "float32" and result["destination"].endswith("f.safetensors")
    assert result["files"] == [str(tmp_path / "f.safetensors")]
    assert result["bytes"] == (tmp_path / "f.safetensors").stat().st_size
    sharded = json.loads(fastfuse("fuse", checkpoint, tmp_path / "shards", "--max-shard-size", "20KB", "--json").stdout)
    names = sorted(Path(p).name for p in sharded["files"])
    assert names[-1] == "model.safetensors.index.json" and len(names) > 2
    assert sharded["bytes"] == sum(Path(p).stat().st_size for p in sharded["files"])


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["inspect", "{src}"], "file "),
        (["inspect", "{src}", "--json"], "{"),
        (["fuse", "{src}", "{tmp}/out.safetensors"], "scheme"),
        (["fuse", "{src}", "{tmp}/out.safetensors", "--json"], "{"),
        (["verify", "{fused}"], "ok: "),
        (["verify", "{fused}", "--json"], "{"),
        (["unfuse", "{fused}", "{tmp}/back.safetensors", "--json"], "{"),
        (["demo"], "wrote"),
        (["demo", "--json"], "{"),
    ],
)
def test_a_closed_pipe_ends_quietly(tmp_path: Path, checkpoint: Path, command: list[str], expected: str) -> None:
    """``fastfuse ... | head -1``: the reader goes away; no error line, exit 0 or 141 (SIGPIPE)."""
    fused = tmp_path / "fused.safetensors"
    fastfuse("fuse", checkpoint, fused, "--quiet")
    argv = [arg.format(src=checkpoint, tmp=tmp_path, fused=fused) for arg in command]
    assert fastfuse(*argv).stdout.startswith(expected)  # it does print something
    (tmp_path / "out.safetensors").unlink(missing_ok=True)
    (tmp_path / "back.safetensors").unlink(missing_ok=True)
    reader, writer = os.pipe()
    os.close(reader)  # nobody will read: the first write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fastfuse", *argv],
            check=False,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(writer)
    assert result.returncode in (0, 141) and result.stderr == "", result.stderr


def test_existing_destination_without_force(tmp_path: Path, checkpoint: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"keep")
    result = fastfuse("fuse", checkpoint, dst, check=1)
    assert result.stderr.startswith("fastfuse: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and dst.read_bytes() == b"keep"
    fastfuse("fuse", checkpoint, dst, "--force", "--quiet")
    assert dst.stat().st_size > 4


@pytest.mark.parametrize("bad", ["missing.safetensors", "folder"])
def test_one_line_errors(tmp_path: Path, bad: str) -> None:
    (tmp_path / "folder").mkdir()
    result = fastfuse("inspect", tmp_path / bad, check=1)
    assert result.stderr.startswith("fastfuse: error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = fastfuse("inspect", tmp_path / "missing.safetensors", "--debug", check=1)
    assert "Traceback" in result.stderr


def test_verify_mismatch_exits_1_naming_the_key(tmp_path: Path, checkpoint: Path) -> None:
    from safetensors import safe_open

    fused = tmp_path / "fused.safetensors"
    fastfuse("fuse", checkpoint, fused, "--quiet")
    with safe_open(str(fused), framework="numpy") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not a dict)
    tensors["fused.enc.1.self_attn.qkv.bias"][0] += 1
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=metadata)
    result = fastfuse("verify", tmp_path / "tampered.safetensors", check=1)
    assert (
        result.stderr
        == "fastfuse: error: 'fused.enc.1.self_attn.qkv.bias' differs from its recomputation (1 tensor(s) differ)\n"
    )


def test_demo(tmp_path: Path) -> None:
    out = fastfuse("demo", "--out", tmp_path).stdout
    assert "verify   ok: bit-exact" in out and "concat(x @ Wq.T, x @ Wk.T, x @ Wv.T): True" in out
    assert (tmp_path / "whisper-tiny.fused.safetensors").exists()
    assert f"files    {tmp_path} (kept)" in out


def demo_in(temp: Path, *args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
    """``fastfuse demo`` with its temporary folder under ``temp``."""
    return run_cli("demo", *args, env={"TMPDIR": str(temp)}, check=check)


def test_demo_cleans_up_after_itself(tmp_path: Path) -> None:
    report = json.loads(demo_in(tmp_path, "--json").stdout)
    assert report["ok"] and report["verify_different"] == [] and report["matmul_matches"]
    assert report["kept"] is False and report["folder"].startswith(str(tmp_path)) and os.listdir(tmp_path) == []
    kept = demo_in(tmp_path, "--keep").stdout
    (folder,) = os.listdir(tmp_path)
    assert f"files    {tmp_path / folder} (kept)" in kept
    assert sorted(os.listdir(tmp_path / folder)) == ["whisper-tiny.fused.safetensors", "whisper-tiny.safetensors"]


def test_demo_with_an_unknown_size_creates_nothing(tmp_path: Path) -> None:
    result = demo_in(tmp_path, "--size", "huge", check=2)
    assert "invalid choice: 'huge'" in result.stderr and os.listdir(tmp_path) == []


def test_import_does_not_load_numba() -> None:
    code = "import sys, fastfuse, fastfuse.cli.main; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_main_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from fastfuse.cli.main import main

    assert main(["--version"]) == 0
    assert main(["fuse"]) == 2
    assert "fastfuse" in capsys.readouterr().out


def test_progress_bar_on_a_terminal_only(tmp_path: Path, checkpoint: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        process = subprocess.run(
            [sys.executable, "-m", "fastfuse", "fuse", str(checkpoint), str(tmp_path / "tty.safetensors")],
            check=False,
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            timeout=300,
        )
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0
    assert b"fuse:" in shown and b"B/s" in shown  # tqdm drew the bar on the terminal (and erased it)
    piped = fastfuse("fuse", checkpoint, tmp_path / "piped.safetensors")
    assert piped.stderr == ""
