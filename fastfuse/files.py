"""Checkpoint files: zero-copy load, streaming file-to-file fuse, verify and unfuse.

Sources are memory-mapped and never copied into anonymous memory; fused tensors are computed by
the kernel straight from those maps, into a memory map of the destination when writing files.
A file run validates everything (headers, plan, destination) before it creates anything, and
writes atomically: a temporary file in the destination folder, renamed on success only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import st_format
from ._dtypes import as_dtype
from ._typing import PathLike
from .core import execute, transpose_concat
from .errors import FuseError, MalformedFileError, MissingTensorError
from .plan import LAYOUT, FusedTensor, Plan, make_plan

__all__ = ["load", "fuse_file", "verify", "unfuse", "read_metadata", "Checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
META_PREFIX = "fastfuse."
Progress = Callable[[int], None]


@dataclass(frozen=True)
class _Meta:
    """Shape and dtype of a tensor known from a header only (what planning needs)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk: its shard files, each tensor's header entry and shard."""

    path: Path
    index: Path | None
    headers: tuple[st_format.Header, ...]
    location: dict[str, tuple[int, st_format.TensorInfo]]  # key -> (shard number, header entry)

    @property
    def metadata(self) -> dict[str, str]:
        """The first shard's ``__metadata__`` (shards of one checkpoint share it)."""
        return dict(self.headers[0].metadata or {})

    def metas(self) -> dict[str, _Meta]:
        return {
            key: _Meta(info.shape, st_format.dtype_of(info.dtype)) for key, (_, info) in self.location.items()
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only zero-copy views of every tensor, in shard then header order."""
        arrays: dict[str, np.ndarray] = {}
        for header in self.headers:
            arrays.update(st_format.map_tensors(header))
        return arrays


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Resolve ``path`` (a file, an index, or a folder holding either) and read every header.

    Raises MalformedFileError for a bad file or index, a key held by two shards, or an index
    naming a key its shard does not hold; FuseError for a path that is not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / INDEX_NAME, path / SINGLE_NAME]
        found = [c for c in candidates if c.exists()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1 and not (found and found[0].name in (INDEX_NAME, SINGLE_NAME)):
            raise FuseError(
                f"{path}: expected {INDEX_NAME}, {SINGLE_NAME} or exactly one .safetensors file in the folder, "
                f"found {len(found)}"
            )
        path = found[0]
    if path.name.endswith(".json"):
        weight_map = st_format.read_index(path)
        shards = list(dict.fromkeys(weight_map.values()))
        headers = tuple(st_format.read_header(shard) for shard in shards)
        index: Path | None = path
    else:
        weight_map = None
        headers = (st_format.read_header(path),)
        index = None
    location: dict[str, tuple[int, st_format.TensorInfo]] = {}
    for number, header in enumerate(headers):
        for key, info in header.tensors.items():
            if key in location:
                other = headers[location[key][0]].path
                raise MalformedFileError(f"tensor {key!r} is in two shards: {other} and {header.path}")
            location[key] = (number, info)
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in location or os.path.abspath(headers[location[key][0]].path) != os.path.abspath(shard):
                raise MalformedFileError(f"{index}: weight_map names {key!r} in {shard}, which does not hold it")
    return Checkpoint(path, index, headers, location)


def read_metadata(path: PathLike) -> dict[str, _Meta]:
    """Shapes and dtypes of every tensor of a checkpoint, from its headers alone."""
    return open_checkpoint(path).metas()


def load(path: PathLike, **options: Any) -> dict[str, np.ndarray]:
    """Load a checkpoint for inference: originals zero-copy, fused tensors computed.

    Args:
        path: a ``.safetensors`` file, a sharded index, or a folder holding either.
        **options: as for :func:`fastfuse.plan` (``cross_kv``, ``logits``, ``keep_originals``,
            ``dtype``, ``scheme``, ``names``, ``overwrite``).

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
    fusion = make_plan(checkpoint.metas(), **options)
    fused = execute(fusion, arrays)
    result = {key: value for key, value in arrays.items() if key not in fusion.dropped and key not in fused}
    result.update(fused)
    return result


def _describe(fusion: Plan, source_dtypes: Mapping[str, np.dtype[Any]]) -> dict[str, str]:
    """fastfuse's own ``__metadata__`` entries: enough for ``verify`` and ``unfuse`` to work alone."""
    from . import __version__

    recipe = {
        t.key: {"sources": list(t.sources), "rows": list(t.rows), "source_dtype": source_dtypes[t.key].name}
        for t in fusion.fused
    }
    return {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}layout": LAYOUT,
        f"{META_PREFIX}scheme": fusion.scheme,
        f"{META_PREFIX}groups": json.dumps(fusion.layers, separators=(",", ":")),
        f"{META_PREFIX}fused": json.dumps(recipe, separators=(",", ":")),
    }


def recorded_plan(metadata: Mapping[str, str], metas: Mapping[str, Any], path: object) -> tuple[Plan, dict[str, str]]:
    """Rebuild the plan a fastfuse-written file records; also the source dtype of each fused key."""
    try:
        recipe = json.loads(metadata[f"{META_PREFIX}fused"])
        fused = []
        for key, entry in recipe.items():
            meta = metas[key]
            sources = tuple(entry["sources"])
            kind = "weight" if len(meta.shape) == 2 else "bias"
            fused.append(FusedTensor(key, "recorded", None, kind, sources, tuple(entry["rows"]), tuple(meta.shape), meta.dtype))
        dtypes = {key: entry["source_dtype"] for key, entry in recipe.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedFileError(
            f"{path}: no valid fastfuse recipe in __metadata__ ({exc.__class__.__name__}: {exc}); "
            "was it written by `fastfuse fuse`?"
        ) from None
    if metadata.get(f"{META_PREFIX}layout", LAYOUT) != LAYOUT:
        raise MalformedFileError(f"{path}: layout {metadata[f'{META_PREFIX}layout']!r} is not supported; expected {LAYOUT!r}")
    return Plan(metadata.get(f"{META_PREFIX}scheme", "recorded"), "", None, {}, tuple(fused)), dtypes


def _check_destination(sources: Iterable[PathLike], dst: Path) -> None:
    for source in sources:
        if dst.exists() and os.path.samefile(source, dst):
            raise FuseError(f"destination {dst} is the source file; write to a new path")


def _write(
    dst: Path,
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]],
    metadata: Mapping[str, str],
    fill: Callable[[st_format.AtomicWriter, dict[str, tuple[int, int]]], None],
    *,
    overwrite: bool,
) -> None:
    """Lay out ``entries`` in a new safetensors file at ``dst`` and let ``fill`` write the data."""
    outputs = [st_format.OutputTensor(name, dtype, shape) for name, dtype, shape in entries]
    prefix, offsets = st_format.layout(outputs, metadata)
    data_size = max((end for _, end in offsets.values()), default=0)
    with st_format.AtomicWriter(dst, prefix, data_size, overwrite=overwrite) as writer:
        fill(writer, offsets)


def _copy_originals(
    writer: st_format.AtomicWriter,
    offsets: Mapping[str, tuple[int, int]],
    checkpoint: Checkpoint,
    keys: Iterable[str],
    progress: Progress | None = None,
) -> None:
    """Copy tensors byte for byte from their shard into the destination (file to file)."""
    for key in keys:
        number, info = checkpoint.location[key]
        header = checkpoint.headers[number]
        start, end = offsets[key]
        writer.copy_from(header.path, header.data_offset + info.start, start, end - start)
        if progress:
            progress(end - start)


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer (as transformers reads sizes)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    number = text.strip().upper().rstrip("BIKMGT")
    unit = text.strip().upper()[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise FuseError(f"max shard size {text!r}: expected bytes like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise FuseError(f"max shard size {text!r}: expected a positive size")
    return size


def _shards(entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]], limit: int) -> list[list[tuple[str, np.dtype[Any], tuple[int, ...]]]]:
    """Split entries in order into shards of at most ``limit`` data bytes (a bigger tensor goes alone)."""
    shards: list[list[tuple[str, np.dtype[Any], tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * entry[1].itemsize
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
    **options: Any,
) -> Plan:
    """Fuse a checkpoint file to a new file, streaming through memory maps, atomically.

    ``src``: a ``.safetensors`` file, an index or a folder. ``dst``: the new ``.safetensors``
    file; or, for a sharded output, the folder that receives ``model-0000k-of-0000n.safetensors``
    and ``model.safetensors.index.json``. A sharded input gives a sharded output (shards of at
    most ``max_shard_size`` bytes, default the largest input shard) unless ``single_file``;
    ``max_shard_size`` shards a single-file input too. ``overwrite_destination`` allows replacing
    existing files (CLI ``--force``). ``options`` as for :func:`fastfuse.plan`; the input's
    ``__metadata__`` is kept and fastfuse adds its recipe (``fastfuse.*`` keys). ``progress`` is
    called with byte counts as data is written. Returns the plan that was executed.

    Everything is validated before anything is created; on any error, no destination file is
    changed. Each file is atomic; a sharded output's index is written last.
    """
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    _check_destination((h.path for h in checkpoint.headers), destination)
    metas = checkpoint.metas()
    fusion = make_plan(metas, **options)
    fused = {t.key: t for t in fusion.fused}
    kept = [key for key in metas if key not in fusion.dropped and key not in fused]
    entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
    entries += [(t.key, t.dtype, t.shape) for t in fusion.fused]
    source_dtypes = {t.key: metas[next(s for s in t.sources if s is not None)].dtype for t in fusion.fused}
    metadata = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}
    metadata.update(_describe(fusion, source_dtypes))
    arrays = checkpoint.arrays()

    def fill(writer: st_format.AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        _copy_originals(writer, offsets, checkpoint, [key for key in kept if key in offsets], progress)
        targets = [t for t in fusion.fused if t.key in offsets]
        outputs = {t.key: writer.view(*offsets[t.key], t.dtype, t.shape) for t in targets}
        execute(replace(fusion, fused=tuple(targets)), arrays, outputs)
        if progress:
            progress(sum(t.nbytes for t in targets))

    sharded = not single_file and (checkpoint.index is not None or max_shard_size is not None)
    if not sharded:
        _write(destination, entries, metadata, fill, overwrite=overwrite_destination)
        return fusion
    limit = parse_size(max_shard_size) if max_shard_size is not None else max(h.file_size for h in checkpoint.headers)
    _write_sharded(destination, _shards(entries, limit), metadata, fill, overwrite=overwrite_destination)
    return fusion


def _write_sharded(
    folder: Path,
    shards: list[list[tuple[str, np.dtype[Any], tuple[int, ...]]]],
    metadata: Mapping[str, str],
    fill: Callable[[st_format.AtomicWriter, dict[str, tuple[int, int]]], None],
    *,
    overwrite: bool,
) -> None:
    """Write shards into ``folder`` (created if its parent exists), then the index, each atomically."""
    if folder.exists() and not folder.is_dir():
        raise FuseError(f"{folder}: a sharded output needs a folder, and this is a file")
    if not folder.parent.is_dir():
        raise FuseError(f"{folder}: destination folder {folder.parent} does not exist")
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    index_path = folder / INDEX_NAME
    for path in [index_path, *(folder / name for name in names)]:
        if path.exists() and not overwrite:
            raise FuseError(f"{path}: exists; pass --force / overwrite_destination=True to replace it")
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        for name, entries in zip(names, shards):
            _write(folder / name, entries, metadata, fill, overwrite=overwrite)
        total = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shard in shards for _, dtype, shape in shard)
        weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
        st_format.write_bytes_atomic(index_path, json.dumps(index, indent=2).encode() + b"\n", overwrite=overwrite)
    except BaseException:
        if created:
            for name in names:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
        raise


def verify(path: PathLike) -> list[str]:
    """Recompute every fused tensor of a fastfuse-written file from its originals.

    Returns the keys whose bytes differ (empty: all bit-exact). Raises MalformedFileError if the
    file carries no fastfuse recipe, MissingTensorError if an original was dropped.
    """
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

    Fuse then unfuse is bit-exact. Zero-filled bias parts (a missing ``k_proj.bias``) are not
    invented. Returns the rebuilt keys. Raises FuseError for a file fused with a widening
    ``dtype`` (unfusing would have to narrow).
    """
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    _check_destination((h.path for h in checkpoint.headers), destination)
    metas = checkpoint.metas()
    fusion, source_dtypes = recorded_plan(checkpoint.metadata, metas, checkpoint.path)
    pieces: dict[str, tuple[FusedTensor, int]] = {}
    for t in fusion.fused:
        if as_dtype(source_dtypes[t.key]) != t.dtype:
            raise FuseError(
                f"{t.key!r} was widened from {source_dtypes[t.key]} to {t.dtype.name}; unfuse does not narrow"
            )
        offset = 0
        for source, rows in zip(t.sources, t.rows):
            if source is not None and source not in metas:
                pieces[source] = (t, offset)
            offset += rows
    fused_keys = {t.key for t in fusion.fused}
    kept = [key for key in metas if key not in fused_keys]
    entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
    for source, (t, _) in pieces.items():
        rows = t.rows[t.sources.index(source)]
        entries.append((source, t.dtype, (rows, t.shape[0]) if t.kind == "weight" else (rows,)))
    metadata = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}

    def fill(writer: st_format.AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        _copy_originals(writer, offsets, checkpoint, kept)
        arrays = checkpoint.arrays()
        for source, (t, offset) in pieces.items():
            rows = t.rows[t.sources.index(source)]
            fused = arrays[t.key]
            if t.kind == "weight":
                out = writer.view(*offsets[source], t.dtype, (rows, t.shape[0]))
                transpose_concat([fused[:, offset : offset + rows]], out=out)
            else:
                writer.view(*offsets[source], t.dtype, (rows,))[:] = fused[offset : offset + rows]

    _write(destination, entries, metadata, fill, overwrite=overwrite_destination)
    return list(pieces)

