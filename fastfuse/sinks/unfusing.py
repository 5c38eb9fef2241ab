"""``unfuse``: rebuild the original tensors of a file fastfuse wrote, from its recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastfuse.aliases import PathLike
from fastfuse.dtypes import as_dtype
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import open_checkpoint
from fastfuse.fusion import transpose_concat
from fastfuse.planning.planner import FusedTensor
from fastfuse.planning.recipe import META_PREFIX, recorded_plan
from fastfuse.sinks.atomic import AtomicWriter
from fastfuse.sinks.file_writer import check_destination, copy_originals, write_file

__all__ = ["unfuse"]


def unfuse(src: PathLike, dst: PathLike, *, overwrite_destination: bool = False) -> list[str]:
    """Rebuild the original tensors of a fastfuse-written file and write them without fused keys.

    Fuse then unfuse is bit-exact, in either layout and for every target. Zero-filled bias
    parts (a missing ``k_proj.bias``) are not invented.

    Args:
        src: a file written by ``fuse_file`` (any target, originals kept or dropped).
        dst: the new ``*.safetensors`` file.
        overwrite_destination: allow replacing an existing ``dst``.

    Returns:
        The rebuilt source keys (empty when the file kept its originals).

    Raises:
        FuseError: a file fused with a widening ``dtype`` (unfusing would have to narrow) or
            one tensor-parallel rank; MalformedFileError for a file without a recipe.

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
    checkpoint = open_checkpoint(src)
    destination = Path(dst)
    check_destination((f.path for f in checkpoint.files), destination, folder=False)
    metas = checkpoint.metas()
    fusion, source_dtypes = recorded_plan(checkpoint.metadata, metas, checkpoint.path)
    if fusion.tp > 1:
        raise FuseError(f"{checkpoint.path} holds one tensor-parallel rank's slices; unfuse needs an unsplit file")
    pieces: dict[str, tuple[FusedTensor, int, int]] = {}  # source key -> (fused tensor, offset, rows)
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
    kept = checkpoint.in_file_order(key for key in metas if key not in fused_keys)
    entries = [(key, metas[key].dtype, metas[key].shape) for key in kept]
    entries += [(source, t.dtype, _source_shape(t, rows)) for source, (t, _, rows) in pieces.items()]
    metadata = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(META_PREFIX)}
    arrays = checkpoint.arrays()

    def fill(writer: AtomicWriter, offsets: dict[str, tuple[int, int]]) -> None:
        copy_originals(checkpoint, arrays, kept, writer, offsets)
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
                np.copyto(out, stored)
            else:
                transpose_concat([stored.T], out=out)

    write_file(destination, entries, metadata, fill, overwrite=overwrite_destination, copied=(checkpoint, kept))
    return list(pieces)


def _source_shape(t: FusedTensor, rows: int) -> tuple[int, ...]:
    """The shape a source of ``t`` had in the checkpoint (``[rows, in]``, ``[in, rows]`` or ``[rows]``)."""
    if t.kind == "bias":
        return (rows,)
    width = t.shape[0] if t.layout == "in_out" else t.shape[1]
    return (width, rows) if t.transposed else (rows, width)
