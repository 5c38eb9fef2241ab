"""Fuzz targets for the three readers of untrusted bytes, and a driver for them.

Targets (each takes the bytes of one input; anything but a :class:`fastfuse.FuseError` escaping
is a finding): ``safetensors`` (header, offsets, then zero-copy views of every tensor),
``zip`` (a whole ``torch.save`` archive: directory, members, pickle, views) and ``pickle``
(the restricted unpickler alone). Seeds are real files written by :func:`seeds`: safetensors
files and ``torch.save`` of small state dicts with shared storage, strided views and an
openai-whisper dict (torch seeds only where torch is installed).

Two drivers run the same targets: atheris (coverage-guided) where it is installed, and a
deterministic random-mutation driver otherwise (the tests use that one, with a fixed budget).
The run must stay under ``MEMORY_LIMIT`` bytes of resident memory; a long run also reports an
input slower than ``--time-limit`` seconds (default ``TIME_LIMIT``; 0: no limit, as the tests run
it: they assert no wall time, and the child's own timeout catches a hang). The longer run::

    python tests/fuzz_readers.py zip --inputs 200000          # mutation driver, any target
    python tests/fuzz_readers.py pickle --atheris -- -max_total_time=3600   # coverage-guided
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from fastfuse.errors import FuseError
from fastfuse.formats import unpickler
from fastfuse.formats.safetensors_file import read_safetensors
from fastfuse.formats.stored import map_arrays
from fastfuse.formats.torch_zip import read_torch

TIME_LIMIT = 10.0  # seconds per input in a long run (a hang, not a speed: inputs take milliseconds)
MEMORY_LIMIT = 2 << 30  # bytes of resident memory, the whole run
_SCRATCH = Path(tempfile.mkdtemp(prefix="fastfuse-fuzz-"))


def _through_a_file(data: bytes, suffix: str, read: Callable[[Path], object]) -> None:
    path = _SCRATCH / f"input{suffix}"
    path.write_bytes(data)
    stored = read(path)
    for array in map_arrays(stored).values():  # type: ignore[arg-type]
        if array.size < 4096:  # read the small ones through (the views point into the map)
            array.tobytes()


def target_safetensors(data: bytes) -> None:
    _through_a_file(data, ".safetensors", read_safetensors)


def target_zip(data: bytes) -> None:
    _through_a_file(data, ".pt", read_torch)


def target_pickle(data: bytes) -> None:
    unpickler.unpickle(data, "fuzz")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": target_safetensors,
    "zip": target_zip,
    "pickle": target_pickle,
}


def _torch_seeds() -> list[bytes]:
    try:
        import torch
    except ImportError:
        return []
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=generator)
    d = 8
    whisper = {
        f"{side}.blocks.0.attn.{p}.weight": torch.randn(d, d, generator=generator, dtype=torch.float16)
        for side in ("encoder", "decoder")
        for p in ("query", "key", "value")
    }
    dicts = [
        {"w": base, "tied": base, "half": base[:3]},  # shared storage
        {"t": base.t(), "step": base[:, ::2], "offset": base[2:]},  # strided and offset views
        {"dims": {"n_mels": 80, "n_audio_state": d}, "model_state_dict": whisper},  # openai-whisper
        {"b": torch.arange(5, dtype=torch.int64), "bf": torch.ones(3, dtype=torch.bfloat16)},
    ]
    out = []
    for state in dicts:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        out.append(buffer.getvalue())
    return out


def seeds(target: str) -> list[bytes]:
    """Real files for ``target``: safetensors files, torch archives, or their pickles."""
    if target == "safetensors":
        rng = np.random.default_rng(0)
        return [
            save({"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(3, dtype=np.uint8)}),
            save({"w": np.zeros((2, 0), np.float16)}, metadata={"format": "pt"}),
            save({f"model.layers.{i}.q.weight": np.ones((4, 4), np.float16) for i in range(3)}),
        ]
    archives = _torch_seeds()
    if target == "zip":
        return archives
    pickles = []
    for archive in archives:
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            pickles += [z.read(n) for n in z.namelist() if n.endswith("/data.pkl")]
    return pickles


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to four random edits: byte flips, interesting integers, inserts, deletes, duplicated
    chunks, splices from another seed, truncation; digits in text rewritten as huge numbers."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(8)
        at = rng.randrange(len(out) + 1)
        if what == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif what == 1:
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            out[at : at + width] = value.to_bytes(width, "little")
        elif what == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif what == 3:
            del out[at : at + rng.randint(1, 64)]
        elif what == 4 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 256)]
        elif what == 5:
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            out[at:] = other[start : start + rng.randint(0, len(other))]
        elif what == 6:
            del out[at:]
        else:
            digit = out.find(b"0123456789"[rng.randrange(10)], at)
            if digit >= 0:
                out[digit : digit + 1] = str(rng.choice(INTERESTING)).encode()
    return bytes(out)


def run_one(target: Callable[[bytes], None], data: bytes, time_limit: float = TIME_LIMIT) -> str | None:
    """None when ``data`` is read or refused with a FuseError (within ``time_limit`` seconds
    unless it is 0); else what went wrong."""
    start = time.monotonic()
    try:
        target(data)
    except FuseError:
        pass
    except Exception as e:  # noqa: BLE001 - a finding, reported with the input
        return f"{type(e).__name__}: {str(e)[:200]}"
    took = time.monotonic() - start
    return f"took {took:.1f} s" if time_limit and took > time_limit else None


def fuzz(name: str, inputs: int, seed: int = 0, time_limit: float = TIME_LIMIT) -> tuple[int, list[tuple[str, bytes]]]:
    """Run ``inputs`` mutated inputs through target ``name``; (inputs run, findings)."""
    target, pool = TARGETS[name], seeds(name)
    rng = random.Random(seed)
    findings = []
    for data in pool:
        problem = run_one(target, data, time_limit)
        if problem is not None:
            findings.append((problem, data))
    for _ in range(inputs):
        data = mutate(rng.choice(pool), rng, pool)
        problem = run_one(target, data, time_limit)
        if problem is not None:
            findings.append((problem, data))
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > MEMORY_LIMIT:
        findings.append(("resident memory over 2 GB", b""))
    return inputs + len(pool), findings


def _atheris(name: str, argv: list[str], time_limit: float = TIME_LIMIT) -> None:
    """libFuzzer over target ``name`` (``argv``: its options); an input slower than
    ``time_limit`` seconds is a finding, unless it is 0 (libFuzzer's ``-timeout`` too)."""
    import atheris

    target, pool = TARGETS[name], seeds(name)
    corpus = _SCRATCH / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, data in enumerate(pool):
        (corpus / f"seed-{i}").write_bytes(data)

    def one(data: bytes) -> None:
        problem = run_one(target, data, time_limit)
        if problem is not None:
            raise AssertionError(problem)

    atheris.instrument_all()  # coverage of every loaded function, fastfuse's readers included
    atheris.Setup([sys.argv[0], *argv, str(corpus), f"-timeout={int(time_limit)}", "-rss_limit_mb=2048"], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, help="seconds per input (0: none)")
    parser.add_argument(
        "--atheris", action="store_true", help="coverage-guided (atheris); args after -- go to libFuzzer"
    )
    args, rest = parser.parse_known_args()
    if args.atheris:
        _atheris(args.target, [a for a in rest if a != "--"], args.time_limit)
        return 0
    start = time.monotonic()
    ran, findings = fuzz(args.target, args.inputs, args.seed, args.time_limit)
    print(f"{args.target}: {ran} inputs in {time.monotonic() - start:.0f} s, {len(findings)} findings")
    for problem, data in findings[:20]:
        print(f"  {problem}  ({len(data)} bytes: {data[:60]!r})")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
