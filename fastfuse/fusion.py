"""Arrays in, fused arrays out: the public in-memory API.

``transpose_concat`` is the primitive; ``fuse`` plans a checkpoint and ``execute`` runs a plan:
every part of every fused tensor goes to the engine in one call (``engine.run_copies``: one
parallel kernel launch, or numpy until the kernels are loaded), which is also how ``load`` and
``fuse_file`` fill memory maps. Where a part lies in a fused tensor and in its source, for
every layout, is said once (:func:`fused_part`, :func:`source_part`); ``unfuse`` reads the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fastfuse.dtypes import check_movable, result_dtype
from fastfuse.errors import DtypeMismatchError, FuseError, ShapeMismatchError
from fastfuse.kernels.engine import run_copies
from fastfuse.kernels.regions import Copy
from fastfuse.planning.planner import FusedTensor, FuseOptions, Plan, make_plan

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastfuse.aliases import DTypeLike, FuseKwargs, PathLike, TensorLike

__all__ = ["execute", "fuse", "fused_part", "plan", "source_part", "transpose_concat"]


def plan(tensors: Mapping[str, TensorLike] | PathLike, **options: Unpack[FuseKwargs]) -> Plan:
    """Validate a checkpoint and describe what fusing it does, computing nothing.

    Args:
        tensors: name -> array (anything with ``.shape`` and ``.dtype``), or the path of a
            ``.safetensors`` file, a sharded index or a folder (only headers are read; head
            counts for ``tp`` may come from a ``config.json`` beside it).
        cross_kv: also fuse decoder cross-attention K and V (``fused.dec.{i}.encoder_attn.kv``).
        logits: also write the tied output projection ``[d, vocab]`` (``fused.dec.logits``).
        convert: for checkpoints stored already fused (Phi-3, GPT-2): write them in ``layout``.
        keep_originals: keep the source tensors beside the fused ones (default True).
        dtype: output dtype; ``None`` keeps the input's, ``"float32"`` widens f16/bf16.
        scheme: ``"auto"`` (detect from the keys) or a name from ``fastfuse.planning.rules.SCHEMES``.
        names: per-group fused key templates, e.g. ``{"encoder_qkv": "enc.{i}.qkv.{kind}"}``.
        overwrite: allow replacing fused keys the input already holds.
        layout: ``"in_out"`` (default, ``[in, sum(out)]`` for ``x @ W``) or ``"out_in"``
            (``[sum(out), in]`` for ``F.linear(x, W)``, as vLLM and CTranslate2 keep it).
        tp: tensor-parallel ranks; each rank's fused tensor holds its q heads, its kv heads
            (replicated when there are fewer kv heads than ranks) and its MLP rows.
        rank: plan only this rank (``fuse`` needs one when ``tp > 1``).
        heads, kv_heads: attention head counts, needed to split attention for ``tp > 1``.
        target: ``"fastfuse"`` (``fused.*`` keys beside the originals) or an engine's names
            and layout from ``fastfuse.planning.rules.TARGETS`` (``"vllm"``: ``qkv_proj``,
            ``[sum(out), in]``, sources dropped; ``"ctranslate2"``: a CTranslate2 Whisper model
            folder, written by ``fuse_file``).
        quantization: for ``target="ctranslate2"``: the weights' type as
            ``ct2-transformers-converter --quantization`` writes it (``"float16"``, ``"int8"``, ...).
        tokenizer_from: for ``target="ctranslate2"``: the Hugging Face folder whose
            ``config.json``, tokenizer and preprocessor config go with the model (needed for an
            openai-whisper ``.pt``).

    Every option, its type, default and allowed values is defined once, in
    ``fastfuse.planning.options.FuseOptions``; the CLI's flags are derived from it.

    Returns:
        The :class:`~fastfuse.planning.planner.Plan`: every fused tensor (key, sources, rows,
        shape, dtype), the dropped keys, layout, target and layer counts.

    Raises:
        FuseError (and subclasses), naming the key, the expected and the found value.

    Example:
        >>> import numpy as np, fastfuse
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(4, dtype=np.float16) for p in "qkv"}
        >>> [(t.key, t.shape) for t in fastfuse.plan(sd).fused]
        [('fused.enc.0.self_attn.qkv.weight', (4, 12))]
    """
    settings = FuseOptions.from_kwargs(options)
    if isinstance(tensors, (str, os.PathLike)):
        from fastfuse.formats.checkpoint import open_checkpoint

        checkpoint = open_checkpoint(tensors)
        return make_plan(checkpoint.metas(), settings.with_head_counts(checkpoint.head_counts))
    if not isinstance(tensors, Mapping):
        raise FuseError(f"expected a mapping of name -> array or a path, found {type(tensors).__name__}")
    return make_plan(tensors, settings)


def fuse(tensors: Mapping[str, Any], **options: Unpack[FuseKwargs]) -> dict[str, Any]:
    """Return a new dict: the originals (same objects, unless dropped) plus fused tensors.

    All groups are filled by one parallel kernel call; see :func:`transpose_concat` for the
    layout. The input mapping is not modified.

    Args:
        tensors: name -> numpy array, or name -> CPU torch tensor (a ``state_dict()``: any
            dtype including bf16, non-contiguous views, shared storage).
        **options: as for :func:`plan`; with ``tp > 1`` pass the ``rank`` to build.

    Returns:
        A new dict: the originals (the same objects, unless the target drops them) and the
        fused tensors, numpy arrays or, given torch tensors, torch-owned tensors.

    Raises:
        FuseError (and subclasses) as :func:`plan`; also for a CUDA or meta tensor, saying
        what to do.

    Example:
        >>> import numpy as np, fastfuse
        >>> sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": np.eye(2, dtype=np.float32) for p in "qkv"}
        >>> fastfuse.fuse(sd, keep_originals=False)["fused.enc.0.self_attn.qkv.weight"].shape
        (2, 6)
    """
    if isinstance(tensors, (str, bytes, os.PathLike)):
        raise FuseError(
            f"fuse takes a mapping of name -> array, found the path {os.fsdecode(tensors)!r}; "
            "use load() (in memory) or fuse_file() (file to file) for a path"
        )
    framework = "np"
    arrays: Mapping[str, Any] = tensors
    # Without torch imported, the input cannot hold torch tensors: no import for numpy users.
    if "torch" in sys.modules and isinstance(tensors, Mapping):
        from fastfuse import torch_bridge

        if torch_bridge.holds_torch(tensors):
            if torch_bridge.holds_cuda(tensors):
                on_device = plan(torch_bridge.TensorMetas(tensors), **options)
                device = _device_of_sources(tensors, on_device)
                if device.startswith("cuda"):
                    return _fuse_on_device(tensors, on_device, device, options)
            framework, arrays = "pt", torch_bridge.NumpyViews(tensors)
    fusion = plan(arrays, **options)
    if fusion.tp > 1 and options.get("rank") is None:
        raise FuseError(f"tp={fusion.tp}: fuse builds one rank in memory; pass rank= (or use fuse_file for all ranks)")
    fused = execute(fusion, arrays, framework=framework)
    result = {key: value for key, value in tensors.items() if key not in fusion.dropped and key not in fused}
    result.update(fused)
    return result


def _device_of_sources(tensors: Mapping[str, Any], fusion: Plan) -> str:
    """The one device every source of ``fusion`` is on; FuseError naming two keys on different ones."""
    from fastfuse import torch_bridge

    sources = sorted({key for t in fusion.fused for key in t.sources if key is not None})
    devices = torch_bridge.devices_of(tensors, sources)
    found = sorted(set(devices.values()))
    if len(found) > 1:
        first = {device: key for key, device in devices.items()}
        keys = ", ".join(f"{first[device]!r} on {device}" for device in found)
        raise FuseError(
            f"the tensors to fuse are on {len(found)} devices ({keys}); move them to one "
            "(e.g. {k: t.to('cuda:0') for k, t in state_dict.items()})"
        )
    return found[0] if found else "cpu"


def _fuse_on_device(
    tensors: Mapping[str, Any], fusion: Plan, device: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """``fuse`` for tensors on a CUDA device: the fused tensors carved from one allocation there,
    filled by the CUDA engine (transposed copies at HBM speed); the sources are not copied
    unless strided (then once, contiguous)."""
    import torch

    from fastfuse import torch_bridge
    from fastfuse.kernels.cuda_engine import carve, run_moves
    from fastfuse.staging.transfer_plan import fused_moves

    if fusion.tp > 1 and options.get("rank") is None:
        raise FuseError(f"tp={fusion.tp}: fuse builds one rank in memory; pass rank= (or use fuse_file for all ranks)")
    sources = sorted({key for t in fusion.fused for key in t.sources if key is not None})
    numbers = {key: n + 1 for n, key in enumerate(sources)}
    placements, nbytes, moves = fused_moves(fusion.fused, torch_bridge.TensorMetas(tensors), numbers)
    with torch.cuda.device(device):
        arena = torch.empty(nbytes, dtype=torch.uint8, device=device)
        flats = [arena] + [tensors[key].detach().contiguous().reshape(-1).view(torch.uint8) for key in sources]
        run_moves(flats, moves)
    fused = carve(arena, placements, torch_bridge.torch_dtype)
    result = {key: value for key, value in tensors.items() if key not in fusion.dropped and key not in fused}
    result.update(fused)
    return result


def torch_converter(framework: str) -> Callable[[np.ndarray], Any] | None:
    """None for ``"np"``; for ``"pt"``, the zero-copy numpy -> torch conversion (torch imported now)."""
    if framework == "np":
        return None
    if framework == "pt":
        try:
            from fastfuse import torch_bridge
        except ImportError:
            raise FuseError(
                'framework="pt" needs torch, which is not installed: pip install "fastfuse[torch]"'
            ) from None

        return torch_bridge.to_torch
    raise FuseError(f"framework {framework!r}: expected 'np' (numpy) or 'pt' (torch)")


def execute(
    fusion: Plan,
    tensors: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    framework: str = "np",
) -> dict[str, Any]:
    """Compute every tensor of ``fusion`` from ``tensors`` (numpy arrays), in one parallel kernel call.

    ``outputs`` may supply the destination of some or all keys (writable, C-contiguous, the
    planned shape and dtype, e.g. views of a memory-mapped file); the rest are allocated, as
    numpy arrays, or torch tensors for ``framework="pt"``, all carved from one allocation (the
    kernels fill it with few page faults, instead of one per 4 KB page of each output; each
    result still has its own torch storage). Returns key -> fused array.
    """
    given = outputs or {}
    results: dict[str, Any] = dict(given)
    results.update(_allocate([t for t in fusion.fused if t.key not in given], framework))
    work: list[Copy] = []
    for target in fusion.fused:
        out = given[target.key] if target.key in given else _numpy_of(results[target.key])
        offset = 0
        for key, start, rows in zip(target.sources, target.row_starts(), target.rows):
            if key is None:  # a missing bias: zeros
                part = np.zeros((1, rows), target.dtype)
            else:  # the planner checked it is array-like with a numpy dtype
                part = source_part(np.asarray(tensors[key]), target, start, rows)
            work.append(Copy.of(part, fused_part(out, target, offset, rows)))
            offset += rows
    run_copies(work)
    return results


def fused_part(fused: np.ndarray, target: FusedTensor, offset: int, rows: int) -> np.ndarray:
    """The part at ``offset`` (``rows`` long) of ``fused``, a tensor planned as ``target``, as a
    ``[rows, in]`` view (a bias: ``[1, rows]``): a column block of an ``in_out`` weight, seen
    transposed, or a row block of an ``out_in`` one.
    """
    if target.kind == "bias":
        return fused[offset : offset + rows].reshape(1, rows)
    if target.layout == "in_out":
        return fused[:, offset : offset + rows].T
    return fused[offset : offset + rows]


def source_part(source: np.ndarray, target: FusedTensor, start: int, rows: int) -> np.ndarray:
    """Rows ``start:start+rows`` of ``source``, one source of ``target``, as a ``[rows, in]`` view
    (a bias: ``[1, rows]``); a source stored transposed (``[in, out]``, GPT-2's Conv1D) gives
    its columns."""
    if target.kind == "bias":
        return source[start : start + rows].reshape(1, rows)
    if target.transposed:
        return source[:, start : start + rows].T
    return source[start : start + rows]


_ALIGN = 64  # each output starts on a cache line: the kernels' streaming stores need it


def _new_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of new, uninitialised memory starting on a cache line (one allocation: huge
    pages where the system has them; ``np.empty`` alone starts 16 bytes into a page)."""
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    skip = -buffer.ctypes.data % _ALIGN
    return buffer[skip : skip + nbytes]


def _allocate(targets: Sequence[FusedTensor], framework: str) -> dict[str, Any]:
    """New outputs for ``targets``: views of one buffer (numpy), or of one torch-owned tensor."""
    starts, end = [], 0
    for t in targets:
        start = -(-end // _ALIGN) * _ALIGN
        starts.append(start)
        end = start + t.nbytes
    if not targets:
        return {}
    to_torch = torch_converter(framework)
    buffer = _new_buffer(end)
    results = {}
    for t, start in zip(targets, starts):
        view = buffer[start : start + t.nbytes].view(t.dtype).reshape(t.shape)
        results[t.key] = view if to_torch is None else to_torch(view)
    return results


def _numpy_of(result: Any) -> np.ndarray:
    """The numpy view the kernels fill, of a result made by :func:`_allocate`."""
    if isinstance(result, np.ndarray):
        return result
    from fastfuse import torch_bridge

    return torch_bridge.from_torch("output", result)


def transpose_concat(
    parts: Sequence[np.ndarray],
    out: np.ndarray | None = None,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """Fuse ``N >= 1`` parts ``[o_j, in]`` into ``[in, sum(o_j)]``, one parallel pass.

    ``out[r, off_j + c] == parts[j][c, r]`` bit for bit (NaN payloads, -0.0), so
    ``x @ out == concatenate([x @ p.T for p in parts], axis=-1)``. Parts may be read-only,
    strided or memory-mapped; any element width of 1, 2, 4 or 8 bytes works (bf16 too).

    Args:
        parts: 2-D arrays sharing ``in`` (their second axis) and dtype.
        out: optional C-contiguous writable destination of shape ``[in, sum(o_j)]`` and the
            result dtype, e.g. a slice of a memory-mapped file; no temporary is made.
        dtype: result dtype; only float16/bfloat16 -> float32 widening differs from the input.

    Returns:
        ``out`` (or a new array).

    Raises:
        ShapeMismatchError, DtypeMismatchError: with the part index, expected and found.

    Example:
        >>> q, k = np.arange(6.0).reshape(2, 3), np.arange(3.0).reshape(1, 3)
        >>> transpose_concat([q, k])
        array([[0., 3., 0.],
               [1., 4., 1.],
               [2., 5., 2.]])
    """
    arrays = _check_parts(parts)
    target = result_dtype(arrays[0].dtype, dtype)
    shape = (arrays[0].shape[1], sum(a.shape[0] for a in arrays))
    if out is None:
        out = _new_buffer(shape[0] * shape[1] * target.itemsize).view(target).reshape(shape)
    else:
        _check_out(out, shape, target, arrays)
    work, start = [], 0
    for part in arrays:  # part j is the column block off_j:off_j+o_j of out, seen transposed
        work.append(Copy.of(part, out[:, start : start + part.shape[0]].T))
        start += part.shape[0]
    run_copies(work)
    return out


def _check_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(parts, np.ndarray) or not isinstance(parts, Sequence) or not parts:
        raise ShapeMismatchError(
            f"transpose_concat needs a non-empty sequence of 2-D arrays, e.g. [q, k, v]; found {type(parts).__name__}"
        )
    arrays: list[np.ndarray] = []
    for j, part in enumerate(parts):
        if not isinstance(part, np.ndarray):
            raise ShapeMismatchError(f"part {j}: expected a numpy array, found {type(part).__name__}")
        if part.ndim != 2:
            raise ShapeMismatchError(f"part {j}: expected 2 dimensions [out, in], found shape {list(part.shape)}")
        first = arrays[0] if arrays else part
        if part.shape[1] != first.shape[1]:
            raise ShapeMismatchError(
                f"part {j}: expected shape [*, {first.shape[1]}] like part 0, found {list(part.shape)}"
            )
        if part.dtype != first.dtype:
            raise DtypeMismatchError(f"part {j}: expected dtype {first.dtype} like part 0, found {part.dtype}")
        arrays.append(part)
    check_movable(arrays[0].dtype, "parts")
    return arrays


def _check_out(out: np.ndarray, shape: tuple[int, int], dtype: np.dtype[Any], parts: list[np.ndarray]) -> None:
    if not isinstance(out, np.ndarray):
        raise ShapeMismatchError(f"out: expected a numpy array, found {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ShapeMismatchError(
            f"out: expected shape {list(shape)} of {dtype}, found {list(out.shape)} of {out.dtype}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ShapeMismatchError(
            "out: expected a writable C-contiguous array; pass np.ascontiguousarray(out) or a fresh buffer"
        )
    for j, part in enumerate(parts):
        if np.may_share_memory(out, part):
            raise ShapeMismatchError(f"out overlaps part {j}; fastfuse does not fuse in place")
