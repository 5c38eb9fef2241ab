"""The file sink: fuse a checkpoint into new safetensors files, at disk speed, all or nothing.

Everything is validated (headers, plan, destination names) before anything is created. Then
each output file is built as a temporary beside its destination (``atomic``): the originals it
keeps are copied file to file, as few long ranges (the output keeps their source order), in
parallel chunks that the disk starts writing at once; meanwhile the fused tensors are computed
from the source maps straight into a map of the destination (on numpy until the kernels, loading
in the background, take over). One fsync, one rename. The checkpoint never sits in anonymous
memory.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError
from fastfuse.formats import safetensors_file
from fastfuse.formats.checkpoint import INDEX_NAME, SINGLE_NAME, TP_INDEX_NAME, Checkpoint, open_checkpoint
from fastfuse.fusion import execute
from fastfuse.kernels import engine
from fastfuse.planning import rules
from fastfuse.planning.planner import FuseOptions, Plan, make_plan
from fastfuse.planning.recipe import META_PREFIX, describe
from fastfuse.sinks import model_folder
from fastfuse.sinks.atomic import AtomicWriter, CopyRange, write_bytes_atomic
from fastfuse.sinks.destinations import check_destination, parse_size, previous_output
from fastfuse.sinks.streams import Background

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastfuse.aliases import FuseKwargs

__all__ = ["copy_originals", "fuse_file", "write_file"]

Progress = Callable[[int, int], None]  # (bytes just written, bytes the whole run writes)
Entry = tuple[str, "np.dtype[Any]", tuple[int, ...]]  # name, dtype, shape of one output tensor


@dataclass(frozen=True)
class _File:
    """One output file: its name in the destination, tensors in order, metadata and plan part."""

    name: str
    entries: list[Entry]
    metadata: dict[str, str]
    fusion: Plan


def fuse_file(
    src: PathLike,
    dst: PathLike,
    *,
    overwrite_destination: bool = False,
    max_shard_size: int | str | None = None,
    single_file: bool = False,
    progress: Progress | None = None,
    **options: Unpack[FuseKwargs],
) -> Plan:
    """Fuse a checkpoint file into a new safetensors file (or folder), streaming, atomically.

    Args:
        src: a ``.safetensors`` or torch (``.bin``/``.pt``) file, an index or a folder.
            With ``target="ctranslate2"``, ``dst`` is a CTranslate2 model folder instead
            (``fastfuse.sinks.ctranslate2_writer``).
        dst: a new ``*.safetensors`` file; or a folder, for a sharded output
            (``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``) or a
            tensor-parallel one (``rank-k-of-n.safetensors`` per rank, each complete on its
            own, and ``tensor_parallel.json``).
        overwrite_destination: allow replacing existing files (CLI ``--force``); files of a
            replaced folder output that the new one does not have are removed.
        max_shard_size: shard the output (bytes, or ``"5GB"``); a sharded input gives a
            sharded output (default: its largest shard) unless ``single_file``.
        single_file: write a sharded input as one file.
        progress: ``progress(done, total)`` is called as data is written (from a worker
            thread at times, never two calls at once).
        **options: as for :func:`fastfuse.plan`.

    Returns:
        The executed :class:`~fastfuse.planning.planner.Plan`.

    Raises:
        FuseError (and subclasses) as :func:`fastfuse.plan`; FuseFileNotFoundError,
        FusePermissionError and MalformedFileError for paths and bytes. On any error no
        destination file is created or changed.

    The output keeps
    the input's metadata (``"format": "pt"`` added for torch files) plus fastfuse's recipe
    (``fastfuse.*`` keys). The originals keep their source order, then come the fused tensors
    (item size descending, then name), unless that would misalign a tensor (then all are in
    safetensors' own order). A torch file's CRCs are checked while copying.
    ``progress(done, total)`` is called as data is written (from a worker thread at times,
    never two calls at once). Returns the executed plan.

    Everything is validated before anything is created; on any error no destination file is
    changed. Each file is atomic; an index is written last.

    Example:
        >>> import tempfile, numpy as np, fastfuse
        >>> from safetensors.numpy import save_file
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(4, dtype=np.float16) for p in "qkv"}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file(sd, f"{folder}/model.safetensors")
        ...     fusion = fastfuse.fuse_file(f"{folder}/model.safetensors", f"{folder}/fused.safetensors")
        ...     print([t.key for t in fusion.fused], fastfuse.verify(f"{folder}/fused.safetensors"))
        ['fused.enc.0.self_attn.qkv.weight'] []
    """
    settings = FuseOptions.from_kwargs(options)
    if rules.TARGETS[settings.target].folder:  # an engine's own model folder, from its own sink
        if max_shard_size is not None or single_file:
            raise FuseError(f"target {settings.target!r} writes one model folder: drop max_shard_size / single_file")
        from fastfuse.sinks.ctranslate2_writer import fuse_ctranslate2

        return fuse_ctranslate2(src, dst, settings, overwrite_destination=overwrite_destination, progress=progress)
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    metas = checkpoint.metas()
    fusion = make_plan(metas, settings.with_head_counts(checkpoint.head_counts))
    sharded = not single_file and (checkpoint.index is not None or max_shard_size is not None)
    why = f"tp={fusion.tp}" if fusion.tp > 1 else "a sharded output; pass single_file / --single-file for one file"
    folder_output = fusion.tp > 1 or sharded
    # A folder source into a folder: a model folder (weights as model.safetensors, config and tokenizer beside).
    into_folder = not folder_output and os.path.isdir(src) and destination.suffix.lower() != ".safetensors"
    file_destination = destination / SINGLE_NAME if into_folder else destination
    check_destination((f.path for f in checkpoint.files), file_destination, folder=folder_output, why=why)
    side = model_folder.side_files(src) if folder_output or into_folder else []
    model_folder.check_side_files(side, destination, overwrite=overwrite_destination)
    if fusion.tp > 1 and max_shard_size is not None:
        raise FuseError("tp and max_shard_size do not combine: each rank is written as one file")
    files = _plan_files(checkpoint, fusion)
    if fusion.tp == 1 and sharded:
        limit = parse_size(max_shard_size) if max_shard_size is not None else max(f.file_size for f in checkpoint.files)
        files = _shard(files[0], limit)
    total = sum(_nbytes(entry) for file in files for entry in file.entries)
    report: Callable[[int], None] | None = None
    if progress is not None:
        report = functools.partial(_report, progress, total, threading.Lock())
    engine.expect(((metas[_first(t.sources)].dtype, t.dtype) for t in fusion.fused), fusion.nbytes)
    arrays = checkpoint.arrays()
    # A torch file's CRCs are checked once, in a thread, while the first file is copied; no
    # output is published before the check passed.
    checking = Background(checkpoint.check_integrity)
    fill = functools.partial(_fill, checking, arrays, checkpoint, report)
    write = functools.partial(_write, fill=fill, checkpoint=checkpoint, overwrite=overwrite_destination)
    if not folder_output:
        with model_folder.new_folder(destination if into_folder else None):
            write(file_destination, files[0])
    elif fusion.tp > 1:
        index: dict[str, Any] = {"tp": fusion.tp, "layout": fusion.layout, "ranks": [f.name for f in files]}
        _write_folder(destination, files, TP_INDEX_NAME, index, write, overwrite=overwrite_destination)
    else:
        weight_map = dict(sorted((name, file.name) for file in files for name, _, _ in file.entries))
        index = {"metadata": {"total_size": total, **files[0].metadata}, "weight_map": weight_map}
        _write_folder(destination, files, INDEX_NAME, index, write, overwrite=overwrite_destination)
    model_folder.copy_side_files(side, destination, overwrite=overwrite_destination)
    return fusion


def _report(progress: Progress, total: int, lock: threading.Lock, done: int) -> None:
    with lock:  # the copy reports from its thread, the fused tensors from this one: one at a time
        progress(done, total)


def _first(sources: Sequence[str | None]) -> str:
    return next(s for s in sources if s is not None)


def _nbytes(entry: Entry) -> int:
    return int(np.prod(entry[2], dtype=np.int64)) * entry[1].itemsize


def _plan_files(checkpoint: Checkpoint, fusion: Plan) -> list[_File]:
    """One output file per rank (one without tensor parallelism): kept originals in source
    order, then that rank's fused tensors."""
    metas = checkpoint.metas()
    base = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}
    if checkpoint.format == "torch":
        base.setdefault("format", "pt")  # what transformers writes for weights that came from torch
    fused_keys = {t.key for t in fusion.fused}
    kept = checkpoint.in_file_order(key for key in metas if key not in fusion.dropped and key not in fused_keys)
    ranks = sorted({t.rank for t in fusion.fused}, key=lambda r: -1 if r is None else r) or [None]
    files = []
    for rank in ranks:
        part = fusion.for_rank(rank)
        entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
        entries += sorted(((t.key, t.dtype, t.shape) for t in part.fused), key=lambda e: (-e[1].itemsize, e[0]))
        name = f"rank-{rank}-of-{fusion.tp}.safetensors" if rank is not None else ""
        files.append(_File(name, entries, {**base, **describe(part, metas, rank)}, part))
    return files


def _shard(file: _File, limit: int) -> list[_File]:
    """Split a file's entries in order into shards of at most ``limit`` data bytes (a bigger tensor goes alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in file.entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    count = len(shards)
    return [
        replace(file, name=f"model-{n + 1:05d}-of-{count:05d}.safetensors", entries=s) for n, s in enumerate(shards)
    ]


Fill = Callable[[_File, AtomicWriter, dict[str, tuple[int, int]]], None]


def write_file(
    path: Path,
    entries: Sequence[Entry],
    metadata: Mapping[str, str],
    fill: Callable[[AtomicWriter, dict[str, tuple[int, int]]], None],
    *,
    overwrite: bool,
    copied: tuple[Checkpoint, Sequence[str]] | None = None,
) -> None:
    """Lay out ``entries`` (in this order if aligned) as a new safetensors file at ``path``, and
    let ``fill(writer, offsets)`` write its data; atomically. ``copied``: the checkpoint and
    the keys ``fill`` will copy from it; the header padding puts their longest run at the same
    place in a page as in the source."""
    outputs = [safetensors_file.OutputTensor(name, dtype, shape) for name, dtype, shape in entries]
    prefix, offsets = safetensors_file.layout(outputs, metadata, keep_order=True)
    if copied is not None:  # the longest copy then moves whole pages
        ranges, _ = _copy_ranges(*copied, offsets)
        longest = max(ranges, key=lambda r: r.length, default=None)
        if longest is not None:
            data_start = (longest.offset - longest.start) % safetensors_file.PAGE
            prefix, _ = safetensors_file.layout(outputs, metadata, keep_order=True, data_start=data_start)
    data_size = max((end for _, end in offsets.values()), default=0)
    with AtomicWriter(path, prefix, data_size, overwrite=overwrite) as writer:
        fill(writer, offsets)


def _write(path: Path, file: _File, *, fill: Fill, checkpoint: Checkpoint, overwrite: bool) -> None:
    copied = (checkpoint, _kept(file))
    write_file(path, file.entries, file.metadata, functools.partial(fill, file), overwrite=overwrite, copied=copied)


def _kept(file: _File) -> list[str]:
    """The originals ``file`` holds (everything but its fused tensors), in its order."""
    fused = {t.key for t in file.fusion.fused}
    return [name for name, _, _ in file.entries if name not in fused]


def _fill(
    checking: Background,
    arrays: Mapping[str, np.ndarray],
    checkpoint: Checkpoint,
    report: Callable[[int], None] | None,
    file: _File,
    writer: AtomicWriter,
    offsets: dict[str, tuple[int, int]],
) -> None:
    """Copy the originals ``file`` keeps and compute its fused tensors into the destination map
    at the same time: the copy waits on the disk, the fused tensors start at once (on numpy
    until the kernels are loaded, then on them), and the disk writes both as they come. Then
    wait for the source's integrity check."""
    copying = Background(functools.partial(copy_originals, checkpoint, arrays, _kept(file), writer, offsets, report))
    targets = [t for t in file.fusion.fused if t.key in offsets]
    outputs = {t.key: writer.view(*offsets[t.key], t.dtype, t.shape) for t in targets}
    try:
        with engine.without_waiting():  # the disk is the bottleneck: fused pages written early beat faster kernels
            execute(replace(file.fusion, fused=tuple(targets)), arrays, outputs)
        for t in targets:
            writer.written(*offsets[t.key])
        if report:
            report(sum(t.nbytes for t in targets))
        copying.join()
    except BaseException:  # an error or Ctrl-C: stop the copy now, not when it is done
        writer.cancel()
        copying.join_quietly(None)
        raise
    checking.join()


def copy_originals(
    checkpoint: Checkpoint,
    arrays: Mapping[str, np.ndarray],
    keys: Sequence[str],
    writer: AtomicWriter,
    offsets: Mapping[str, tuple[int, int]],
    report: Callable[[int], None] | None = None,
) -> None:
    """Copy tensors ``keys`` of ``checkpoint`` byte for byte to their ``offsets`` in ``writer``:
    file to file where their bytes are one run, through the maps where they are strided."""
    ranges, strided = _copy_ranges(checkpoint, keys, offsets)
    writer.copy(ranges, report)
    for key in strided:  # views that are not one run of their file (torch): through the maps
        start, end = offsets[key]
        np.copyto(writer.view(start, end, arrays[key].dtype, arrays[key].shape), arrays[key])
        writer.written(start, end)
        if report:
            report(end - start)


def _copy_ranges(
    checkpoint: Checkpoint, keys: Sequence[str], offsets: Mapping[str, tuple[int, int]]
) -> tuple[list[CopyRange], list[str]]:
    """File-to-file copies for ``keys`` (neighbours in both files merged), and the keys whose
    bytes are not one run of their file."""
    ranges: list[CopyRange] = []
    strided = []
    for key in keys:
        source = checkpoint.byte_range(key)
        start, end = offsets[key]
        if source is None:
            strided.append(key)
            continue
        path, offset = source
        last = ranges[-1] if ranges else None
        if last and last.source == path and last.offset + last.length == offset and last.start + last.length == start:
            ranges[-1] = last._replace(length=last.length + end - start)
        elif end > start:
            ranges.append(CopyRange(path, offset, start, end - start))
    return ranges, strided


def _write_folder(
    folder: Path,
    files: list[_File],
    index_name: str,
    index: Mapping[str, Any],
    write: Callable[[Path, _File], None],
    *,
    overwrite: bool,
) -> None:
    """Write ``files`` into ``folder`` (created if its parent exists), then the index, each
    atomically; then remove what a replaced output of fastfuse's left that this one lacks."""
    if folder.exists() and not folder.is_dir():
        raise FuseError(f"{folder}: this output is a folder of files, and {folder} is a file")
    if not folder.parent.is_dir():
        raise FuseError(f"{folder}: destination folder {folder.parent} does not exist")
    paths = [folder / index_name, *(folder / file.name for file in files)]
    for path in paths:
        if path.exists() and not overwrite:
            raise FuseError(f"{path}: exists; pass --force (overwrite_destination=True) to replace it")
    stale = previous_output(folder) if overwrite else set()
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        for file in files:
            write(folder / file.name, file)
        write_bytes_atomic(folder / index_name, json.dumps(index, indent=2).encode() + b"\n", overwrite=overwrite)
    except BaseException:
        if created:
            for path in paths:
                path.unlink(missing_ok=True)
            folder.rmdir()
        raise
    for name in sorted(stale - {p.name for p in paths}):
        (folder / name).unlink(missing_ok=True)
