"""The rules of the restricted unpickler: which globals resolve, which REDUCEs rebuild what,
which persistent ids name a storage, which BUILDs and dict items are taken.

Each rule takes plain values the opcode machine (:mod:`fastfuse.formats.unpickler`) popped
and returns the plain data of :mod:`fastfuse.formats.pickle_objects`, or raises
:class:`Refusal` with the message; the machine adds the file, member and byte offset. Nothing
here imports a module, calls a pickled function or builds an arbitrary object.
"""

from __future__ import annotations

from typing import Any, NoReturn

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
    ordered_dict,
)

__all__ = ["Refusal", "build", "reduce", "resolve", "setitems", "stack_global", "storage"]


class Refusal(Exception):
    """What a rule refuses, in words; the opcode machine says where."""


def _refuse(message: str) -> NoReturn:
    raise Refusal(message)


def resolve(module: str, name: str) -> Global:
    """The allowed global ``module.name`` (never imported)."""
    found = ALLOWED.get((module, name))
    if found is None:
        full = f"{module}.{name}"
        what = HINTS.get(full, "not a piece of a state dict")
        _refuse(f"global {full[:200]!r} is refused ({what}); nothing was imported or called")
    return found


def stack_global(module: Any, name: Any) -> Global:
    """STACK_GLOBAL of the two values it popped (two strings, then :func:`resolve`)."""
    if type(module) is not str or type(name) is not str:
        _refuse(f"STACK_GLOBAL of {a_kind(module)} and {a_kind(name)}, expected two strings")
    return resolve(module, name)


_new = tuple.__new__  # a NamedTuple from a tuple of all its fields, without a Python frame
_V2 = (StorageRef, int, tuple, tuple, bool, PickledDict)
_V3 = (*_V2, Global)
_TYPES = {  # role -> (argument types, with a trailing metadata dict: 3.x torch's lazy views)
    "rebuild_v2": (_V2, (*_V2, PickledDict)),
    "rebuild_v3": (_V3, (*_V3, PickledDict)),
}
_PARAMETER = (TensorRef, bool, PickledDict)


def reduce(func: Any, args: Any) -> TensorRef | PickledDict:
    """REDUCE of ``func`` on ``args``: an empty OrderedDict, a tensor or a Parameter's tensor.
    Argument types are checked exactly (``type(x) is T``); value ranges are the caller's."""
    if type(func) is not Global or func.role in ("storage", "dtype"):
        _refuse(
            f"REDUCE on {a_kind(func)} is refused (only collections.OrderedDict and "
            "torch._utils._rebuild_tensor_v2/_v3/_rebuild_parameter are rebuilt, and never called)"
        )
    if type(args) is not tuple:
        _refuse(f"REDUCE of {func.full} with {a_kind(args)} of arguments, expected a tuple")
    role = func.role
    if role == "ordered_dict":
        if args:
            _refuse(f"REDUCE of collections.OrderedDict with {len(args)} arguments, expected none")
        return ordered_dict()
    if role == "rebuild_parameter":
        _check(func, args, _PARAMETER)
        _empty(func, "backward_hooks", args[2])
        tensor: TensorRef = args[0]
        return tensor._replace(parameter=True)
    plain, with_metadata = _TYPES[role]
    types = with_metadata if len(args) > len(plain) else plain
    _check(func, args, types)
    storage_ref, offset, size, stride, _, hooks = args[:6]
    _empty(func, "backward_hooks", hooks)
    if types is with_metadata:
        _empty(func, "metadata (a lazy conj/neg view: save x.resolve_conj().resolve_neg())", args[-1])
    for dim in size + stride:
        if type(dim) is not int:
            _not_ints(func, size, stride)
    if role == "rebuild_v3":
        if args[6].role != "dtype":
            _refuse(f"{func.full} dtype is {a_kind(args[6])}, expected a torch dtype")
        return _new(TensorRef, (storage_ref, offset, size, stride, args[6].dtype, False))
    return _new(TensorRef, (storage_ref, offset, size, stride, storage_ref.dtype, False))


def _not_ints(func: Global, size: tuple[Any, ...], stride: tuple[Any, ...]) -> NoReturn:
    for what, dims in (("size", size), ("stride", stride)):
        odd = sorted({a_kind(d) for d in dims if type(d) is not int})
        if odd:
            _refuse(f"{func.full} {what} holds {' and '.join(odd)}, expected ints")
    raise AssertionError("every dimension is an int")


def _check(func: Global, args: tuple[Any, ...], types: tuple[type, ...]) -> None:
    if tuple(map(type, args)) != types:
        expected = ", ".join(NAMES.get(t.__name__, t.__name__) for t in types)
        _refuse(f"{func.full} arguments are ({kinds(args)}), expected ({expected})")


def _empty(func: Global, what: str, value: PickledDict) -> None:
    if value or value.odd_keys:
        _refuse(f"{func.full} {what} holds {len(value) + value.odd_keys} entries, expected none")


_PID_SHAPE = "str 'storage', global storage class, str key, str location, int numel"


def storage(pid: Any) -> StorageRef:
    """The storage a BINPERSID's persistent id names (a plain member name as its key)."""
    if type(pid) is tuple and len(pid) == 5:
        tag, cls, key, location, numel = pid
        if (
            type(tag) is str
            and tag == "storage"
            and type(cls) is Global
            and cls.role == "storage"
            and type(key) is str
            and type(location) is str
            and type(numel) is int
        ):
            if not key or len(key) > 200 or key in (".", "..") or "/" in key or "\\" in key or "\0" in key:
                _refuse(f"storage key {key[:200]!r} is not a plain member name")
            return _new(StorageRef, (cls.name, cls.dtype, key, location, numel))
    found = f"({kinds(pid)})" if type(pid) is tuple else a_kind(pid)
    _refuse(f"persistent id is {found}, expected ({_PID_SHAPE})")


def setitems(target: Any, items: list[Any], opname: str) -> None:
    """DICT, SETITEM or SETITEMS (``opname``): ``items`` (key, value, key, value...) into
    ``target``; a non-string key is counted and dropped, never hashed (int or float hashes can
    be made to collide)."""
    if type(target) is not PickledDict:
        _refuse(f"{opname} on {a_kind(target)}; only dicts take items")
    if len(items) % 2:
        _refuse(f"{opname} with an odd number ({len(items)}) of keys and values")
    keys, values = items[::2], items[1::2]
    if all(type(k) is str for k in keys):
        target.update(zip(keys, values))
        return
    for k, v in zip(keys, values):
        if type(k) is str:
            target[k] = v
        else:  # counted and dropped, never hashed
            target.odd_keys += 1
            target.odd_kind = target.odd_kind or a_kind(k)


def build(state: Any, inst: Any) -> None:
    """BUILD: only an OrderedDict's ``{'_metadata': ...}`` state is accepted (and dropped)."""
    if type(inst) is not PickledDict or not inst.ordered:
        _refuse(f"BUILD on {a_kind(inst)} is refused (only an OrderedDict's _metadata is accepted)")
    if type(state) is not PickledDict or state.odd_keys or set(state) - {"_metadata"}:
        found = list(state)[:10] if type(state) is PickledDict else []
        _refuse(f"BUILD of an OrderedDict with {a_kind(state)} {found}, expected {{'_metadata': ...}}")
