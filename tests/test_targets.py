"""Engine targets proven on real engine code: ``target="vllm"`` files loaded by transformers models.

transformers' ``Phi3ForCausalLM`` is a Llama whose attention and MLP read the vLLM names
(``self_attn.qkv_proj`` split by rows into q|k|v, ``mlp.gate_up_proj`` chunked into gate|up),
so a Llama checkpoint fused for vLLM must load into it strictly and give the Llama's logits.
Models are random-initialised from tiny configs (no download) and saved with
``save_pretrained``; every reference is torch (``cat``, slices, the modules' own outputs) or
``safetensors.torch``, never fastfuse.

Which transformers models load a fused ``qkv_proj`` weight AND bias (checked in transformers
5.24 with ``grep -rn "self.qkv_proj = nn.Linear" models/``): Phi-3, Phi-4-multimodal, MiniMax
and CodeGen build ``qkv_proj`` with ``bias=False`` (CodeGen also interleaves its rows by
model-parallel shard); MobileViTV2 and Zaya name a conv / a custom projection ``qkv_proj``. The
modules with a fused biased projection name it ``qkv`` and are vision encoders (Qwen2-VL and
Qwen2.5-VL vision blocks, Exaone 4.5 vision: ``nn.Linear(dim, q + 2 * kv, bias=True)`` split
[q, kv, kv]), not LLM decoders with vLLM's key names. So the Qwen2 bias is proven twice: with
``F.linear(x, W, b)`` against the three projections, and by giving Phi-3's attention the
``bias=True`` projection vLLM's Qwen2 uses (a one-line module swap, the forward is Phi-3's own)
and loading the fused file into it strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

import pytest
from conftest import run_cli, tiny_whisper_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastfuse
import fastfuse.planning.rules

pytestmark = pytest.mark.usefixtures("engine")

D, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 96, 2, 100
HEAD_DIM = D // HEADS
Q_OUT, KV_OUT = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
LLM = {
    "hidden_size": D,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attn_implementation": "eager",
}
ROPE = {"rope_theta": 10000.0, "rope_type": "default"}
QKV_PROJ = "model.layers.{i}.self_attn.qkv_proj.{kind}"
GATE_UP_PROJ = "model.layers.{i}.mlp.gate_up_proj.{kind}"
LLM_SOURCES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def llama_config(tie: bool) -> Any:
    return transformers.LlamaConfig(**LLM, tie_word_embeddings=tie, rope_parameters=dict(ROPE))


def phi3_config(tie: bool) -> Any:
    """The Phi-3 config equivalent to ``llama_config``: same sizes, rope, eps, ids; full rotary, no dropout."""
    return transformers.Phi3Config(
        **LLM,
        tie_word_embeddings=tie,
        rope_parameters={**ROPE, "partial_rotary_factor": 1.0},
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        original_max_position_embeddings=64,
        sliding_window=None,
    )


class Saved:
    """A random-initialised model, its ``save_pretrained`` folder and its tensors (safetensors.torch)."""

    def __init__(self, model: torch.nn.Module, folder: Path) -> None:
        self.model = model.eval()
        model.save_pretrained(folder)
        self.folder, self.file = folder, folder / "model.safetensors"
        self.tensors = load_file(str(self.file))


def build_llama(folder: Path, tie: bool) -> Saved:
    torch.manual_seed(0)
    return Saved(transformers.LlamaForCausalLM(llama_config(tie)), folder)


def build_qwen2(folder: Path) -> Saved:
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM, rope_parameters=dict(ROPE)))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # transformers initialises biases to zero: make them tell q, k, v apart
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(generator=generator)
    return Saved(model, folder)


def whisper_config() -> Any:
    return tiny_whisper_config(D, LAYERS, HEADS, VOCAB)


def build_whisper(folder: Path) -> Saved:
    torch.manual_seed(2)
    model = transformers.WhisperForConditionalGeneration(whisper_config())
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():  # biases start at zero: make them tell the parts (and the zero k bias) apart
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias"):
                parameter.normal_(generator=generator)
    return Saved(model, folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(name)``: each model built and saved once per module."""
    builders = {
        "llama": lambda f: build_llama(f, tie=False),
        "llama-tied": lambda f: build_llama(f, tie=True),
        "qwen2": build_qwen2,
        "whisper": build_whisper,
    }
    cache: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in cache:
            cache[name] = builders[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and tuple(got.shape) == tuple(expected.shape), (got.shape, expected.shape)
    assert torch.equal(raw(got), raw(expected))


def llm_expected_keys(tensors: dict[str, torch.Tensor], bias: bool) -> set[str]:
    """Original keys minus q/k/v/gate/up, plus the vLLM fused names."""
    kept = {key for key in tensors if not any(f".{source}." in key for source in LLM_SOURCES)}
    fused = {QKV_PROJ.format(i=i, kind="weight") for i in range(LAYERS)}
    fused |= {GATE_UP_PROJ.format(i=i, kind="weight") for i in range(LAYERS)}
    if bias:
        fused |= {QKV_PROJ.format(i=i, kind="bias") for i in range(LAYERS)}
    return kept | fused


def part(tensors: dict[str, torch.Tensor], i: int, name: str, kind: str = "weight") -> torch.Tensor:
    block = "mlp" if name in ("gate", "up") else "self_attn"
    return tensors[f"model.layers.{i}.{block}.{name}_proj.{kind}"]


def check_llm_file(fused: dict[str, torch.Tensor], original: dict[str, torch.Tensor], bias: bool) -> None:
    """Keys, shapes and bits of a vLLM-target file against torch concatenations of the originals."""
    assert set(fused) == llm_expected_keys(original, bias)
    for i in range(LAYERS):
        qkv, gate_up = fused[QKV_PROJ.format(i=i, kind="weight")], fused[GATE_UP_PROJ.format(i=i, kind="weight")]
        assert tuple(qkv.shape) == (Q_OUT + 2 * KV_OUT, D) and tuple(gate_up.shape) == (2 * FFN, D)
        assert_same_bits(qkv, torch.cat([part(original, i, p) for p in "qkv"], 0))
        assert_same_bits(gate_up, torch.cat([part(original, i, "gate"), part(original, i, "up")], 0))
        if bias:
            b = fused[QKV_PROJ.format(i=i, kind="bias")]
            assert tuple(b.shape) == (Q_OUT + 2 * KV_OUT,)
            assert_same_bits(b, torch.cat([part(original, i, p, "bias") for p in "qkv"]))
    for key in set(fused) & set(original):
        assert_same_bits(fused[key], original[key])  # everything else passes through untouched


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


# ---------------------------------------------------------------- Llama -> Phi-3


@torch.no_grad()
def test_llama_fused_for_vllm_loads_strictly_into_phi3_with_the_same_logits(saved, tmp_path, ids) -> None:
    llama = saved("llama")
    dst = tmp_path / "vllm.safetensors"
    fusion = fastfuse.fuse_file(llama.file, dst, target="vllm")
    assert (fusion.target, fusion.layout) == ("vllm", "out_in")
    fused = load_file(str(dst))
    check_llm_file(fused, llama.tensors, bias=False)
    assert metadata(dst)["format"] == "pt"  # transformers' own metadata kept
    phi3 = transformers.Phi3ForCausalLM(phi3_config(tie=False)).eval()
    result = phi3.load_state_dict(fused, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    expected, got = llama.model(ids).logits, phi3(ids).logits
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # Observed: bit-identical in f32 (eager attention; the fused matmuls give the very same sums here).
    assert torch.equal(got, expected)


@torch.no_grad()
def test_in_memory_vllm_target_from_load_pt_and_from_a_state_dict_loads_into_phi3(saved, ids) -> None:
    llama = saved("llama")
    expected = llama.model(ids).logits
    loaded = fastfuse.load(llama.file, framework="pt", target="vllm")
    from_state_dict = fastfuse.fuse(llama.model.state_dict(), target="vllm")
    for tensors in (loaded, from_state_dict):
        check_llm_file(tensors, llama.tensors, bias=False)
        phi3 = transformers.Phi3ForCausalLM(phi3_config(tie=False)).eval()
        result = phi3.load_state_dict(tensors, strict=True)
        assert (result.missing_keys, result.unexpected_keys) == ([], [])
        assert torch.equal(phi3(ids).logits, expected)


@torch.no_grad()
def test_tied_llama_fused_for_vllm_loads_with_phi3_from_pretrained(saved, tmp_path, ids) -> None:
    # Tied embeddings: lm_head.weight is not saved, so torch's strict load_state_dict would call
    # it missing for the original checkpoint too; transformers' own loader ties it.
    llama = saved("llama-tied")
    assert "lm_head.weight" not in llama.tensors
    folder = tmp_path / "phi3"
    folder.mkdir()
    fastfuse.fuse_file(llama.folder, folder / "model.safetensors", target="vllm")
    phi3_config(tie=True).save_pretrained(folder)
    check_llm_file(load_file(str(folder / "model.safetensors")), llama.tensors, bias=False)
    phi3, info = transformers.Phi3ForCausalLM.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    assert {k: sorted(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert phi3.lm_head.weight.data_ptr() == phi3.model.embed_tokens.weight.data_ptr()
    expected, got = llama.model(ids).logits, phi3.eval()(ids).logits
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.equal(got, expected)  # observed bit-identical, as untied


# ---------------------------------------------------------------- Qwen2: q/k/v biases


@torch.no_grad()
def test_qwen2_vllm_qkv_bias_is_the_concat_of_the_biases_and_f_linear_gives_the_projections(saved, tmp_path) -> None:
    qwen = saved("qwen2")
    dst = tmp_path / "vllm.safetensors"
    fastfuse.fuse_file(qwen.file, dst, target="vllm")
    fused = load_file(str(dst))
    check_llm_file(fused, qwen.tensors, bias=True)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(qwen.model.model.layers):
        attn = layer.self_attn
        assert all(bool(p.bias.abs().sum() > 0) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = torch.nn.functional.linear(
            x, fused[QKV_PROJ.format(i=i, kind="weight")], fused[QKV_PROJ.format(i=i, kind="bias")]
        )
        q, k, v = torch.split(out, [Q_OUT, KV_OUT, KV_OUT], dim=-1)
        for got, projection in zip((q, k, v), (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(got, projection(x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_qwen2_vllm_file_loads_strictly_into_phi3_with_a_biased_qkv_proj(saved, tmp_path, ids) -> None:
    qwen = saved("qwen2")
    dst = tmp_path / "vllm.safetensors"
    fastfuse.fuse_file(qwen.file, dst, target="vllm")
    phi3 = transformers.Phi3ForCausalLM(phi3_config(tie=False)).eval()
    for layer in phi3.model.layers:  # vLLM's Qwen2 attention: QKVParallelLinear(bias=True), rows q|k|v
        old = layer.self_attn.qkv_proj
        layer.self_attn.qkv_proj = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    result = phi3.load_state_dict(load_file(str(dst)), strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    expected, got = qwen.model(ids).logits, phi3(ids).logits
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.equal(got, expected)  # observed bit-identical in f32


# ---------------------------------------------------------------- Whisper


def whisper_attn(model: torch.nn.Module, side: str, i: int, block: str = "self_attn") -> torch.nn.Module:
    return getattr(getattr(model.model, side).layers[i], block)


SIDES = [(side, i) for side in ("encoder", "decoder") for i in range(LAYERS)]


def test_whisper_vllm_keys_shapes_and_dropped_sources(saved, tmp_path) -> None:
    whisper = saved("whisper")
    original = whisper.tensors
    dst = tmp_path / "vllm.safetensors"
    fastfuse.fuse_file(whisper.file, dst, target="vllm", cross_kv=True)
    fused = load_file(str(dst))
    dropped = {
        f"model.{side}.layers.{i}.self_attn.{p}_proj.{kind}"
        for side, i in SIDES
        for p in "qkv"
        for kind in ("weight", "bias")
    }
    dropped |= {
        f"model.decoder.layers.{i}.encoder_attn.{p}_proj.{kind}"
        for i in range(LAYERS)
        for p in "kv"
        for kind in ("weight", "bias")
    }
    dropped &= set(original)  # k_proj has no bias
    added = {f"model.{side}.layers.{i}.self_attn.qkv_proj.{kind}" for side, i in SIDES for kind in ("weight", "bias")}
    added |= {
        f"model.decoder.layers.{i}.encoder_attn.kv_proj.{kind}" for i in range(LAYERS) for kind in ("weight", "bias")
    }
    assert set(fused) == (set(original) - dropped) | added
    for i in range(LAYERS):  # cross-attention q (and out_proj) stay, bit for bit
        for key in (
            f"model.decoder.layers.{i}.encoder_attn.q_proj.weight",
            f"model.decoder.layers.{i}.encoder_attn.q_proj.bias",
        ):
            assert_same_bits(fused[key], original[key])
    for side, i in SIDES:
        prefix = f"model.{side}.layers.{i}.self_attn"
        w, b = fused[f"{prefix}.qkv_proj.weight"], fused[f"{prefix}.qkv_proj.bias"]
        assert tuple(w.shape) == (3 * D, D) and tuple(b.shape) == (3 * D,)
        assert_same_bits(w, torch.cat([original[f"{prefix}.{p}_proj.weight"] for p in "qkv"], 0))
        zeros = torch.zeros(D, dtype=b.dtype)
        assert_same_bits(b, torch.cat([original[f"{prefix}.q_proj.bias"], zeros, original[f"{prefix}.v_proj.bias"]]))
        assert torch.equal(raw(b[D : 2 * D]), raw(zeros))  # the k bias is +0.0, not -0.0
    for i in range(LAYERS):
        prefix = f"model.decoder.layers.{i}.encoder_attn"
        w, b = fused[f"{prefix}.kv_proj.weight"], fused[f"{prefix}.kv_proj.bias"]
        assert tuple(w.shape) == (2 * D, D) and tuple(b.shape) == (2 * D,)
        assert_same_bits(w, torch.cat([original[f"{prefix}.k_proj.weight"], original[f"{prefix}.v_proj.weight"]], 0))
        assert_same_bits(b, torch.cat([torch.zeros(D), original[f"{prefix}.v_proj.bias"]]))


@torch.no_grad()
def test_whisper_vllm_f_linear_equals_the_module_projections(saved, tmp_path) -> None:
    whisper = saved("whisper")
    dst = tmp_path / "vllm.safetensors"
    fastfuse.fuse_file(whisper.file, dst, target="vllm", cross_kv=True)
    fused = load_file(str(dst))
    g = torch.Generator().manual_seed(4)
    hidden, encoded = torch.randn(2, 7, D, generator=g), torch.randn(2, 11, D, generator=g)
    assert bool(whisper_attn(whisper.model, "encoder", 0).q_proj.bias.abs().sum() > 0)
    for side, i in SIDES:
        attn = whisper_attn(whisper.model, side, i)
        prefix = f"model.{side}.layers.{i}.self_attn.qkv_proj"
        out = torch.nn.functional.linear(hidden, fused[f"{prefix}.weight"], fused[f"{prefix}.bias"])
        for got, projection in zip(out.split(D, dim=-1), (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(got, projection(hidden), rtol=1e-5, atol=1e-6)
    for i in range(LAYERS):
        cross = whisper_attn(whisper.model, "decoder", i, "encoder_attn")
        prefix = f"model.decoder.layers.{i}.encoder_attn.kv_proj"
        out = torch.nn.functional.linear(encoded, fused[f"{prefix}.weight"], fused[f"{prefix}.bias"])
        k, v = out.split(D, dim=-1)
        torch.testing.assert_close(k, cross.k_proj(encoded), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, cross.v_proj(encoded), rtol=1e-5, atol=1e-6)


def test_logits_with_the_vllm_target_is_a_fuse_error(saved, tmp_path) -> None:
    whisper = saved("whisper")
    dst = tmp_path / "vllm.safetensors"
    for call in (
        lambda: fastfuse.fuse_file(whisper.file, dst, target="vllm", logits=True),
        lambda: fastfuse.plan(whisper.file, target="vllm", logits=True),
        lambda: fastfuse.fuse(whisper.tensors, target="vllm", logits=True),
        lambda: fastfuse.load(whisper.file, target="vllm", logits=True),
    ):
        with pytest.raises(fastfuse.FuseError, match="logits"):
            call()
    assert not dst.exists()


# ---------------------------------------------------------------- tensor parallelism


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_vllm_ranks_reassemble_q_k_v(saved, tmp_path, tp) -> None:
    llama = saved("llama")
    original = llama.tensors
    out = tmp_path / "tp"
    fastfuse.fuse_file(llama.file, out, target="vllm", tp=tp, heads=HEADS, kv_heads=KV_HEADS)
    names = [f"rank-{r}-of-{tp}.safetensors" for r in range(tp)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "tensor_parallel.json"])
    index = json.loads((out / "tensor_parallel.json").read_text())
    assert (index["tp"], index["layout"], index["ranks"]) == (tp, "out_in", names)
    q_rows, ffn_rows = Q_OUT // tp, FFN // tp
    kv_rows = KV_OUT // tp if KV_HEADS >= tp else HEAD_DIM  # fewer kv heads than ranks: one whole head each
    ranks = [load_file(str(out / name)) for name in names]
    for rank, tensors in enumerate(ranks):
        assert set(tensors) == llm_expected_keys(original, bias=False)
        assert metadata(out / names[rank])["fastfuse.rank"] == str(rank)
    for i in range(LAYERS):
        q, k, v, gate, up = (part(original, i, p) for p in ("q", "k", "v", "gate", "up"))
        blocks: dict[str, list[torch.Tensor]] = {p: [] for p in ("q", "k", "v", "gate", "up")}
        for rank, tensors in enumerate(ranks):
            qkv, gate_up = (
                tensors[QKV_PROJ.format(i=i, kind="weight")],
                tensors[GATE_UP_PROJ.format(i=i, kind="weight")],
            )
            assert tuple(qkv.shape) == (q_rows + 2 * kv_rows, D) and tuple(gate_up.shape) == (2 * ffn_rows, D)
            for p, block in zip("qkv", qkv.split([q_rows, kv_rows, kv_rows], 0)):
                blocks[p].append(block)
            for p, block in zip(("gate", "up"), gate_up.split(ffn_rows, 0)):
                blocks[p].append(block)
            # independent reference: this rank's heads, sliced from the original by head
            heads = q.view(HEADS, HEAD_DIM, D)[rank * HEADS // tp : (rank + 1) * HEADS // tp]
            assert_same_bits(blocks["q"][-1], heads.reshape(-1, D))
            kv_head = slice(rank * KV_HEADS // tp, rank * KV_HEADS // tp + max(KV_HEADS // tp, 1))
            assert_same_bits(blocks["k"][-1], k.view(KV_HEADS, HEAD_DIM, D)[kv_head].reshape(-1, D))
            assert_same_bits(blocks["v"][-1], v.view(KV_HEADS, HEAD_DIM, D)[kv_head].reshape(-1, D))
        assert_same_bits(torch.cat(blocks["q"]), q)
        assert_same_bits(torch.cat(blocks["gate"]), gate)
        assert_same_bits(torch.cat(blocks["up"]), up)
        if KV_HEADS >= tp:
            assert_same_bits(torch.cat(blocks["k"]), k)
            assert_same_bits(torch.cat(blocks["v"]), v)
        else:  # each kv head is replicated to tp // KV_HEADS consecutive ranks
            share = tp // KV_HEADS
            assert_same_bits(torch.cat(blocks["k"][::share]), k)
            assert_same_bits(torch.cat(blocks["v"][::share]), v)
    assert fastfuse.verify(out, source=llama.file) == []


# ---------------------------------------------------------------- verify, unfuse, CLI

TARGET_CASES = [
    ("fastfuse", "fused.enc.1.self_attn.qkv.weight", "fused.dec.0.encoder_attn.kv.bias"),
    ("vllm", "model.encoder.layers.1.self_attn.qkv_proj.weight", "model.decoder.layers.0.encoder_attn.kv_proj.bias"),
]


def test_every_target_has_a_verify_case() -> None:
    # Folder targets (an engine's own format) are verified in their own tests (test_ctranslate2.py).
    files = [name for name, preset in fastfuse.planning.rules.TARGETS.items() if not preset.folder]
    assert sorted(files) == sorted(target for target, _, _ in TARGET_CASES)


@pytest.mark.parametrize(("target", "weight_key", "bias_key"), TARGET_CASES, ids=[t for t, _, _ in TARGET_CASES])
def test_verify_every_target_and_report_a_corrupted_tensor(saved, tmp_path, target, weight_key, bias_key) -> None:
    whisper = saved("whisper")
    dst = tmp_path / "fused.safetensors"
    fastfuse.fuse_file(whisper.file, dst, target=target, cross_kv=True)
    assert fastfuse.verify(dst, source=whisper.file) == []
    if target == "vllm":  # originals dropped: nothing to recompute from without the source
        with pytest.raises(fastfuse.MissingTensorError, match="source"):
            fastfuse.verify(dst)
    else:
        assert fastfuse.verify(dst) == []
    meta, tensors = metadata(dst), load_file(str(dst))
    assert meta["fastfuse.target"] == target
    for key, index in ((weight_key, (5, 3)), (bias_key, (D // 2,))):  # the bias element is in the zero-filled k part
        corrupted = {name: value.clone() for name, value in tensors.items()}
        corrupted[key].view(torch.int32)[index] ^= 1  # one flipped bit
        bad = tmp_path / f"bad-{key}.safetensors"
        save_file(corrupted, str(bad), metadata=meta)
        assert fastfuse.verify(bad, source=whisper.file) == [key]


UNFUSE_CASES = [("whisper", {"cross_kv": True}), ("llama", {}), ("qwen2", {}), ("llama-bf16", {})]


@pytest.mark.parametrize(("name", "options"), UNFUSE_CASES, ids=[n for n, _ in UNFUSE_CASES])
def test_unfuse_of_a_vllm_file_rebuilds_the_original_checkpoint(saved, tmp_path, name, options) -> None:
    if name == "llama-bf16":
        src = tmp_path / "bf16.safetensors"
        save_file(
            {k: v.to(torch.bfloat16) for k, v in saved("llama").tensors.items()}, str(src), metadata={"format": "pt"}
        )
    else:
        src = saved(name).file
    original = load_file(str(src))
    fused, back = tmp_path / "vllm.safetensors", tmp_path / "back.safetensors"
    fastfuse.fuse_file(src, fused, target="vllm", **options)
    dropped = set(original) - set(load_file(str(fused)))
    rebuilt = fastfuse.unfuse(fused, back)
    assert dropped and sorted(rebuilt) == sorted(dropped)
    restored = load_file(str(back))
    assert set(restored) == set(original)  # no k_proj.bias invented for Whisper
    for key, value in original.items():
        assert_same_bits(restored[key], value)
    assert not any(key.startswith("fastfuse.") for key in metadata(back))


def test_cli_fuse_vllm_then_verify_with_source(saved, tmp_path) -> None:
    llama = saved("qwen2")
    dst = tmp_path / "vllm.safetensors"
    fused = run_cli("fuse", llama.file, dst, "--target", "vllm", "--json")
    assert fused.returncode == 0, fused.stderr
    report = json.loads(fused.stdout)
    assert (report["target"], report["layout"], report["scheme"]) == ("vllm", "out_in", "hf-llama")
    assert set(report["dropped"]) == set(llama.tensors) - set(load_file(str(dst)))
    assert {entry["key"] for entry in report["fused"]} == set(load_file(str(dst))) - set(llama.tensors)
    check_llm_file(load_file(str(dst)), llama.tensors, bias=True)
    verified = run_cli("verify", dst, "--source", llama.file)
    assert verified.returncode == 0, verified.stderr
    missing = run_cli("verify", dst)
    assert missing.returncode == 1 and "--source" in missing.stderr
    assert missing.stderr.startswith("fastfuse: error:") and missing.stderr.count("\n") == 1
