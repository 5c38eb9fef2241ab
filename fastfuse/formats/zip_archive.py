"""The zip container of a ``torch.save`` archive: its directory, members and CRCs.

Only what a torch archive needs is accepted: one file (no split archive), members stored
uncompressed, plain relative names, each local header agreeing with the central directory,
members in order without overlap, ZIP64 where sizes need it. Every violation is a one-line
MalformedFileError naming the file, the member and the values found; nothing is read past the
end of the file. What the members hold (a torch object model) is :mod:`fastfuse.formats.torch_zip`'s.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from fastfuse.errors import MalformedFileError
from fastfuse.formats.stored import map_private, pread_exactly

__all__ = [
    "MAX_DIRECTORY_BYTES",
    "Entry",
    "Member",
    "check_crcs",
    "check_entries",
    "locate",
    "read_entries",
    "read_member",
]

MAX_DIRECTORY_BYTES = 64 << 20  # ~600k members; large-v3 has ~1300
_CHUNK = 16 << 20  # check_crcs reads this much at a time
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_LOCATOR = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_METHODS = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz"}


@dataclass(frozen=True)
class Entry:
    """A central directory entry: a member's name (and its raw bytes), flags, compression
    method, CRC-32, size and the offset of its local header."""

    name: str
    raw: bytes
    flags: int
    method: int
    crc: int
    size: int
    offset: int


@dataclass(frozen=True)
class Member:
    """A member located and checked: ``size`` bytes from absolute file offset ``data``."""

    name: str
    crc: int
    size: int
    data: int  # absolute offset of its first byte


def read_entries(fd: int, size: int, p: str) -> tuple[list[Entry], int]:
    """The central directory's entries, in its order, and the directory's offset."""
    count, cd_offset, cd_size, _ = _end_records(fd, size, p)
    cd, at = pread_exactly(fd, cd_size, cd_offset, p), 0
    entries: list[Entry] = []
    for _ in range(count):
        if at + _CENTRAL.size > cd_size or cd[at : at + 4] != b"PK\x01\x02":
            raise MalformedFileError(f"{p}: central directory entry at byte {cd_offset + at} is not a file header")
        (_, _, _, flags, method, _, _, crc, csize, usize, n, e, c, disk, _, attrs, offset) = _CENTRAL.unpack_from(
            cd, at
        )
        raw, extra = cd[at + 46 : at + 46 + n], cd[at + 46 + n : at + 46 + n + e]
        at += 46 + n + e + c
        if at > cd_size:
            raise MalformedFileError(f"{p}: central directory entry runs past the directory's end")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFileError(f"{p}: member name {raw[:200]!r} is not valid UTF-8") from None
        if 0xFFFFFFFF in (usize, csize, offset):
            usize, csize, offset = _zip64(p, name, extra, [usize, csize, offset])
        if attrs & 0x10:  # the DOS directory attribute: zip readers (torch's too) read no data
            raise MalformedFileError(f"{p}: member {name!r} is marked as a directory (attributes 0x{attrs:08x})")
        if disk != 0:
            raise MalformedFileError(f"{p}: member {name!r} starts on disk {disk} of a multi-disk (split) zip archive")
        if csize != usize and method == 0:
            raise MalformedFileError(f"{p}: stored member {name!r} has size {usize} but occupies {csize} bytes")
        entries.append(Entry(name, raw, flags, method, crc, usize, offset))
    if at != cd_size:
        raise MalformedFileError(f"{p}: central directory has {cd_size - at} bytes after its {count} entries")
    return entries, cd_offset


def check_entries(p: str, entries: list[Entry]) -> None:
    """Plain relative names, no encryption, members stored (torch.save compresses nothing)."""
    for entry in entries:
        name, flags, method = entry.name, entry.flags, entry.method
        if name.startswith("/") or "\\" in name or "\0" in name or {"", ".", ".."} & set(name.split("/")):
            raise MalformedFileError(f"{p}: member name {name!r} is not a plain relative path (absolute, .., \\)")
        if flags & 0x2061:  # encrypted, strongly encrypted, patch data, masked directory
            raise MalformedFileError(f"{p}: member {name!r} is encrypted or patch data (flags 0x{flags:04x})")
        if method != 0:
            how = _METHODS.get(method, f"method {method}")
            raise MalformedFileError(
                f"{p}: member {name!r} is compressed ({how}); torch.save stores members uncompressed"
                " - was the archive re-zipped?"
            )


def locate(fd: int, p: str, entries: list[Entry], cd_offset: int) -> dict[str, Member]:
    """The members by name, each checked against its local header, in order, without overlap,
    before the central directory at ``cd_offset``."""
    members: dict[str, Member] = {}
    end = 0
    for entry in sorted(entries, key=lambda entry: entry.offset):
        name, raw, offset, usize = entry.name, entry.raw, entry.offset, entry.size
        if name in members:
            raise MalformedFileError(f"{p}: member {name!r} appears twice in the central directory")
        if offset < end or offset + _LOCAL.size + len(raw) > cd_offset:
            raise MalformedFileError(
                f"{p}: member {name!r} local header at byte {offset} overlaps the previous member "
                f"(which ends at byte {end}) or runs past the central directory at byte {cd_offset}"
            )
        head = pread_exactly(fd, _LOCAL.size + len(raw), offset, p)
        sig, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, n, e = _LOCAL.unpack_from(head)
        described = lflags & 8 and lcrc == lcsize == lusize == 0  # sizes in a data descriptor
        if (
            sig != b"PK\x03\x04"
            or head[_LOCAL.size :] != raw
            or lmethod != 0
            or lflags != entry.flags
            or not (
                described or (lcrc == entry.crc and lcsize in (usize, 0xFFFFFFFF) and lusize in (usize, 0xFFFFFFFF))
            )
        ):
            raise MalformedFileError(
                f"{p}: local header of member {name!r} at byte {offset} disagrees with the central directory "
                f"(name, flags, method, CRC or sizes)"
            )
        data = offset + _LOCAL.size + n + e
        end = data + usize
        if end > cd_offset:
            raise MalformedFileError(
                f"{p}: data of member {name!r} [{data}, {end}) runs past the central directory at byte {cd_offset}"
            )
        members[name] = Member(name, entry.crc, usize, data)
    return members


def read_member(fd: int, m: Member, p: str) -> bytes:
    """The bytes of ``m``, their CRC-32 checked."""
    raw = pread_exactly(fd, m.size, m.data, p)
    _check_crc(p, m, zlib.crc32(raw))
    return raw


def _check_crc(p: str, m: Member, crc: int) -> None:
    """MalformedFileError unless ``crc``, the CRC-32 of ``m``'s bytes, is the directory's."""
    if crc != m.crc:
        raise MalformedFileError(
            f"{p}: member {m.name!r} [{m.data}, {m.data + m.size}) has CRC-32 {crc:08x}, "
            f"the directory says {m.crc:08x} (corrupted file)"
        )


def check_crcs(p: str, size: int, members: dict[str, Member]) -> None:
    """Check the CRC-32 of every member of the ``size``-byte file at ``p``, reading it through a
    private map in 16 MB chunks (zlib releases the GIL); MalformedFileError names the first
    member that differs."""
    mm = map_private(p, size)
    try:
        with memoryview(mm) as whole:
            for m in members.values():
                crc = 0
                for start in range(m.data, m.data + m.size, _CHUNK):
                    with whole[start : min(start + _CHUNK, m.data + m.size)] as chunk:
                        crc = zlib.crc32(chunk, crc)
                _check_crc(p, m, crc)
    finally:
        mm.close()


def _end_records(fd: int, size: int, p: str) -> tuple[int, int, int, int]:
    """(members, directory offset, directory size, where the end records start)."""
    start = max(0, size - _EOCD.size - 0xFFFF)
    tail = pread_exactly(fd, size - start, start, p)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (at + _EOCD.size > len(tail) or _EOCD.unpack_from(tail, at)[-1] != len(tail) - at - _EOCD.size):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise MalformedFileError(
            f"{p}: no zip end-of-central-directory record in its last {len(tail)} bytes (truncated archive?)"
        )
    _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    disks = [disk, cd_disk, on_disk - count]  # one file: disk 0 holds everything
    records = start + at
    locator = pread_exactly(fd, _LOCATOR.size, records - _LOCATOR.size, p) if records >= _LOCATOR.size else b""
    if locator.startswith(b"PK\x06\x07"):  # read from the file: the tail may start after it
        _, disk64, eocd64, total = _LOCATOR.unpack(locator)
        if eocd64 + _EOCD64.size > records - _LOCATOR.size:
            raise MalformedFileError(f"{p}: ZIP64 end record at byte {eocd64} runs past its locator")
        fields = _EOCD64.unpack(pread_exactly(fd, _EOCD64.size, eocd64, p))
        if fields[0] != b"PK\x06\x06" or not 44 <= fields[1] <= records - _LOCATOR.size - eocd64 - 12:
            raise MalformedFileError(f"{p}: no valid ZIP64 end record at byte {eocd64}, where its locator points")
        disks = [d % 0xFFFF for d in disks[:2]] + [disk64, total - 1, fields[4], fields[5], fields[6] - fields[7]]
        count, cd_size, cd_offset, records = fields[7], fields[8], fields[9], eocd64
    elif 0xFFFF == count or 0xFFFFFFFF in (cd_size, cd_offset):
        raise MalformedFileError(f"{p}: ZIP64 sizes in the end record but no ZIP64 locator (truncated archive?)")
    if any(disks):
        raise MalformedFileError(f"{p}: is a multi-disk (split) zip archive; torch.save writes one file")
    if cd_offset + cd_size > records or cd_size > MAX_DIRECTORY_BYTES or count * _CENTRAL.size > cd_size:
        raise MalformedFileError(
            f"{p}: central directory [{cd_offset}, {cd_offset + cd_size}) of {count} members does not fit "
            f"before its end records at byte {records} (or exceeds {MAX_DIRECTORY_BYTES} bytes)"
        )
    return count, cd_offset, cd_size, records


def _zip64(p: str, name: str, extra: bytes, values: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF fields of ``values`` (size, compressed size, offset) from the ZIP64 extra."""
    at = 0
    while at + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4 : at + 4 + n]
        if tag == 1:
            out = list(values)
            for i, v in enumerate(values):
                if v == 0xFFFFFFFF:
                    if len(body) < 8:
                        break
                    out[i], body = int.from_bytes(body[:8], "little"), body[8:]
            else:
                return out
        at += 4 + n
    raise MalformedFileError(f"{p}: member {name!r} has ZIP64 sizes but no valid ZIP64 extra field")
