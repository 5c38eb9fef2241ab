"""The CUDA engine: fusion moves as torch ops on the device, and the destination that stages a
load through pinned host buffers onto it. Imported only when a CUDA device is asked for.

Moves (:mod:`fastfuse.kernels.regions`) run as strided ``copy_`` on integer views of the
buffers (bits are moved, never converted as floats: NaN payloads and -0.0 kept), on one
compute stream, at HBM speed: a transposed copy of all of whisper large-v3's Q/K/V takes well
under a millisecond, so fusing on the device costs nothing next to moving the bytes there.
Widening float16/bfloat16 to float32 is integer arithmetic on the bits (the numpy engine's
formula), in blocks of at most ``WIDEN_BLOCK`` elements so that its temporaries stay small.

:class:`CudaDestination` (see ``fastfuse.staging.pipeline.Destination``): one device
allocation for the results, one for the scratch (freed before the results are returned), one
pinned host block for the staging (returned to torch's pinned-memory cache when the load ends,
so that the next load in the process need not pin again; ``torch.cuda.empty_host_cache`` or
process exit releases it), one stream per lane, events to reuse the staging slots. Given the
staging size up front, it pins that block and loads the copy kernels on a thread of its own
while the caller reads the header and plans.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fastfuse.errors import FuseError
from fastfuse.kernels.regions import Move, Placement, Region

__all__ = ["WIDEN_BLOCK", "CudaDestination", "carve", "cuda_device", "run_moves"]

WIDEN_BLOCK = 1 << 22  # elements widened at a time (int64 temporaries: 32 MiB each)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def cuda_device(device: Any) -> torch.device:
    """``device`` (``"cuda:1"``, ``1``, a ``torch.device``) as a torch CUDA device with an index,
    checked to exist; FuseError naming the fix otherwise."""
    try:
        chosen = torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FuseError(
            f"device {device!r}: not a device torch knows ({e}); pass 'cuda', 'cuda:<n>' or 'cpu'"
        ) from None
    if chosen.type != "cuda":
        raise FuseError(f"device {str(chosen)!r}: fastfuse loads onto 'cpu' or CUDA devices ('cuda', 'cuda:<n>')")
    if not torch.cuda.is_available():
        raise FuseError(
            f"device {str(chosen)!r}: torch {torch.__version__} sees no CUDA device here; pass device='cpu'"
        )
    index = torch.cuda.current_device() if chosen.index is None else chosen.index
    if not 0 <= index < torch.cuda.device_count():
        raise FuseError(
            f"device {str(chosen)!r}: expected an index below {torch.cuda.device_count()} (the CUDA devices here)"
        )
    return torch.device("cuda", index)


def _view(buffers: Sequence[torch.Tensor], region: Region) -> torch.Tensor:
    """``region`` of flat uint8 ``buffers`` as a ``[rows, cols]`` integer tensor (no copy)."""
    flat = buffers[region.buffer]
    bits = _BITS[region.itemsize]
    if region.span == 0:
        return torch.empty((region.rows, region.cols), dtype=bits, device=flat.device)
    window = flat[region.offset : region.offset + region.span]  # offsets and strides: whole elements
    typed = window.view(bits)
    return typed.as_strided((region.rows, region.cols), (region.row_stride // region.itemsize, 1))


def _widened(bits: torch.Tensor, source: str) -> torch.Tensor:
    """float32 bit patterns (int32) of float16 / bfloat16 bit patterns (int16), exactly."""
    h = bits.to(torch.int64) & 0xFFFF
    if source == "bfloat16":
        result = h << 16
    else:
        sign = (h & 0x8000) << 16
        magnitude = h & 0x7FFF
        normal = (magnitude << 13) + (112 << 23)
        special = 0x7F800000 | ((magnitude & 0x3FF) << 13)
        subnormal = (magnitude.to(torch.float32) * 2.0**-24).view(torch.int32).to(torch.int64)
        result = torch.where(magnitude >= 0x7C00, special, torch.where(magnitude >= 0x0400, normal, subnormal)) | sign
    return torch.where(result >= 1 << 31, result - (1 << 32), result).to(torch.int32)


def run_moves(buffers: Sequence[torch.Tensor], moves: Sequence[Move]) -> None:
    """Run ``moves`` over flat uint8 device tensors, on the current stream (see ``regions``)."""
    for move in moves:
        destination = _view(buffers, move.destination)
        if move.source is None:
            destination.zero_()
            continue
        source = _view(buffers, move.source)
        if move.widen is None:
            destination.copy_(source.T if move.transpose else source)
            continue
        step = max(1, WIDEN_BLOCK // max(source.shape[1], 1))
        for first in range(0, source.shape[0], step):
            block = _widened(source[first : first + step], move.widen)
            if move.transpose:
                destination[:, first : first + step].copy_(block.T)
            else:
                destination[first : first + step].copy_(block)


def carve(
    arena: torch.Tensor, placements: Sequence[Placement], torch_dtype: Callable[[np.dtype[Any]], torch.dtype]
) -> dict[str, torch.Tensor]:
    """key -> a C-contiguous tensor viewing its placement in ``arena`` (a flat uint8 tensor whose
    length is a multiple of every itemsize), in order; ``torch_dtype`` names the torch dtype of a
    numpy one (``torch_bridge.torch_dtype``). Placements are aligned to their itemsize.

    One ``as_strided`` per tensor over one typed view of the arena per dtype: a load carves about
    1400 tensors, and three view operations each cost more than the moves of the fused ones.
    """
    typed: dict[np.dtype[Any], torch.Tensor] = {}
    out = {}
    for p in placements:
        base = typed.get(p.dtype)
        if base is None:
            base = typed[p.dtype] = arena.view(torch_dtype(p.dtype))
        itemsize = p.dtype.itemsize
        out[p.key] = base.as_strided(p.shape, _element_strides(p.shape), p.offset // itemsize)
    return out


def _element_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class CudaDestination:
    """A load onto ``device`` (see ``fastfuse.staging.pipeline.Destination``).

    ``lanes`` streams upload from the staging slots; the moves run on a compute stream that
    waits for every lane; the next stage's uploads wait for the moves (they reuse the scratch).
    """

    def __init__(
        self,
        device: torch.device,
        lanes: int,
        slots: int,
        torch_dtype: Callable[[np.dtype[Any]], torch.dtype],
        staging_bytes: int = 0,
    ) -> None:
        self.device, self.torch_dtype = device, torch_dtype
        self.buffers: list[torch.Tensor] = []
        self.streams = [torch.cuda.Stream(device) for _ in range(lanes)]  # type: ignore[no-untyped-call]
        self.compute = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.slot_events = [[torch.cuda.Event() for _ in range(slots)] for _ in range(lanes)]  # type: ignore[no-untyped-call]
        self.host: torch.Tensor | None = None
        self._preparing: threading.Thread | None = None
        self._prepared: list[torch.Tensor | BaseException] = []
        if staging_bytes:
            self._preparing = threading.Thread(
                target=self._prepare, args=(staging_bytes,), name="fastfuse-pin", daemon=True
            )
            self._preparing.start()

    def _prepare(self, nbytes: int) -> None:
        """Pin ``nbytes`` of staging and load the copy kernels the moves use, while the caller
        reads the header and plans (a fresh process: pinning 128 MiB takes ~40 ms, and the first
        launch of each copy kernel loads its module, ~20 ms)."""
        try:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
                for bits in (torch.int16, torch.int32):
                    square = torch.empty((8, 8), dtype=bits, device=self.device)
                    square.copy_(square.T.clone())
            self._prepared.append(host)
        except BaseException as exc:  # noqa: BLE001 - raised again by staging()
            self._prepared.append(exc)

    def _staging_prepared(self, nbytes: int) -> torch.Tensor | None:
        """The pinned block :meth:`_prepare` made, if it is ``nbytes`` long; raises its failure."""
        if self._preparing is None:
            return None
        self._preparing.join()
        self._preparing = None
        result = self._prepared.pop()
        if isinstance(result, BaseException):
            raise result
        return result if len(result) == nbytes else None

    def allocate(self, arena_bytes: int, scratch_bytes: int) -> None:
        with torch.cuda.device(self.device):
            self.buffers = [
                torch.empty(arena_bytes, dtype=torch.uint8, device=self.device),
                torch.empty(scratch_bytes, dtype=torch.uint8, device=self.device),
            ]

    def staging(self, nbytes: int) -> np.ndarray:
        prepared = self._staging_prepared(nbytes)
        self.host = prepared if prepared is not None else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        array: np.ndarray = self.host.numpy()
        return array

    def upload(self, lane: int, slot: int, host: np.ndarray, buffer: int, offset: int) -> None:
        assert self.host is not None
        start = host.ctypes.data - self.host.data_ptr()
        n = len(host)
        if not 0 <= start < len(self.host):  # a gathered view (pageable): an ordinary copy
            source = torch.from_numpy(host)
        else:
            source = self.host[start : start + n]
        with torch.cuda.stream(self.streams[lane]):
            self.buffers[buffer][offset : offset + n].copy_(source, non_blocking=True)

    def slot_reusable(self, lane: int, slot: int) -> None:
        self.slot_events[lane][slot].record(self.streams[lane])

    def wait_slot(self, lane: int, slot: int) -> None:
        self.slot_events[lane][slot].synchronize()

    def run_moves(self, moves: Sequence[Move], lanes: int) -> None:
        for stream in self.streams[:lanes]:
            self.compute.wait_stream(stream)
        with torch.cuda.stream(self.compute):
            run_moves(self.buffers, moves)
        for stream in self.streams:
            stream.wait_stream(self.compute)

    def results(self, placements: Sequence[Placement]) -> dict[str, Any]:
        torch.cuda.synchronize(self.device)
        arena = self.buffers[0]
        self.buffers = [arena]  # the scratch goes back to torch's allocator now
        return carve(arena, placements, self.torch_dtype)

    def close(self) -> None:
        if self._preparing is not None:  # a failure before staging: wait, then let it go
            self._preparing.join()
            self._preparing, self._prepared = None, []
        if self.host is not None:
            for stream in self.streams:
                stream.synchronize()
            self.host = None
