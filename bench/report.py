"""Print fastfuse's benchmark ratios as a markdown table: ``python bench/report.py``.

Runs the cases of ``cases.py`` (the ones ``pytest bench --benchmark-only`` runs) outside pytest,
after ``fastfuse warmup``: each implementation is warmed up once (not fresh processes), then timed
min-of-N, the implementations of a comparison taking turns round by round. ``--quick`` for a look
in under two minutes (whisper-small), ``--only kernel,load`` to pick groups (kernel, widen,
layouts, loop, load, torch, ptload, file, startup, codegen, scaling). ``codegen``: the kernel and
the per-layer loop under each instruction set numba generates here (``host``, ``haswell``).
``--only scaling --threads 1,2,4,8,16`` runs the thread scaling alone (about a minute; from a
copied tree: ``PYTHONPATH=. python bench/report.py ...``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import cases
import harness

Case = tuple[str, str, str]  # group, param, implementation


class Row(NamedTuple):
    """One table row: fastfuse implementation ``impl`` against ``base`` of the same group and param."""

    label: str
    group: str
    param: str
    impl: str
    base: str
    op: str = ""  # target: "<=" / "<" on the time ratio, "+<=" on the time difference (s); "" none
    value: float = 0.0
    rss: bool = False  # compare peak RssAnon instead of time; target: below ``value`` MB


F16 = "float16"
ST = "safetensors"
CT2_CP = ("cli-ct2+sync", "cp-hf+sync")  # the CLI on a Hugging Face folder, cp of its weights
ROWS = [
    *[
        row
        for dt in cases.DTYPES
        for row in [
            Row(
                f"kernel {dt} vs memcpy", "kernel", dt, "fastfuse", "memcpy", *(("<=", 1.5) if dt != "bfloat16" else ())
            ),
            Row(f"kernel {dt} vs original loop (serial)", "kernel", dt, "fastfuse", "serial", "<=", 1 / 4),
            Row(f"kernel {dt} vs numpy", "kernel", dt, "fastfuse", "numpy", "<=", 1 / 3),
            Row(f"kernel {dt} vs torch", "kernel", dt, "fastfuse", "torch", "<", 1.0),
        ]
    ],
    *[Row(f"widen {dt}->f32 vs numpy astype", "widen", dt, "fastfuse", "numpy") for dt in (F16, "bfloat16")],
    *[
        Row(f"GQA qkv f16, layout {layout} vs memcpy", "layouts", layout, "fastfuse", "memcpy", "<=", 1.5)
        for layout in ("in_out", "out_in")
    ],
    *[
        row
        for dt in ("float32", F16)
        for row in [
            Row(f"per-layer loop {dt}, fresh process, first pass vs memcpy", "loop", dt, "first-loop", "memcpy"),
            Row(f"per-layer loop {dt}, steady state vs memcpy", "loop", dt, "steady", "memcpy", "<=", 1.5),
        ]
    ],
    Row("load vs load_file", "load", F16, "fastfuse", "load_file", "<=", 0.5),
    Row("load vs safe_open + numpy fusion", "load", F16, "fastfuse", "safe_open+numpy"),
    Row(
        "load peak RssAnon (the fused tensors are new memory) vs load_file",
        "load",
        F16,
        "fastfuse",
        "load_file",
        rss=True,
    ),
    Row("load(framework='pt') vs safetensors.torch.load_file (lazy map)", "torch", F16, "fastfuse-pt", "load_file-pt"),
    Row("load(framework='pt') vs safe_open('pt'), every tensor", "torch", F16, "fastfuse-pt", "safe_open-pt"),
    Row("load(framework='pt') peak RssAnon (vs load_file)", "torch", F16, "fastfuse-pt", "load_file-pt", rss=True),
    Row("load(framework='pt') peak RssAnon (vs safe_open)", "torch", F16, "fastfuse-pt", "safe_open-pt", rss=True),
    *[
        row
        for pt, name in ((F16, "pytorch_model.bin"), ("openai-float16", "openai-whisper .pt"))
        for row in [
            Row(
                f"load of a {name} vs torch.load(mmap=True) + torch fusion",
                "ptload",
                pt,
                "fastfuse",
                "torch.load-mmap+fusion",
                "<=",
                0.5,
            ),
            Row(
                f"load of a {name} vs torch.load(mmap=True) alone",
                "ptload",
                pt,
                "fastfuse",
                "torch.load-mmap",
                "<=",
                1.0,
            ),
            Row(
                f"parse of a {name}'s data.pkl alone (vs torch.load(mmap=True))",
                "ptload",
                pt,
                "parse",
                "torch.load-mmap",
            ),
            Row(f"load of a {name}: peak RssAnon", "ptload", pt, "fastfuse", "torch.load-mmap", rss=True),
        ]
    ],
    Row("file: CLI + sync vs cp + sync", "file", ST, "cli+sync", "cp+sync", "<=", 1.3),
    Row("file: CLI on a torch.save file + sync vs cp + sync", "file", "torch", "cli+sync", "cp+sync", "<=", 1.3),
    Row("file: fuse_file vs copyfile + fsync (in process)", "file", ST, "fuse_file", "copyfile+fsync"),
    Row("file: fuse_file vs numpy pipeline", "file", ST, "fuse_file", "numpy"),
    Row("file: CLI peak RssAnon (vs cp)", "file", ST, "cli+sync", "cp+sync", "<", 256, rss=True),
    Row("file: CLI on a torch file, peak RssAnon", "file", "torch", "cli+sync", "cp+sync", "<", 256, rss=True),
    Row("file: fuse_file peak RssAnon (vs numpy pipeline)", "file", ST, "fuse_file", "numpy", rss=True),
    Row(
        "file: CLI --target ctranslate2 vs CTranslate2's converter, + sync",
        "file",
        ST,
        "cli-ct2+sync",
        "ctranslate2+sync",
    ),
    Row("file: CLI --target ctranslate2 vs cp + sync of the folder's weights", "file", ST, *CT2_CP, "<=", 1.3),
    Row("file: CLI --target ctranslate2 peak RssAnon (vs cp)", "file", ST, *CT2_CP, "<", 256, rss=True),
    Row("file: CTranslate2's converter peak RssAnon (vs cp)", "file", ST, "ctranslate2+sync", "cp-hf+sync", rss=True),
    Row("file: CTranslate2's converter + sync vs cp + sync", "file", ST, "ctranslate2+sync", "cp-hf+sync"),
    Row("fresh process: load vs load_file (warm compile cache)", "startup", "load", "fastfuse", "load_file", "<=", 0.5),
    Row(
        "fresh process: load vs load_file (cold compile cache)",
        "startup",
        "load",
        "fastfuse-cold",
        "load_file",
        "<=",
        1.0,
    ),
    Row("fresh process: import + first tiny fuse vs import numpy", "startup", "fuse", "fastfuse", "numpy", "+<=", 0.15),
    *[
        row
        for cg in cases.CODEGENS
        for dt in cases.DTYPES
        for row in [
            Row(f"kernel {dt}, {cg} code vs memcpy", "codegen", f"{cg}/{dt}", "kernel", "memcpy", "<=", 1.0),
            Row(f"per-layer loop {dt}, {cg} code, steady state vs memcpy", "codegen", f"{cg}/{dt}", "loop", "memcpy"),
        ]
    ],
]


def scaling_rows() -> list[Row]:
    """Per dtype and thread count: the kernel against the numba-threaded memcpy of the same
    bytes at the same thread count, and each against itself on one thread."""
    rows = []
    for dt in cases.DTYPES:
        for n in cases.THREADS:
            rows.append(
                Row(
                    f"scaling {dt}: kernel vs memcpy, {n} thread{'s' if n > 1 else ''}",
                    "scaling",
                    dt,
                    f"fastfuse-{n}t",
                    f"memcpy-{n}t",
                    "<=",
                    1.0,
                )
            )
        for n in cases.THREADS[1:]:
            rows.append(Row(f"scaling {dt}: kernel {n} threads vs 1", "scaling", dt, f"fastfuse-{n}t", "fastfuse-1t"))
            rows.append(Row(f"scaling {dt}: memcpy {n} threads vs 1", "scaling", dt, f"memcpy-{n}t", "memcpy-1t"))
    return rows


QUICK_SIZE = "small"  # whisper-small: 0.5 GB files, everything in under two minutes
QUICK_SKIP = {"scaling", "widen", "codegen"}


def wait_for_idle(limit: float = 60.0, window: float = 0.5, share: float = 0.1) -> float:
    """Wait (up to ``limit`` s) until other processes use less than ``share`` of the CPUs; seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = cpu_seconds()
        time.sleep(window)
        wall, busy, own = (b - a for a, b in zip(before, cpu_seconds(), strict=True))
        if busy - own < share * wall * (os.cpu_count() or 1):
            break
    return time.perf_counter() - start


def run(
    groups: list[str], size: str, quick: bool = False
) -> tuple[dict[Case, float], dict[Case, dict[str, float]], float]:
    """Time every case of ``groups``; also the share of the CPUs other processes used meanwhile."""
    times: dict[Case, float] = {}
    extras: dict[Case, dict[str, float]] = {}
    spent = [0.0, 0.0, 0.0]  # wall, machine busy, own: summed over the measured stretches only
    for group, param in dict.fromkeys((group, param) for group, param, _ in cases.CASES):
        if group not in groups:
            continue
        built = cases.impls(group, size, param)
        names = [n for n in cases.GROUPS[group].params[param] if not (quick and n in cases.QUICK_LEAVES_OUT)]
        impls = {name: impl for name in names if (impl := built[name]) is not None}
        waited = wait_for_idle(limit=5.0 if quick else 60.0)
        print(
            f"  {group} {param} {', '.join(impls)} (waited {waited:.1f} s for idle CPUs) ...", end="", file=sys.stderr
        )
        before = cpu_seconds()
        for name, impl in impls.items():
            if not (quick or impl.self_timed or name in cases.SLOW):  # warm-up: page cache, first call
                if impl.setup:
                    impl.setup()
                impl.run()
        best = harness.measure(impls, {name: cases.rounds(group, name) for name in impls})
        for name, impl in impls.items():
            times[group, param, name] = best[name]
            if impl.extra:
                extras[group, param, name] = impl.extra()
        spent = [total + b - a for total, a, b in zip(spent, before, cpu_seconds(), strict=True)]
        print(" " + ", ".join(f"{s:.4f}" for s in best.values()) + " s", file=sys.stderr)
    wall, busy, own = spent
    return times, extras, max(busy - own, 0.0) / max(wall * (os.cpu_count() or 1), 1e-9)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(times: dict[Case, float], extras: dict[Case, dict[str, float]], groups: list[str]) -> list[str]:
    lines = ["| case | fastfuse | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for row in [*ROWS, *scaling_rows()]:
        if row.group not in groups:
            continue
        a, b = (row.group, row.param, row.impl), (row.group, row.param, row.base)
        found = extras if row.rss else times
        if a not in found or b not in found:
            lines.append(f"| {row.label} | n/a | n/a | | | |")  # e.g. torch not installed
            continue
        if row.rss:
            x, y = found[a]["rss_anon_mb"], found[b]["rss_anon_mb"]  # type: ignore[index]
            shown, met, goal = [f"{x:.0f} MB", f"{y:.0f} MB", f"{x / y:.1f}x"], x < row.value, f"< {row.value:.0f} MB"
        else:
            x, y = times[a], times[b]
            diff = row.op == "+<="
            shown = [_seconds(x), _seconds(y), f"+{(x - y) * 1e3:.0f} ms" if diff else f"{x / y:.2f}x"]
            met = x - y <= row.value if diff else (x / y <= row.value if row.op == "<=" else x / y < row.value)
            goal = f"<= +{row.value * 1e3:.0f} ms" if diff else f"{row.op} {row.value:.2f}x"
        verdict = ("yes" if met else "**no**") if row.op else ""
        lines.append(f"| {row.label} | {' | '.join(shown)} | {goal if row.op else '—'} | {verdict} |")
    if "startup" in groups:
        verdict = "**no**" if harness.imports_numba() else "yes"
        lines.append(f"| `import fastfuse` leaves numba unimported | | | | numba not in sys.modules | {verdict} |")
    return lines


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, CPU seconds the whole machine was busy, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    import numba
    import numpy

    return (
        f"{datetime.date.today()} · {model} · nproc {len(os.sched_getaffinity(0))} · "
        f"Python {platform.python_version()} · numpy {numpy.__version__} · numba {numba.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", help="Whisper size of the checkpoints (default large-v3; --quick: small)")
    parser.add_argument("--only", default=",".join(cases.GROUPS), help="comma-separated groups (default: all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"whisper-{QUICK_SIZE}, one round, no {sorted(QUICK_SKIP)} nor slow baselines: under 2 minutes",
    )
    parser.add_argument(
        "--threads",
        default="1,2",
        help="thread counts of the scaling group, e.g. 1,2,4,8,16 (those above the host's CPUs are skipped)",
    )
    args = parser.parse_args(argv)
    available = len(os.sched_getaffinity(0))
    threads = tuple(n for n in (int(t) for t in args.threads.split(",") if t) if 1 <= n <= available)
    if not threads or threads[0] != 1:
        parser.error(f"--threads {args.threads}: expected counts from 1 to this host's {available}, starting at 1")
    cases.set_threads(threads)
    size = args.size or (QUICK_SIZE if args.quick else "large-v3")
    harness.QUICK = args.quick
    groups = [g for g in args.only.split(",") if g and not (args.quick and g in QUICK_SKIP)]
    unknown = set(groups) - set(cases.GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {list(cases.GROUPS)}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastfuse", "warmup"], check=True, capture_output=True)  # a warm cache
    times, extras, others = run(groups, size, args.quick)
    took = time.perf_counter() - start
    print(
        f"whisper {size} · {machine()} · other processes kept {others:.0%} of the CPUs busy while measuring · "
        f"report took {took:.0f} s\n"
    )
    print("\n".join(table(times, extras, groups)))
    if extras:
        print(
            "\npeak memory, each alone in a child: "
            + "; ".join(
                f"{group} {name}: {e['seconds']:.2f} s, RssAnon {e['rss_anon_mb']:.0f} MB, VmHWM {e['vm_hwm_mb']:.0f} MB"
                for (group, _, name), e in extras.items()
            )
        )
    harness.scratch_file().unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
