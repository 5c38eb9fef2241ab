"""numpy <-> torch without copies; imported only when torch tensors are asked for or given.

bfloat16 and the float8 types have no numpy dtype torch knows: they cross as integers of the
same width and are viewed back (``torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)``,
``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``), which works at any stride.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from fastfuse.dtypes import ML_DTYPE_NAMES, ml_dtype
from fastfuse.errors import FuseError

__all__ = [
    "NumpyViews",
    "TensorMetas",
    "devices_of",
    "from_torch",
    "holds_torch",
    "numpy_dtype",
    "to_torch",
    "torch_dtype",
]

# torch dtypes numpy only has through ml_dtypes, by their common name.
_VIA_INTEGERS = {name: getattr(torch, name) for name in ML_DTYPE_NAMES if hasattr(torch, name)}
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def holds_torch(tensors: Mapping[str, Any]) -> bool:
    """Does ``tensors`` hold a torch tensor (or a subclass: ``nn.Parameter``, engines' own)?"""
    return any(isinstance(value, torch.Tensor) for value in tensors.values())


def holds_cuda(tensors: Mapping[str, Any]) -> bool:
    """Does ``tensors`` hold a tensor on a CUDA device?"""
    return any(isinstance(value, torch.Tensor) and value.device.type == "cuda" for value in tensors.values())


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory (writable arrays only: torch warns on read-only ones)."""
    special = _VIA_INTEGERS.get(array.dtype.name)
    if special is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(f"u{array.dtype.itemsize}")).view(special)


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype of a torch dtype (ml_dtypes' for bfloat16 and the float8 types).

    FuseError for one numpy has no counterpart of (complex32, the quantized types).
    """
    if dtype in _VIA_INTEGERS.values():
        return ml_dtype(str(dtype).removeprefix("torch."))
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        raise FuseError(f"dtype {dtype} has no numpy counterpart; fastfuse moves plain 1-8 byte elements") from None


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a numpy dtype (bfloat16 and float8 by their ml_dtypes names)."""
    special: torch.dtype | None = _VIA_INTEGERS.get(dtype.name)
    if special is not None:
        return special
    result: torch.dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    return result


def from_torch(key: str, tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (any strides, bf16 and float8 included).

    FuseError naming ``key`` for a tensor without CPU data (CUDA, meta), or one numpy cannot
    view (sparse, quantized, complex32, a lazy conjugate or negation).
    """
    where = f"{key!r}: a {tensor.dtype} tensor on {tensor.device}"
    if tensor.device.type == "meta":
        raise FuseError(f"{where} has no data; load the weights first (e.g. load_state_dict(..., assign=True))")
    if tensor.device.type != "cpu":
        raise FuseError(f"{where}; fastfuse fuses CPU tensors: pass {{k: t.cpu() for k, t in state_dict.items()}}")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_conj() or tensor.is_neg():
        raise FuseError(f"{where} is sparse, quantized or a lazy conjugate/negation; pass t.resolve_conj().to_dense()")
    plain = tensor.detach()
    if plain.dtype in _VIA_INTEGERS.values():
        return plain.view(_SIGNED[plain.element_size()]).numpy().view(numpy_dtype(plain.dtype))
    try:
        return plain.numpy()
    except (TypeError, RuntimeError) as e:
        raise FuseError(f"{where} cannot be viewed as a numpy array ({e})") from None


class NumpyViews(Mapping[str, Any]):
    """``tensors`` seen through numpy: each torch tensor viewed (zero-copy) when first looked up,
    so a tensor fastfuse does not fuse is never converted (nor refused: a dtype numpy cannot
    view, a tensor on another device)."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self._tensors = tensors
        self._views: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._views:
            value = self._tensors[key]
            self._views[key] = from_torch(key, value) if isinstance(value, torch.Tensor) else value
        return self._views[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors


class _Meta:
    """What planning reads of a tensor: its shape and its numpy dtype."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = numpy_dtype(tensor.dtype)


class TensorMetas(NumpyViews):
    """``tensors`` seen by the planner without their data (tensors on a device): each torch
    tensor's shape and numpy dtype, looked up when first asked for."""

    def __getitem__(self, key: str) -> Any:
        value = self._tensors[key]
        return _Meta(value) if isinstance(value, torch.Tensor) else value


def devices_of(tensors: Mapping[str, Any], keys: Iterator[str] | list[str]) -> dict[str, str]:
    """key -> device (``"cpu"`` for numpy arrays) of each of ``keys``."""
    return {key: str(getattr(tensors[key], "device", "cpu")) for key in keys}
