"""``unfuse``: rebuild the original tensors of a file fastfuse wrote, from its recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.dtypes import as_dtype
from fastfuse.errors import FuseError, MalformedFileError
from fastfuse.formats.checkpoint import open_checkpoint, tensor_parallel_ranks
from fastfuse.fusion import fused_part, source_part
from fastfuse.kernels.engine import run_copies
from fastfuse.kernels.regions import Copy
from fastfuse.planning.planner import FusedTensor
from fastfuse.planning.recipe import META_PREFIX, recorded_plan
from fastfuse.sinks.atomic import AtomicWriter
from fastfuse.sinks.destinations import check_destination
from fastfuse.sinks.file_writer import copy_originals, write_file

__all__ = ["unfuse"]


class _Piece(NamedTuple):
    """Rows ``start:start+rows`` of a source, found at column (row, for ``out_in``) ``offset`` of a fused array."""

    fused: FusedTensor
    array: np.ndarray[Any, Any]
    offset: int
    start: int
    rows: int


def unfuse(src: PathLike, dst: PathLike, *, overwrite_destination: bool = False) -> list[str]:
    """Rebuild the original tensors of a fastfuse-written file and write them without fused keys.

    Fuse then unfuse is bit-exact, in either layout, for every target and tensor-parallel split. Zero-filled bias
    parts (a missing ``k_proj.bias``) are not invented.

    Args:
        src: a file written by ``fuse_file`` (any target, originals kept or dropped), or a
            tensor-parallel folder (``tensor_parallel.json`` and its ``rank-k-of-n.safetensors``):
            each source is reassembled from the rows every rank holds.
        dst: the new ``*.safetensors`` file.
        overwrite_destination: allow replacing an existing ``dst``.

    Returns:
        The rebuilt source keys (empty when the file kept its originals).

    Raises:
        FuseError: a file fused with a widening ``dtype`` (unfusing would have to narrow) or
            a single rank file (its folder holds the other ranks); MalformedFileError for a file
            without a recipe, or ranks that do not cover a source.

    Example:
        >>> import tempfile, numpy as np, fastfuse
        >>> from safetensors.numpy import save_file
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(4, dtype=np.float16) for p in "qkv"}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file(sd, f"{folder}/model.safetensors")
        ...     _ = fastfuse.fuse_file(f"{folder}/model.safetensors", f"{folder}/vllm.safetensors", target="vllm")
        ...     fastfuse.unfuse(f"{folder}/vllm.safetensors", f"{folder}/back.safetensors")
        ['model.encoder.layers.0.self_attn.q_proj.weight', 'model.encoder.layers.0.self_attn.k_proj.weight', 'model.encoder.layers.0.self_attn.v_proj.weight']
    """
    ranks = tensor_parallel_ranks(Path(src))
    checkpoints = [open_checkpoint(rank) for rank in ranks] if ranks is not None else [open_checkpoint(src)]
    destination = Path(dst)
    check_destination((f.path for c in checkpoints for f in c.files), destination, folder=False)
    first = checkpoints[0]
    metas = first.metas()
    recorded = [recorded_plan(c.metadata, c.metas(), c.path) for c in checkpoints]
    if ranks is None and recorded[0][0].tp > 1:
        raise FuseError(
            f"{first.path} holds one tensor-parallel rank's slices; unfuse its folder (the one with "
            "tensor_parallel.json), which holds every rank"
        )
    pieces: dict[str, list[_Piece]] = {}  # source key -> where its rows are
    for checkpoint, (fusion, source_dtypes) in zip(checkpoints, recorded):
        arrays = checkpoint.arrays()
        for t in fusion.fused:
            if as_dtype(source_dtypes[t.key]) != t.dtype:
                raise FuseError(
                    f"{t.key!r} was widened from {source_dtypes[t.key]} to {t.dtype.name}; unfuse does not narrow"
                )
            offset = 0
            for source, start, rows in zip(t.sources, t.row_starts(), t.rows):
                if source is not None and source not in metas:
                    pieces.setdefault(source, []).append(_Piece(t, arrays[t.key], offset, start, rows))
                offset += rows
    shapes = {source: _source_shape(source, found) for source, found in pieces.items()}
    fused_keys = {t.key for fusion, _ in recorded for t in fusion.fused}
    kept = first.in_file_order(key for key in metas if key not in fused_keys)
    entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
    entries += [(source, found[0].fused.dtype, shapes[source]) for source, found in pieces.items()]
    metadata = {k: v for k, v in first.metadata.items() if not k.startswith(META_PREFIX)}
    originals = first.arrays()

    def fill(writer: AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        copy_originals(first, originals, kept, writer, offsets)
        transposes: list[Copy] = []
        for source, found in pieces.items():
            out = writer.view(*offsets[source], found[0].fused.dtype, shapes[source])
            for piece in found:
                fused = fused_part(piece.array, piece.fused, piece.offset, piece.rows)
                stored = source_part(out, piece.fused, piece.start, piece.rows)
                if any(fused.strides[axis] == stored.strides[axis] == fused.itemsize for axis in (0, 1)):
                    np.copyto(stored, fused)  # the same axis adjacent in both: no transpose
                else:
                    transposes.append(Copy.of(fused, stored))
        run_copies(transposes)

    write_file(destination, entries, metadata, fill, overwrite=overwrite_destination, copied=(first, kept))
    return list(pieces)


def _source_shape(source: str, found: list[_Piece]) -> tuple[int, ...]:
    """The shape ``source`` had in the checkpoint (``[rows, in]``, ``[in, rows]`` or ``[rows]``),
    checking that its pieces cover every row."""
    covered = 0
    for piece in sorted(found, key=lambda p: p.start):
        if piece.start > covered:
            raise MalformedFileError(f"{source!r}: no rank holds its rows {covered}..{piece.start - 1}")
        covered = max(covered, piece.start + piece.rows)
    t = found[0].fused
    if t.kind == "bias":
        return (covered,)
    width = t.shape[0] if t.layout == "in_out" else t.shape[1]
    return (width, covered) if t.transposed else (covered, width)
