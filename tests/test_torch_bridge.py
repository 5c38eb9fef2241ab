"""Torch tensors in and out: ``load(path, framework="pt")``, ``fuse(state_dict)`` and copy-on-write maps.

References are independent of fastfuse: ``safetensors.torch.load_file`` / ``torch.load`` for the
originals, ``torch.cat`` of transposes for the fused tensors, and the modules of real
random-initialised transformers models (no download) for state dicts. Files are built inside
each test. In-place writes through loaded tensors run in a subprocess (a read-only map would
segfault there, not here), and the parent checks the file's bytes did not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ml_dtypes
from conftest import hf_whisper_shapes, tiny_whisper_config
from safetensors.torch import load_file, save_file

import fastfuse

pytestmark = pytest.mark.usefixtures("engine")

D, ENC, DEC, VOCAB = 16, 2, 2, 30
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Every dtype safetensors.torch writes that fastfuse's safetensors reader supports (it refuses
# F8_E4M3FNUZ, F8_E5M2FNUZ and C64, which safetensors also writes, as unsupported dtypes).
ST_DTYPES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i8": torch.int8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "u8": torch.uint8,
    "u16": torch.uint16,
    "u32": torch.uint32,
    "u64": torch.uint64,
    "bool": torch.bool,
    "f8_e4m3fn": torch.float8_e4m3fn,
    "f8_e5m2": torch.float8_e5m2,
}
ATTN = "model.{side}.layers.{i}.{block}.{part}_proj.{kind}"
SITES = [("encoder", "enc", i) for i in range(ENC)] + [("decoder", "dec", i) for i in range(DEC)]


# ---------------------------------------------------------------- helpers (no fastfuse inside)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns (NaN payloads, -0.0, infinities, subnormals included); bools 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * itemsize), dtype=torch.uint8, generator=generator)
    return raw.view(dtype)


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's elements in C order."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(got: Any, expected: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor), type(got)
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert tuple(got.shape) == tuple(expected.shape)
    assert torch.equal(raw(got), raw(expected))


def numpy_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def whisper_tensors(
    dtype: torch.dtype, seed: int = 0, extra: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A Hugging Face Whisper-shaped state dict (keys as conftest's ``hf_whisper_shapes``), random bits."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        key: random_bits(shape, dtype, generator) for key, shape in hf_whisper_shapes(D, ENC, DEC, VOCAB).items()
    }
    return tensors | (extra or {})


def qkv_reference(t: dict[str, torch.Tensor], side: str, i: int, block: str = "self_attn") -> tuple[torch.Tensor, ...]:
    """(weight, bias) of ``[Wq.T | Wk.T | Wv.T]`` and ``[bq | 0 | bv]`` by torch."""
    w = [t[ATTN.format(side=side, i=i, block=block, part=p, kind="weight")] for p in "qkv"]
    b = [t.get(ATTN.format(side=side, i=i, block=block, part=p, kind="bias")) for p in "qkv"]
    zeros = torch.zeros(w[1].shape[0], dtype=w[0].dtype)
    return torch.cat([x.t() for x in w], 1), torch.cat([zeros if x is None else x for x in b])


def kv_reference(t: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, ...]:
    w = [t[ATTN.format(side="decoder", i=i, block="encoder_attn", part=p, kind="weight")] for p in "kv"]
    bv = t[ATTN.format(side="decoder", i=i, block="encoder_attn", part="v", kind="bias")]
    return torch.cat([x.t() for x in w], 1), torch.cat([torch.zeros_like(bv), bv])


@contextmanager
def no_warnings() -> Iterator[None]:
    """Fail on any warning, whatever module it is attributed to."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_python(code: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# ---------------------------------------------------------------- load(framework="pt")


@pytest.mark.parametrize("name", list(ST_DTYPES))
def test_load_pt_originals_are_bit_identical_to_safetensors_torch(tmp_path: Path, name: str) -> None:
    dtype = ST_DTYPES[name]
    generator = torch.Generator().manual_seed(7)
    extra = {
        f"x.{name}": random_bits((5, 7), dtype, generator),
        f"row.{name}": random_bits((1, 3), dtype, generator),
        f"vec.{name}": random_bits((11,), dtype, generator),
    }
    path = tmp_path / "ckpt.safetensors"
    save_file(whisper_tensors(torch.float32, extra=extra), str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    with no_warnings():
        loaded = fastfuse.load(path, framework="pt")
    assert set(reference) <= set(loaded)
    for key, expected in reference.items():
        assert_same_bits(loaded[key], expected)
    assert loaded[f"x.{name}"].dtype == dtype  # bf16 as torch.bfloat16, float8 as torch.float8_*


@pytest.mark.parametrize("name", list(FLOATS))
def test_load_pt_fused_tensors_are_torch_cat_of_transposes(tmp_path: Path, name: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file(whisper_tensors(FLOATS[name], seed=3), str(path), metadata={"format": "pt"})
    t = load_file(str(path))
    with no_warnings():
        loaded = fastfuse.load(path, framework="pt", cross_kv=True, logits=True)
    expected: dict[str, torch.Tensor] = {}
    for side, short, i in SITES:
        expected[f"fused.{short}.{i}.self_attn.qkv.weight"], expected[f"fused.{short}.{i}.self_attn.qkv.bias"] = (
            qkv_reference(t, side, i)
        )
    for i in range(DEC):
        expected[f"fused.dec.{i}.encoder_attn.kv.weight"], expected[f"fused.dec.{i}.encoder_attn.kv.bias"] = (
            kv_reference(t, i)
        )
    expected["fused.dec.logits.weight"] = t["model.decoder.embed_tokens.weight"].t()
    assert set(loaded) == set(t) | set(expected)
    for key, value in expected.items():
        got = loaded[key]
        assert_same_bits(got, value)
        assert got.is_contiguous()
    # Fused tensors are new, writable, torch-owned memory: writing them leaves the originals alone.
    for key in expected:
        loaded[key].zero_()
        assert torch.count_nonzero(raw(loaded[key])) == 0
    for key, value in t.items():
        assert_same_bits(loaded[key], value)


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_load_originals_are_zero_copy_views_of_one_map(tmp_path: Path, framework: str) -> None:
    """Address differences of the originals equal their offset differences in the file's header."""
    path = tmp_path / "ckpt.safetensors"
    save_file(whisper_tensors(torch.float16, seed=2), str(path))
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    offsets = {key: entry["data_offsets"][0] for key, entry in header.items() if key != "__metadata__"}
    loaded = fastfuse.load(path, framework=framework)

    def address(value: Any) -> int:
        return value.data_ptr() if framework == "pt" else value.__array_interface__["data"][0]

    first = min(offsets, key=offsets.__getitem__)
    for key, offset in offsets.items():
        assert address(loaded[key]) - address(loaded[first]) == offset - offsets[first], key


def test_load_np_returns_read_only_numpy_originals_and_numpy_fused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file(whisper_tensors(torch.bfloat16, seed=5), str(path), metadata={"format": "pt"})
    t = load_file(str(path))
    loaded = fastfuse.load(path)  # framework="np" is the default
    assert fastfuse.load(path, framework="np").keys() == loaded.keys()
    for key, value in t.items():
        array = loaded[key]
        assert isinstance(array, np.ndarray) and not array.flags.writeable
        assert array.dtype == np.dtype(ml_dtypes.bfloat16) and array.shape == tuple(value.shape)
        np.testing.assert_array_equal(numpy_bits(array), raw(value).numpy())
        with pytest.raises(ValueError, match="read-only"):
            array[(0,) * array.ndim] = 0
    for side, short, i in SITES:
        weight = loaded[f"fused.{short}.{i}.self_attn.qkv.weight"]
        assert isinstance(weight, np.ndarray) and weight.flags.writeable and weight.flags.c_contiguous
        np.testing.assert_array_equal(numpy_bits(weight), raw(qkv_reference(t, side, i)[0]).numpy())


@pytest.mark.parametrize("framework", ["torch", "tf", "jax", "PT", "numpy", ""])
def test_unknown_framework_is_a_fuse_error_naming_the_allowed_values(tmp_path: Path, framework: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file(whisper_tensors(torch.float32), str(path))
    with pytest.raises(fastfuse.FuseError, match=r"(?s)'np'.*'pt'") as info:
        fastfuse.load(path, framework=framework)
    assert repr(framework) in str(info.value)


def test_load_pt_of_a_fused_file_returns_its_tensors_as_torch(tmp_path: Path) -> None:
    src, dst = tmp_path / "ckpt.safetensors", tmp_path / "fused.safetensors"
    save_file(whisper_tensors(torch.bfloat16, seed=9), str(src), metadata={"format": "pt"})
    fastfuse.fuse_file(src, dst, cross_kv=True)
    reference = load_file(str(dst))
    loaded = fastfuse.load(dst, framework="pt")
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert_same_bits(loaded[key], value)
    t = load_file(str(src))
    assert_same_bits(loaded["fused.dec.1.self_attn.qkv.weight"], qkv_reference(t, "decoder", 1)[0])


# torch.save archives, read by fastfuse's own zip reader (no torch involved in reading).
def test_load_pt_of_a_torch_save_file_is_bit_identical_to_torch_load(tmp_path: Path) -> None:
    t = whisper_tensors(torch.float16, seed=11)
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    t |= {"strided": base.t(), "offset": base[2:4], "tied": t["model.decoder.embed_tokens.weight"]}
    path = tmp_path / "pytorch_model.bin"
    torch.save(t, path)
    reference = torch.load(path, weights_only=True)
    loaded = fastfuse.load(path, framework="pt")
    for key, value in reference.items():
        assert_same_bits(loaded[key], value)
        assert tuple(loaded[key].stride()) == tuple(value.stride())
    assert_same_bits(loaded["fused.enc.0.self_attn.qkv.weight"], qkv_reference(t, "encoder", 0)[0])


# ---------------------------------------------------------------- in-place writes, in a subprocess

IN_PLACE_CHILD = """
    import json, sys
    import fastfuse
    framework, files = sys.argv[1], json.loads(sys.argv[2])
    equal = lambda a, b: bool((a == b).all())
    report = {}
    for path, keys in files:
        loaded = fastfuse.load(path, framework=framework)
        for key in keys:
            value = loaded[key]
            before = value.clone() if framework == "pt" else value.copy()
            if framework == "pt":
                value.add_(1)
            else:
                value.flags.writeable = True
                value += 1
            fresh = fastfuse.load(path, framework=framework)[key]  # a new map of the same file
            report[f"{path}:{key}"] = {
                "seen": equal(value, before + 1),
                "fresh_is_original": equal(fresh, before),
                "first": float(value.reshape(-1)[0]),
                "original_first": float(before.reshape(-1)[0]),
            }
    print(json.dumps(report))
"""


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_in_place_write_changes_the_process_copy_never_the_file(tmp_path: Path, framework: str) -> None:
    """A safetensors file, and torch.save files (.pt, .bin, read without torch), one child process."""
    t = whisper_tensors(torch.float32, seed=13)
    for key in t:  # finite values so that x + 1 is meaningful
        t[key] = torch.randn(t[key].shape, generator=torch.Generator().manual_seed(len(key)))
    t["strided"] = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)).t()  # a strided view in torch files
    keys = ["model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.1.self_attn.v_proj.bias"]
    files: list[tuple[Path, list[str]]] = []
    for kind in ("safetensors", "pt", "bin"):
        path = tmp_path / f"ckpt.{kind}"
        if kind == "safetensors":
            save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata={"format": "pt"})
            files.append((path, keys))
        else:
            torch.save(t, path)
            files.append((path, [*keys, "strided"]))
    before = {path: (sha256(path), path.stat().st_mtime_ns) for path, _ in files}
    child = run_python(IN_PLACE_CHILD, framework, json.dumps([(str(p), k) for p, k in files]))
    assert child.returncode == 0, child.stderr  # no segfault (-11), no warning turned error
    report = json.loads(child.stdout)
    assert len(report) == 8
    for path, names in files:
        for key in names:
            entry = report[f"{path}:{key}"]
            assert entry["seen"] and entry["fresh_is_original"], (path, key, entry)
            assert entry["original_first"] == float(t[key].reshape(-1)[0])
            assert entry["first"] == float(t[key].reshape(-1)[0] + 1)
        assert (sha256(path), path.stat().st_mtime_ns) == before[path]


# ---------------------------------------------------------------- fuse(state_dict)


def whisper_config() -> Any:
    return tiny_whisper_config()


@functools.cache
def whisper_model(dtype: torch.dtype) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(whisper_config()).to(dtype).eval()


@functools.cache
def llama_model(dtype: torch.dtype) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k, v have half the rows of q
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("name", list(FLOATS))
def test_fuse_whisper_state_dict_keeps_the_same_tensor_objects(name: str) -> None:
    model = whisper_model(FLOATS[name])
    sd = model.state_dict()
    before = dict(sd)
    result = fastfuse.fuse(sd, cross_kv=True)
    assert list(sd) == list(before) and all(sd[k] is before[k] for k in sd)  # input untouched
    assert all(result[key] is value for key, value in sd.items())
    fused = {key: value for key, value in result.items() if key not in sd}
    assert len(fused) == 2 * (ENC + DEC) + 2 * DEC
    with torch.no_grad():
        for side, short, i in SITES:
            attn = getattr(model.model, side).layers[i].self_attn
            weight, bias = (
                fused[f"fused.{short}.{i}.self_attn.qkv.weight"],
                fused[f"fused.{short}.{i}.self_attn.qkv.bias"],
            )
            assert_same_bits(
                weight, torch.cat([attn.q_proj.weight.t(), attn.k_proj.weight.t(), attn.v_proj.weight.t()], 1)
            )
            assert_same_bits(bias, torch.cat([attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias), attn.v_proj.bias]))
            assert weight.dtype == FLOATS[name] and weight.is_contiguous() and not weight.requires_grad
        for i in range(DEC):
            cross = model.model.decoder.layers[i].encoder_attn
            assert_same_bits(
                fused[f"fused.dec.{i}.encoder_attn.kv.weight"],
                torch.cat([cross.k_proj.weight.t(), cross.v_proj.weight.t()], 1),
            )
            assert_same_bits(
                fused[f"fused.dec.{i}.encoder_attn.kv.bias"],
                torch.cat([torch.zeros_like(cross.v_proj.bias), cross.v_proj.bias]),
            )


@pytest.mark.parametrize("name", list(FLOATS))
def test_fuse_llama_gqa_state_dict_both_targets(name: str) -> None:
    model = llama_model(FLOATS[name])
    sd = model.state_dict()
    default = fastfuse.fuse(sd)
    vllm = fastfuse.fuse(sd, target="vllm")
    assert all(default[key] is value for key, value in sd.items())
    dropped = {key for key in sd if any(f".{p}_proj." in key for p in ("q", "k", "v", "gate", "up"))}
    assert len(dropped) == 5 * 2
    assert dropped.isdisjoint(vllm) and all(vllm[key] is sd[key] for key in sd.keys() - dropped)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v, gate, up = (m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
            assert (q.shape, k.shape) == ((64, 64), (32, 64))
            assert_same_bits(default[f"fused.layers.{i}.self_attn.qkv.weight"], torch.cat([q.t(), k.t(), v.t()], 1))
            assert_same_bits(default[f"fused.layers.{i}.mlp.gate_up.weight"], torch.cat([gate.t(), up.t()], 1))
            assert_same_bits(vllm[f"model.layers.{i}.self_attn.qkv_proj.weight"], torch.cat([q, k, v], 0))
            assert_same_bits(vllm[f"model.layers.{i}.mlp.gate_up_proj.weight"], torch.cat([gate, up], 0))


def _strided_parts(dtype: torch.dtype) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(21)

    def bits(*shape: int) -> torch.Tensor:
        return random_bits(shape, dtype, g)

    def transposed() -> tuple[torch.Tensor, ...]:
        return tuple(bits(D, D).t().contiguous().t() for _ in range(3))  # column-major

    def row_slices() -> tuple[torch.Tensor, ...]:
        big = bits(3 * D + 2, D)  # one storage, non-zero storage offsets
        return big[1 : 1 + D], big[1 + D : 1 + 2 * D], big[1 + 2 * D : 1 + 3 * D]

    def column_slices() -> tuple[torch.Tensor, ...]:
        big = bits(D, 3 * D + 3)
        return big[:, 3 : 3 + D], big[:, 3 + D : 3 + 2 * D], big[:, 3 + 2 * D :]

    def steps() -> tuple[torch.Tensor, ...]:
        big = bits(2 * D, 2 * D)
        return big[::2, ::2], big[1::2, :D], big[:D, 1::2]

    def expanded() -> tuple[torch.Tensor, ...]:
        return bits(D, 1).expand(D, D), bits(1, D).expand(D, D), bits(D, D)  # stride-0 axes

    def same_object() -> tuple[torch.Tensor, ...]:
        w = bits(D, D)
        return w, w, w

    def transposed_views() -> tuple[torch.Tensor, ...]:
        big = bits(D, 3 * D)
        return big.t()[:D].t().t(), big.t()[D : 2 * D], big.t()[2 * D :]  # sharing, offsets, column-major

    return {
        f.__name__: f for f in (transposed, row_slices, column_slices, steps, expanded, same_object, transposed_views)
    }


STRIDED = list(_strided_parts(torch.float32))


@pytest.mark.parametrize("name", list(FLOATS))
@pytest.mark.parametrize("case", STRIDED)
def test_fuse_non_contiguous_and_shared_storage_torch_inputs(name: str, case: str) -> None:
    dtype = FLOATS[name]
    q, k, v = _strided_parts(dtype)[case]()
    biases = random_bits((3 * D,), dtype, torch.Generator().manual_seed(2))
    bq, bv = biases[::3], biases[D + 1 : 2 * D + 1]  # strided and offset biases
    prefix = "model.encoder.layers.0.self_attn"
    sd = {f"{prefix}.q_proj.weight": q, f"{prefix}.k_proj.weight": k, f"{prefix}.v_proj.weight": v}
    sd |= {f"{prefix}.q_proj.bias": bq, f"{prefix}.v_proj.bias": bv}
    snapshot = {key: value.clone() for key, value in sd.items()}
    result = fastfuse.fuse(sd)
    assert all(result[key] is value for key, value in sd.items())
    assert_same_bits(result["fused.enc.0.self_attn.qkv.weight"], torch.cat([q.t(), k.t(), v.t()], 1))
    assert_same_bits(result["fused.enc.0.self_attn.qkv.bias"], torch.cat([bq, torch.zeros(D, dtype=dtype), bv]))
    for key, value in sd.items():
        assert_same_bits(value, snapshot[key])  # sources not written


def test_fuse_parameters_with_requires_grad_and_autograd_results() -> None:
    model = llama_model(torch.float32)
    params = model.state_dict(keep_vars=True)  # nn.Parameters, requires_grad=True
    assert all(p.requires_grad for key, p in params.items() if key.endswith("_proj.weight"))
    result = fastfuse.fuse(params)
    assert all(result[key] is value for key, value in params.items())
    attn = model.model.layers[1].self_attn
    expected = torch.cat([attn.q_proj.weight.t(), attn.k_proj.weight.t(), attn.v_proj.weight.t()], 1)
    assert_same_bits(result["fused.layers.1.self_attn.qkv.weight"], expected)
    assert all(p.grad is None for p in model.parameters())
    # Non-leaf tensors carrying a graph (grad_fn) too.
    scaled = {key: p * 2 if key.endswith("_proj.weight") else p for key, p in params.items()}
    assert scaled["model.layers.0.self_attn.q_proj.weight"].grad_fn is not None
    fused = fastfuse.fuse(scaled)["fused.layers.0.self_attn.qkv.weight"]
    a = model.model.layers[0].self_attn
    assert_same_bits(fused, torch.cat([a.q_proj.weight.t() * 2, a.k_proj.weight.t() * 2, a.v_proj.weight.t() * 2], 1))


def whisper_layer(**replace: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    sd = {f"model.encoder.layers.0.self_attn.{p}_proj.weight": torch.randn(D, D, generator=g) for p in "qkv"}
    return sd | replace


def test_meta_tensor_is_a_fuse_error_naming_the_key_and_what_to_do() -> None:
    key = "model.encoder.layers.0.self_attn.k_proj.weight"
    with pytest.raises(fastfuse.FuseError) as info:
        fastfuse.fuse(whisper_layer(**{key: torch.empty(D, D, device="meta")}))
    message = str(info.value)
    assert key in message and "meta" in message
    assert "load" in message  # what to do: load the weights first


def test_tensors_on_two_devices_are_a_fuse_error_naming_a_key_on_each() -> None:
    # No GPU here: torch's own FakeTensorMode makes a tensor whose device is cuda:0 (nothing of
    # fastfuse is mocked; this is what a tracing framework hands around).
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            cuda = torch.empty(D, D, device="cuda")
    except (RuntimeError, AssertionError, NotImplementedError) as exc:  # pragma: no cover - torch build
        pytest.skip(f"cannot make a fake CUDA tensor: {exc}")
    assert cuda.device.type == "cuda"
    key = "model.encoder.layers.0.self_attn.v_proj.weight"
    with pytest.raises(fastfuse.FuseError) as info:
        fastfuse.fuse(whisper_layer(**{key: cuda}))
    assert str(info.value) == (
        "the tensors to fuse are on 2 devices ('model.encoder.layers.0.self_attn.q_proj.weight' on cpu, "
        f"{key!r} on cuda:0); move them to one (e.g. {{k: t.to('cuda:0') for k, t in state_dict.items()}})"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(D, D).to_sparse(),
        lambda: torch.randn(D, D).to_mkldnn(),
    ],
    ids=["sparse", "mkldnn"],
)
def test_tensors_numpy_cannot_view_are_fuse_errors_naming_the_key(make: Callable[[], torch.Tensor]) -> None:
    key = "model.encoder.layers.0.self_attn.q_proj.weight"
    with pytest.raises(fastfuse.FuseError, match=key.replace(".", r"\.")):
        fastfuse.fuse(whisper_layer(**{key: make()}))


def test_parameter_subclass_state_dict_is_fused_as_torch() -> None:
    # Engines and libraries subclass nn.Parameter (e.g. vLLM's BasevLLMParameter); such a
    # state dict is a mapping of CPU torch tensors like any other.
    class TaggedParameter(torch.nn.Parameter):
        pass

    sd = {key: TaggedParameter(value) for key, value in whisper_layer().items()}
    result = fastfuse.fuse(sd)
    assert all(result[key] is value for key, value in sd.items())
    w = [sd[f"model.encoder.layers.0.self_attn.{p}_proj.weight"].detach() for p in "qkv"]
    assert_same_bits(result["fused.enc.0.self_attn.qkv.weight"], torch.cat([x.t() for x in w], 1))


def test_fuse_passes_through_a_tensor_of_a_dtype_numpy_lacks() -> None:
    # An MX scale tensor (float8_e8m0fnu) beside the attention weights: not a source of any
    # group, so it is returned as it is, like every kept original.
    scales = torch.full((D, 2), 2.0).to(torch.float8_e8m0fnu)
    sd = whisper_layer(**{"model.encoder.layers.0.self_attn.q_proj.weight_scale": scales})
    result = fastfuse.fuse(sd)
    assert result["model.encoder.layers.0.self_attn.q_proj.weight_scale"] is scales


def test_load_pt_of_a_torch_file_with_float8_e8m0fnu(tmp_path: Path) -> None:
    # fastfuse's torch reader reads float8_e8m0fnu (numpy path); framework="pt" must hand it back as torch.
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0]).to(torch.float8_e8m0fnu)
    path = tmp_path / "ckpt.pt"
    torch.save(whisper_layer(scales=scales), path)
    assert fastfuse.load(path)["scales"].dtype == np.dtype(ml_dtypes.float8_e8m0fnu)
    loaded = fastfuse.load(path, framework="pt")
    assert_same_bits(loaded["scales"], scales)


# ---------------------------------------------------------------- torch is imported only when asked for

IMPORT_CHILD = """
    import sys
    import numpy as np
    import fastfuse
    framework, *paths = sys.argv[1:]
    assert "torch" not in sys.modules, "import fastfuse imported torch"
    kinds = set()
    for path in paths:
        loaded = fastfuse.load(path) if framework == "default" else fastfuse.load(path, framework=framework)
        kinds |= {type(v).__module__.split(".")[0] for v in loaded.values()}
        if framework != "pt":
            originals = {k: np.array(v) for k, v in loaded.items() if not k.startswith("fused.")}
            fastfuse.fuse(originals, cross_kv=True)
    print(" ".join(sorted(kinds)), "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    ("framework", "expected"), [("default", "numpy False"), ("np", "numpy False"), ("pt", "torch True")]
)
def test_torch_is_imported_only_for_framework_pt(tmp_path: Path, framework: str, expected: str) -> None:
    t = whisper_tensors(torch.float16, seed=1)
    save_file(t, str(tmp_path / "ckpt.safetensors"))
    torch.save(t, tmp_path / "pytorch_model.bin")  # fastfuse reads torch files without torch
    child = run_python(IMPORT_CHILD, framework, tmp_path / "ckpt.safetensors", tmp_path / "pytorch_model.bin")
    assert child.returncode == 0, child.stderr
    assert child.stdout.split("\n")[-2] == expected
