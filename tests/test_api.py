"""The public API, pinned: names, signatures, error classes and the records' fields.

A change here is a change for every user: it must be deliberate (update this file, the README
and the changelog together), never a side effect of moving code between modules.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import fastfuse

SIGNATURES = {
    "execute": "(fusion: 'Plan', tensors: 'Mapping[str, np.ndarray]', outputs: 'Mapping[str, np.ndarray] | None' = None,"
    " *, framework: 'str' = 'np') -> 'dict[str, Any]'",
    "fuse": "(tensors: 'Mapping[str, Any]', **options: 'Unpack[FuseKwargs]') -> 'dict[str, Any]'",
    "fuse_file": "(src: 'PathLike', dst: 'PathLike', *, overwrite_destination: 'bool' = False,"
    " max_shard_size: 'int | str | None' = None, single_file: 'bool' = False, progress: 'Progress | None' = None,"
    " **options: 'Unpack[FuseKwargs]') -> 'Plan'",
    "load": "(path: 'PathLike', *, framework: 'str | None' = None, device: 'Any' = None,"
    " **options: 'Unpack[FuseKwargs]') -> 'dict[str, Any]'",
    "plan": "(tensors: 'Mapping[str, TensorLike] | PathLike', **options: 'Unpack[FuseKwargs]') -> 'Plan'",
    "transpose_concat": "(parts: 'Sequence[np.ndarray]', out: 'np.ndarray | None' = None,"
    " dtype: 'DTypeLike | None' = None) -> 'np.ndarray'",
    "unfuse": "(src: 'PathLike', dst: 'PathLike', *, overwrite_destination: 'bool' = False) -> 'list[str]'",
    "verify": "(path: 'PathLike', *, source: 'PathLike | None' = None) -> 'list[str]'",
    "warm_up": "(*, wait: 'bool' = True) -> 'None'",
}
ERRORS = {  # each error and its bases: catchable as FuseError and as the builtin it refines
    "FuseError": ("ValueError",),
    "DtypeMismatchError": ("FuseError", "TypeError"),
    "FuseFileNotFoundError": ("FuseError", "FileNotFoundError"),
    "FusePermissionError": ("FuseError", "PermissionError"),
    "KeyConflictError": ("FuseError",),
    "MalformedFileError": ("FuseError",),
    "MissingTensorError": ("FuseError", "KeyError"),
    "SchemeNotDetectedError": ("FuseError",),
    "ShapeMismatchError": ("FuseError",),
}


def test_the_public_names_are_pinned() -> None:
    assert sorted(fastfuse.__all__) == sorted([*SIGNATURES, *ERRORS, "FusedTensor", "Plan", "__version__"])
    assert set(fastfuse.__all__) <= set(dir(fastfuse))


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_each_function_keeps_its_signature(name: str) -> None:
    assert str(inspect.signature(getattr(fastfuse, name))) == SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_each_error_keeps_its_base(name: str) -> None:
    assert tuple(base.__name__ for base in getattr(fastfuse, name).__bases__) == ERRORS[name]


@pytest.mark.parametrize("record", ["FusedTensor", "Plan"])
def test_the_records_are_built_by_keyword(record: str) -> None:
    """Plan and FusedTensor: frozen dataclasses built by keyword (positional building was dropped
    with the layout change, issue 15: a 12-field positional call hid swapped fields)."""
    cls = getattr(fastfuse, record)
    fields = dataclasses.fields(cls)
    assert fields and all(f.kw_only for f in fields)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
