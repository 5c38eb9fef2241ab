"""``load``: a checkpoint for inference, originals zero-copy and fused tensors computed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import open_checkpoint, tensor_parallel_ranks
from fastfuse.fusion import execute, torch_converter
from fastfuse.planning.planner import FuseOptions, make_plan
from fastfuse.planning.recipe import META_PREFIX

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastfuse.aliases import FuseKwargs

__all__ = ["load"]


def load(path: PathLike, *, framework: str = "np", **options: Unpack[FuseKwargs]) -> dict[str, Any]:
    """Load a checkpoint for inference: originals zero-copy, fused tensors computed.

    Args:
        path: a ``.safetensors`` file, a torch ``.bin``/``.pt`` file, a sharded index, or a
            folder holding one of them.
        framework: ``"np"`` (numpy arrays) or ``"pt"`` (torch tensors; bf16 as
            ``torch.bfloat16``), as safetensors spells it.
        **options: as for :func:`fastfuse.plan`; with ``tp > 1`` pass the ``rank`` to load. For a
            tensor-parallel folder fastfuse wrote (``tensor_parallel.json``), pass only
            ``rank=`` (and optionally its ``tp=``): that rank's file is returned as stored.

    Returns:
        key -> array or tensor. Originals are views of a copy-on-write map of the file, valid as
        long as you hold them: writing to one changes your process's copy of those pages, never
        the file. numpy views are flagged read-only (a write is almost always a mistake; set
        ``a.flags.writeable = True`` to write anyway); torch tensors are writable. Fused tensors
        are new arrays (torch-owned tensors for ``"pt"``) filled in one parallel pass. A file
        written by ``fastfuse fuse`` (it records ``fastfuse.fused`` in its metadata) is returned
        as stored, fused tensors included, all zero-copy; options are refused for it, since its
        fusion was chosen when it was written (``fastfuse verify`` checks it).

    Raises:
        FuseError (and subclasses) as :func:`fastfuse.plan`; FuseFileNotFoundError and
        MalformedFileError for paths and bytes; FuseError for options given with a file
        fastfuse already fused.

    Example:
        >>> import tempfile, numpy as np, fastfuse
        >>> from safetensors.numpy import save_file
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(4, dtype=np.float16) for p in "qkv"}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_file(sd, f"{folder}/model.safetensors")
        ...     weights = fastfuse.load(f"{folder}/model.safetensors")
        ...     print(weights["fused.enc.0.self_attn.qkv.weight"].shape, len(weights))
        (4, 12) 4
    """
    to_torch = torch_converter(framework)
    ranks = tensor_parallel_ranks(Path(path))
    if ranks is not None:  # a tensor-parallel folder: the rank asked for, as stored
        path, options = _rank_file(Path(path), ranks, options), {}
    checkpoint = open_checkpoint(path)
    if f"{META_PREFIX}fused" in checkpoint.metadata:
        if options:
            raise FuseError(
                f"{checkpoint.path} was already fused by fastfuse; load it without options "
                f"(got {sorted(options)}) or load the original checkpoint"
            )
        arrays = checkpoint.arrays(writeable=to_torch is not None)
        return arrays if to_torch is None else {key: to_torch(value) for key, value in arrays.items()}
    settings = FuseOptions.from_kwargs(options).with_head_counts(checkpoint.head_counts)
    if settings.tp > 1 and settings.rank is None:
        raise FuseError(f"tp={settings.tp}: load builds one rank; pass rank= (or use fuse_file for all ranks)")
    fusion = make_plan(checkpoint.metas(), settings)
    arrays = checkpoint.arrays(writeable=to_torch is not None)
    fused = execute(fusion, arrays, framework=framework)
    kept = {key: value for key, value in arrays.items() if key not in fusion.dropped and key not in fused}
    if to_torch is not None:
        kept = {key: to_torch(value) for key, value in kept.items()}
    return kept | fused


def _rank_file(folder: Path, ranks: list[Path], options: Mapping[str, Any]) -> Path:
    """The file of the rank ``options`` asks for in a tensor-parallel folder; FuseError for any
    other option, a missing rank or a ``tp`` that is not the folder's."""
    rank, tp = options.get("rank"), options.get("tp", len(ranks))
    others = sorted(set(options) - {"rank", "tp"})
    if others or tp != len(ranks):
        got = others or [f"tp={tp}"]
        raise FuseError(
            f"{folder} is a tensor-parallel folder of {len(ranks)} ranks, fused when it was written; "
            f"load it with rank= only (got {got})"
        )
    if not isinstance(rank, int) or not 0 <= rank < len(ranks):
        raise FuseError(
            f"{folder} is a tensor-parallel folder of {len(ranks)} ranks: pass rank= (0..{len(ranks) - 1}), "
            f"found {rank!r}"
        )
    return ranks[rank]
