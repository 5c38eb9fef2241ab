"""Checkpoint files: zero-copy load, streaming file-to-file fuse, verify and unfuse.

Sources are memory-mapped and never copied into anonymous memory; fused tensors are computed by
the kernel straight from those maps, into a memory map of the destination when writing files.
A file run validates everything (headers, plan, destination) before it creates anything, and
writes atomically: a temporary file in the destination folder, renamed on success only.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import st_format
from ._dtypes import as_dtype
from ._typing import PathLike
from .atomic import AtomicWriter, write_bytes_atomic
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .core import execute, transpose_concat
from .errors import FuseError, MalformedFileError, MissingTensorError
from .plan import FusedTensor, FuseOptions, Plan, make_plan

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._typing import FuseKwargs

__all__ = ["fuse_file", "load", "parse_size", "unfuse", "verify"]

META_PREFIX = "fastfuse."
TP_INDEX_NAME = "tensor_parallel.json"
Progress = Callable[[int, int], None]  # (bytes just written, bytes the whole run writes)
Written = Callable[[int], None]  # bytes just written
Entry = tuple[str, "np.dtype[Any]", tuple[int, ...]]  # name, dtype, shape of one output tensor
Fill = Callable[[AtomicWriter, dict[str, tuple[int, int]]], None]


def _settings(checkpoint: Checkpoint, options: Mapping[str, Any]) -> FuseOptions:
    return checkpoint.with_config(FuseOptions.from_kwargs(options))


def load(path: PathLike, **options: Unpack[FuseKwargs]) -> dict[str, np.ndarray]:
    """Load a checkpoint for inference: originals zero-copy, fused tensors computed.

    Args:
        path: a ``.safetensors`` file, a sharded index, or a folder holding either.
        **options: as for :func:`fastfuse.plan`; with ``tp > 1`` pass the ``rank`` to load.

    Returns:
        key -> array. Originals are read-only views of a memory map (valid as long as you hold
        them); fused tensors are new arrays filled by one parallel kernel pass. A file written
        by ``fastfuse fuse`` (it records ``fastfuse.fused`` in its metadata) is returned as
        stored, fused tensors included, all zero-copy; options are refused for it, since its
        fusion was chosen when it was written (``fastfuse verify`` checks it).
    """
    checkpoint = open_checkpoint(path)
    arrays = checkpoint.arrays()
    if f"{META_PREFIX}fused" in checkpoint.metadata:
        if options:
            raise FuseError(
                f"{checkpoint.path} was already fused by fastfuse; load it without options "
                f"(got {sorted(options)}) or load the original checkpoint"
            )
        return arrays
    settings = _settings(checkpoint, options)
    if settings.tp > 1 and settings.rank is None:
        raise FuseError(f"tp={settings.tp}: load builds one rank; pass rank= (or use fuse_file for all ranks)")
    fusion = make_plan(checkpoint.metas(), settings)
    fused = execute(fusion, arrays)
    result = {key: value for key, value in arrays.items() if key not in fusion.dropped and key not in fused}
    result.update(fused)
    return result


def _describe(fusion: Plan, metas: Mapping[str, Any], rank: int | None) -> dict[str, str]:
    """fastfuse's own ``__metadata__`` entries: enough for ``verify`` and ``unfuse`` to work alone."""
    from . import __version__

    recipe = {
        t.key: {
            "sources": list(t.sources),
            "rows": list(t.rows),
            "starts": list(t.row_starts()),
            "transposed": t.transposed,
            "source_dtype": metas[next(s for s in t.sources if s is not None)].dtype.name,
        }
        for t in fusion.fused
    }
    described = {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}layout": fusion.layout,
        f"{META_PREFIX}scheme": fusion.scheme,
        f"{META_PREFIX}groups": json.dumps(fusion.layers, separators=(",", ":")),
        f"{META_PREFIX}fused": json.dumps(recipe, separators=(",", ":")),
    }
    if rank is not None:
        described.update({f"{META_PREFIX}tp": str(fusion.tp), f"{META_PREFIX}rank": str(rank)})
    return described


def recorded_plan(metadata: Mapping[str, str], metas: Mapping[str, Any], path: object) -> tuple[Plan, dict[str, str]]:
    """Rebuild the plan a fastfuse-written file records; also the source dtype of each fused key."""
    layout = metadata.get(f"{META_PREFIX}layout", "in_out")
    try:
        recipe = json.loads(metadata[f"{META_PREFIX}fused"])
        fused = []
        for key, entry in recipe.items():
            meta = metas[key]
            kind = "weight" if len(meta.shape) == 2 else "bias"
            fused.append(
                FusedTensor(
                    key,
                    "recorded",
                    None,
                    kind,
                    tuple(entry["sources"]),
                    tuple(entry["rows"]),
                    tuple(meta.shape),
                    meta.dtype,
                    tuple(entry["starts"]),
                    bool(entry["transposed"]),
                    layout,
                )
            )
        dtypes = {key: entry["source_dtype"] for key, entry in recipe.items()}
        options = FuseOptions(layout=layout, tp=int(metadata.get(f"{META_PREFIX}tp", "1")))
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedFileError(
            f"{path}: no valid fastfuse recipe in __metadata__ ({exc.__class__.__name__}: {exc}); "
            "was it written by `fastfuse fuse`?"
        ) from None
    fusion = Plan(
        metadata.get(f"{META_PREFIX}scheme", "recorded"),
        "",
        None,
        {},
        tuple(fused),
        layout=options.layout,
        tp=options.tp,
    )
    return fusion, dtypes


def _check_destination(sources: Iterable[PathLike], dst: Path) -> None:
    """Refuse a destination that is a source file, or (for outputs that are folders) its folder."""
    if not dst.exists():
        return
    for source in sources:
        if os.path.samefile(source, dst) or (
            dst.is_dir() and os.path.samefile(os.path.dirname(os.path.abspath(source)), dst)
        ):
            raise FuseError(f"destination {dst} is the source checkpoint or its folder; write to a new path")


def _write(dst: Path, entries: list[Entry], metadata: Mapping[str, str], fill: Fill, *, overwrite: bool) -> None:
    """Lay out ``entries`` in a new safetensors file at ``dst`` and let ``fill`` write the data."""
    outputs = [st_format.OutputTensor(name, dtype, shape) for name, dtype, shape in entries]
    prefix, offsets = st_format.layout(outputs, metadata)
    data_size = max((end for _, end in offsets.values()), default=0)
    with AtomicWriter(dst, prefix, data_size, overwrite=overwrite) as writer:
        fill(writer, offsets)


def _copy_originals(
    writer: AtomicWriter,
    offsets: Mapping[str, tuple[int, int]],
    checkpoint: Checkpoint,
    keys: Iterable[str],
    written: Written | None = None,
) -> None:
    """Copy tensors byte for byte from their shard into the destination (file to file)."""
    arrays: dict[str, np.ndarray] | None = None
    for key in keys:
        start, end = offsets[key]
        source = checkpoint.byte_range(key)
        if source is not None:
            writer.copy_from(source[0], source[1], start, end - start)
        else:  # a strided view (torch files): through the maps
            arrays = arrays if arrays is not None else checkpoint.arrays()
            view = writer.view(start, end, arrays[key].dtype, arrays[key].shape)
            np.copyto(view, arrays[key])
        if written:
            written(end - start)


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer (as transformers reads sizes)."""
    if isinstance(text, int):
        size = text
    else:
        units = {
            "": 1,
            "B": 1,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "TB": 10**12,
            "KIB": 2**10,
            "MIB": 2**20,
            "GIB": 2**30,
            "TIB": 2**40,
        }
        number = text.strip().upper().rstrip("BIKMGT")
        try:
            size = int(float(number) * units[text.strip().upper()[len(number) :]])
        except (KeyError, ValueError):
            raise FuseError(f"max shard size {text!r}: expected bytes like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise FuseError(f"max shard size {text!r}: expected a positive size")
    return size


def _nbytes(entry: Entry) -> int:
    return int(np.prod(entry[2], dtype=np.int64)) * entry[1].itemsize


def _shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Split entries in order into shards of at most ``limit`` data bytes (a bigger tensor goes alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


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
    """Fuse a checkpoint file to a new file, streaming through memory maps, atomically.

    ``src``: a ``.safetensors`` file, an index or a folder. ``dst``: the new ``.safetensors``
    file; or a folder, for a sharded output (``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json``) or a tensor-parallel one (``rank-k-of-n.safetensors``
    per rank, each complete on its own, and ``tensor_parallel.json``). A sharded input gives a
    sharded output (shards of at most ``max_shard_size`` bytes, default the largest input
    shard) unless ``single_file``; ``max_shard_size`` shards a single-file input too.
    ``overwrite_destination`` allows replacing existing files (CLI ``--force``). ``options``
    as for :func:`fastfuse.plan`; the input's ``__metadata__`` is kept and fastfuse adds its
    recipe (``fastfuse.*`` keys). ``progress(done, total)`` is called as data is written, with
    the bytes just written and the bytes the whole run writes.
    Returns the plan that was executed.

    Everything is validated before anything is created; on any error, no destination file is
    changed. Each file is atomic; an index is written last.
    """
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    _check_destination((f.path for f in checkpoint.files), destination)
    metas = checkpoint.metas()
    fusion = make_plan(metas, _settings(checkpoint, options))
    if fusion.tp > 1 and max_shard_size is not None:
        raise FuseError("tp and max_shard_size do not combine: each rank is written as one file")
    arrays = checkpoint.arrays()
    base = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}
    ranks = sorted({t.rank for t in fusion.fused}, key=lambda r: -1 if r is None else r) or [None]
    parts = []
    for rank in ranks:
        part = fusion.for_rank(rank)
        fused_keys = {t.key for t in part.fused}
        kept = [key for key in metas if key not in fusion.dropped and key not in fused_keys]
        entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
        entries += [(t.key, t.dtype, t.shape) for t in part.fused]
        parts.append((rank, part, kept, entries))
    total = sum(_nbytes(entry) for *_, entries in parts for entry in entries)
    written = None if progress is None else functools.partial(_report, progress, total)
    jobs = [
        (rank, entries, {**base, **_describe(part, metas, rank)}, _filler(checkpoint, arrays, part, kept, written))
        for rank, part, kept, entries in parts
    ]
    if fusion.tp > 1:
        names = [f"rank-{rank}-of-{fusion.tp}.safetensors" for rank, *_ in jobs]
        index = {"tp": fusion.tp, "layout": fusion.layout, "ranks": names}
        _write_folder(
            destination,
            [(name, *job[1:]) for name, job in zip(names, jobs)],
            TP_INDEX_NAME,
            index,
            overwrite=overwrite_destination,
        )
        return fusion
    ((_, entries, metadata, fill),) = jobs
    if single_file or (checkpoint.index is None and max_shard_size is None):
        _write(destination, entries, metadata, fill, overwrite=overwrite_destination)
        return fusion
    limit = parse_size(max_shard_size) if max_shard_size is not None else max(f.file_size for f in checkpoint.files)
    shards = _shards(entries, limit)
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    weight_map = dict(sorted((key, name) for name, shard in zip(names, shards) for key, _, _ in shard))
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    _write_folder(
        destination,
        [(name, shard, metadata, fill) for name, shard in zip(names, shards)],
        INDEX_NAME,
        index,
        overwrite=overwrite_destination,
    )
    return fusion


def _report(progress: Progress, total: int, done: int) -> None:
    progress(done, total)


def _filler(
    checkpoint: Checkpoint, arrays: Mapping[str, np.ndarray], fusion: Plan, kept: list[str], written: Written | None
) -> Fill:
    """Fill one output file: copy the kept originals it holds, then run the kernel into its map."""

    def fill(writer: AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        _copy_originals(writer, offsets, checkpoint, [key for key in kept if key in offsets], written)
        targets = [t for t in fusion.fused if t.key in offsets]
        outputs = {t.key: writer.view(*offsets[t.key], t.dtype, t.shape) for t in targets}
        execute(replace(fusion, fused=tuple(targets)), arrays, outputs)
        if written:
            written(sum(t.nbytes for t in targets))

    return fill


def _write_folder(
    folder: Path,
    files: list[tuple[str, list[Entry], Mapping[str, str], Fill]],
    index_name: str,
    index: Mapping[str, Any],
    *,
    overwrite: bool,
) -> None:
    """Write several files into ``folder`` (created if its parent exists), then the index, each atomically."""
    if folder.exists() and not folder.is_dir():
        raise FuseError(f"{folder}: this output is a folder of files, and {folder} is a file")
    if not folder.parent.is_dir():
        raise FuseError(f"{folder}: destination folder {folder.parent} does not exist")
    paths = [folder / index_name, *(folder / name for name, *_ in files)]
    for path in paths:
        if path.exists() and not overwrite:
            raise FuseError(f"{path}: exists; pass --force / overwrite_destination=True to replace it")
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        for name, entries, metadata, fill in files:
            _write(folder / name, entries, metadata, fill, overwrite=overwrite)
        write_bytes_atomic(
            folder / index_name, json.dumps(index, indent=2).encode() + b"\n", overwrite=overwrite
        )
    except BaseException:
        if created:
            for path in paths:
                path.unlink(missing_ok=True)
            folder.rmdir()
        raise


def verify(path: PathLike) -> list[str]:
    """Recompute every fused tensor of a fastfuse-written file from its originals.

    ``path``: a file, an index or folder of shards, or a tensor-parallel folder (every rank is
    checked). Returns the keys whose bytes differ (``rank-k-of-n.safetensors:key`` for ranks;
    empty: all bit-exact). Raises MalformedFileError if the file carries no fastfuse recipe,
    MissingTensorError if an original was dropped.
    """
    tp_index = Path(path) / TP_INDEX_NAME if Path(path).is_dir() else None
    if tp_index is not None and tp_index.is_file():
        ranks = json.loads(tp_index.read_text())["ranks"]
        return [f"{name}:{key}" for name in ranks for key in verify(Path(path) / name)]
    checkpoint = open_checkpoint(path)
    fusion, _ = recorded_plan(checkpoint.metadata, checkpoint.metas(), checkpoint.path)
    arrays = checkpoint.arrays()
    for t in fusion.fused:
        for source in t.sources:
            if source is not None and source not in arrays:
                raise MissingTensorError(
                    f"cannot verify {t.key!r}: its source {source!r} is not in the file (fused with originals dropped?)"
                )
    recomputed = execute(fusion, arrays)
    return [key for key, value in recomputed.items() if not _same_bits(value, arrays[key])]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def unfuse(src: PathLike, dst: PathLike, *, overwrite_destination: bool = False) -> list[str]:
    """Rebuild the original tensors of a fastfuse-written file and write them without fused keys.

    Fuse then unfuse is bit-exact, in either layout. Zero-filled bias parts (a missing
    ``k_proj.bias``) are not invented. Returns the rebuilt keys. Raises FuseError for a file
    fused with a widening ``dtype`` (unfusing would have to narrow) or a tensor-parallel rank.
    """
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    _check_destination((f.path for f in checkpoint.files), destination)
    metas = checkpoint.metas()
    fusion, source_dtypes = recorded_plan(checkpoint.metadata, metas, checkpoint.path)
    if fusion.tp > 1:
        raise FuseError(f"{checkpoint.path} holds one tensor-parallel rank's slices; unfuse needs an unsplit file")
    pieces: dict[str, tuple[FusedTensor, int, int]] = {}
    for t in fusion.fused:
        if as_dtype(source_dtypes[t.key]) != t.dtype:
            raise FuseError(
                f"{t.key!r} was widened from {source_dtypes[t.key]} to {t.dtype.name}; unfuse does not narrow"
            )
        offset = 0
        for source, rows in zip(t.sources, t.rows):
            if source is not None and source not in metas:
                pieces[source] = (t, offset, rows)
            offset += rows
    fused_keys = {t.key for t in fusion.fused}
    kept = [key for key in metas if key not in fused_keys]
    entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
    entries += [(source, t.dtype, _source_shape(t, rows)) for source, (t, _, rows) in pieces.items()]
    metadata = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}

    def fill(writer: AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        _copy_originals(writer, offsets, checkpoint, kept)
        arrays = checkpoint.arrays()
        for source, (t, offset, rows) in pieces.items():
            out = writer.view(*offsets[source], t.dtype, _source_shape(t, rows))
            fused = arrays[t.key]
            if t.kind == "bias":
                out[:] = fused[offset : offset + rows]
                continue
            # the part as [rows, in]: a column block of an in_out tensor, a row block of out_in
            part = fused[:, offset : offset + rows].T if t.layout == "in_out" else fused[offset : offset + rows]
            stored = part.T if t.transposed else part
            if stored.flags.c_contiguous:
                out[:] = stored
            else:
                transpose_concat([stored.T], out=out)

    _write(destination, entries, metadata, fill, overwrite=overwrite_destination)
    return list(pieces)


def _source_shape(t: FusedTensor, rows: int) -> tuple[int, ...]:
    """The shape a source of ``t`` had in the checkpoint (``[rows, in]``, ``[in, rows]`` or ``[rows]``)."""
    if t.kind == "bias":
        return (rows,)
    width = t.shape[0] if t.layout == "in_out" else t.shape[1]
    return (width, rows) if t.transposed else (rows, width)
