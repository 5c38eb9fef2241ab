"""``load``: a checkpoint for inference, originals zero-copy and fused tensors computed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastfuse.aliases import PathLike
from fastfuse.errors import FuseError
from fastfuse.formats.checkpoint import Checkpoint, open_checkpoint, tensor_parallel_ranks
from fastfuse.fusion import execute, torch_converter
from fastfuse.planning.planner import FuseOptions, Plan, make_plan
from fastfuse.planning.recipe import META_PREFIX

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastfuse.aliases import FuseKwargs

__all__ = ["load"]


def load(
    path: PathLike, *, framework: str | None = None, device: Any = None, **options: Unpack[FuseKwargs]
) -> dict[str, Any]:
    """Load a checkpoint for inference: originals zero-copy, fused tensors computed.

    Args:
        path: a ``.safetensors`` file, a torch ``.bin``/``.pt`` file, a sharded index, or a
            folder holding one of them.
        framework: ``"np"`` (numpy arrays, the default on the CPU) or ``"pt"`` (torch tensors;
            bf16 as ``torch.bfloat16``), as safetensors spells it. A CUDA ``device`` implies
            ``"pt"``.
        device: ``None`` or ``"cpu"``: the zero-copy load below. A CUDA device (``"cuda"``,
            ``"cuda:1"``, ``1``, a ``torch.device``): every tensor is put there, bit-identical to
            the CPU load with the same options moved there; each byte is read from the file once
            (only the rows a ``tp`` rank keeps), through a bounded set of pinned staging buffers
            (see ``fastfuse.staging``), and the fused tensors are formed on the device. The
            results are carved from one device allocation (each at least 64-byte aligned); device memory
            peaks at their size plus at most 256 MiB of scratch.
        **options: as for :func:`fastfuse.plan`; with ``tp > 1`` pass the ``rank`` to load. For a
            tensor-parallel folder fastfuse wrote (``tensor_parallel.json``), pass only
            ``rank=`` (and optionally its ``tp=``): that rank's file is returned as stored.

    Returns:
        key -> array or tensor. On the CPU, originals are views of a copy-on-write map of the
        file, valid as long as you hold them: writing to one changes your process's copy of those
        pages, never the file. numpy views are flagged read-only (a write is almost always a
        mistake; set ``a.flags.writeable = True`` to write anyway); torch tensors are writable.
        Fused tensors are new arrays (torch-owned tensors for ``"pt"``) filled in one parallel
        pass. A file written by ``fastfuse fuse`` (it records ``fastfuse.fused`` in its
        metadata) is returned as stored, fused tensors included, all zero-copy; options are
        refused for it, since its fusion was chosen when it was written (``fastfuse verify``
        checks it).

    Raises:
        FuseError: ``framework="np"`` with a CUDA device, a device that is neither the CPU nor
            CUDA, or CUDA asked for where torch has none; options given with a file fastfuse
            already fused; and whatever :func:`fastfuse.plan` raises. FuseFileNotFoundError and
            MalformedFileError for paths and bytes.

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
    cuda = _cuda_device(device, framework)
    if cuda is not None:
        return _load_onto(cuda, path, options)
    ranks = tensor_parallel_ranks(Path(path))
    if ranks is not None:  # a tensor-parallel folder: the rank asked for, as stored
        path, options = _rank_file(Path(path), ranks, options), {}
    checkpoint = open_checkpoint(path)
    fusion = _fusion_plan(checkpoint, options)
    framework = "np" if framework is None else framework
    to_torch = torch_converter(framework)
    arrays = checkpoint.arrays(writeable=to_torch is not None)
    if fusion is None:
        return arrays if to_torch is None else {key: to_torch(value) for key, value in arrays.items()}
    fused = execute(fusion, arrays, framework=framework)
    kept = {key: value for key, value in arrays.items() if key not in fusion.dropped and key not in fused}
    if to_torch is not None:
        kept = {key: to_torch(value) for key, value in kept.items()}
    return kept | fused


def _load_onto(cuda: Any, path: PathLike, options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`load` onto CUDA device ``cuda``: the staging is pinned while the header is read."""
    from fastfuse import torch_bridge
    from fastfuse.kernels.cuda_engine import CudaDestination
    from fastfuse.staging.pipeline import StagingConfig, run_transfer
    from fastfuse.staging.transfer_plan import plan_transfer

    config = StagingConfig.from_environment()
    destination = CudaDestination(cuda, config.lanes, config.slots, torch_bridge.torch_dtype, config.total_bytes)
    try:
        ranks = tensor_parallel_ranks(Path(path))
        if ranks is not None:
            path, options = _rank_file(Path(path), ranks, options), {}
        checkpoint = open_checkpoint(path)
        transfer = plan_transfer(checkpoint, _fusion_plan(checkpoint, options))
    except BaseException:
        destination.close()
        raise
    return run_transfer(checkpoint, transfer, destination, config)


def _fusion_plan(checkpoint: Checkpoint, options: Mapping[str, Any]) -> Plan | None:
    """The plan of a load; None for a file fastfuse already fused (loaded as stored)."""
    if f"{META_PREFIX}fused" in checkpoint.metadata:
        if options:
            raise FuseError(
                f"{checkpoint.path} was already fused by fastfuse; load it without options "
                f"(got {sorted(options)}) or load the original checkpoint"
            )
        return None
    settings = FuseOptions.from_kwargs(options).with_head_counts(checkpoint.head_counts)
    if settings.tp > 1 and settings.rank is None:
        raise FuseError(f"tp={settings.tp}: load builds one rank; pass rank= (or use fuse_file for all ranks)")
    return make_plan(checkpoint.metas(), settings)


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


def _cuda_device(device: Any, framework: str | None) -> Any:
    """The torch CUDA device ``device`` names, or None for the CPU (torch imported only for CUDA)."""
    if device is None or (isinstance(device, str) and device == "cpu"):
        return None
    if type(device).__module__.startswith("torch") and getattr(device, "type", None) == "cpu":
        return None
    if not isinstance(device, (str, int)) and not type(device).__module__.startswith("torch"):
        raise FuseError(f"device {device!r}: expected 'cpu', 'cuda', 'cuda:<n>', an index or a torch.device")
    if isinstance(device, str) and not device.startswith("cuda"):
        raise FuseError(f"device {device!r}: fastfuse loads onto 'cpu' or CUDA devices ('cuda', 'cuda:<n>', an index)")
    if framework not in (None, "pt"):
        raise FuseError(
            f"framework={framework!r} with device {str(device)!r}: numpy arrays cannot live on a CUDA device; "
            "pass framework='pt' (or leave framework out) for torch tensors there, or device='cpu'"
        )
    from fastfuse.kernels.cuda_engine import cuda_device

    return cuda_device(device)
