"""Benchmark cases that run whole processes: file to file (the CLI, ``cp``, CTranslate2's
converter) and a loader's first call in a fresh process (warm and cold numba cache).

Builders for ``cases.GROUPS`` (``file``, ``startup``); ``file_argv`` is also what ``peers.py`` runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import (
    Impl,
    checkpoint_file,
    fresh,
    lower_peak,
    python_argv,
    scratch_file,
    torch_checkpoint_file,
    warm_page_cache,
)

TINY = "tiny"
FILE_IMPLS = {
    "safetensors": (
        "cli+sync",
        "cp+sync",
        "fuse_file",
        "copyfile+fsync",
        "numpy",
        *("ctranslate2+sync", "cli-ct2+sync", "cp-hf+sync"),
    ),
    "torch": ("cli+sync", "cp+sync"),
}


# ---------------------------------------------------------------------------------------------
# File to file, against ``cp`` + ``sync``: every byte on disk.


def _fuse_file(src: str, dst: str) -> None:
    from fastfuse.sinks.file_writer import fuse_file

    fuse_file(src, dst, overwrite_destination=True)


def _numpy_file(src: str, dst: str) -> None:
    from cases import numpy_fuse
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src)
    save_file({**tensors, **numpy_fuse(tensors)}, dst, metadata={"format": "pt"})


def _copy_fsync(src: str, dst: str) -> None:
    """A plain copy, made as durable as fastfuse's atomic writer makes its output (synced before the rename)."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_OPS: dict[str, Callable[[str, str], Any]] = {
    "fuse_file": _fuse_file,
    "copyfile+fsync": _copy_fsync,
    "numpy": _numpy_file,
}


def file_argv(op: str, src: Path, dst: Path) -> list[str]:
    """The command running file operation ``op`` alone (``cli``: the real CLI; ``cp``: coreutils)."""
    if op == "cli":
        return [sys.executable, "-m", "fastfuse", "fuse", str(src), str(dst), "--force", "--quiet"]
    if op == "cp":
        return ["cp", str(src), str(dst)]
    return python_argv(f"import file_cases; file_cases.FILE_OPS[{op!r}]({str(src)!r}, {str(dst)!r})")


def _file_impl(argv: list[str], setup: Callable[[], None], *, sync: bool, in_process: Callable[[], Any] | None) -> Impl:
    """A file operation timed with ``sync`` after it (or in this process), peak memory from a child."""
    if in_process is not None:
        run = in_process
    else:
        command = " ".join(map(_quote, argv)) + (" && sync" if sync else "")
        run = functools.partial(subprocess.run, ["sh", "-c", command], check=True, capture_output=True)
    return Impl(run, setup, functools.partial(lower_peak, argv, setup, runs=1 if harness.QUICK else 2))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def build_file(size: str, source: str) -> dict[str, Impl | None]:
    src = checkpoint_file(size, "float16") if source == "safetensors" else torch_checkpoint_file(size, "float16")
    dst = scratch_file()
    warm_page_cache(src)

    def setup() -> None:  # a fresh destination, nothing of ours left dirty
        dst.unlink(missing_ok=True)
        os.sync()

    impls: dict[str, Impl | None] = {
        "cli+sync": _file_impl(file_argv("cli", src, dst), setup, sync=True, in_process=None),
        "cp+sync": _file_impl(file_argv("cp", src, dst), setup, sync=True, in_process=None),
    }
    for op in FILE_IMPLS[source]:
        if op in FILE_OPS:
            run = functools.partial(FILE_OPS[op], str(src), str(dst))
            impls[op] = _file_impl(file_argv(op, src, dst), setup, sync=False, in_process=run)
    if "ctranslate2+sync" in FILE_IMPLS[source]:
        impls |= _ctranslate2(size, setup)
    return impls


def _ctranslate2(size: str, setup: Callable[[], None]) -> dict[str, Impl | None]:
    """CTranslate2's converter (what faster-whisper users run), the CLI's ``--target ctranslate2``
    on the same model folder (both float16), and ``cp`` of the folder's weights file; each + ``sync``."""
    import peers

    if not peers.ctranslate2_available():
        return {"ctranslate2+sync": None, "cli-ct2+sync": None, "cp-hf+sync": None}
    from harness import cache_dir

    model = peers.whisper_model_dir(size, cache_dir())
    warm_page_cache(model / "model.safetensors")
    out = Path(tempfile.gettempdir()) / "fastfuse-bench-ct2"
    dst = scratch_file()

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        setup()

    converter = peers.ctranslate2_argv(model, out)
    cli = [*file_argv("cli", model, out), "--target", "ctranslate2", "--quantization", "float16"]
    return {
        "ctranslate2+sync": _file_impl(converter, clean, sync=True, in_process=None),
        "cli-ct2+sync": _file_impl(cli, clean, sync=True, in_process=None),
        "cp-hf+sync": _file_impl(file_argv("cp", model / "model.safetensors", dst), clean, sync=True, in_process=None),
    }


# ---------------------------------------------------------------------------------------------
# Fresh processes: the first call of a loader, with a warm and a cold numba cache.

_FIRST_FUSE = """\
import json, struct, time
raw = open({path!r}, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8 : 8 + n]); header.pop("__metadata__", None)
start = time.perf_counter()
import numpy as np
tensors = {{k: np.frombuffer(raw, "<f2", (v["data_offsets"][1] - v["data_offsets"][0]) // 2,
                             8 + n + v["data_offsets"][0]).reshape(v["shape"]) for k, v in header.items()}}
{fuse}
print(time.perf_counter() - start)
"""


def build_startup(size: str, variant: str) -> dict[str, Impl | None]:
    if variant == "load":
        path = checkpoint_file(size, "float16")
        warm_page_cache(path)
        load = f"import fastfuse; fastfuse.load({str(path)!r})"

        def cold() -> float:
            with tempfile.TemporaryDirectory(prefix="fastfuse-numba-") as empty:
                return fresh(load, {"NUMBA_CACHE_DIR": empty})[0]

        load_file = f"import safetensors.numpy; safetensors.numpy.load_file({str(path)!r})"
        return {
            "fastfuse": Impl(lambda: fresh(load)[0]),
            "fastfuse-cold": Impl(cold),
            "load_file": Impl(lambda: fresh(load_file)[0]),
        }
    path = checkpoint_file(TINY, "float16")  # always whisper-tiny: this measures import + first call

    def child(fuse: str) -> Impl:
        code = _FIRST_FUSE.format(path=str(path), fuse=fuse)
        return Impl(lambda: float(fresh(code)[1]), self_timed=True)

    return {"fastfuse": child("import fastfuse; fastfuse.fuse(tensors)"), "numpy": child("")}
