"""GPU section of the report: whisper large-v3 f16 onto ``cuda:0`` (skipped without CUDA).

Ratios to baselines measured in the same run: the pipelined pinned-read limit (8 threads
pread 64 MB chunks into pinned memory, each copied up on its own stream), safetensors
``load_file(device=)``, each min of ``ROUNDS``; fresh processes (clock from before the import
of the loader, torch and CUDA initialised first); cold page cache (root: drop_caches before
each round); tensor-parallel ranks loaded alone. Run: ``python bench/gpu_report.py [--json F]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROUNDS = 4


def _sync_time(run):  # type: ignore[no-untyped-def]
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del result
    return seconds


def limit(path: Path) -> None:
    """Every byte read once (8 threads, 64 MB chunks, pinned) and copied up once."""
    import torch

    size = path.stat().st_size
    chunk = 64 << 20
    out = torch.empty(size, dtype=torch.uint8, device="cuda")
    host = torch.empty(8 * chunk, dtype=torch.uint8, pin_memory=True)
    streams = [torch.cuda.Stream() for _ in range(8)]
    fd = os.open(path, os.O_RDONLY)

    def lane(n: int) -> None:
        view = memoryview(host[n * chunk : (n + 1) * chunk].numpy())
        for start in range(n * chunk, size, 8 * chunk):
            got = os.preadv(fd, [view[: min(chunk, size - start)]], start)
            with torch.cuda.stream(streams[n]):
                out[start : start + got].copy_(host[n * chunk : n * chunk + got], non_blocking=True)
            streams[n].synchronize()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lane, range(8)))
    os.close(fd)


def best(run, rounds: int = ROUNDS, setup=None) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        if setup:
            setup()
        times.append(_sync_time(run))
    return min(times)


FRESH = """
import sys, time, torch
torch.empty(1, device="cuda"); torch.cuda.synchronize()
start = time.perf_counter()
{code}
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def fresh(code: str, rounds: int = ROUNDS, setup=None) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        if setup:
            setup()
        done = subprocess.run(
            [sys.executable, "-c", FRESH.format(code=code)], capture_output=True, text=True, check=True
        )
        times.append(float(done.stdout.split()[-1]))
    return min(times)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> dict[str, object]:
    import torch
    from safetensors.torch import load_file

    import fastfuse
    from fastfuse.formats.checkpoint import open_checkpoint
    from fastfuse.loading import _fusion_plan
    from fastfuse.staging.transfer_plan import plan_transfer

    path = harness.checkpoint_file("large-v3", "float16")
    harness.warm_page_cache(path)
    p = str(path)
    rows: dict[str, object] = {"device": torch.cuda.get_device_name(0), "file_bytes": path.stat().st_size}
    limit(path)
    fastfuse.load(p, device="cuda")  # first use: streams, kernels
    t = {
        "limit": best(lambda: limit(path)),
        "load_file": best(lambda: load_file(p, device="cuda:0")),
        "fastfuse": best(lambda: fastfuse.load(p, device="cuda:0")),
        "fastfuse-vllm": best(lambda: fastfuse.load(p, device="cuda:0", target="vllm")),
        "fastfuse-no-originals": best(lambda: fastfuse.load(p, device="cuda:0", keep_originals=False)),
    }
    rows["in_process"] = t
    rows["fresh"] = {
        "load_file": fresh(f"from safetensors.torch import load_file; r = load_file({p!r}, device='cuda:0')"),
        "fastfuse": fresh(f"import fastfuse; r = fastfuse.load({p!r}, device='cuda:0')"),
    }
    tp = {}
    whole = plan_transfer(open_checkpoint(p), _fusion_plan(open_checkpoint(p), {"target": "vllm"}))
    tp["whole"] = {"bytes": whole.bytes_read, "seconds": t["fastfuse-vllm"]}
    for n in (2, 4):
        opts = {"target": "vllm", "tp": n, "rank": n - 1, "heads": 20}
        cp = open_checkpoint(p)
        tp[f"rank {n - 1} of {n}"] = {
            "bytes": plan_transfer(cp, _fusion_plan(cp, opts)).bytes_read,
            "seconds": best(lambda opts=opts: fastfuse.load(p, device="cuda:0", **opts)),
        }
    rows["tp"] = tp
    if os.geteuid() == 0:
        rows["cold"] = {
            "limit": best(lambda: limit(path), 2, drop_caches),
            "load_file": fresh(
                f"from safetensors.torch import load_file; r = load_file({p!r}, device='cuda:0')", 2, drop_caches
            ),
            "fastfuse": fresh(f"import fastfuse; r = fastfuse.load({p!r}, device='cuda:0')", 2, drop_caches),
        }
        harness.warm_page_cache(path)
    rows["profile"] = profile(p)
    return rows


def profile(p: str) -> dict[str, float]:
    """Where one in-process load's time goes (warm cache), phase by phase."""
    import torch

    from fastfuse import torch_bridge
    from fastfuse.formats.checkpoint import open_checkpoint
    from fastfuse.kernels.cuda_engine import CudaDestination
    from fastfuse.loading import _fusion_plan
    from fastfuse.staging.pipeline import StagingConfig, _Lanes, chunks
    from fastfuse.staging.transfer_plan import plan_transfer

    out: dict[str, float] = {}
    clock = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal clock
        torch.cuda.synchronize()
        now = time.perf_counter()
        out[name] = (now - clock) * 1e3
        clock = now

    cp = open_checkpoint(p)
    mark("header ms")
    transfer = plan_transfer(cp, _fusion_plan(cp, {}))
    mark("plan ms")
    config = StagingConfig.from_environment()
    dest = CudaDestination(torch.device("cuda:0"), config.lanes, config.slots, torch_bridge.torch_dtype)
    mark("streams ms")
    dest.allocate(transfer.arena_bytes, transfer.scratch_bytes)
    mark("device alloc ms")
    host = dest.staging(config.lanes * config.slots * config.chunk_bytes)
    mark("pinned alloc ms")
    files = [(os.open(f.path, os.O_RDONLY), f.path) for f in cp.files]
    lanes = _Lanes(dest, host, config, files)
    stage = transfer.stages[0]
    lanes.run(chunks(stage.pieces, config.chunk_bytes))
    mark("read+upload ms")
    dest.run_moves(stage.moves, config.lanes)
    mark("moves ms")
    dest.results(transfer.placements)
    mark("carve ms")
    dest.close()
    return out


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: GPU section skipped")
        raise SystemExit(0)
    result = main()
    text = json.dumps(result, indent=1)
    print(text)
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(text)
