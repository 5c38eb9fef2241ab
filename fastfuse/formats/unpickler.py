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

Three modules: :mod:`~fastfuse.formats.pickle_program` decodes the opcodes into a program
(first pass), this one runs it (the opcode machine, second pass), and
:mod:`~fastfuse.formats.pickle_rules` says what is allowed; the objects built are in
:mod:`~fastfuse.formats.pickle_objects`.

>>> unpickle(b"\\x80\\x02}q\\x00X\\x01\\x00\\x00\\x00aK\\x07s.", "demo")
{'a': 7}
"""

from __future__ import annotations

import gc
import operator
from collections.abc import Iterator
from typing import Any

from fastfuse.errors import MalformedFileError
from fastfuse.formats.pickle_objects import PickledDict, a_kind
from fastfuse.formats.pickle_program import (
    APPEND,
    APPENDS,
    BUILD,
    DICT,
    GET,
    LIST,
    MARK,
    MEMOIZE,
    NEW_DICT,
    NEW_LIST,
    PERSID,
    PUSH,
    PUT,
    REDUCE,
    SETITEM,
    SETITEMS,
    STACK_GLOBAL,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
    Program,
    decode,
    limit,
    offset,
    opname,
)
from fastfuse.formats.pickle_rules import Refusal, build, reduce, setitems, stack_global, storage

__all__ = ["MAX_DEPTH", "MAX_OBJECTS", "MAX_OPCODES", "MAX_PICKLE_BYTES", "unpickle"]

MAX_PICKLE_BYTES = 100_000_000  # a large-v3 state dict pickles to ~0.1 MB
MAX_OBJECTS = 1_000_000  # values pushed (and memo entries): ~10k per large model; bounds memory
MAX_OPCODES = 1_000_000  # opcodes run: ~40k for large-v3 (1259 tensors); bounds time (~0.5 s here)
MAX_DEPTH = 100  # open MARKs; torch nests 3


def unpickle(data: bytes, where: str) -> Any:
    """The object ``data`` pickles, built from allowed pieces only; ``where`` (file and member)
    starts every error message."""
    collecting = gc.isenabled()
    gc.disable()  # ~25k tuples and dicts for large-v3: no collection (a walk of the process) midway
    try:
        program = decode(data, MAX_OPCODES, MAX_DEPTH)
        if len(program.kinds) > MAX_OBJECTS:  # else fewer values and memo entries than instructions
            program = limit(data, program, MAX_OBJECTS)
        return _run(program, data)
    except _Stopped as e:
        raise MalformedFileError(f"{where} byte {e.args[0]}: {e.args[1]}") from None
    finally:
        if collecting:
            gc.enable()


class _Stopped(Exception):
    """``(byte, message)`` of the error that stopped a program."""


def _run(program: Program, data: bytes) -> Any:
    """Interpret ``program`` (one test chain, most frequent kinds first) until STOP.

    Stack underflow and unset memo indexes are not tested per instruction: they raise
    IndexError or KeyError, and the handler names the opcode from the instruction's number;
    MARKs are known to be open (the decoder counted them).
    """
    kinds, args, pending = program
    stack: list[Any] = []
    append, pop = stack.append, stack.pop
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    left = iter(kinds)  # its length hint says which instruction failed
    try:
        for kind, arg in zip(left, args):
            if kind == PUSH:
                append(arg)
            elif kind == PUT:
                memo[arg] = stack[-1]
            elif kind == GET:
                append(memo[arg])
            elif kind == MARK:
                marks.append(stack)
                stack = []
                append, pop = stack.append, stack.pop
            elif kind == TUPLE:
                values = tuple(stack)
                stack = marks.pop()
                append, pop = stack.append, stack.pop
                append(values)
            elif kind == REDUCE:
                value = pop()
                stack[-1] = reduce(stack[-1], value)
            elif kind == TUPLE1:
                stack[-1] = (stack[-1],)
            elif kind == PERSID:
                stack[-1] = storage(stack[-1])
            elif kind == TUPLE2:
                stack[-2:] = [(stack[-2], stack[-1])]
            elif kind == TUPLE3:
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif kind == NEW_DICT:
                append(PickledDict())
            elif kind == NEW_LIST:
                append([])
            elif kind == LIST or kind == DICT or kind == APPENDS or kind == SETITEMS:
                items = stack
                stack = marks.pop()
                append, pop = stack.append, stack.pop
                _close(kind, stack, items)
            elif kind == APPEND:
                value = pop()
                _a_list(stack[-1], "APPEND").append(value)
            elif kind == SETITEM:
                value = pop()
                key = pop()  # before the dict is read: a one-pass machine's order of errors
                setitems(stack[-1], [key, value], "SETITEM")
            elif kind == STACK_GLOBAL:
                name = pop()
                append(stack_global(pop(), name))
            elif kind == BUILD:
                value = pop()
                build(value, stack[-1])
            elif kind == MEMOIZE:
                memo[len(memo)] = stack[-1]
            else:  # STOP: arg is the number of bytes after it
                if marks or len(stack) != 1 or arg:
                    raise Refusal(
                        f"STOP with {len(marks)} open MARKs, {len(stack)} values "
                        f"and {arg} bytes after it; expected none, one and none"
                    )
                return stack[0]
    except IndexError:
        at = _failed(data, kinds, left)
        code = data[at]
        if code in (0x85, 0x86, 0x87):
            raise _Stopped(at, f"{opname(code)} needs {code - 0x84} values, the stack holds {len(stack)}") from None
        raise _Stopped(at, f"{opname(code)} on an empty stack") from None
    except KeyError as e:  # only GET reads a dict here
        raise _Stopped(_failed(data, kinds, left), f"memo index {e} is read before it is set") from None
    except Refusal as e:
        raise _Stopped(_failed(data, kinds, left), str(e)) from None
    raise _Stopped(*pending)


def _failed(data: bytes, kinds: list[int], left: Iterator[int]) -> int:
    """The byte of the instruction that raised: the last one ``left`` (over ``kinds``) handed out."""
    return offset(data, len(kinds) - operator.length_hint(left) - 1)


def _close(kind: int, stack: list[Any], items: list[Any]) -> None:
    """LIST, DICT, APPENDS or SETITEMS of ``items`` (the values since the MARK) onto ``stack``
    (the one before the MARK)."""
    if kind == LIST:
        stack.append(items)
    elif kind == DICT:
        new = PickledDict()
        setitems(new, items, "DICT")
        stack.append(new)
    elif kind == SETITEMS:
        setitems(stack[-1], items, "SETITEMS")
    else:
        _a_list(stack[-1], "APPENDS").extend(items)


def _a_list(target: Any, opname: str) -> list[Any]:
    if type(target) is not list:
        raise Refusal(f"{opname} to {a_kind(target)}; only lists take items")
    return target
