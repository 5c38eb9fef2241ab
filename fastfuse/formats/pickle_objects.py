"""What the restricted unpickler (:mod:`fastfuse.formats.unpickler`) may build: the allowed
globals, and the plain data it turns persistent ids and tensor rebuilds into. Nothing here is
ever called by a pickle. The refs are NamedTuples (built in C, one per storage and tensor of
a checkpoint); compare them with ``type(x) is TensorRef``, never ``isinstance(x, tuple)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "ALLOWED",
    "HINTS",
    "NAMES",
    "STORAGE_DTYPES",
    "V3_DTYPES",
    "Global",
    "PickledDict",
    "StorageRef",
    "TensorRef",
    "a_kind",
    "kind",
    "kinds",
    "ordered_dict",
]

#: Legacy typed storage classes (``torch.FloatStorage``...) -> element dtype name.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
#: dtypes torch >= 2.1 pickles as ``torch.<name>`` globals with ``_rebuild_tensor_v3``.
V3_DTYPES = (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "uint16",
    "uint32",
    "uint64",
)


@dataclass(frozen=True)
class Global:
    """An allowed global, never imported. ``role``: ordered_dict, rebuild_v2, rebuild_v3,
    rebuild_parameter, storage or dtype; ``dtype``: element dtype name of a storage or dtype."""

    module: str
    name: str
    role: str
    dtype: str = ""

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"


ALLOWED: dict[tuple[str, str], Global] = {
    (g.module, g.name): g
    for g in [
        Global("collections", "OrderedDict", "ordered_dict"),
        Global("torch._utils", "_rebuild_tensor_v2", "rebuild_v2"),
        Global("torch._utils", "_rebuild_tensor_v3", "rebuild_v3"),
        Global("torch._utils", "_rebuild_parameter", "rebuild_parameter"),
        Global("torch.storage", "UntypedStorage", "storage", "uint8"),
        *(Global("torch", cls, "storage", dt) for cls, dt in STORAGE_DTYPES.items()),
        *(Global("torch", dt, "dtype", dt) for dt in V3_DTYPES),
    ]
}
HINTS = {
    "torch._tensor._rebuild_from_type_v2": "a tensor subclass or a tensor with Python attributes",
    "torch._utils._rebuild_parameter_with_state": "a Parameter with Python attributes",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch.complex32": "a dtype numpy cannot represent",
    "torch.float4_e2m1fn_x2": "a dtype numpy cannot represent: two 4-bit floats per byte",
}


class StorageRef(NamedTuple):
    """A persistent id ``('storage', <storage class>, key, location, numel)``."""

    cls: str  # "FloatStorage", ..., "UntypedStorage"
    dtype: str  # element dtype name of the storage
    key: str
    location: str
    numel: int  # elements of ``dtype`` (bytes for UntypedStorage)


class TensorRef(NamedTuple):
    """A rebuilt tensor: ``dtype`` elements of ``storage`` from element ``offset``."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    parameter: bool = False


class PickledDict(dict[str, Any]):
    """A dict or OrderedDict of the pickle. ``odd_keys``: how many non-string keys were
    dropped, ``odd_kind`` the kind of the first one. ``PickledDict()`` is a plain empty dict
    (no ``__init__``: the class attributes are the defaults, set on the instance when they
    differ); :func:`ordered_dict` makes an OrderedDict's."""

    ordered: bool = False
    odd_keys: int = 0
    odd_kind: str = ""


def ordered_dict() -> PickledDict:
    """A new, empty PickledDict of an OrderedDict."""
    d = PickledDict()
    d.ordered = True
    return d


NAMES = {"NoneType": "None", "PickledDict": "dict", "TensorRef": "tensor", "StorageRef": "storage", "Global": "global"}


def kind(value: object) -> str:
    """What ``value`` is, in words (never its contents: it may be huge or cyclic)."""
    if isinstance(value, Global):
        return f"global {value.full}"
    if isinstance(value, PickledDict) and value.ordered:
        return "OrderedDict"
    return NAMES.get(type(value).__name__, type(value).__name__)


def a_kind(value: object) -> str:
    """``kind(value)`` with its article: "an int", "a list"."""
    text = kind(value)
    return ("an " if text[0] in "aeiouAEIOU" else "a ") + text


def kinds(values: tuple[Any, ...]) -> str:
    shown = ", ".join(kind(v) for v in values[:8])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 8 else "")
