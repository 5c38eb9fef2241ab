"""fastfuse against Hugging Face transformers: a random-initialised Whisper, saved and fused.

The checkpoints are real ``save_pretrained`` output (no download, no network), and the
references are the transformers modules themselves: their projections, their attention forward
and their tied output projection. Skipped when torch or transformers is not installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import numpy as np
import pytest
from conftest import tiny_whisper_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ml_dtypes  # noqa: F401  (safetensors.numpy yields bf16 arrays only once it is imported)
from naive import same_bits
from safetensors import safe_open
from safetensors.numpy import load_file

import fastfuse

D, HEADS, LAYERS, VOCAB = 64, 4, 2, 100
SITES = [("enc", i) for i in range(LAYERS)] + [("dec", i) for i in range(LAYERS)]
SITE_IDS = [f"{side}{i}" for side, i in SITES]


def whisper_config() -> transformers.WhisperConfig:
    return tiny_whisper_config(D, LAYERS, HEADS, VOCAB)


def build(model_class: type, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_class(whisper_config()).eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    return folder / "model.safetensors"


def self_attention(model: torch.nn.Module, side: str, i: int) -> torch.nn.Module:
    stack = model.model.encoder if side == "enc" else model.model.decoder
    return stack.layers[i].self_attn


def as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: torch warns on read-only arrays


def int_bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Raw bit patterns as signed integers of the element width (works for bf16 on both sides)."""
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()]).numpy()
    return np.ascontiguousarray(x).view(f"<i{x.dtype.itemsize}")


def assert_same_bits(array: np.ndarray, tensor: torch.Tensor) -> None:
    np.testing.assert_array_equal(int_bits(array), int_bits(tensor))


def qkv_weight(attn: torch.nn.Module) -> torch.Tensor:
    """What the fused weight must be, bit for bit: ``[Wq.T | Wk.T | Wv.T]``."""
    return torch.cat([attn.q_proj.weight.T, attn.k_proj.weight.T, attn.v_proj.weight.T], 1)


def qkv_bias(attn: torch.nn.Module) -> torch.Tensor:
    """``[bq | 0 | bv]``: HF Whisper's k_proj has no bias."""
    return torch.cat([attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias), attn.v_proj.bias])


def fused_projection(x: torch.Tensor, fused: dict[str, np.ndarray], key: str, parts: int) -> tuple[torch.Tensor, ...]:
    """One matmul ``x @ W + b``, split into ``parts`` equal chunks."""
    return torch.chunk(x @ as_torch(fused[f"{key}.weight"]) + as_torch(fused[f"{key}.bias"]), parts, dim=-1)


def attention_by_hand(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention without a mask, then ``out_proj`` (HF scales q first)."""
    batch, seq, _ = q.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, seq, module.num_heads, module.head_dim).transpose(1, 2)

    scores = heads(q * module.scaling) @ heads(k).transpose(2, 3)
    context = torch.softmax(scores, dim=-1) @ heads(v)
    return module.out_proj(context.transpose(1, 2).reshape(batch, seq, D))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build(transformers.WhisperForConditionalGeneration)


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(model, tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def fused(checkpoint: Path) -> dict[str, np.ndarray]:
    return fastfuse.fuse(load_file(checkpoint), cross_kv=True, logits=True)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))


def test_saved_keys_are_what_fastfuse_expects(checkpoint: Path) -> None:
    tensors = load_file(checkpoint)
    for block in ("encoder.layers.0.self_attn", "decoder.layers.1.self_attn", "decoder.layers.0.encoder_attn"):
        assert f"model.{block}.q_proj.bias" in tensors and f"model.{block}.v_proj.bias" in tensors
        assert f"model.{block}.k_proj.bias" not in tensors  # HF Whisper k_proj has no bias
        assert tensors[f"model.{block}.k_proj.weight"].shape == (D, D)
    assert "proj_out.weight" not in tensors  # tied to the token embedding, saved once
    assert tensors["model.decoder.embed_tokens.weight"].shape == (VOCAB, D)
    with safe_open(checkpoint, "np") as f:
        assert f.metadata() == {"format": "pt"}
    assert fastfuse.plan(tensors).prefix == "model."


@pytest.mark.parametrize(("side", "i"), SITES, ids=SITE_IDS)
def test_fused_qkv_is_bitwise_the_concat_of_transposed_module_weights(model, fused, side, i) -> None:
    attn = self_attention(model, side, i)
    key = f"fused.{side}.{i}.self_attn.qkv"
    assert_same_bits(fused[f"{key}.weight"], qkv_weight(attn))
    assert_same_bits(fused[f"{key}.bias"], qkv_bias(attn))


@torch.no_grad()
@pytest.mark.parametrize(("side", "i"), SITES, ids=SITE_IDS)
def test_one_fused_matmul_gives_the_module_projections(model, fused, x, side, i) -> None:
    attn = self_attention(model, side, i)
    q, k, v = fused_projection(x, fused, f"fused.{side}.{i}.self_attn.qkv", 3)
    for got, projection in ((q, attn.q_proj), (k, attn.k_proj), (v, attn.v_proj)):
        torch.testing.assert_close(got, projection(x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize(("side", "i"), SITES, ids=SITE_IDS)
def test_attention_from_fused_qkv_matches_the_module_forward(model, fused, x, side, i) -> None:
    attn = self_attention(model, side, i)
    q, k, v = fused_projection(x, fused, f"fused.{side}.{i}.self_attn.qkv", 3)
    reference, _ = attn(x, attention_mask=None)  # returns (output, attention weights)
    torch.testing.assert_close(attention_by_hand(attn, q, k, v), reference, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("i", range(LAYERS))
def test_fused_cross_kv_gives_the_encoder_attn_projections(model, fused, i) -> None:
    cross = model.model.decoder.layers[i].encoder_attn
    encoder_states = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(2))
    k, v = fused_projection(encoder_states, fused, f"fused.dec.{i}.encoder_attn.kv", 2)
    torch.testing.assert_close(k, cross.k_proj(encoder_states), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, cross.v_proj(encoder_states), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_fused_logits_weight_gives_the_tied_proj_out(model, fused, x) -> None:
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    logits = x @ as_torch(fused["fused.dec.logits.weight"])
    torch.testing.assert_close(logits, model.proj_out(x), rtol=1e-5, atol=1e-6)


def test_load_from_disk_gives_the_same_fused_tensors_as_fuse(checkpoint, fused) -> None:
    loaded = fastfuse.load(checkpoint, cross_kv=True, logits=True)
    assert loaded.keys() == fused.keys()
    for key in (k for k in fused if k.startswith("fused.")):
        assert same_bits(loaded[key], fused[key]), key


def test_load_returns_read_only_originals(checkpoint) -> None:
    loaded = fastfuse.load(checkpoint, cross_kv=True)
    originals = {key: array for key, array in loaded.items() if not key.startswith("fused.")}
    assert originals.keys() == load_file(checkpoint).keys()
    assert not any(array.flags.writeable for array in originals.values())


def test_whisper_model_checkpoint_without_model_prefix_is_fused(tmp_path) -> None:
    bare = build(transformers.WhisperModel)
    tensors = load_file(save(bare, tmp_path))
    assert "encoder.layers.0.self_attn.q_proj.weight" in tensors  # WhisperModel drops "model."
    assert fastfuse.plan(tensors).prefix == ""
    attn = bare.encoder.layers[1].self_attn
    assert_same_bits(fastfuse.fuse(tensors)["fused.enc.1.self_attn.qkv.weight"], qkv_weight(attn))


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half_model_and_tensors(request, tmp_path_factory) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    half = build(transformers.WhisperForConditionalGeneration).to(request.param)
    return half, load_file(save(half, tmp_path_factory.mktemp(str(request.param))))


@pytest.mark.parametrize(("side", "i"), SITES, ids=SITE_IDS)
def test_half_precision_fused_bits_match_torch(half_model_and_tensors, side, i) -> None:
    half, tensors = half_model_and_tensors
    attn = self_attention(half, side, i)
    fused_weight = fastfuse.fuse(tensors)[f"fused.{side}.{i}.self_attn.qkv.weight"]
    assert fused_weight.dtype.itemsize == 2
    assert_same_bits(fused_weight, qkv_weight(attn))


@pytest.mark.parametrize(("side", "i"), SITES, ids=SITE_IDS)
def test_half_precision_widens_to_float32_exactly(half_model_and_tensors, side, i) -> None:
    half, tensors = half_model_and_tensors
    attn = self_attention(half, side, i)
    fused_weight = fastfuse.fuse(tensors, dtype="float32")[f"fused.{side}.{i}.self_attn.qkv.weight"]
    assert fused_weight.dtype == np.float32
    assert_same_bits(fused_weight, qkv_weight(attn).float())


def test_transformers_loads_a_fused_file(model: torch.nn.Module, checkpoint: Path, tmp_path: Path) -> None:
    """The file `fastfuse fuse` writes is a checkpoint transformers still loads (fused keys are extra)."""
    folder = tmp_path / "fused"
    folder.mkdir()
    shutil.copy(checkpoint.parent / "config.json", folder / "config.json")
    fastfuse.fuse_file(checkpoint, folder / "model.safetensors", cross_kv=True)
    reloaded = transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
