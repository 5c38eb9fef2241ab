"""GPU section of the report: whisper large-v3 f16 onto ``cuda:0`` (skipped without CUDA).

Ratios to baselines measured in the same run: the pipelined pinned-read limit (8 threads
pread 64 MB chunks into pinned memory, each copied up on its own stream), safetensors
``load_file(device=)``, each min of ``ROUNDS``; fresh processes (clock from before the import
of the loader, torch and CUDA initialised first); cold page cache (root: drop_caches before
each round); tensor-parallel ranks loaded alone (large-v3, and a Llama shape for N = 8); the
``.pt`` file against ``torch.load(mmap=True)`` then ``.to(device)``; fastsafetensors and the Run:ai
streamer where installed. Run: ``python bench/gpu_report.py [--json F] [--staging "8,2,8;8,2,16"]``.
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


def fresh(code: str, rounds: int = ROUNDS, setup=None, env=None) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        if setup:
            setup()
        done = subprocess.run(
            [sys.executable, "-c", FRESH.format(code=code)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
        times.append(float(done.stdout.split()[-1]))
    return min(times)


def fresh_output(code: str) -> str:
    """The last line ``code`` prints in a fresh process."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


# A cold load phase by phase (the page cache dropped before): importing fastfuse reads its own
# files from the disk too, as every loader's first run after a boot does.
COLD_PROFILE = """
import json, sys, time, torch
torch.empty(1, device="cuda"); torch.cuda.synchronize()
start = time.perf_counter()
import fastfuse
imported = (time.perf_counter() - start) * 1e3
sys.path.insert(0, {bench!r})
import gpu_report
print(json.dumps({{"import fastfuse ms": imported, **gpu_report.profile({p!r})}}))
"""


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# Peers that put unfused safetensors on a GPU, as their users call them (skipped where not installed).
PEERS = {
    "fastsafetensors": (
        "fastsafetensors",
        (
            "from fastsafetensors import SafeTensorsFileLoader, SingleGroup\n"
            "loader = SafeTensorsFileLoader(SingleGroup(), torch.device('cuda:0'), nogds=True)\n"
            "loader.add_filenames({{0: [{p!r}]}})\n"
            "buffer = loader.copy_files_to_device()\n"
            "r = {{k: buffer.get_tensor(k) for k in buffer.key_to_rank_lidx}}"
        ),
    ),
    "runai-streamer": (
        "runai_model_streamer",
        (
            "from runai_model_streamer import SafetensorsStreamer\n"
            "with SafetensorsStreamer() as streamer:\n"
            "    streamer.stream_file({p!r})\n"
            "    r = {{k: t.to('cuda:0') for k, t in streamer.get_tensors()}}"
        ),
    ),
}
LOAD_FILE = "from safetensors.torch import load_file; r = load_file({p!r}, device='cuda:0')"
FASTFUSE = "import fastfuse; r = fastfuse.load({p!r}, device='cuda:0')"
TORCH_LOAD = "r = {{k: v.to('cuda:0') for k, v in torch.load({p!r}, mmap=True, weights_only=True).items()}}"


def peer(code: str, rounds: int = ROUNDS, setup=None) -> float | str:  # type: ignore[no-untyped-def]
    """:func:`fresh` for a peer's code; the last line of its error where it fails (an API change)."""
    try:
        return fresh(code, rounds, setup)
    except subprocess.CalledProcessError as e:
        return "failed: " + (e.stderr.strip().splitlines() or ["?"])[-1]


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(staging: list[str]) -> dict[str, object]:
    import torch
    from safetensors.torch import load_file

    import fastfuse

    path = harness.checkpoint_file("large-v3", "float16")
    pt = harness.torch_checkpoint_file("large-v3", "float16")
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
    harness.warm_page_cache(pt)
    t["torch.load-mmap+to"] = best(
        lambda: {k: v.to("cuda:0") for k, v in torch.load(pt, mmap=True, weights_only=True).items()}
    )
    t["fastfuse-pt"] = best(lambda: fastfuse.load(pt, device="cuda:0"))
    rows["in_process"] = t
    rows["fresh"] = {
        "load_file": fresh(LOAD_FILE.format(p=p)),
        "fastfuse": fresh(FASTFUSE.format(p=p)),
        "import fastfuse": fresh("import fastfuse"),
        "torch.load-mmap+to": fresh(TORCH_LOAD.format(p=str(pt))),
        "fastfuse-pt": fresh(FASTFUSE.format(p=str(pt))),
    }
    for name, (module, code) in PEERS.items():
        if installed(module):
            rows["fresh"][name] = peer(code.format(p=p))  # type: ignore[index]
    rows["tp"] = tensor_parallel(p, 20, t["fastfuse-vllm"], (2, 4))
    from tp_multi_gpu import checkpoint

    llama, heads, kv_heads = checkpoint("llama-medium")
    harness.warm_page_cache(llama)
    whole = best(lambda: fastfuse.load(llama, device="cuda:0", target="vllm"))
    rows["tp-llama-medium"] = tensor_parallel(str(llama), heads, whole, (2, 4, 8), kv_heads)
    if os.geteuid() == 0:
        cold = {
            "limit": best(lambda: limit(path), 2, drop_caches),
            "load_file": fresh(LOAD_FILE.format(p=p), 2, drop_caches),
            "fastfuse": fresh(FASTFUSE.format(p=p), 2, drop_caches),
        }
        for name, (module, code) in PEERS.items():
            if installed(module):
                cold[name] = peer(code.format(p=p), 2, drop_caches)
        rows["cold"] = cold
        drop_caches()
        rows["profile-cold"] = json.loads(fresh_output(COLD_PROFILE.format(bench=str(Path(__file__).parent), p=p)))
        harness.warm_page_cache(path)
    rows["staging"] = {setting: fresh(FASTFUSE.format(p=p), env={"FASTFUSE_STAGING": setting}) for setting in staging}
    rows["profile"] = profile(p)
    rows["profile-pt"] = profile(str(pt))
    return rows


def tensor_parallel(
    p: str, heads: int, whole_seconds: float, sizes: tuple[int, ...], kv_heads: int | None = None
) -> dict[str, dict[str, float]]:
    """Bytes read and time of the last rank of each ``tp`` loaded alone, against the whole load."""
    import fastfuse
    from fastfuse.formats.checkpoint import open_checkpoint
    from fastfuse.loading import _fusion_plan
    from fastfuse.staging.transfer_plan import plan_transfer

    cp = open_checkpoint(p)
    whole = plan_transfer(cp, _fusion_plan(cp, {"target": "vllm"}))
    rows = {"whole": {"bytes": whole.bytes_read, "seconds": whole_seconds}}
    for n in sizes:
        opts: dict[str, object] = {"target": "vllm", "tp": n, "rank": n - 1, "heads": heads}
        if kv_heads is not None:
            opts["kv_heads"] = kv_heads
        rows[f"rank {n - 1} of {n}"] = {
            "bytes": plan_transfer(cp, _fusion_plan(cp, opts)).bytes_read,
            "seconds": best(lambda opts=opts: fastfuse.load(p, device="cuda:0", **opts)),
        }
    return rows


def profile(p: str) -> dict[str, float]:
    """Where one in-process load's time goes, phase by phase (ms; ``cold file``: 1.0 where the
    file was found out of the page cache and read with read-ahead hints)."""
    import torch

    from fastfuse import torch_bridge
    from fastfuse.formats.checkpoint import open_checkpoint
    from fastfuse.kernels.cuda_engine import CudaDestination
    from fastfuse.loading import _fusion_plan
    from fastfuse.staging.pipeline import StagingConfig, _Lanes, chunks, mostly_uncached
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
    readahead = any(mostly_uncached(fd) for fd, _ in files)
    out["cold file"] = float(readahead)
    mark("mincore ms")
    lanes = _Lanes(dest, host, config, files)
    stage = transfer.stages[0]
    lanes.run(chunks(stage.pieces, config.chunk_bytes), readahead=readahead)
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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument(
        "--staging", default="", help="FASTFUSE_STAGING settings to compare in fresh processes (lanes,slots,MiB;...)"
    )
    args = parser.parse_args()
    result = main([s for s in args.staging.split(";") if s])
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
