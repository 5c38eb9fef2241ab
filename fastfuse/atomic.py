"""Writing files all or nothing: a temporary in the destination folder, published by one rename.

Knows files and folders, not formats: ``st_format.layout`` makes a safetensors prefix, and the
sink fills the data section through :meth:`AtomicWriter.view` (a writable memory map) and
:meth:`AtomicWriter.copy_from` (file to file, never through Python buffers).
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ._typing import DTypeLike, PathLike
from .errors import FuseError, FuseFileNotFoundError, FusePermissionError, MalformedFileError
from .stored import open_regular

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AtomicWriter", "write_bytes_atomic"]

_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)  # tests set 0 to exercise the named fallback
_CHUNK = 16 << 20  # largest preadv when copy_file_range is unavailable
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python < 3.13 lacks the name


class AtomicWriter:
    """Write ``prefix`` (from :func:`layout`) + a ``data_size``-byte data section to ``dst``,
    all or nothing.

    The constructor checks the destination (folder exists and is writable, ``dst`` is not a
    directory and, unless ``overwrite``, does not exist) and creates nothing. ``__enter__``
    creates an unnamed O_TMPFILE in the destination folder (else a hidden
    ``.{name}.fastfuse-XXXXXXXX.tmp``), reserves its space (disk full is a FuseError now, not
    a SIGBUS later), writes the prefix and maps the data section; fill it with :meth:`view`
    and :meth:`copy_from`. A clean exit flushes, fsyncs and publishes the file with one
    rename (without ``overwrite``: one link, which also refuses a ``dst`` created meanwhile),
    then fsyncs the folder. An exception (KeyboardInterrupt too) removes the temporary and
    leaves ``dst`` untouched; so does SIGKILL with O_TMPFILE (the named fallback leaves its
    temporary). Views are invalid after exit: one still held keeps the map alive, and
    writing through it would change the published file.
    """

    def __init__(self, dst: PathLike, prefix: bytes, data_size: int, *, overwrite: bool = False) -> None:
        if data_size < 0:
            raise ValueError(f"data_size must be >= 0, got {data_size}")
        self.dst, self.prefix, self.data_size = os.fspath(dst), bytes(prefix), data_size
        self.overwrite, self.folder = overwrite, os.path.dirname(os.path.abspath(self.dst))
        self._name = os.path.basename(self.dst)
        self._fd = self._dir = -1  # the temporary file, the destination folder
        self._tmp = ""  # name in the folder of the named temporary, or of the O_TMPFILE's link
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray[Any, np.dtype[np.uint8]] = np.empty(0, np.uint8)
        self._check()

    def _check(self) -> None:
        dst, folder = self.dst, self.folder
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                raise FuseError(f"{dst}: destination folder {folder} is not a folder")
            raise FuseFileNotFoundError(f"{dst}: destination folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FusePermissionError(f"{dst}: destination folder {folder} is not writable")
        if not self._name or os.path.isdir(dst):
            raise FuseError(f"{dst}: is a directory; expected a file name")
        if os.path.lexists(dst) and not self.overwrite:
            raise FuseError(f"{dst}: exists; pass --force / overwrite=True to replace it")

    def _new_temp(self, fd: int = -1) -> int:
        """Take a fresh hidden name in the folder: link it to ``fd``, or create a file there."""
        self._tmp = f".{self._name}.fastfuse-{os.urandom(4).hex()}.tmp"
        if fd >= 0:  # a dir fd makes os.link use linkat(AT_SYMLINK_FOLLOW); bare link() fails
            os.link(f"/proc/self/fd/{fd}", self._tmp, dst_dir_fd=self._dir, follow_symlinks=True)
            return fd
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return os.open(self._tmp, flags, 0o644, dir_fd=self._dir)

    def __enter__(self) -> Self:
        self._check()
        total = len(self.prefix) + self.data_size
        try:
            self._dir = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not _O_TMPFILE or not os.path.isdir("/proc/self/fd"):
                    raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
                flags = _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
                self._fd = os.open(".", flags, 0o644, dir_fd=self._dir)
            except OSError:  # not supported here: a named temporary instead
                self._fd = self._new_temp()
            os.ftruncate(self._fd, total)
            try:
                os.posix_fallocate(self._fd, 0, total)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
            done = 0
            while done < len(self.prefix):
                done += os.pwrite(self._fd, self.prefix[done:], done)
            if self.data_size:
                self._mm = mmap.mmap(self._fd, total, access=mmap.ACCESS_WRITE)
                self._data = np.frombuffer(self._mm, np.uint8)[len(self.prefix) :]
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise FuseError(
                    f"{self.folder}: not enough space for {self.dst}: it needs {total} bytes ({e.strerror})"
                ) from None
            if isinstance(e, OSError):
                raise FuseError(f"{self.dst}: cannot create a temporary file in {self.folder}: {e.strerror}") from None
            raise
        return self

    def view(self, start: int, end: int, dtype: DTypeLike, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """Writable zero-copy view of data bytes ``[start, end)`` as ``dtype`` and ``shape``."""
        dt = np.dtype(dtype)
        if self._fd < 0 or not 0 <= start <= end <= self.data_size or math.prod(shape) * dt.itemsize != end - start:
            raise ValueError(
                f"view [{start}, {end}) as {dt} {shape} does not fit the open data section of {self.data_size} bytes"
            )
        self._populate(len(self.prefix) + start, len(self.prefix) + end)
        return self._data[start:end].view(dt).reshape(shape)

    def _populate(self, start: int, end: int) -> None:
        """Fault in map bytes ``[start, end)`` for writing in one system call (Linux >= 5.14).

        A kernel writing into a fresh shared file map otherwise takes one page fault per 4 KB,
        serialised across its threads: measured 0.14 s here instead of 0.14-0.39 s of faults
        for large-v3's 630 MB of fused tensors. Older kernels refuse the advice; that is fine.
        """
        if self._mm is None or end <= start:
            return
        page = start - start % mmap.PAGESIZE
        with contextlib.suppress(OSError):
            self._mm.madvise(_MADV_POPULATE_WRITE, page, end - page)

    def copy_from(self, src: int | PathLike, src_offset: int, start: int, length: int) -> None:
        """Copy ``length`` bytes at ``src_offset`` of ``src`` (fd or path) to data byte ``start``
        file to file: copy_file_range, else preadv straight into the map (no buffer)."""
        if self._fd < 0 or min(src_offset, start, length) < 0 or start + length > self.data_size:
            raise ValueError(
                f"copy of {length} bytes to data byte {start} does not fit the open "
                f"data section of {self.data_size} bytes"
            )
        if not isinstance(src, int):
            fd = open_regular(src)[0]
            try:
                self.copy_from(fd, src_offset, start, length)
            finally:
                os.close(fd)
            return
        done, fast, at = 0, hasattr(os, "copy_file_range"), len(self.prefix) + start
        while done < length:
            try:
                if fast:
                    n = os.copy_file_range(src, self._fd, length - done, src_offset + done, at + done)
                else:
                    assert self._mm is not None  # length > 0, so there is a mapped data section
                    stop = at + min(length, done + _CHUNK)
                    with memoryview(self._mm) as whole, whole[at + done : stop] as part:
                        n = os.preadv(src, [part], src_offset + done)
            except OSError as e:
                if fast and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    fast = False  # not between these files: copy through the map instead
                    continue
                raise FuseError(
                    f"{self.dst}: copying {length} bytes from byte {src_offset} of the source failed: {e.strerror}"
                ) from None
            if n == 0:
                raise MalformedFileError(
                    f"source ended at byte {src_offset + done} while copying "
                    f"{length} bytes from byte {src_offset} into {self.dst}"
                )
            done += n

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                return
            if self._mm is not None:
                self._mm.flush()
            self._release_map()
            os.fsync(self._fd)
            if self.overwrite:
                if not self._tmp:
                    self._new_temp(self._fd)
                os.replace(self._tmp, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                self._tmp = ""
            else:  # a named temporary, now a second name, is unlinked by _abort below
                source = self._tmp or f"/proc/self/fd/{self._fd}"
                os.link(source, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir, follow_symlinks=True)
            with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
                os.fsync(self._dir)
        except FileExistsError:
            raise FuseError(f"{self.dst}: exists; pass --force / overwrite=True to replace it") from None
        except OSError as e:
            raise FuseError(f"{self.dst}: could not write the file: {e.strerror}") from None
        finally:
            self._abort()

    def _release_map(self) -> None:
        self._data = np.empty(0, np.uint8)
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still held: it closes when they die
                mm.close()

    def _abort(self) -> None:
        """Unmap, remove the named temporary (if any) and close both descriptors."""
        self._release_map()
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir)
            self._tmp = ""
        for fd in (self._fd, self._dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir = -1


def write_bytes_atomic(dst: PathLike, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (e.g. a sharded index) with the guarantees of :class:`AtomicWriter`."""
    with AtomicWriter(dst, data, 0, overwrite=overwrite):
        pass
