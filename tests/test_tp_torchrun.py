"""The tensor-parallel load as engines run it: one process per rank under ``torchrun``, each
loading only its rank (``bench/tp_multi_gpu.py``), checked against an independent split and an
all-gather. CI has no GPU, so here the ranks run on the CPU with the gloo backend; the same
script runs one rank per GPU where several exist."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "tp_multi_gpu.py"


@pytest.mark.parametrize(("model", "ranks"), [("llama-tiny", 4), ("whisper-tiny", 2)])
def test_every_rank_loads_its_share(tmp_path: Path, model: str, ranks: int) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torch ships torchrun"
    env = os.environ | {"FASTFUSE_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    argv = [torchrun, "--standalone", "--nproc-per-node", str(ranks), str(SCRIPT)]
    argv += ["--device", "cpu", "--model", model, "--check-only"]
    # Its own session, so that a timeout ends torchrun's workers too (they would hold their ports).
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as run:
        try:
            stdout, stderr = run.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            stdout, stderr = run.communicate()
    done = subprocess.CompletedProcess(argv, run.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["mismatches"] for r in report["per_rank"]] == [[]] * ranks
