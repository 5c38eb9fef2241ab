"""The engine policy, in fresh processes: numpy until the kernels are loaded, loading in the
background once the process has seen enough work, a hand-over in the middle of a call, threads,
``fastfuse warmup`` and numba's cache, read-only installs. Results are checked against numpy
references at every step; no test asserts a wall time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, *, cache: Path | str | None, engine: str | None = None, timeout: float = 120, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (numba cache at ``cache``); its stdout. Fails loudly."""
    environment = {k: v for k, v in os.environ.items() if k not in ("FASTFUSE_ENGINE", "NUMBA_CACHE_DIR")}
    environment |= {"PYTHONWARNINGS": "error", **env}
    if cache is not None:
        environment["NUMBA_CACHE_DIR"] = str(cache)
    if engine is not None:
        environment["FASTFUSE_ENGINE"] = engine
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def warm_cache() -> Iterator[Path]:
    """A numba cache filled once by ``fastfuse warmup`` (what an image build does)."""
    with tempfile.TemporaryDirectory(prefix="fastfuse-numba-") as folder:
        run("from fastfuse.cli.main import main; raise SystemExit(main(['warmup']))", cache=folder, timeout=300)
        yield Path(folder)


PER_LAYER_LOOP = """
    import time
    import numpy as np
    import fastfuse
    from fastfuse.kernels import engine as kernel_engine
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((512, 512)).astype(np.float32) for _ in range(3)]  # 3 MB per call
    expected = np.concatenate([p.T for p in parts], axis=1)
    out = np.empty(expected.shape, expected.dtype)
    used = []
    deadline = time.monotonic() + 240  # for the compile; once the kernels are ready, 3 calls more at most
    calls_since_ready = 0
    while time.monotonic() < deadline and calls_since_ready < 3:
        calls_since_ready += bool(kernel_engine.status()["ready"])
        before = kernel_engine.status()["copies_run"]["numba"]
        out.fill(np.nan)
        fastfuse.transpose_concat(parts, out=out)
        assert np.array_equal(out, expected)
        used.append("numba" if kernel_engine.status()["copies_run"]["numba"] > before else "numpy")
    print(json.dumps({"used": used, "status": kernel_engine.status()}, default=str))
"""


@pytest.mark.parametrize("cache_state", ["warm", "cold"])
def test_a_per_layer_loop_reaches_the_kernels(cache_state: str, warm_cache: Path, tmp_path: Path) -> None:
    """Small calls run on numpy while the process has seen little work, then switch for good."""
    cache = warm_cache if cache_state == "warm" else tmp_path / "empty-cache"
    report = json.loads(run("import json\n" + textwrap.dedent(PER_LAYER_LOOP), cache=cache, timeout=300))
    used = report["used"]
    first_kernel = used.index("numba")
    # 32 MB of output before loading starts: at least ten 3 MB calls on numpy first
    assert first_kernel >= 10 and set(used[:first_kernel]) == {"numpy"}
    assert used[-3:] == ["numba"] * 3 and set(used[first_kernel:]) == {"numba"}, used  # never back to numpy
    assert report["status"]["ready"] == [[0, 4]] and report["status"]["failure"] is None


def test_a_first_small_job_never_imports_numba(tmp_path: Path) -> None:
    """A whisper-tiny fuse (14 MB of QKV) costs what numpy costs: numba is not even imported."""
    code = """
        import sys
        import numpy as np
        import fastfuse
        from fastfuse.kernels import engine as kernel_engine
        from fastfuse.cli.demo import whisper_checkpoint
        tensors = whisper_checkpoint("tiny", np.float16)
        fused = fastfuse.fuse(tensors)
        w = fused["fused.enc.3.self_attn.qkv.weight"]
        parts = [tensors[f"model.encoder.layers.3.self_attn.{p}_proj.weight"] for p in "qkv"]
        assert np.array_equal(w, np.concatenate([p.T for p in parts], axis=1))
        print("numba" in sys.modules, kernel_engine.status()["copies_run"]["numba"])
    """
    assert run(code, cache=tmp_path) == "False 0\n"


def test_a_big_call_hands_its_remaining_copies_to_the_kernels(tmp_path: Path) -> None:
    """The kernels become ready during a call (here: right after its first group; the cache is
    empty, so the call did not wait for them): the rest of that call runs on them, and the whole
    result is still exact."""
    code = """
        import numpy as np
        from fastfuse.kernels import engine as kernel_engine
        from fastfuse.kernels import kernel_loader, numpy_engine
        from fastfuse.kernels.regions import Copy
        numpy_move = numpy_engine.move_with_numpy

        def first_group_then_ready(copies):
            numpy_move(copies)
            kernel_loader.load_here({(0, 2)})  # what the loader thread does, at a known moment

        numpy_engine.move_with_numpy = first_group_then_ready
        rng = np.random.default_rng(1)
        parts = [rng.integers(0, 2**16, size=(3000, 2000), dtype=np.uint16).view(np.float16) for _ in range(3)]
        out = np.full((2000, 9000), np.nan, np.float16)  # 36 MB: past the 32 MB threshold alone
        kernel_engine.run_copies([Copy.of(p, out[:, 3000 * j : 3000 * (j + 1)].T) for j, p in enumerate(parts)])
        expected = np.concatenate([p.T for p in parts], axis=1)
        print(np.array_equal(out.view(np.uint16), expected.view(np.uint16)), kernel_engine.status()["copies_run"])
    """
    assert run(code, cache=tmp_path) == "True {'numba': 2, 'numpy': 1}\n"


def test_a_big_call_waits_for_kernels_the_cache_holds(warm_cache: Path) -> None:
    """With a warm cache, a call worth the kernels waits for them (about half a second) rather
    than running on numpy meanwhile; a small call never does."""
    code = """
        import numpy as np
        from fastfuse import transpose_concat
        from fastfuse.kernels import engine as kernel_engine
        small = [np.ones((256, 256), np.float32)] * 3  # 0.75 MB
        assert np.array_equal(transpose_concat(small), np.concatenate([p.T for p in small], 1))
        big = [np.ones((2048, 2048), np.float32)] * 3  # 48 MB
        assert np.array_equal(transpose_concat(big), np.concatenate([p.T for p in big], 1))
        print(kernel_engine.status()["copies_run"])
    """
    assert run(code, cache=warm_cache) == "{'numba': 3, 'numpy': 3}\n"  # a copy per part


def test_no_deadlock_and_exact_results_while_the_kernels_compile(tmp_path: Path) -> None:
    """Threads fuse in auto mode while the loader compiles (cold cache) and another thread asks
    for a kernel synchronously (what FASTFUSE_ENGINE=numba does): everything finishes, exactly."""
    code = """
        import threading
        import time
        import numpy as np
        import fastfuse
        from fastfuse.kernels import kernel_loader
        fastfuse.warm_up(wait=False)  # the loader thread starts compiling every kernel
        errors = []

        def fuse_repeatedly(seed):
            try:
                rng = np.random.default_rng(seed)
                for _ in range(20):
                    parts = [rng.standard_normal((96, 80)).astype(np.float16) for _ in range(3)]
                    got = fastfuse.transpose_concat(parts, dtype="float32")
                    assert np.array_equal(got, np.concatenate([p.T for p in parts], 1).astype(np.float32))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=fuse_repeatedly, args=(s,)) for s in range(3)]
        threads.append(threading.Thread(target=kernel_loader.load_here, args=({(0, 2), (1, 2)},)))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 240
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        print("ok")
    """
    assert run(code, cache=tmp_path, timeout=300) == "ok\n"


EXIT_SCRIPT = """
    import json, os, time, fastfuse
    from fastfuse.kernels import engine as kernel_engine, kernel_loader
    fastfuse.warm_up(wait=False)
    deadline = time.monotonic() + 240
    while kernel_engine.status()["phase"] not in {phases!r} and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep({delay})
    child = kernel_loader.state.child
    print(json.dumps({{"phase": kernel_engine.status()["phase"], "child": child and child.pid}}))
"""


def exit_at(delay: float, phases: tuple[str, ...], cache: Path, cpu: str) -> tuple[str, int | None]:
    """A fresh process starts the background compile, waits for a loader phase, then ``delay``
    seconds, and exits: it must exit 0 and quietly (no LLVM assertion), its compiling child gone."""
    env = {} if cpu == "host" else {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ""}  # features: the CPU's own
    report = json.loads(run(EXIT_SCRIPT.format(phases=phases, delay=delay), cache=cache, timeout=300, **env))
    if report["child"] is not None:  # reaped by the exit hook: no such process, or not ours any more
        status = Path(f"/proc/{report['child']}/status")
        assert not status.exists() or "fastfuse" not in Path(f"/proc/{report['child']}/cmdline").read_text()
    return report["phase"], report["child"]


@pytest.mark.parametrize("cpu", ["host", "haswell"])
def test_exiting_at_any_moment_of_the_kernels_compile_is_clean(cpu: str, tmp_path: Path) -> None:
    """The whole compile window, each moment in a fresh process, two at a time: from the start
    through the child's compile (empty caches), the moment the loader starts loading from the
    cache it filled and after everything is ready (empty caches), then through loading itself
    (fresh processes on the cache just filled)."""
    started = ("starting", "compiling in a child", "loading", "idle")
    caches = iter(tmp_path / f"cache-{n}" for n in range(100))
    during_compile = [(d, started, next(caches)) for d in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)]
    warm = next(caches)
    around_loading = [(0.0, ("loading",), next(caches)), (0.0, ("idle",), warm)]
    during_loading = [(d, started, warm) for d in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.1, 1.5, 2.5)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        phases = list(pool.map(lambda case: exit_at(*case, cpu=cpu), during_compile + around_loading))
        assert phases[-2][0] == "loading" and phases[-1][0] == "idle", phases  # the window was reached
        assert phases[0][0] in {"starting", "compiling in a child"} and phases[3][1] is not None, phases
        phases += pool.map(lambda case: exit_at(*case, cpu=cpu), during_loading)
    assert {"loading", "idle"} <= {phase for phase, _ in phases[-len(during_loading) :]}, phases


def test_warmup_fills_the_cache_for_the_next_process(warm_cache: Path) -> None:
    code = """
        import json, numpy as np, fastfuse
        from fastfuse.kernels import engine as kernel_engine
        from fastfuse.kernels import kernel_cache
        fastfuse.warm_up()
        print(json.dumps(kernel_cache.hits()))
    """
    hits = json.loads(run(code, cache=warm_cache))
    assert hits == {"driver": 1, "copy-1": 1, "copy-2": 1, "copy-4": 1, "copy-8": 1, "widen-2": 1}


def test_warmup_command(warm_cache: Path) -> None:
    out = run("from fastfuse.cli.main import main; raise SystemExit(main(['warmup', '--json']))", cache=warm_cache)
    report = json.loads(out)
    assert report["kernels"] == ["copy-1", "copy-2", "copy-4", "copy-8", "widen-2"]
    assert report["cache"].startswith(str(warm_cache)) and any(Path(report["cache"]).iterdir())


def test_unknown_engine_is_a_clear_error(tmp_path: Path) -> None:
    code = """
        import numpy as np, fastfuse
        try:
            fastfuse.transpose_concat([np.ones((2, 2))])
        except fastfuse.FuseError as e:
            print(e)
    """
    assert run(code, cache=tmp_path, engine="cuda") == (
        "FASTFUSE_ENGINE='cuda': expected one of ['auto', 'numba', 'numpy']\n"
    )


def test_numpy_engine_never_loads_numba(tmp_path: Path) -> None:
    code = """
        import sys, numpy as np, fastfuse
        parts = [np.ones((4096, 4096), np.float32)] * 3  # 200 MB: would load the kernels in auto mode
        fastfuse.transpose_concat(parts)
        print("numba" in sys.modules)
    """
    assert run(code, cache=tmp_path, engine="numpy") == "False\n"


# ---------------------------------------------------------------------------------------------
# A read-only install: the package where nobody may write, run as an unprivileged user.

AS_NOBODY = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to nobody with setpriv"
)


def as_nobody(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", textwrap.dedent(code)]
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "FASTFUSE_ENGINE", "HOME")}
    return subprocess.run(argv, check=False, capture_output=True, text=True, env={**base, **env}, timeout=300, cwd="/")


@pytest.fixture
def read_only_install() -> Iterator[Path]:
    """A copy of the package in a folder nobody can write to (site-packages of an image)."""
    with tempfile.TemporaryDirectory(prefix="fastfuse-ro-") as folder:
        base = Path(folder)
        shutil.copytree(ROOT / "fastfuse", base / "site" / "fastfuse", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [base, *base.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield base / "site"
        finally:
            for path in [base, *base.rglob("*")]:
                path.chmod(0o755)


KERNEL_CHECK = """
    import json, sys, numpy as np, fastfuse
    from fastfuse.kernels import engine as kernel_engine
    from fastfuse.kernels import kernel_cache
    assert fastfuse.__file__.startswith({site!r})
    got = fastfuse.transpose_concat([np.arange(12, dtype=np.float32).reshape(3, 4)])
    assert np.array_equal(got, np.arange(12, dtype=np.float32).reshape(3, 4).T)
    print(json.dumps({{"cache": kernel_cache.location(), "hits": kernel_cache.hits()}}))
"""


@AS_NOBODY
def test_read_only_install_caches_in_the_users_home(read_only_install: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fastfuse-home-") as home:
        os.chmod(home, 0o777)
        env = {"PYTHONPATH": str(read_only_install), "HOME": home, "FASTFUSE_ENGINE": "numba"}
        first = as_nobody(KERNEL_CHECK.format(site=str(read_only_install)), env)
        assert first.returncode == 0, first.stderr[-3000:]
        report = json.loads(first.stdout)
        assert report["cache"].startswith(os.path.join(home, ".cache", "numba"))
        second = json.loads(as_nobody(KERNEL_CHECK.format(site=str(read_only_install)), env).stdout)
        assert all(n >= 1 for n in second["hits"].values()), second  # loaded, not compiled again


@AS_NOBODY
def test_read_only_install_with_numba_cache_dir(read_only_install: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fastfuse-cache-") as cache:
        os.chmod(cache, 0o777)
        env = {"PYTHONPATH": str(read_only_install), "HOME": "/nonexistent", "NUMBA_CACHE_DIR": cache}
        result = as_nobody(KERNEL_CHECK.format(site=str(read_only_install)), {**env, "FASTFUSE_ENGINE": "numba"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["cache"].startswith(cache)


@AS_NOBODY
def test_nowhere_to_cache_still_works(read_only_install: Path) -> None:
    """No writable cache folder at all: the kernels compile in memory instead of failing."""
    env = {"PYTHONPATH": str(read_only_install), "HOME": "/nonexistent", "FASTFUSE_ENGINE": "numba"}
    result = as_nobody(KERNEL_CHECK.format(site=str(read_only_install)), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["cache"] is None
    code = "from fastfuse.kernels import engine as kernel_engine, kernel_loader; kernel_loader.load_here({(0, 1)}); print(kernel_engine.cache_report())"
    report = as_nobody(code, env)
    assert report.stdout == "{'cache': None, 'kernels': ['copy-1']}\n", report.stderr
