"""fastfuse against Hugging Face decoder-only LLMs: Llama, Qwen2, Mistral, Phi-3 and GPT-2.

Random-initialised models from tiny configs (no download), saved with ``save_pretrained``; the
references are the transformers modules themselves. Skipped without torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.numpy import load_file

import fastfuse

D, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 8, 2, 96, 2, 100
HEAD_DIM = D // HEADS
Q_OUT, KV_OUT = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
TOKENS = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLM = {
    "hidden_size": D,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "attn_implementation": "eager",
    **TOKENS,
}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLM),
    "qwen2": lambda: transformers.Qwen2Config(**LLM),
    "mistral": lambda: transformers.MistralConfig(**LLM),
    "phi3": lambda: transformers.Phi3Config(**LLM),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=D, n_head=HEADS, n_layer=LAYERS, n_positions=32, attn_implementation="eager", **TOKENS
    ),
}
QKV, GATE_UP = "fused.layers.{i}.self_attn.qkv.{kind}", "fused.layers.{i}.mlp.gate_up.{kind}"


class Saved:
    """A random-initialised model, its ``save_pretrained`` folder and the saved tensors."""

    def __init__(self, family: str, folder: Path) -> None:
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
        self.model.save_pretrained(folder)  # model.safetensors and config.json
        self.folder, self.file = folder, folder / "model.safetensors"
        self.tensors = load_file(self.file)

    def layer(self, i: int) -> torch.nn.Module:
        return self.model.transformer.h[i] if hasattr(self.model, "transformer") else self.model.model.layers[i]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(family)``: each family built and saved once per module."""
    cache: dict[str, Saved] = {}

    def get(family: str) -> Saved:
        if family not in cache:
            cache[family] = Saved(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: torch warns on read-only arrays


def assert_bits(array: np.ndarray, tensor: torch.Tensor) -> None:
    """Same shape and the same float32 bit patterns."""
    expected = tensor.detach().contiguous().numpy()
    assert array.shape == expected.shape and array.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(np.ascontiguousarray(array).view(np.int32), expected.view(np.int32))


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def qkv_t(attn: torch.nn.Module) -> torch.Tensor:
    return torch.cat([attn.q_proj.weight.T, attn.k_proj.weight.T, attn.v_proj.weight.T], 1)


def projections(x: torch.Tensor, fused: dict[str, np.ndarray], i: int, bias: bool = False) -> tuple[torch.Tensor, ...]:
    """q, k, v from ONE matmul with the fused weight (plus the fused bias)."""
    out = x @ as_torch(fused[QKV.format(i=i, kind="weight")])
    if bias:
        out = out + as_torch(fused[QKV.format(i=i, kind="bias")])
    return torch.split(out, [Q_OUT, KV_OUT, KV_OUT], dim=-1)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_one_fused_qkv_matmul_gives_the_module_projections(saved, x, family) -> None:
    model = saved(family)
    assert fastfuse.plan(model.tensors).scheme == "hf-llama"
    fused = fastfuse.fuse(model.tensors)
    for i in range(LAYERS):
        attn = model.layer(i).self_attn
        assert_bits(fused[QKV.format(i=i, kind="weight")], qkv_t(attn))
        for got, projection in zip(
            projections(x, fused, i, bias=family == "qwen2"), (attn.q_proj, attn.k_proj, attn.v_proj)
        ):
            close(got, projection(x))


@torch.no_grad()
def test_qwen2_fused_bias_is_the_concat_of_q_k_v_biases(saved) -> None:
    model = saved("qwen2")
    fused = fastfuse.fuse(model.tensors)
    for i in range(LAYERS):
        attn = model.layer(i).self_attn
        assert_bits(
            fused[QKV.format(i=i, kind="bias")], torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        )


@torch.no_grad()
def test_llama_fused_gate_up_gives_the_mlp_forward(saved, x) -> None:
    model = saved("llama")
    fused = fastfuse.fuse(model.tensors)
    assert GATE_UP.format(i=0, kind="bias") not in fused
    for i in range(LAYERS):
        mlp = model.layer(i).mlp
        weight = fused[GATE_UP.format(i=i, kind="weight")]
        assert_bits(weight, torch.cat([mlp.gate_proj.weight.T, mlp.up_proj.weight.T], 1))
        gate, up = torch.split(x @ as_torch(weight), [FFN, FFN], dim=-1)
        close(gate, mlp.gate_proj(x))
        close(up, mlp.up_proj(x))
        close(mlp.down_proj(mlp.act_fn(gate) * up), mlp(x))


@torch.no_grad()
def test_llama_out_in_layout_is_for_f_linear(saved, x) -> None:
    model = saved("llama")
    fused = fastfuse.fuse(model.tensors, layout="out_in")
    for i in range(LAYERS):
        attn = model.layer(i).self_attn
        weight = fused[QKV.format(i=i, kind="weight")]
        assert_bits(weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0))
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        close(torch.nn.functional.linear(x, as_torch(weight)), expected)


def test_phi3_is_already_fused_and_left_alone_without_convert(saved) -> None:
    tensors = saved("phi3").tensors
    assert "model.layers.0.self_attn.qkv_proj.weight" in tensors and "model.layers.1.mlp.gate_up_proj.weight" in tensors
    fusion = fastfuse.plan(tensors)
    assert (fusion.scheme, fusion.already_fused, fusion.fused) == ("hf-phi3", True, ())
    result = fastfuse.fuse(tensors)
    assert list(result) == list(tensors)
    assert all(result[key] is tensors[key] for key in tensors)


@torch.no_grad()
def test_phi3_convert_transposes_qkv_and_gate_up(saved, x) -> None:
    model = saved("phi3")
    fused = fastfuse.fuse(model.tensors, convert=True)
    for i in range(LAYERS):
        layer = model.layer(i)
        weight = fused[QKV.format(i=i, kind="weight")]
        assert_bits(weight, layer.self_attn.qkv_proj.weight.T)
        close(x @ as_torch(weight), layer.self_attn.qkv_proj(x))
        assert_bits(fused[GATE_UP.format(i=i, kind="weight")], layer.mlp.gate_up_proj.weight.T)


@torch.no_grad()
def test_gpt2_convert_out_in_is_c_attn_for_f_linear(saved, x) -> None:
    model = saved("gpt2")
    assert model.tensors["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    fused = fastfuse.fuse(model.tensors, convert=True, layout="out_in")
    for i in range(LAYERS):
        c_attn = model.layer(i).attn.c_attn
        weight, bias = (as_torch(fused[QKV.format(i=i, kind=kind)]) for kind in ("weight", "bias"))
        assert_bits(weight.numpy(), c_attn.weight.T)
        close(torch.nn.functional.linear(x, weight, bias), c_attn(x))


def test_gpt2_convert_in_out_is_a_bit_exact_copy(saved) -> None:
    tensors = saved("gpt2").tensors
    fused = fastfuse.fuse(tensors, convert=True)
    for i in range(LAYERS):
        for kind in ("weight", "bias"):
            assert_bits(
                fused[QKV.format(i=i, kind=kind)], torch.from_numpy(tensors[f"transformer.h.{i}.attn.c_attn.{kind}"])
            )


def rank_slices(tensors: dict[str, np.ndarray], tp: int, i: int) -> list[tuple[np.ndarray, ...]]:
    """Per rank: (q, k, v, gate, up) column blocks of its in_out fused weights."""
    q_r, kv_r, ffn_r = Q_OUT // tp, KV_OUT // tp if KV_HEADS >= tp else HEAD_DIM, FFN // tp
    slices = []
    for rank in range(tp):
        fused = fastfuse.fuse(tensors, tp=tp, rank=rank, heads=HEADS, kv_heads=KV_HEADS, keep_originals=False)
        qkv, gate_up = fused[QKV.format(i=i, kind="weight")], fused[GATE_UP.format(i=i, kind="weight")]
        assert qkv.shape == (D, q_r + 2 * kv_r) and gate_up.shape == (D, 2 * ffn_r)
        slices.append((*np.split(qkv, [q_r, q_r + kv_r], axis=1), *np.split(gate_up, [ffn_r], axis=1)))
    return slices


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tensor_parallel_ranks_reassemble_the_projections(saved, tp) -> None:
    model = saved("llama")
    for i in range(LAYERS):
        attn, mlp = model.layer(i).self_attn, model.layer(i).mlp
        q, k, v, gate, up = zip(*rank_slices(model.tensors, tp, i))
        assert_bits(np.concatenate(q, axis=1), attn.q_proj.weight.T)
        assert_bits(np.concatenate(gate, axis=1), mlp.gate_proj.weight.T)
        assert_bits(np.concatenate(up, axis=1), mlp.up_proj.weight.T)
        for slices, projection in ((k, attn.k_proj), (v, attn.v_proj)):
            if KV_HEADS >= tp:
                assert_bits(np.concatenate(slices, axis=1), projection.weight.T)
                continue
            for rank, got in enumerate(slices):  # each kv head replicated to tp // KV_HEADS ranks
                h = rank * KV_HEADS // tp
                assert_bits(got, projection.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM].T)


@pytest.mark.parametrize("tp", [2, 4])
def test_fuse_file_tensor_parallel_reads_heads_from_config_json(saved, tmp_path, tp) -> None:
    model = saved("llama")
    out = tmp_path / "tp"
    fastfuse.fuse_file(model.folder, out, tp=tp)  # no heads=: from config.json beside model.safetensors
    copied = {p.name for p in model.folder.iterdir()} - {"model.safetensors"}  # a model folder's other files
    assert "config.json" in copied
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"rank-{r}-of-{tp}.safetensors" for r in range(tp)), "tensor_parallel.json", *copied]
    )
    for rank in range(tp):
        expected = fastfuse.fuse(model.tensors, tp=tp, rank=rank, heads=HEADS, kv_heads=KV_HEADS)
        with safe_open(out / f"rank-{rank}-of-{tp}.safetensors", "np") as f:
            assert set(f.keys()) == set(expected)
            for key in (QKV.format(i=i, kind="weight") for i in range(LAYERS)):
                np.testing.assert_array_equal(f.get_tensor(key).view(np.int32), expected[key].view(np.int32))
    assert fastfuse.verify(out) == []


ROUND_TRIPS = [("llama", {}), ("qwen2", {}), ("phi3", {"convert": True}), ("gpt2", {"convert": True})]


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize(("family", "options"), ROUND_TRIPS, ids=[family for family, _ in ROUND_TRIPS])
def test_fuse_then_unfuse_is_bit_exact(saved, tmp_path, layout, family, options) -> None:
    model = saved(family)
    fastfuse.fuse_file(model.file, tmp_path / "fused.safetensors", keep_originals=False, layout=layout, **options)
    dropped = model.tensors.keys() - load_file(tmp_path / "fused.safetensors").keys()
    rebuilt = fastfuse.unfuse(tmp_path / "fused.safetensors", tmp_path / "back.safetensors")
    assert dropped and set(rebuilt) == dropped
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == model.tensors.keys()
    for key, array in model.tensors.items():
        assert_bits(back[key], torch.from_numpy(array))


def test_tp_that_does_not_divide_the_heads_is_refused(saved) -> None:
    with pytest.raises(fastfuse.FuseError, match="do not divide"):
        fastfuse.fuse(saved("llama").tensors, tp=3, rank=0, heads=HEADS, kv_heads=KV_HEADS)


def test_tp_without_head_counts_or_config_is_refused(saved) -> None:
    with pytest.raises(fastfuse.FuseError, match="heads="):
        fastfuse.fuse(saved("llama").tensors, tp=2, rank=0)


def test_gqa_kv_heads_are_inferred_from_the_q_head_size(saved) -> None:
    model = saved("llama")
    k = model.tensors["model.layers.0.self_attn.k_proj.weight"]
    fused = fastfuse.fuse(model.tensors, tp=4, rank=0, heads=HEADS)  # kv heads = k rows / (q rows / heads)
    qkv = fused[QKV.format(i=0, kind="weight")]
    np.testing.assert_array_equal(qkv[:, Q_OUT // 4 : Q_OUT // 4 + HEAD_DIM], k[:HEAD_DIM].T)  # kv head 0, whole


def test_tensor_parallel_of_an_already_fused_checkpoint_is_refused(saved, tmp_path) -> None:
    with pytest.raises(
        fastfuse.FuseError, match=r"tp=2: nothing to split in this hf-phi3 checkpoint \(it is stored already fused"
    ):
        fastfuse.fuse_file(saved("phi3").folder, tmp_path / "tp", tp=2)
    assert not (tmp_path / "tp").exists()
