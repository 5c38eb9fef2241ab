"""The one exception family of fastfuse.

Every error a user can cause is a :class:`FuseError` (a :class:`ValueError`), raised before any
output is written. Messages name the key(s), what was expected and what was found.
"""

from __future__ import annotations

__all__ = [
    "DtypeMismatchError",
    "FuseError",
    "FuseFileNotFoundError",
    "FusePermissionError",
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
    """A checkpoint file (or index) breaks its format: header, pickle, members, offsets, sizes or paths."""


class FuseFileNotFoundError(FuseError, FileNotFoundError):
    """A path fastfuse was given does not exist (also a FileNotFoundError, as loaders expect)."""


class FusePermissionError(FuseError, PermissionError):
    """A path cannot be read, or a destination folder cannot be written (also a PermissionError)."""


class SchemeNotDetectedError(FuseError):
    """No fusion scheme matches the checkpoint's key names."""


class KeyConflictError(FuseError):
    """The input already holds a key the fusion would write."""
