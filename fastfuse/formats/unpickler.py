"""A restricted pickle interpreter for the ``data.pkl`` of a ``torch.save`` archive.

It never imports a module, calls a function or builds an arbitrary object: it is a loop over
the opcodes a state dict uses, and each one builds plain data. Globals resolve against an
allow-list to :class:`Global` sentinels; a persistent id becomes a :class:`StorageRef`; a
REDUCE of an allowed tensor rebuilder becomes a :class:`TensorRef` (argument types checked;
value ranges are the caller's to check, with the tensor's name at hand). Every dict is a
:class:`PickledDict` with string keys (a non-string key is counted, never hashed, and its
value dropped: int or float hashes can be made to collide). Anything else (other opcodes,
globals, REDUCE targets, BUILD states, persistent ids) raises MalformedFileError naming the
opcode, global or value and its byte offset.

Resources are bounded: the pickle size (checked by the caller before reading), the values
pushed, the memo, the open MARKs; a length is never trusted beyond the remaining bytes.
Cycles (a list appended to itself through the memo) are plain data: nothing here walks
containers, so no input recurses or hangs.

>>> load(b"\\x80\\x02}q\\x00X\\x01\\x00\\x00\\x00aK\\x07s.", "demo")
{'a': 7}
"""

from __future__ import annotations

import dataclasses
import pickletools
import struct
from collections.abc import Callable
from typing import Any, NoReturn

from fastfuse.errors import MalformedFileError
from fastfuse.formats.pickle_objects import (
    ALLOWED,
    HINTS,
    NAMES,
    Global,
    PickledDict,
    StorageRef,
    TensorRef,
    a_kind,
    kinds,
)

__all__ = ["MAX_DEPTH", "MAX_OBJECTS", "MAX_OPCODES", "MAX_PICKLE_BYTES", "load"]

MAX_PICKLE_BYTES = 100_000_000  # a large-v3 state dict pickles to ~0.1 MB
MAX_OBJECTS = 1_000_000  # values pushed (and memo entries): ~10k per large model; bounds memory
MAX_OPCODES = 1_000_000  # opcodes run: ~30k for large-v3 (about 40k tensors a file); bounds time (~3 s here)
MAX_DEPTH = 100  # open MARKs; torch nests 3


def load(data: bytes, where: str) -> Any:
    """The object ``data`` pickles, built from allowed pieces only; ``where`` (file and member)
    starts every error message."""
    return _Machine(data, where).run()


_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes}
# The only opcodes read, by handler; every other opcode is refused by name.
_HANDLED = {
    "_proto": b"\x80",
    "_frame": b"\x95",
    "_stop": b".",
    "_mark": b"(",
    "_empty": b"}])",
    "_tuple": b"t\x85\x86\x87",
    "_list": b"l",
    "_dict": b"d",
    "_append": b"ae",
    "_setitem": b"su",
    "_unicode": b"X\x8c\x8d",
    "_bytes": b"CB\x8e",
    "_int": b"JKM\x8a",
    "_float": b"G",
    "_constant": b"N\x88\x89",
    "_put": b"qr\x94",
    "_get": b"hj",
    "_global": b"c\x93",
    "_reduce": b"R",
    "_persistent": b"Q",
    "_build": b"b",
}
_LENGTH_BYTES = {ord("X"): 4, 0x8C: 1, 0x8D: 8, ord("C"): 1, ord("B"): 4, 0x8E: 8}


def _opname(code: int) -> str:
    return _OPNAMES.get(code, f"0x{code:02x}")


class _Machine:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.where, self.pos, self.at = data, where, 0, 0
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.pushed = 0
        self.handlers: dict[int, Callable[[int], bool]] = {
            code: getattr(self, method) for method, codes in _HANDLED.items() for code in codes
        }

    def fail(self, message: str) -> NoReturn:
        raise MalformedFileError(f"{self.where} byte {self.at}: {message}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            self.fail(f"{_opname(self.data[self.at])} needs {n} bytes but the pickle ends at byte {len(self.data)}")
        chunk, self.pos = self.data[self.pos : end], end
        return chunk

    def uint(self, n: int) -> int:
        if n == 1 and self.pos < len(self.data):  # the common case, without slicing
            self.pos += 1
            return self.data[self.pos - 1]
        return int.from_bytes(self.take(n), "little")

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"string is not valid UTF-8 (its byte {e.start})")

    def push(self, value: Any) -> None:
        self.pushed += 1
        if self.pushed > MAX_OBJECTS:
            self.fail(f"more than {MAX_OBJECTS} values; a state dict needs far fewer")
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            self.fail(f"{_opname(self.data[self.at])} on an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            self.fail(f"{_opname(self.data[self.at])} on an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            self.fail(f"{_opname(self.data[self.at])} without a MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def memoize(self, index: int) -> None:
        if index not in self.memo and len(self.memo) >= MAX_OBJECTS:
            self.fail(f"more than {MAX_OBJECTS} memo entries")
        self.memo[index] = self.top()

    def fetch(self, index: int) -> None:
        if index not in self.memo:
            self.fail(f"memo index {index} is read before it is set")
        self.push(self.memo[index])

    def setitems(self, target: Any, items: list[Any]) -> None:
        if type(target) is not PickledDict:
            self.fail(f"{_opname(self.data[self.at])} on {a_kind(target)}; only dicts take items")
        if len(items) % 2:
            self.fail(f"{_opname(self.data[self.at])} with an odd number ({len(items)}) of keys and values")
        for i in range(0, len(items), 2):
            if type(items[i]) is str:
                target[items[i]] = items[i + 1]
            else:  # counted and dropped, never hashed
                target.odd_keys += 1
                target.odd_kind = target.odd_kind or a_kind(items[i])

    def run(self) -> Any:
        """Interpret every opcode through its handler (one dict lookup each) until STOP."""
        data, handlers = self.data, self.handlers
        budget = MAX_OPCODES
        while self.pos < len(data):
            budget -= 1
            if budget < 0:
                self.fail(f"more than {MAX_OPCODES} opcodes; a state dict needs far fewer")
            self.at = self.pos
            code = data[self.pos]
            self.pos += 1
            handler = handlers.get(code)
            if handler is None:
                self.fail(f"opcode {_opname(code)} is refused (torch.save never writes it for a state dict)")
            if handler(code):  # only STOP returns True
                return self.stack[0]
        self.at = self.pos
        self.fail("the pickle ends without STOP")

    def _proto(self, code: int) -> bool:
        version = self.uint(1)
        if self.at != 0 or not 2 <= version <= 5:
            self.fail(f"PROTO {version} (protocols 2 to 5 are read, at byte 0 only)")
        return False

    def _frame(self, code: int) -> bool:  # a read-ahead hint: its length is checked, then ignored
        if self.uint(8) > len(self.data) - self.pos:
            self.fail("FRAME runs past the end of the pickle")
        return False

    def _stop(self, code: int) -> bool:
        if self.marks or len(self.stack) != 1 or self.pos != len(self.data):
            self.fail(
                f"STOP with {len(self.marks)} open MARKs, {len(self.stack)} values "
                f"and {len(self.data) - self.pos} bytes after it; expected none, one and none"
            )
        return True

    def _mark(self, code: int) -> bool:
        if len(self.marks) >= MAX_DEPTH:
            self.fail(f"more than {MAX_DEPTH} nested MARKs")
        self.marks.append(self.stack)
        self.stack = []
        return False

    def _empty(self, code: int) -> bool:  # EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE
        self.push(PickledDict() if code == 0x7D else [] if code == 0x5D else ())
        return False

    def _tuple(self, code: int) -> bool:  # TUPLE (from a MARK), TUPLE1, TUPLE2, TUPLE3
        if code == 0x74:
            self.push(tuple(self.pop_mark()))
            return False
        n = code - 0x84
        if len(self.stack) < n:
            self.fail(f"{_opname(code)} needs {n} values, the stack holds {len(self.stack)}")
        last = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.push(last)
        return False

    def _list(self, code: int) -> bool:
        self.push(self.pop_mark())
        return False

    def _dict(self, code: int) -> bool:
        items, new = self.pop_mark(), PickledDict()
        self.setitems(new, items)
        self.push(new)
        return False

    def _append(self, code: int) -> bool:  # APPEND, APPENDS
        items = [self.pop()] if code == 0x61 else self.pop_mark()
        target = self.top()
        if type(target) is not list:
            self.fail(f"{_opname(code)} to {a_kind(target)}; only lists take items")
        target.extend(items)
        return False

    def _setitem(self, code: int) -> bool:  # SETITEM, SETITEMS
        if code == 0x75:
            items = self.pop_mark()
        else:
            value = self.pop()
            items = [self.pop(), value]
        self.setitems(self.top(), items)
        return False

    def _unicode(self, code: int) -> bool:  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
        self.push(self.text(self.uint(_LENGTH_BYTES[code])))
        return False

    def _bytes(self, code: int) -> bool:  # SHORT_BINBYTES, BINBYTES, BINBYTES8
        self.push(self.take(self.uint(_LENGTH_BYTES[code])))
        return False

    def _int(self, code: int) -> bool:  # BININT, BININT1, BININT2, LONG1 (LONG4: torch never needs it)
        if code == 0x4A:
            self.push(int.from_bytes(self.take(4), "little", signed=True))
        elif code == 0x8A:
            self.push(int.from_bytes(self.take(self.uint(1)), "little", signed=True))
        else:
            self.push(self.uint(1 if code == 0x4B else 2))
        return False

    def _float(self, code: int) -> bool:  # BINFLOAT
        self.push(struct.unpack(">d", self.take(8))[0])
        return False

    def _constant(self, code: int) -> bool:  # NONE, NEWTRUE, NEWFALSE
        self.push(None if code == 0x4E else code == 0x88)
        return False

    # The two most frequent opcodes of a torch pickle (half of them): their arguments are read
    # inline, falling back to uint() (which names a truncated pickle) only at the very end.
    def _put(self, code: int) -> bool:  # BINPUT, LONG_BINPUT, MEMOIZE
        if code == 0x94:
            index = len(self.memo)
        else:
            n, pos = (1 if code == 0x71 else 4), self.pos
            if pos + n <= len(self.data):
                index, self.pos = int.from_bytes(self.data[pos : pos + n], "little"), pos + n
            else:
                index = self.uint(n)
        if self.stack and (index in self.memo or len(self.memo) < MAX_OBJECTS):
            self.memo[index] = self.stack[-1]
        else:
            self.memoize(index)  # names what is wrong
        return False

    def _get(self, code: int) -> bool:  # BINGET, LONG_BINGET
        n, pos = (1 if code == 0x68 else 4), self.pos
        if pos + n <= len(self.data):
            index, self.pos = int.from_bytes(self.data[pos : pos + n], "little"), pos + n
        else:
            index = self.uint(n)
        self.fetch(index)
        return False

    def _global(self, code: int) -> bool:  # GLOBAL, STACK_GLOBAL
        if code == 0x63:
            self.push(self.resolve(self.line(), self.line()))
            return False
        name, module = self.pop(), self.pop()
        if type(module) is not str or type(name) is not str:
            self.fail(f"STACK_GLOBAL of {a_kind(module)} and {a_kind(name)}, expected two strings")
        self.push(self.resolve(module, name))
        return False

    def _reduce(self, code: int) -> bool:
        args = self.pop()
        self.push(self.reduce(self.pop(), args))
        return False

    def _persistent(self, code: int) -> bool:  # BINPERSID
        self.push(self.storage(self.pop()))
        return False

    def _build(self, code: int) -> bool:
        self.build(self.pop(), self.top())
        return False

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            self.fail("GLOBAL name is not a line of at most 255 bytes")
        return self.text(end - self.pos + 1)[:-1]

    def resolve(self, module: str, name: str) -> Global:
        found = ALLOWED.get((module, name))
        if found is None:
            full = f"{module}.{name}"
            what = HINTS.get(full, "not a piece of a state dict")
            self.fail(f"global {full[:200]!r} is refused ({what}); nothing was imported or called")
        return found

    def reduce(self, func: Any, args: Any) -> Any:
        if type(func) is not Global or func.role in ("storage", "dtype"):
            self.fail(
                f"REDUCE on {a_kind(func)} is refused (only collections.OrderedDict and "
                "torch._utils._rebuild_tensor_v2/_v3/_rebuild_parameter are rebuilt, and never called)"
            )
        if type(args) is not tuple:
            self.fail(f"REDUCE of {func.full} with {a_kind(args)} of arguments, expected a tuple")
        if func.role == "ordered_dict":
            if args:
                self.fail(f"REDUCE of collections.OrderedDict with {len(args)} arguments, expected none")
            return PickledDict(ordered=True)
        if func.role == "rebuild_parameter":
            self.check(func, args, [TensorRef, bool, PickledDict])
            self.empty(func, "backward_hooks", args[2])
            return dataclasses.replace(args[0], parameter=True)
        v3 = func.role == "rebuild_v3"
        types: list[type] = [StorageRef, int, tuple, tuple, bool, PickledDict] + ([Global] if v3 else [])
        self.check(func, args, types + [PickledDict] if len(args) > len(types) else types)
        storage, offset, size, stride = args[:4]
        self.empty(func, "backward_hooks", args[5])
        if len(args) > len(types):
            self.empty(func, "metadata (a lazy conj/neg view: save x.resolve_conj().resolve_neg())", args[-1])
        for what, dims in (("size", size), ("stride", stride)):
            if not all(type(d) is int for d in dims):
                odd = sorted({a_kind(d) for d in dims if type(d) is not int})
                self.fail(f"{func.full} {what} holds {' and '.join(odd)}, expected ints")
        if v3 and args[6].role != "dtype":
            self.fail(f"{func.full} dtype is {a_kind(args[6])}, expected a torch dtype")
        return TensorRef(storage, offset, size, stride, args[6].dtype if v3 else storage.dtype)

    def check(self, func: Global, args: tuple[Any, ...], types: list[type]) -> None:
        if len(args) != len(types) or not all(type(a) is t for a, t in zip(args, types)):
            expected = ", ".join(NAMES.get(t.__name__, t.__name__) for t in types)
            self.fail(f"{func.full} arguments are ({kinds(args)}), expected ({expected})")

    def empty(self, func: Global, what: str, value: PickledDict) -> None:
        if value or value.odd_keys:
            self.fail(f"{func.full} {what} holds {len(value) + value.odd_keys} entries, expected none")

    def storage(self, pid: Any) -> StorageRef:
        shape = ["str 'storage'", "global storage class", "str key", "str location", "int numel"]
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and type(pid[0]) is str
            and pid[0] == "storage"
            and type(pid[1]) is Global
            and pid[1].role == "storage"
            and type(pid[2]) is str
            and type(pid[3]) is str
            and type(pid[4]) is int
        ):
            found = f"({kinds(pid)})" if type(pid) is tuple else a_kind(pid)
            self.fail(f"persistent id is {found}, expected ({', '.join(shape)})")
        key = pid[2]
        if not key or len(key) > 200 or key in (".", "..") or any(c in key for c in "/\\\0"):
            self.fail(f"storage key {key[:200]!r} is not a plain member name")
        return StorageRef(pid[1].name, pid[1].dtype, key, pid[3], pid[4])

    def build(self, state: Any, inst: Any) -> None:
        if type(inst) is not PickledDict or not inst.ordered:
            self.fail(f"BUILD on {a_kind(inst)} is refused (only an OrderedDict's _metadata is accepted)")
        if type(state) is not PickledDict or state.odd_keys or set(state) - {"_metadata"}:
            keys = list(state)[:10] if type(state) is PickledDict else []
            self.fail(f"BUILD of an OrderedDict with {a_kind(state)} {keys}, expected {{'_metadata': ...}}")
