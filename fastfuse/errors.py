"""The one exception family of fastfuse.

Every error a user can cause is a :class:`FuseError` (a :class:`ValueError`), raised before any
output is written. Messages name the key(s), what was expected and what was found.
"""

from __future__ import annotations

__all__ = [
    "DtypeMismatchError",
    "FuseError",
    "KeyConflictError",
    "MalformedFileError",
    "MissingTensorError",
    "SchemeNotDetectedError",
    "ShapeMismatchError",
]


class FuseError(ValueError):
    """Base class of every error fastfuse raises on purpose."""


class MissingTensorError(FuseError, KeyError):
    """A tensor a fusion group needs is absent (the message names the key)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(FuseError):
    """A tensor has the wrong number of dimensions or the wrong size."""


class DtypeMismatchError(FuseError, TypeError):
    """Parts of one group differ in dtype, or a dtype conversion is not supported."""


class MalformedFileError(FuseError):
    """A safetensors file (or index) breaks the format: header, offsets, sizes or paths."""


class SchemeNotDetectedError(FuseError):
    """No fusion scheme matches the checkpoint's key names."""


class KeyConflictError(FuseError):
    """The input already holds a key the fusion would write."""
