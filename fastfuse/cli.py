"""The ``fastfuse`` command: fuse, inspect, verify, unfuse, demo.

Exit codes: 0 success, 1 a failed run (a FuseError, a verify mismatch, an I/O error),
2 bad usage (argparse). Errors print one line ``fastfuse: error: ...`` unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FuseError
from .plan import Plan


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The fusion options given on the command line (defaults left out, so they stay the library's)."""
    names = ("cross_kv", "logits", "convert", "dtype", "scheme", "layout", "tp", "heads", "kv_heads")
    return {name: getattr(args, name) for name in names if getattr(args, name) not in (None, False)}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on a terminal (tqdm), drawn once the run knows its total; nothing
    when piped or disabled."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bars: list[tqdm[Any]] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False))
        bars[0].update(done)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _size_of(path: Path) -> int:
    """Bytes of a file, or of the .safetensors shards in a folder."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _print_plan(fusion: Plan) -> None:
    out = sys.stdout
    layers = ", ".join(f"{name} x{count}" for name, count in fusion.layers.items()) or "none"
    dtypes = sorted({t.dtype.name for t in fusion.fused})
    print(
        f"scheme   {fusion.scheme} (prefix {fusion.prefix!r}), layout {fusion.layout}"
        + (f", tp {fusion.tp}" if fusion.tp > 1 else ""),
        file=out,
    )
    print(f"d        {fusion.d}", file=out)
    print(f"groups   {layers}", file=out)
    print(f"dtype    {', '.join(dtypes) or '-'}", file=out)
    print(f"fused    {len(fusion.fused)} tensors, {_human(fusion.nbytes)}", file=out)


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .files import fuse_file

    options = _options(args) | ({"keep_originals": False} if args.drop_originals else {})
    with _progress("fuse", not args.quiet and not args.json) as progress:
        fusion = fuse_file(
            args.src,
            args.dst,
            overwrite_destination=args.force,
            max_shard_size=args.max_shard_size,
            single_file=args.single_file,
            progress=progress,
            **options,
        )
    if args.json:
        print(json.dumps({"destination": str(args.dst), **fusion.to_dict()}))
    elif not args.quiet:
        _print_plan(fusion)
        print(f"wrote    {args.dst} ({_human(_size_of(Path(args.dst)))})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .core import plan

    checkpoint = open_checkpoint(args.file)
    fusion = plan(args.file, overwrite=True, **_options(args))
    if fusion.already_fused and not fusion.fused:
        print(
            f"note     {args.file} is stored already fused ({fusion.scheme}); --convert rewrites it in --layout",
            file=sys.stderr,
        )
    size = checkpoint.size
    if args.json:
        print(
            json.dumps(
                {"file": str(args.file), "tensors": len(checkpoint.location), "file_bytes": size, **fusion.to_dict()}
            )
        )
        return 0
    print(f"file     {args.file} ({len(checkpoint.location)} tensors, {_human(size)})")
    _print_plan(fusion)
    print(f"output   {_human(size + fusion.nbytes)} with originals kept")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .files import verify

    different = verify(args.file)
    if args.json:
        print(json.dumps({"file": str(args.file), "ok": not different, "different": different}))
    elif different:
        print(
            f"fastfuse: error: {different[0]!r} differs from its recomputation ({len(different)} tensor(s) differ)",
            file=sys.stderr,
        )
    else:
        print(f"ok: every fused tensor of {args.file} matches its originals bit for bit")
    return 1 if different else 0


def _cmd_unfuse(args: argparse.Namespace) -> int:
    from .files import unfuse

    rebuilt = unfuse(args.src, args.dst, overwrite_destination=args.force)
    if args.json:
        print(json.dumps({"destination": str(args.dst), "rebuilt": rebuilt}))
    elif not args.quiet:
        print(f"rebuilt  {len(rebuilt)} tensors into {args.dst}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastfuse-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.size not in demo.WHISPER_SIZES:
        raise FuseError(f"unknown size {args.size!r}; expected one of {sorted(demo.WHISPER_SIZES)}")
    return 0 if demo.run(folder, size=args.size) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfuse",
        description="Pre-fuse attention weights of Whisper (and transformer) safetensors checkpoints: "
        "q/k/v [out, in] -> one [in, 3*out] tensor for x @ W.",
    )
    parser.add_argument("--version", action="version", version=f"fastfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", help="show a traceback on errors")
        p.add_argument("--json", action="store_true", help="print one JSON object for machines")
        return p

    def fusion_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cross-kv", action="store_true", help="also fuse decoder cross-attention K,V")
        p.add_argument("--logits", action="store_true", help="also write the tied logits weight [d, vocab]")
        p.add_argument("--dtype", choices=["float32"], help="widen float16/bfloat16 to float32 while fusing")
        p.add_argument("--scheme", help="naming scheme (default: detect from the keys)")
        p.add_argument(
            "--convert", action="store_true", help="convert an already fused checkpoint (Phi-3, GPT-2) to --layout"
        )
        p.add_argument(
            "--layout",
            choices=["in_out", "out_in"],
            help="in_out: [in, sum(out)] for x @ W (default); out_in: [sum(out), in] for F.linear (vLLM, CTranslate2)",
        )
        p.add_argument("--tp", type=int, help="tensor-parallel ranks: write one file per rank into DST (a folder)")
        p.add_argument("--heads", type=int, help="attention heads, to split for --tp (default: config.json beside SRC)")
        p.add_argument("--kv-heads", type=int, help="key/value heads (GQA), to split for --tp")

    p = command("fuse", "fuse SRC (file, index or folder) into a new safetensors file DST")
    p.add_argument("src", help="source .safetensors file, model.safetensors.index.json, or folder")
    p.add_argument("dst", help="destination .safetensors file (written atomically)")
    fusion_options(p)
    p.add_argument("--drop-originals", action="store_true", help="leave out the fused sources")
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write DST as a folder of shards of at most SIZE (e.g. 5GB); sharded inputs default to their largest shard",
    )
    p.add_argument("--single-file", action="store_true", help="write a sharded input as one file")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_cmd_fuse)

    p = command("inspect", "show what fastfuse would fuse in FILE, without writing anything")
    p.add_argument("file", help=".safetensors file, index, or folder")
    fusion_options(p)
    p.set_defaults(run=_cmd_inspect)

    p = command("verify", "recompute every fused tensor of FILE from its originals; exit 1 if any differs")
    p.add_argument("file", help="a file written by `fastfuse fuse` (originals kept)")
    p.set_defaults(run=_cmd_verify)

    p = command("unfuse", "rebuild the original q/k/v tensors of a fused file into DST")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_cmd_unfuse)

    p = command("demo", "write a small Whisper-shaped checkpoint (random values), fuse, verify and check it")
    p.add_argument("--out", help="folder for the demo files (default: a new temporary folder)")
    p.add_argument("--size", default="tiny", help="Whisper size whose shapes to use (default: tiny)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never calls sys.exit itself)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help / usage errors
        return int(exit_.code or 0)
    try:
        return int(args.run(args))
    except (FuseError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"fastfuse: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastfuse: interrupted; nothing was written", file=sys.stderr)
        return 130
