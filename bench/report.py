"""Print fastfuse's benchmark ratios as a markdown table: ``python bench/report.py``.

Runs the cases of ``cases.py`` (the ones ``pytest bench --benchmark-only`` runs) outside pytest:
each implementation is warmed up once, then timed min-of-N. ``--size tiny`` for a quick run,
``--only kernel,load`` to pick groups (kernel, widen, load, file, startup, scaling).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import cases

# (case, group, param, fastfuse impl, baseline impl, target); target (op, value): op "<=" / "<"
# on the time ratio, "+<=" on the time difference (s), "MB<" on peak RssAnon; None: information.
Target = tuple[str, float] | None
Case = tuple[str, str, str]  # group, param, implementation
ROWS: list[tuple[str, str, str, str, str, Target]] = [
    *[row for dt in cases.DTYPES for row in [
        (f"kernel {dt} vs memcpy", "kernel", dt, "fastfuse", "memcpy", ("<=", 1.5) if dt != "bfloat16" else None),
        (f"kernel {dt} vs original loop (serial)", "kernel", dt, "fastfuse", "serial", ("<=", 1 / 4)),
        (f"kernel {dt} vs numpy", "kernel", dt, "fastfuse", "numpy", ("<=", 1 / 3)),
        (f"kernel {dt} vs torch", "kernel", dt, "fastfuse", "torch", ("<", 1.0)),
    ]],
    *[(f"widen {dt}->f32 vs numpy astype", "widen", dt, "fastfuse", "numpy", None) for dt in ("float16", "bfloat16")],
    ("load vs load_file", "load", "float16", "fastfuse", "load_file", ("<=", 0.5)),
    ("load vs safe_open + numpy fusion", "load", "float16", "fastfuse", "safe_open+numpy", None),
    ("file: fuse_file vs copyfile", "file", "float16", "fuse_file", "copyfile", ("<=", 1.3)),
    ("file: CLI (subprocess) vs copyfile", "file", "float16", "cli", "copyfile", ("<=", 1.3)),
    ("file: fuse_file vs copyfile + fsync (fastfuse syncs its output)", "file", "float16", "fuse_file", "copyfile+fsync", None),
    ("file: fuse_file vs numpy pipeline", "file", "float16", "fuse_file", "numpy", None),
    ("file: fuse_file peak RssAnon (vs copyfile)", "file", "float16", "fuse_file", "copyfile", ("MB<", 256)),
    ("file: CLI peak RssAnon (vs copyfile)", "file", "float16", "cli", "copyfile", ("MB<", 256)),
    ("file: numpy pipeline peak RssAnon (vs copyfile)", "file", "float16", "numpy", "copyfile", None),
    ("fresh process: load vs load_file (warm compile cache)", "startup", "load", "fastfuse", "load_file", ("<=", 0.5)),
    ("fresh process: load vs load_file (cold compile cache)", "startup", "load", "fastfuse-cold", "load_file", None),
    ("fresh process: import + first tiny fuse vs import numpy", "startup", "fuse", "fastfuse", "numpy", ("+<=", 0.150)),
    *[row for dt in ("float32", "float16") for row in [
        (f"scaling {dt}: kernel vs memcpy, 1 thread", "scaling", dt, "fastfuse-1t", "memcpy-1t", None),
        (f"scaling {dt}: kernel vs memcpy, 2 threads", "scaling", dt, "fastfuse-2t", "memcpy-2t", None),
        (f"scaling {dt}: kernel 2 threads vs 1", "scaling", dt, "fastfuse-2t", "fastfuse-1t", None),
        (f"scaling {dt}: memcpy 2 threads vs 1", "scaling", dt, "memcpy-2t", "memcpy-1t", None),
    ]],
]


def wait_for_idle(limit: float = 60.0, window: float = 0.5, share: float = 0.1) -> float:
    """Wait (up to ``limit`` s) until other processes use less than ``share`` of the CPUs; seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = cpu_seconds()
        time.sleep(window)
        wall, busy, own = (b - a for a, b in zip(before, cpu_seconds()))
        if busy - own < share * wall * (os.cpu_count() or 1):
            break
    return time.perf_counter() - start


def run(groups: list[str], size: str) -> tuple[dict[Case, float], dict[Case, dict[str, float]], float]:
    """Time every case of ``groups``; also the share of the CPUs other processes used meanwhile."""
    times: dict[Case, float] = {}
    extras: dict[Case, dict[str, float]] = {}
    spent = [0.0, 0.0, 0.0]  # wall, machine busy, own: summed over the measured stretches only
    for case in cases.CASES:
        group, param, name = case
        if group not in groups:
            continue
        impl = cases.impls(group, size, param)[name]
        if impl is None:
            continue
        waited = wait_for_idle()
        print(f"  {group} {param} {name} (waited {waited:.1f} s for other processes) ...", end="", flush=True, file=sys.stderr)
        before = cpu_seconds()
        if impl.setup:
            impl.setup()
        impl.run()  # warm-up
        times[case] = cases.measure(impl, cases.rounds(group, name))
        if impl.extra:
            extras[case] = impl.extra()
        spent = [total + b - a for total, a, b in zip(spent, before, cpu_seconds())]
        print(f" {times[case]:.4f} s", file=sys.stderr)
    wall, busy, own = spent
    return times, extras, max(busy - own, 0.0) / max(wall * (os.cpu_count() or 1), 1e-9)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def rows(times: dict[Case, float], extras: dict[Case, dict[str, float]], groups: list[str]) -> list[str]:
    lines = ["| case | fastfuse | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for label, group, param, impl, base, target in ROWS:
        if group not in groups:
            continue
        a, b = (group, param, impl), (group, param, base)
        op, value = target or ("", 0.0)
        if op == "MB<" or (target is None and "RssAnon" in label):
            if a not in extras or b not in extras:
                continue
            x, y = extras[a]["rss_anon_mb"], extras[b]["rss_anon_mb"]
            shown = [f"{x:.0f} MB", f"{y:.0f} MB", f"{x / y:.1f}x"]
            met = x < value
            goal = f"< {value:.0f} MB" if target else ""
        else:
            if a not in times or b not in times:
                lines.append(f"| {label} | {_seconds(times[a]) if a in times else 'n/a'} | n/a | | | |")
                continue
            x, y = times[a], times[b]
            ratio = x / y
            shown = [_seconds(x), _seconds(y), f"+{(x - y) * 1e3:.0f} ms" if op == "+<=" else f"{ratio:.2f}x"]
            met = {"<=": ratio <= value, "<": ratio < value, "+<=": x - y <= value}.get(op, False)
            goal = {"<=": f"<= {value:.2f}x", "<": f"< {value:.2f}x", "+<=": f"<= +{value * 1e3:.0f} ms"}.get(op, "")
        lines.append(f"| {label} | {' | '.join(shown)} | {goal or '—'} | {('yes' if met else '**no**') if target else ''} |")
    if "startup" in groups:
        ok = not cases.imports_numba()
        lines.append(f"| `import fastfuse` leaves numba unimported | | | | numba not in sys.modules | {'yes' if ok else '**no**'} |")
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
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), platform.processor())
    import numba
    import numpy

    return (f"{datetime.date.today()} · {model} · nproc {os.cpu_count()} · Python {platform.python_version()} · "
            f"numpy {numpy.__version__} · numba {numba.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large-v3", help="Whisper size of the generated checkpoints (default large-v3)")
    parser.add_argument("--only", default=",".join(cases.GROUPS), help="comma-separated groups (default: all)")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = set(groups) - set(cases.GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {list(cases.GROUPS)}")
    times, extras, others = run(groups, args.size)
    print(f"whisper {args.size} · {machine()} · other processes kept {others:.0%} of the CPUs busy while measuring\n")
    print("\n".join(rows(times, extras, groups)))
    if extras:
        print("\nfile-to-file alone in a child (lower of two runs): " + "; ".join(
            f"{name}: {e['seconds']:.2f} s, RssAnon {e['rss_anon_mb']:.0f} MB, VmHWM {e['vm_hwm_mb']:.0f} MB"
            for (_, _, name), e in extras.items()))
    cases.output_file().unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
