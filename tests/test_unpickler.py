"""The restricted unpickler against independent references: ``pickle.loads`` (harmless pickles
written by ``pickle.dumps`` at protocols 2 to 5), ``torch.load`` (a real state dict), and
``pickletools.genops`` (where each opcode starts, for the byte every error names).

The interpreter runs in two passes (``pickle_program.decode``, then ``unpickler._run``); these
tests check that together they build what a one-pass machine builds and fail where it fails:
a truncated pickle at every byte, an opcode out of place at every opcode boundary.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfuse.errors import MalformedFileError
from fastfuse.formats import unpickler
from fastfuse.formats.pickle_objects import PickledDict, StorageRef, TensorRef


def plain(value: Any) -> Any:
    """``value`` with every PickledDict as a dict (for comparing types exactly)."""
    if type(value) is PickledDict:
        return {k: plain(v) for k, v in value.items()}
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    return value


def same(found: Any, expected: Any) -> bool:
    """Equal values of the same types all the way down (1 == 1.0 == True are not the same)."""
    if type(found) is not type(expected):
        return False
    if type(found) is dict:
        return list(found) == list(expected) and all(same(found[k], expected[k]) for k in found)
    if type(found) in (list, tuple):
        return len(found) == len(expected) and all(same(a, b) for a, b in zip(found, expected))
    if type(found) is float and math.isnan(found):
        return math.isnan(expected)
    return bool(found == expected)


def values(with_bytes: bool = True) -> st.SearchStrategy[Any]:
    """Nested dicts (string keys), lists and tuples of every size of None, bools, ints (1, 2, 4
    bytes and longer), floats (NaN too), strings (any code point, short and long) and bytes."""
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=300)
    return st.recursive(
        scalars | st.binary(max_size=300) if with_bytes else scalars,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.tuples(inner)
            | st.tuples(inner, inner)
            | st.tuples(inner, inner, inner)
            | st.lists(inner, min_size=4, max_size=6).map(tuple)  # MARK ... TUPLE
            | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=30,
    )


@settings(max_examples=300, deadline=None)
@given(value=values(), protocol=st.integers(3, 5))
def test_harmless_pickles_load_as_pickle_loads_them(value: Any, protocol: int) -> None:
    data = pickle.dumps(value, protocol=protocol)
    assert same(plain(unpickler.unpickle(data, "x")), pickle.loads(data))


@settings(max_examples=100, deadline=None)
@given(value=values(with_bytes=False))
def test_protocol_2_pickles_load_as_pickle_loads_them(value: Any) -> None:
    """(Protocol 2 pickles bytes as a call of _codecs.encode: refused, so none here.)"""
    data = pickle.dumps(value, protocol=2)
    assert same(plain(unpickler.unpickle(data, "x")), pickle.loads(data))


def test_shared_and_cyclic_values_keep_their_identity() -> None:
    shared: list[Any] = [1, "a"]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    for protocol in range(2, 6):
        found = unpickler.unpickle(pickle.dumps({"a": shared, "b": shared, "c": cyclic}, protocol=protocol), "x")
        assert found["a"] is found["b"] and found["a"] == [1, "a"]
        assert found["c"][0] is found["c"]


def torch_pickle(obj: Any) -> bytes:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    import zipfile

    with zipfile.ZipFile(buffer) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def test_a_state_dict_reads_as_torch_load_reads_it() -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float16)
    state = {
        "w": base[:12].view(3, 4),
        "t": base[:12].view(3, 4).t(),  # strided view of the same storage
        "b": torch.ones(5, dtype=torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64)[2:],  # offset view
        "s": torch.tensor(3.0),
        "p": torch.nn.Parameter(torch.zeros(2, 2)),
    }
    found = unpickler.unpickle(torch_pickle(state), "x")
    assert list(found) == list(state)
    for name, tensor in state.items():
        ref = found[name]
        assert type(ref) is TensorRef and type(ref.storage) is StorageRef
        assert (ref.size, ref.stride, ref.offset) == (tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
        assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
        assert ref.storage.numel == tensor.untyped_storage().nbytes() // tensor.element_size()
    assert found["w"].storage.key == found["t"].storage.key != found["b"].storage.key
    assert found["p"].parameter and not found["w"].parameter


def _opcodes(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of each opcode, by pickletools."""
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(data)]
    return [(name, pos, end) for (name, pos), (_, end) in zip(ops, [*ops[1:], ("", len(data))])]


def _error(data: bytes) -> str:
    with pytest.raises(MalformedFileError) as caught:
        unpickler.unpickle(data, "x")
    return str(caught.value)


def test_a_pickle_cut_at_every_byte_names_the_opcode_cut() -> None:
    data = pickle.dumps({"name": ("storage", 7, -3, 2**40, 1.5, None, True), "more": ["a" * 300, b"xy"]}, protocol=3)
    ops = _opcodes(data)
    for cut in range(1, len(data)):
        name, start, _ = next(op for op in ops if op[1] <= cut < op[2])
        message = _error(data[:cut])
        if cut == start:
            assert message == f"x byte {cut}: the pickle ends without STOP", cut
        elif name == "GLOBAL":
            assert message == f"x byte {start}: GLOBAL name is not a line of at most 255 bytes", cut
        else:
            assert message.startswith(f"x byte {start}: {name} needs "), (cut, message)
            assert message.endswith(f" bytes but the pickle ends at byte {cut}"), (cut, message)


@pytest.mark.parametrize(("opcode", "name"), [(b"a", "APPEND"), (b"s", "SETITEM"), (b"b", "BUILD")])
def test_an_opcode_out_of_place_is_named_at_its_byte(opcode: bytes, name: str) -> None:
    """Errors found at run time (an empty stack, a value of the wrong kind) name the byte of
    their opcode, wherever it is: each of these fails wherever it is put in a state dict."""
    torch = pytest.importorskip("torch")
    data = torch_pickle({"a": torch.zeros(2), "b": torch.ones(3)})
    for _, start, _ in _opcodes(data)[1:]:  # after PROTO
        message = _error(data[:start] + opcode + data[start:])
        assert message.startswith(f"x byte {start}: {name} "), (start, message)


def test_the_memo_is_read_by_index_only_after_it_is_set() -> None:
    assert _error(b"\x80\x02h\x05.") == "x byte 2: memo index 5 is read before it is set"
    assert _error(b"\x80\x02Nq\x05j\x06\x00\x00\x00.") == "x byte 5: memo index 6 is read before it is set"
    assert unpickler.unpickle(b"\x80\x04N\x94h\x00\x86.", "x") == (None, None)  # MEMOIZE takes the next index


def test_errors_of_a_one_pass_machine_come_in_opcode_order() -> None:
    """An error at run time before an opcode the decoder refuses wins, as one pass reads them."""
    assert _error(b"\x80\x02a\xff") == "x byte 2: APPEND on an empty stack"
    assert _error(b"\x80\x02N\x85" + b"\x86X\xff\xff\xff\xff") == "x byte 4: TUPLE2 needs 2 values, the stack holds 1"
    assert (
        _error(b"\x80\x02N.junk")
        == "x byte 3: STOP with 0 open MARKs, 1 values and 4 bytes after it; expected none, one and none"
    )


def test_limits_stop_at_the_opcode_a_one_pass_machine_stops_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unpickler, "MAX_OPCODES", 5)  # PROTO and four NONEs
    assert _error(b"\x80\x02NNNNN.") == "x byte 5: more than 5 opcodes; a state dict needs far fewer"  # the last run
    assert _error(b"\x80\x02NNNN") == "x byte 6: the pickle ends without STOP"
    monkeypatch.setattr(unpickler, "MAX_OPCODES", 1000)
    monkeypatch.setattr(unpickler, "MAX_OBJECTS", 3)
    assert _error(b"\x80\x02NNNN.") == "x byte 5: more than 3 values; a state dict needs far fewer"
    assert _error(b"\x80\x02NN]\x87.") == "x byte 5: more than 3 values; a state dict needs far fewer"
    # the fourth push, TUPLE3, checks its operands first
    assert _error(b"\x80\x02NN\x85\x87.") == "x byte 5: TUPLE3 needs 3 values, the stack holds 2"
    assert _error(b"\x80\x02Nq\x00q\x01q\x02q\x03.") == "x byte 9: more than 3 memo entries"
    assert _error(b"Nq\x00q\x01q\x02(q\x03.") == "x byte 8: more than 3 memo entries"  # before the empty stack
    assert unpickler.unpickle(b"\x80\x02Nq\x00q\x01q\x02q\x00.", "x") is None  # setting an index again: no new entry


def test_the_garbage_collector_is_left_as_it_was() -> None:
    """The parse pauses the collector (it would walk the whole process midway) and restores it."""
    import gc

    assert gc.isenabled()
    unpickler.unpickle(b"\x80\x02N.", "x")
    _error(b"\x80\x02a")
    assert gc.isenabled()
    gc.disable()
    try:
        unpickler.unpickle(b"\x80\x02N.", "x")
        _error(b"\x80\x02a")
        assert not gc.isenabled()
    finally:
        gc.enable()
