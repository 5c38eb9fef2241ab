"""``load(device="cuda")`` and ``fuse`` of CUDA tensors, on a real device (skipped without one).
Reference: the CPU load / fuse with the same options, moved to the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from device_cases import DTYPES, INPUTS, OPTIONS, whisper

import fastfuse
from fastfuse import FuseError

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def bits(t: Any) -> Any:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def assert_on_device_as(expected: dict[str, Any], got: dict[str, Any], device: str = "cuda:0") -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].device == torch.device(device), key
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(bits(got[key]), bits(value.to(device))), key


@pytest.mark.parametrize("source", list(INPUTS))
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_load_on_cuda_is_the_cpu_load_moved(tmp_path: Path, source: str, options: dict[str, Any]) -> None:
    path = INPUTS[source](tmp_path, DTYPES["float16"])
    expected = fastfuse.load(path, framework="pt", **options)
    assert_on_device_as(expected, fastfuse.load(path, device="cuda:0", **options))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("options", OPTIONS[:10], ids=str)
def test_load_on_cuda_other_dtypes(tmp_path: Path, dtype: str, options: dict[str, Any]) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES[dtype])
    expected = fastfuse.load(path, framework="pt", **options)
    assert_on_device_as(expected, fastfuse.load(path, device=0, framework="pt", **options))


def test_device_spellings(tmp_path: Path) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    expected = fastfuse.load(path, framework="pt")
    for device in ("cuda", 0, torch.device("cuda:0"), torch.device("cuda")):
        assert_on_device_as(expected, fastfuse.load(path, device=device))
    with pytest.raises(FuseError, match="expected an index below"):
        fastfuse.load(path, device=f"cuda:{torch.cuda.device_count()}")


def test_peak_device_memory_is_the_results_plus_the_scratch(tmp_path: Path) -> None:
    path = INPUTS["safetensors"](tmp_path, DTYPES["float16"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = fastfuse.load(path, device="cuda", keep_originals=False, cross_kv=True, dtype="float32")
    results = sum(t.numel() * t.element_size() for t in loaded.values())
    assert torch.cuda.max_memory_allocated() - before <= results + (512 << 20)
    assert torch.cuda.memory_allocated() - before <= results + 256 * len(loaded) + (2 << 20)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_fuse_of_cuda_tensors_is_the_cpu_fuse_moved(options: dict[str, Any]) -> None:
    state = {k: torch.from_numpy(v) for k, v in whisper(np.float16).items()}
    expected = fastfuse.fuse(state, **options)
    on_device = {k: v.to("cuda") for k, v in state.items()}
    on_device["model.decoder.layers.0.self_attn.q_proj.weight"] = (
        on_device["model.decoder.layers.0.self_attn.q_proj.weight"].T.contiguous().T
    )  # a strided source
    assert_on_device_as(expected, fastfuse.fuse(on_device, **options))


def test_fuse_on_mixed_devices_is_an_error() -> None:
    state = {k: torch.from_numpy(v).to("cuda") for k, v in whisper(np.float16).items()}
    state["model.encoder.layers.1.self_attn.v_proj.weight"] = state[
        "model.encoder.layers.1.self_attn.v_proj.weight"
    ].cpu()
    with pytest.raises(FuseError, match=r"on 2 devices \(.*on cpu, .*on cuda:0\); move them to one"):
        fastfuse.fuse(state)
