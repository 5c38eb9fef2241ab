"""Beyond Whisper on synthetic checkpoints: LLM GQA and MLP groups, already-fused families,
the out_in layout and tensor-parallel splits (numpy references; the transformers models are in
test_hf_families.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import metas, random_tensors
from naive import same_bits
from safetensors import safe_open
from safetensors.numpy import save_file

import fastfuse
from fastfuse import FuseError, ShapeMismatchError

pytestmark = pytest.mark.usefixtures("engine", "poisoned_outputs")

D, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 8, 2, 8, 96
LAYER = "model.layers.{}.{}.{}_proj.{}"


def llama_shapes(layers: int = 2, bias: bool = False) -> dict[str, tuple[int, ...]]:
    """Llama/Mistral/Qwen2 keys: GQA attention (k, v smaller than q) and a gated MLP."""
    rows = {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM, "o": D}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (50, D), "lm_head.weight": (50, D)}
    for i in range(layers):
        for p, n in rows.items():
            shapes[LAYER.format(i, "self_attn", p, "weight")] = (n, D) if p != "o" else (D, HEADS * HEAD_DIM)
            if bias and p != "o":
                shapes[LAYER.format(i, "self_attn", p, "bias")] = (n,)
        for p in ("gate", "up"):
            shapes[LAYER.format(i, "mlp", p, "weight")] = (FFN, D)
        shapes[LAYER.format(i, "mlp", "down", "weight")] = (D, FFN)
    return shapes


def test_llama_plan_shapes() -> None:
    plan = fastfuse.plan(metas(llama_shapes(3)))
    assert (plan.scheme, plan.d, plan.layers) == ("hf-llama", D, {"qkv": 3, "gate_up": 3})
    shapes = {t.key: t.shape for t in plan.fused}
    assert shapes["fused.layers.2.self_attn.qkv.weight"] == (D, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    assert shapes["fused.layers.0.mlp.gate_up.weight"] == (D, 2 * FFN)
    assert not any(k.endswith("bias") for k in shapes)


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2"])
def test_gqa_one_matmul_equals_projections(bias: bool) -> None:
    tensors = random_tensors(llama_shapes(bias=bias))
    fused = fastfuse.fuse(tensors)
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    got = x @ fused["fused.layers.1.self_attn.qkv.weight"] + (fused["fused.layers.1.self_attn.qkv.bias"] if bias else 0)
    expected = np.concatenate(
        [
            x @ tensors[LAYER.format(1, "self_attn", p, "weight")].T
            + (tensors[LAYER.format(1, "self_attn", p, "bias")] if bias else 0)
            for p in "qkv"
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    gate_up = x @ fused["fused.layers.0.mlp.gate_up.weight"]
    np.testing.assert_allclose(
        gate_up[:, :FFN], x @ tensors[LAYER.format(0, "mlp", "gate", "weight")].T, rtol=1e-5, atol=1e-5
    )


def test_out_in_layout_is_a_row_concatenation() -> None:
    tensors = random_tensors(llama_shapes(bias=True), np.float16)
    fused = fastfuse.fuse(tensors, layout="out_in")
    parts = [tensors[LAYER.format(0, "self_attn", p, "weight")] for p in "qkv"]
    assert same_bits(fused["fused.layers.0.self_attn.qkv.weight"], np.concatenate(parts, axis=0))
    biases = [tensors[LAYER.format(0, "self_attn", p, "bias")] for p in "qkv"]
    assert same_bits(fused["fused.layers.0.self_attn.qkv.bias"], np.concatenate(biases))


def test_phi3_is_recognised_and_left_alone_unless_converted() -> None:
    shapes = {
        "model.layers.0.self_attn.qkv_proj.weight": (3 * D, D),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * FFN, D),
        "model.layers.0.self_attn.o_proj.weight": (D, D),
    }
    tensors = random_tensors(shapes)
    plan = fastfuse.plan(tensors)
    assert (plan.scheme, plan.already_fused, plan.fused) == ("hf-phi3", True, ())
    assert fastfuse.fuse(tensors).keys() == tensors.keys()
    converted = fastfuse.fuse(tensors, convert=True)
    assert same_bits(
        converted["fused.layers.0.self_attn.qkv.weight"], tensors["model.layers.0.self_attn.qkv_proj.weight"].T
    )
    assert same_bits(
        fastfuse.fuse(tensors, convert=True, layout="out_in")["fused.layers.0.mlp.gate_up.weight"],
        tensors["model.layers.0.mlp.gate_up_proj.weight"],
    )


def test_gpt2_conv1d_is_already_in_out() -> None:
    tensors = random_tensors(
        {
            "transformer.h.0.attn.c_attn.weight": (D, 3 * D),
            "transformer.h.0.attn.c_attn.bias": (3 * D,),
            "transformer.h.1.attn.c_attn.weight": (D, 3 * D),
            "transformer.h.1.attn.c_attn.bias": (3 * D,),
        }
    )
    plan = fastfuse.plan(tensors, convert=True)
    assert (plan.scheme, plan.prefix, plan.layers) == ("gpt2", "transformer.", {"qkv": 2})
    same = fastfuse.fuse(tensors, convert=True)
    assert same_bits(same["fused.layers.1.self_attn.qkv.weight"], tensors["transformer.h.1.attn.c_attn.weight"])
    flipped = fastfuse.fuse(tensors, convert=True, layout="out_in")
    assert same_bits(flipped["fused.layers.1.self_attn.qkv.weight"], tensors["transformer.h.1.attn.c_attn.weight"].T)
    assert same_bits(flipped["fused.layers.1.self_attn.qkv.bias"], tensors["transformer.h.1.attn.c_attn.bias"])


@pytest.mark.parametrize(("tp", "kv_heads"), [(1, 2), (2, 2), (4, 2), (8, 2), (2, 8), (4, 8)])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_tensor_parallel_ranks_reassemble(tp: int, kv_heads: int, layout: str) -> None:
    shapes = llama_shapes(1, bias=True)
    for p in "kv":
        shapes[LAYER.format(0, "self_attn", p, "weight")] = (kv_heads * HEAD_DIM, D)
        shapes[LAYER.format(0, "self_attn", p, "bias")] = (kv_heads * HEAD_DIM,)
    tensors = random_tensors(shapes)
    q, k, v = (tensors[LAYER.format(0, "self_attn", p, "weight")] for p in "qkv")
    nq, nkv = HEADS * HEAD_DIM // tp, max(kv_heads // tp, 1) * HEAD_DIM  # rows of q and of k (= v) per rank
    q_parts, k_parts, v_parts, up_parts = [], [], [], []
    for rank in range(tp):
        fused = fastfuse.fuse(tensors, tp=tp, rank=rank, heads=HEADS, kv_heads=kv_heads, layout=layout)
        weight = fused["fused.layers.0.self_attn.qkv.weight"]
        rows = weight.T if layout == "in_out" else weight  # [q_r + k_r + v_r, D]
        assert rows.shape == (nq + 2 * nkv, D)
        assert fused["fused.layers.0.self_attn.qkv.bias"].shape == (nq + 2 * nkv,)
        q_parts.append(rows[:nq])
        k_parts.append(rows[nq : nq + nkv])
        v_parts.append(rows[nq + nkv :])
        gate_up = fused["fused.layers.0.mlp.gate_up.weight"]
        up_parts.append((gate_up.T if layout == "in_out" else gate_up)[FFN // tp :])
    assert same_bits(np.concatenate(q_parts), q)
    assert same_bits(np.concatenate(up_parts), tensors[LAYER.format(0, "mlp", "up", "weight")])
    if kv_heads >= tp:  # kv heads divide among the ranks
        assert same_bits(np.concatenate(k_parts), k) and same_bits(np.concatenate(v_parts), v)
    else:  # each kv head is replicated, whole, to the tp // kv_heads ranks sharing it
        for rank in range(tp):
            head = slice(rank * kv_heads // tp * HEAD_DIM, (rank * kv_heads // tp + 1) * HEAD_DIM)
            assert same_bits(k_parts[rank], k[head]) and same_bits(v_parts[rank], v[head])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"tp": 2, "rank": 0},
            "tp=2 needs the attention head count to split 'model.layers.0.self_attn.q_proj.weight': pass heads=",
        ),
        (
            {"tp": 3, "rank": 0, "heads": HEADS, "kv_heads": KV_HEADS},
            "'model.layers.0.self_attn.q_proj.weight': 8 heads do not divide among tp=3 ranks",
        ),
        (
            {"tp": 2, "rank": 0, "heads": 5},
            "'model.layers.0.self_attn.q_proj.weight': 64 rows do not divide into 5 heads",
        ),
        ({"tp": 2, "heads": HEADS}, "tp=2: fuse builds one rank in memory; pass rank="),
        ({"tp": 2, "rank": 2}, "rank=2: expected 0 <= rank < tp=2"),
        ({"tp": 0}, "tp=0: expected a positive number of tensor-parallel ranks"),
        ({"layout": "columns"}, "layout 'columns': expected one of ['in_out', 'out_in']"),
        ({"heads": -1}, "heads=-1: expected a positive head count"),
        ({"frobnicate": True}, "unknown option(s) ['frobnicate']"),
    ],
)
def test_option_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(FuseError, match=re.escape(message)):
        fastfuse.fuse(random_tensors(llama_shapes(1)), **options)  # type: ignore[arg-type]


def test_kv_heads_that_ranks_cannot_share() -> None:
    shapes = llama_shapes(1) | {LAYER.format(0, "self_attn", p, "weight"): (3 * HEAD_DIM, D) for p in "kv"}
    with pytest.raises(
        ShapeMismatchError,
        match=re.escape("'model.layers.0.self_attn.k_proj.weight': 3 heads cannot be shared by tp=4 ranks"),
    ):
        fastfuse.plan(metas(shapes), tp=4, heads=HEADS, kv_heads=3)


def test_already_fused_groups_cannot_be_split() -> None:
    tensors = metas({"model.layers.0.self_attn.qkv_proj.weight": (3 * D, D)})
    with pytest.raises(FuseError, match="group qkv cannot be split for tp=2: its parts are already fused"):
        fastfuse.plan(tensors, convert=True, tp=2, heads=HEADS)


def test_tensor_parallel_files_with_config(tmp_path: Path) -> None:
    source = tmp_path / "llama"
    source.mkdir()
    tensors = random_tensors(llama_shapes(2), np.float16)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}))
    plan = fastfuse.fuse_file(source, tmp_path / "tp", tp=4, layout="out_in")
    assert plan.tp == 4 and len(plan.fused) == 2 * 2 * 4
    index = json.loads((tmp_path / "tp" / "tensor_parallel.json").read_text())
    assert index == {"tp": 4, "layout": "out_in", "ranks": [f"rank-{r}-of-4.safetensors" for r in range(4)]}
    q, k, v = (tensors[LAYER.format(1, "self_attn", p, "weight")] for p in "qkv")
    q_rows = HEADS * HEAD_DIM // 4
    for rank in range(4):
        with safe_open(str(tmp_path / "tp" / f"rank-{rank}-of-4.safetensors"), framework="numpy") as f:
            assert f.metadata()["fastfuse.rank"] == str(rank)
            # 2 kv heads for 4 ranks: kv head rank // 2 goes whole to ranks 2h and 2h + 1
            head = slice(rank // 2 * HEAD_DIM, (rank // 2 + 1) * HEAD_DIM)
            expected = np.concatenate([q[rank * q_rows : (rank + 1) * q_rows], k[head], v[head]])
            assert same_bits(f.get_tensor("fused.layers.1.self_attn.qkv.weight"), expected)
    assert fastfuse.verify(tmp_path / "tp") == []
    # a corrupted rank file is found and named
    path = tmp_path / "tp" / "rank-2-of-4.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        stored, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()  # noqa: SIM118
    stored["fused.layers.0.mlp.gate_up.weight"][0, 0] += 1
    save_file(stored, str(path), metadata=metadata)
    assert fastfuse.verify(tmp_path / "tp") == ["rank-2-of-4.safetensors:fused.layers.0.mlp.gate_up.weight"]
    with pytest.raises(FuseError, match="holds one tensor-parallel rank's slices"):
        fastfuse.unfuse(tmp_path / "tp" / "rank-0-of-4.safetensors", tmp_path / "back.safetensors")


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_files_in_both_layouts_verify_and_unfuse(tmp_path: Path, layout: str) -> None:
    tensors = random_tensors(llama_shapes(2, bias=True), np.float16)
    save_file(tensors, str(tmp_path / "src.safetensors"))
    fastfuse.fuse_file(tmp_path / "src.safetensors", tmp_path / "kept.safetensors", layout=layout)
    assert fastfuse.verify(tmp_path / "kept.safetensors") == []
    fastfuse.fuse_file(
        tmp_path / "src.safetensors", tmp_path / "fused.safetensors", layout=layout, keep_originals=False
    )
    fastfuse.unfuse(tmp_path / "fused.safetensors", tmp_path / "back.safetensors")
    with safe_open(str(tmp_path / "back.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(tensors) and all(same_bits(f.get_tensor(k), tensors[k]) for k in tensors)


def test_whisper_tensor_parallel_with_heads() -> None:
    from conftest import hf_whisper_shapes

    tensors = random_tensors(hf_whisper_shapes(16, 1, 1, 10))
    fused = fastfuse.fuse(tensors, tp=2, rank=1, heads=4)
    weight = fused["fused.enc.0.self_attn.qkv.weight"]
    assert weight.shape == (16, 24)
    assert same_bits(weight[:, :8], tensors["model.encoder.layers.0.self_attn.q_proj.weight"][8:].T)
