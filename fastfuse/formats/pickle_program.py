"""The first pass of the restricted unpickler: a pickle's opcodes, decoded into a program.

:func:`decode` reads every opcode and its argument in one loop into instructions (a kind and
an argument each, in two lists: no object per instruction). What an opcode's bytes alone
decide is decided here and, when it is an error, becomes the program's *pending* error at
that opcode's byte: truncation, UTF-8, refused opcodes and globals (resolved now), MARK
depth, the opcode count; :func:`limit` adds the values pushed and the memo's size where a
program is long enough to reach them. The interpreter (:mod:`fastfuse.formats.unpickler`)
runs the instructions before it; an error it meets first wins, as in a one-pass machine.

Instructions map one to one to opcodes (but PROTO and FRAME, which leave none), so an
instruction's number names its opcode's byte (:func:`offset`, on the error path only).
Folding work into this pass (constant tuples, BINPUTs of constants, storages of constant
persistent ids) was measured: it halves the second pass but costs the first more than that
in list surgery, so the passes stay one instruction per opcode.
"""

from __future__ import annotations

import pickletools
import struct
from typing import Any, NamedTuple

from fastfuse.formats.pickle_rules import Refusal, resolve

__all__ = ["Program", "decode", "limit", "offset", "opname", "truncated"]

_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def opname(code: int) -> str:
    """pickletools' name of opcode ``code`` (``0x..`` for a byte that is none)."""
    return _OPNAMES.get(code, f"0x{code:02x}")


# Instruction kinds, most frequent first (the order the interpreter tests them in).
PUSH, PUT, GET, MARK, TUPLE, REDUCE, TUPLE1, PERSID, TUPLE2, TUPLE3, MEMOIZE = range(11)
NEW_DICT, NEW_LIST, LIST, DICT, APPEND, APPENDS, SETITEM, SETITEMS, STACK_GLOBAL, BUILD, STOP = range(11, 22)
# Kinds that push one value (each pushes exactly one): what MAX_OBJECTS counts.
_PUSHING = frozenset({PUSH, GET, TUPLE, REDUCE, TUPLE1, PERSID, TUPLE2, TUPLE3, NEW_DICT, NEW_LIST, LIST, DICT})
_PUSHING |= {STACK_GLOBAL}
# Opcodes that close a MARK (the decoder checks one is open), and the other argument-free ones.
_CLOSES = {ord("t"): TUPLE, ord("l"): LIST, ord("d"): DICT, ord("e"): APPENDS, ord("u"): SETITEMS}
_PLAIN = {ord("R"): REDUCE, 0x85: TUPLE1, 0x86: TUPLE2, 0x87: TUPLE3, ord("Q"): PERSID, ord("}"): NEW_DICT}
_PLAIN |= {ord("]"): NEW_LIST, ord("a"): APPEND, ord("s"): SETITEM, 0x93: STACK_GLOBAL, ord("b"): BUILD}
_PLAIN |= {0x94: MEMOIZE}
_CONSTANTS = {ord("N"): None, 0x88: True, 0x89: False, ord(")"): ()}
# Bytes of an opcode's fixed argument; bytes of the length that precedes a variable one.
_FIXED = {0x80: 1, 0x95: 8, ord("K"): 1, ord("M"): 2, ord("J"): 4, ord("G"): 8}
_FIXED |= {ord("q"): 1, ord("r"): 4, ord("h"): 1, ord("j"): 4}
_PREFIXED = {ord("X"): 4, 0x8C: 1, 0x8D: 8, ord("C"): 1, ord("B"): 4, 0x8E: 8, 0x8A: 1}
_TEXT = frozenset({ord("X"), 0x8C, 0x8D})
_U16, _U32, _I32 = struct.Struct("<H").unpack_from, struct.Struct("<I").unpack_from, struct.Struct("<i").unpack_from
_U64, _F64 = struct.Struct("<Q").unpack_from, struct.Struct(">d").unpack_from


class Program(NamedTuple):
    """Instructions ``kinds[i]`` with ``args[i]``, one per opcode but PROTO and FRAME;
    ``pending``: the error (byte, message) at their end unless they end with STOP."""

    kinds: list[int]
    args: list[Any]
    pending: tuple[int, str]


def decode(data: bytes, max_opcodes: int, max_depth: int) -> Program:
    """Read opcodes and arguments up to STOP or the first error an opcode's bytes show."""
    kinds: list[int] = []
    args: list[Any] = []
    kind, arg = kinds.append, args.append
    end, pos, at, count, depth = len(data), 0, 0, -1, 0
    pending = (0, "")
    try:
        for count in range(max_opcodes):
            if pos >= end:
                pending = (pos, "the pickle ends without STOP")
                break
            at, code = pos, data[pos]
            if code == 0x72:  # LONG_BINPUT
                kind(PUT)
                arg(_U32(data, pos + 1)[0])
                pos += 5
            elif code == 0x68:  # BINGET
                kind(GET)
                arg(data[pos + 1])
                pos += 2
            elif code == 0x4D:  # BININT2
                kind(PUSH)
                arg(_U16(data, pos + 1)[0])
                pos += 3
            elif code == 0x4B:  # BININT1
                kind(PUSH)
                arg(data[pos + 1])
                pos += 2
            elif code == 0x28:  # MARK
                if depth >= max_depth:
                    pending = (at, f"more than {max_depth} nested MARKs")
                    break
                depth += 1
                kind(MARK)
                arg(None)
                pos += 1
            elif code in _PREFIXED:  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, *BINBYTES*, LONG1
                n = _PREFIXED[code]
                start = pos + 1 + n
                pos = start + (data[pos + 1] if n == 1 else (_U32 if n == 4 else _U64)(data, pos + 1)[0])
                if pos > end:
                    pending = (at, truncated(data, at))
                    break
                kind(PUSH)
                if code in _TEXT:
                    arg(str(data[start:pos], "utf-8"))
                else:
                    arg(int.from_bytes(data[start:pos], "little", signed=True) if code == 0x8A else data[start:pos])
            elif code in _CLOSES:
                if not depth:
                    pending = (at, f"{opname(code)} without a MARK")
                    break
                depth -= 1
                kind(_CLOSES[code])
                arg(None)
                pos += 1
            elif code in _PLAIN:
                kind(_PLAIN[code])
                arg(None)
                pos += 1
            elif code in _CONSTANTS:
                kind(PUSH)
                arg(_CONSTANTS[code])
                pos += 1
            elif code == 0x4A or code == 0x47:  # BININT, BINFLOAT
                kind(PUSH)
                arg(_I32(data, pos + 1)[0] if code == 0x4A else _F64(data, pos + 1)[0])
                pos += 5 if code == 0x4A else 9
            elif code == 0x71 or code == 0x6A:  # BINPUT, LONG_BINGET
                kind(PUT if code == 0x71 else GET)
                arg(data[pos + 1] if code == 0x71 else _U32(data, pos + 1)[0])
                pos += 2 if code == 0x71 else 5
            elif code == 0x63:  # GLOBAL: two lines, resolved now
                module, pos = _line(data, pos + 1)
                name, pos = _line(data, pos)
                kind(PUSH)
                arg(resolve(module, name))
            elif code == 0x2E:  # STOP
                kind(STOP)
                arg(end - pos - 1)  # bytes after it
                break
            elif code == 0x80:  # PROTO
                version = data[pos + 1]
                if at != 0 or not 2 <= version <= 5:
                    pending = (at, f"PROTO {version} (protocols 2 to 5 are read, at byte 0 only)")
                    break
                pos += 2
            elif code == 0x95:  # FRAME: a read-ahead hint; its length is checked, then ignored
                if _U64(data, pos + 1)[0] > end - pos - 9:
                    pending = (at, "FRAME runs past the end of the pickle")
                    break
                pos += 9
            else:
                pending = (at, f"opcode {opname(code)} is refused (torch.save never writes it for a state dict)")
                break
        else:  # a one-pass machine names the last opcode it ran
            pending = (at, f"more than {max_opcodes} opcodes; a state dict needs far fewer")
            if pos >= end:
                pending = (pos, "the pickle ends without STOP")
    except (IndexError, struct.error):  # an argument past the end
        pending = (at, truncated(data, at))
    except UnicodeDecodeError as e:
        pending = (at, f"string is not valid UTF-8 (its byte {e.start})")
    except Refusal as e:  # a GLOBAL not allowed, or not a line
        pending = (at, str(e))
    del kinds[len(args) :]  # an opcode that failed half-way
    return Program(kinds, args, pending)


def limit(data: bytes, program: Program, limit: int) -> Program:
    """``program`` cut where it pushes value ``limit + 1`` or sets memo entry ``limit + 1``, with
    that error pending, as a one-pass machine fails: after the push (that opcode's operands
    checked first), before the put. Only needed for a program of more than ``limit`` instructions."""
    kinds, args, _ = program
    pushed, memo = 0, set[int]()
    for i, (k, a) in enumerate(zip(kinds, args)):
        if k == PUT or k == MEMOIZE:
            index = len(memo) if k == MEMOIZE else a
            if index not in memo and len(memo) >= limit:
                return Program(kinds[:i], args[:i], (offset(data, i), f"more than {limit} memo entries"))
            memo.add(index)
        elif k in _PUSHING:
            pushed += 1
            if pushed > limit:
                message = f"more than {limit} values; a state dict needs far fewer"
                return Program(kinds[: i + 1], args[: i + 1], (offset(data, i), message))
    return program


def offset(data: bytes, instruction: int) -> int:
    """The byte of the opcode of instruction number ``instruction`` (every opcode up to it decoded)."""
    pos, count = 0, -1
    while True:
        code = data[pos]
        count += code not in (0x80, 0x95)
        if count == instruction:
            return pos
        if code in _PREFIXED:
            n = _PREFIXED[code]
            pos += 1 + n + int.from_bytes(data[pos + 1 : pos + 1 + n], "little")
        elif code == 0x63:
            pos = _line(data, _line(data, pos + 1)[1])[1]
        else:
            pos += 1 + _FIXED.get(code, 0)


def _line(data: bytes, pos: int) -> tuple[str, int]:
    """A GLOBAL's module or name: the text up to a newline at most 255 bytes on, and what follows."""
    end = data.find(b"\n", pos, pos + 256)
    if end < 0:
        raise Refusal("GLOBAL name is not a line of at most 255 bytes")
    return data[pos : end + 1].decode("utf-8")[:-1], end + 1


def truncated(data: bytes, at: int) -> str:
    """What the opcode at byte ``at`` needed beyond the end of ``data``."""
    code, end = data[at], len(data)
    n = _FIXED.get(code, 0)
    if code in _PREFIXED:
        n = _PREFIXED[code]
        if at + 1 + n <= end:
            n = int.from_bytes(data[at + 1 : at + 1 + n], "little")
    return f"{opname(code)} needs {n} bytes but the pickle ends at byte {end}"
