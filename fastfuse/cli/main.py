"""The ``fastfuse`` command: fuse, inspect, verify, unfuse, demo, warmup.

Exit codes: 0 success, 1 a failed run (a FuseError, a verify mismatch, an I/O error),
2 bad usage (argparse), 130 interrupted, 141 output pipe closed (``| head``: quietly, as Unix
tools do). Errors print one line ``fastfuse: error: ...`` unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastfuse.cli.demo import WHISPER_SIZES
from fastfuse.errors import FuseError
from fastfuse.planning.options import WRITE_ONLY, options
from fastfuse.planning.planner import Plan
from fastfuse.version import __version__

# What a command does with an option, where that differs by command: (option, writes files) -> note.
_WHAT_IT_DOES = {("tp", True): ": one file per rank into DST, a folder", ("tp", False): ": plan one slice per rank"}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The fusion options given on the command line (those not given left out: the library's defaults hold)."""
    given = {option.name: getattr(args, option.name, None) for option in options() if option.flag}
    return {name: value for name, value in given.items() if value is not None}


# The CLI flag of each fusion option (from FuseOptions), for messages the library words in Python spellings.
_FLAGS = {option.name: option.flag for option in options() if option.flag and option.flag_help is None}
_SPELLING = re.compile(r"(?<![\w.-])(" + "|".join(_FLAGS) + r")=('[^']*'|True\b|None\b|[\w.]+)?")


def cli_message(message: str) -> str:
    """A library message with each option spelt as the CLI flag a user typed: ``tp=0`` -> ``--tp 0``,
    ``logits=True`` -> ``--logits``, ``pass dtype=None`` -> ``drop --dtype``, ``heads=`` -> ``--heads``."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if value in (None, "True", "None"):
            return _FLAGS[name]
        return f"{_FLAGS[name]} {value.strip(chr(39))}"

    message = re.sub(r"\bpass (\w+)=None\b", r"drop \1=None", message)
    message = _SPELLING.sub(flag, message)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)  # "--overwrite (--overwrite)"


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


def _written(path: Path) -> list[Path]:
    """The files an output consists of: the file, or the folder's files."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _print_plan(fusion: Plan) -> None:
    layers = ", ".join(f"{name} x{count}" for name, count in fusion.layers.items()) or "none"
    dtypes = sorted({t.dtype.name for t in fusion.fused})
    tp = f", tp {fusion.tp}" if fusion.tp > 1 else ""
    prefix = f" (prefix {fusion.prefix!r})" if fusion.prefix else ""
    print(f"scheme   {fusion.scheme}{prefix}, target {fusion.target}, layout {fusion.layout}{tp}")
    print(f"d        {fusion.d}")
    print(f"groups   {layers}")
    print(f"dtype    {', '.join(dtypes) or '-'}")
    print(f"fused    {len(fusion.fused)} tensors, {_human(fusion.nbytes)}")
    if fusion.dropped:
        print(f"dropped  {len(fusion.dropped)} original tensors (fused sources)")


def _cmd_fuse(args: argparse.Namespace) -> int:
    from fastfuse.sinks.file_writer import fuse_file

    with _progress("fuse", not args.quiet and not args.json) as progress:
        fusion = fuse_file(
            args.src,
            args.dst,
            overwrite_destination=args.force,
            max_shard_size=args.max_shard_size,
            single_file=args.single_file,
            progress=progress,
            **_options(args),
        )
    files = _written(Path(args.dst))
    size = sum(p.stat().st_size for p in files)
    if args.json:
        print(
            json.dumps(
                {"destination": str(args.dst), "files": [str(p) for p in files], "bytes": size, **fusion.to_dict()}
            )
        )
    elif not args.quiet:
        _print_plan(fusion)
        print(f"wrote    {args.dst} ({_human(size)}{f' in {len(files)} files' if len(files) > 1 else ''})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fastfuse.formats.checkpoint import open_checkpoint, tensor_parallel_ranks
    from fastfuse.planning.planner import FuseOptions, make_plan
    from fastfuse.planning.recipe import META_PREFIX
    from fastfuse.sinks.ctranslate2_folder import is_ctranslate2_folder

    if is_ctranslate2_folder(Path(args.file)):
        return _inspect_ctranslate2(args)
    ranks = tensor_parallel_ranks(Path(args.file))
    checkpoints = [open_checkpoint(rank) for rank in ranks] if ranks else [open_checkpoint(args.file)]
    checkpoint = checkpoints[0]
    written = ranks is not None or f"{META_PREFIX}fused" in checkpoint.metadata
    options = _options(args)
    if written:
        if options:
            flags = ", ".join(_FLAGS[name] for name in options if name in _FLAGS)
            raise FuseError(f"{args.file} was written by fastfuse: inspect describes it as written; drop {flags}")
        fusion = _written_plan(checkpoints)
        output = None
    else:
        settings = FuseOptions.from_kwargs({"overwrite": True} | options).with_head_counts(checkpoint.head_counts)
        fusion = make_plan(checkpoint.metas(), settings)
        if fusion.already_fused and not fusion.fused:
            print(
                f"note     {args.file} is stored already fused ({fusion.scheme}); --convert rewrites it in --layout",
                file=sys.stderr,
            )
        kept = sum(entry.nbytes for key, entry in checkpoint.metas().items() if key not in fusion.dropped)
        output = kept + fusion.nbytes
    tensors = sum(len(c.location) for c in checkpoints)
    size = sum(c.size for c in checkpoints)
    if args.json:
        described: dict[str, Any] = {"file": str(args.file), "format": checkpoint.format, "tensors": tensors}
        described |= {"file_bytes": size, "written_by_fastfuse": written}
        described |= {"ranks": [str(r) for r in ranks]} if ranks else {}
        described |= {"output_bytes": output} if output is not None else {}
        print(json.dumps({**described, **fusion.to_dict()}))
        return 0
    files = f", {len(checkpoints)} files" if len(checkpoints) > 1 else ""
    print(f"file     {args.file} ({checkpoint.format}, {tensors} tensors{files}, {_human(size)})")
    if written:
        version = checkpoint.metadata.get(f"{META_PREFIX}version", "?")
        print(f"written  by fastfuse {version}: fused as described below (verify checks it, unfuse undoes it)")
    _print_plan(fusion)
    if fusion.opt_in:
        print(
            f"opt-in   {', '.join(_FLAGS.get(o, o) for o in fusion.opt_in)} (present in the checkpoint, not asked for)"
        )
    if output is not None:
        print(f"output   about {_human(output)}")
    return 0


def _inspect_ctranslate2(args: argparse.Namespace) -> int:
    """``inspect`` of a CTranslate2 model folder (``--target ctranslate2``'s output, or the converter's)."""
    from fastfuse.sinks.ctranslate2_folder import describe_ctranslate2

    given = _options(args)
    if given:
        flags = ", ".join(_FLAGS.get(name, name) for name in given)
        raise FuseError(f"{args.file} is a CTranslate2 model folder: inspect describes it as written; drop {flags}")
    model = describe_ctranslate2(Path(args.file))
    if args.json:
        print(json.dumps(model))
        return 0
    dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in model["dtypes"].items())
    print(f"folder   {args.file} (CTranslate2 model, {', '.join(model['files'])})")
    print(
        f"spec     {model['spec']} revision {model['revision']}, {model['variables']} variables, {_human(model['data_bytes'])}"
    )
    print(f"dtype    {dtypes} (quantization {model['quantization']})")
    fused = [
        f"{kind} x{sum(n.endswith('/weight') for n in names)} (weights {'x'.join(map(str, model['fused_shapes'][kind]))}, with biases)"
        for kind, names in model["fused"].items()
    ]
    print(f"fused    {', '.join(fused) or 'none'}")
    aliases = [f"{alias} -> {target}" for alias, target in model["aliases"].items()]
    print(
        f"aliases  {len(aliases)}{': ' + ', '.join(aliases[:3]) if aliases else ''}{' ...' if len(aliases) > 3 else ''}"
    )
    heads = ", ".join(f"{part} {count}" for part, count in model["heads"].items())
    layers = ", ".join(f"{part} {count}" for part, count in model["layers"].items())
    print(
        f"model    layers {layers}; d {model['d_model']}; heads {heads or '-'}; mels {model['mels']}; vocabulary {model['vocabulary']}"
    )
    config = model["config"]
    if config is None:
        print("config   none (no config.json)")
    else:
        print(f"config   {', '.join(f'{key} {value}' for key, value in config.items())}")
    return 0


def _written_plan(checkpoints: Sequence[Any]) -> Plan:
    """The plan files fastfuse wrote record (every rank's, for a tensor-parallel folder)."""
    from dataclasses import replace

    from fastfuse.planning.recipe import recorded_plan

    plans = [recorded_plan(c.metadata, c.metas(), c.path)[0] for c in checkpoints]
    dropped = frozenset().union(*(p.dropped for p in plans))
    return replace(plans[0], fused=tuple(t for p in plans for t in p.fused), dropped=dropped)


def _cmd_verify(args: argparse.Namespace) -> int:
    from fastfuse.sinks.verification import verify

    different = verify(args.file, source=args.source)
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
    from fastfuse.sinks.unfusing import unfuse

    rebuilt = unfuse(args.src, args.dst, overwrite_destination=args.force)
    if args.json:
        print(json.dumps({"destination": str(args.dst), "rebuilt": rebuilt}))
    elif not args.quiet and not rebuilt:
        print(f"rebuilt  nothing: {args.src} kept its originals; wrote them into {args.dst} without the fused tensors")
    elif not args.quiet:
        print(f"rebuilt  {len(rebuilt)} tensors into {args.dst}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastfuse.cli import demo

    report = demo.run(Path(args.out) if args.out else None, size=args.size, keep=args.keep, quiet=args.json)
    if args.json:
        print(json.dumps(report))
    return 0 if report["ok"] else 1


def _cmd_warmup(args: argparse.Namespace) -> int:
    import time

    from fastfuse.kernels import engine

    start = time.perf_counter()
    engine.warm_up()
    report = {"seconds": round(time.perf_counter() - start, 3), **engine.cache_report()}
    if args.json:
        print(json.dumps(report))
    else:
        where = report["cache"] or "nowhere writable: every process will compile (set NUMBA_CACHE_DIR)"
        print(f"kernels  {len(report['kernels'])} compiled or loaded in {report['seconds']:.1f} s; cache: {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfuse",
        description="Pre-fuse attention weights of Whisper (and transformer) checkpoints (safetensors, or torch "
        ".bin/.pt read without torch): q/k/v [out, in] -> one [in, 3*out] tensor for x @ W, or an engine's layout.",
    )
    parser.add_argument("--version", action="version", version=f"fastfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(parser=p)
        p.add_argument("--debug", action="store_true", help="show a traceback on errors")
        p.add_argument("--json", action="store_true", help="print one JSON object for machines")
        return p

    def fusion_options(p: argparse.ArgumentParser, *, writes: bool) -> None:
        """One flag per option of ``FuseOptions`` that has one (absent flags stay None: not given)."""
        for option in options():
            if option.flag is None or (option.scope == WRITE_ONLY and not writes):
                continue
            if option.type.startswith("bool"):  # a switch; one with flag_help turns its option off
                on = option.flag_help is None
                help = option.help if on else option.flag_help
                p.add_argument(option.flag, dest=option.name, action="store_const", const=on, help=help)
            else:
                kind = int if option.type.startswith("int") else str
                help = option.help + _WHAT_IT_DOES.get((option.name, writes), "")
                p.add_argument(option.flag, dest=option.name, type=kind, choices=option.choices, help=help)

    p = command("fuse", "fuse SRC (a safetensors or torch file, an index or a folder) into a new safetensors DST")
    p.add_argument("src", help="source .safetensors, .bin or .pt file, index (.index.json), or folder")
    p.add_argument(
        "dst",
        help="destination: a new .safetensors file; a folder (no .safetensors suffix) with --tp, --max-shard-size "
        "or a sharded SRC, or --target ctranslate2 (a CTranslate2 model folder)",
    )
    fusion_options(p, writes=True)
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write DST as a folder of shards of at most SIZE (e.g. 5GB); sharded inputs default to their largest shard",
    )
    p.add_argument("--single-file", action="store_true", help="write a sharded input as one file")
    p.add_argument("--force", action="store_true", help="replace an existing destination (file or folder output)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_cmd_fuse)

    p = command("inspect", "show what fastfuse would fuse in FILE, without writing anything")
    p.add_argument("file", help=".safetensors, .bin or .pt file, index, or folder")
    fusion_options(p, writes=False)
    p.set_defaults(run=_cmd_inspect)

    p = command("verify", "recompute every fused tensor of FILE from its originals; exit 1 if any differs")
    p.add_argument("file", help="a file, shard folder or tensor-parallel folder written by `fastfuse fuse`")
    p.add_argument("--source", help="the checkpoint FILE was fused from (needed when its originals were dropped)")
    p.set_defaults(run=_cmd_verify)

    p = command("unfuse", "rebuild the original q/k/v tensors of a fused file into DST")
    p.add_argument("src", help="a file written by `fastfuse fuse` (any target, originals kept or dropped)")
    p.add_argument("dst", help="the new .safetensors file, with the originals and without the fused tensors")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_cmd_unfuse)

    p = command("demo", "write a small Whisper-shaped checkpoint (random values), fuse, verify and check it")
    p.add_argument("--out", help="keep the demo files in this folder (default: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and say where it is")
    p.add_argument(
        "--size", default="tiny", choices=list(WHISPER_SIZES), help="Whisper size whose shapes to use (default: tiny)"
    )
    p.set_defaults(run=_cmd_demo)

    p = command("warmup", "compile every kernel into numba's on-disk cache, so later processes start warm")
    p.set_defaults(run=_cmd_warmup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never calls sys.exit itself)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep the interpreter's final flush
        # of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the subcommand's usage, not the top level's
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        split_flags = getattr(args, "heads", None) is not None or getattr(args, "kv_heads", None) is not None
        if split_flags and getattr(args, "tp", None) in (None, 1):
            args.parser.error("--heads and --kv-heads split attention for --tp; pass --tp N (N > 1) or drop them")
    except SystemExit as exit_:  # argparse exits on --help / usage errors
        return int(exit_.code or 0)
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        raise
    except (FuseError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if isinstance(exc, FuseError):
            message = cli_message(message)
        print(f"fastfuse: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastfuse: interrupted; nothing was written", file=sys.stderr)
        return 130
