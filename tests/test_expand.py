"""Depth up-scaling (posttrain expand): every test is an invariance on tiny random models in fp32.

    .venv/bin/python -m pytest tests/test_expand.py -q

Models: the tiny Llama fixture (2 layers, hidden 64, 4 q heads, 2 KV heads) and a tiny
Qwen3-MoE (3 layers, layer 0 dense via mlp_only_layers, layers 1-2 sparse with 8 experts,
q_norm / k_norm per head).
"""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from posttrain.expand.align import (
    _hungarian,
    align_layer,
    match_heads,
    permute_attention,
    permute_experts,
    permute_mlp,
)
from posttrain.config import ConfigError
from posttrain.expand.depth import (
    expand,
    expand_model,
    fuse_layers,
    insertion_points,
    read_metadata,
)
from posttrain.models import load_model
from posttrain.train.config import LoraConfig
from posttrain.train.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        )
    )
    with torch.no_grad():  # random norms, so that averaging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_moe2_dir(tmp_path_factory, tiny_model_dir):
    """Qwen2-MoE, 4 layers, decoder_sparse_step 2 (layers 1 and 3 sparse): a shared expert with
    its gate, q/k/v biases (made random: they start at 0)."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-moe2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


FIXTURES = {"dense": "tiny_model_dir", "moe": "tiny_moe_dir", "moe2": "tiny_moe2_dir"}


def fp32(folder):
    return load_model(folder, dtype="fp32").eval()


def test_insertion_points_worked_by_hand():
    # opt-deus top, L 30, N 6: slots 0..28, the last six: new layers between (23,24)..(28,29)
    assert insertion_points("opt-deus", "top", 30, 6) == [23, 24, 25, 26, 27, 28]
    # the paper's 32 -> 48: one between each adjacent pair of the top 17 layers 15..31
    assert insertion_points("opt-deus", "top", 32, 16) == list(range(15, 31))
    # llama-pro interleave: after every 5th layer, floor(5k + 0.5) - 1
    assert insertion_points("llama-pro", "interleave", 30, 6) == [4, 9, 14, 19, 24, 29]
    # opt-deus interleave: floor(30k/7 + 0.5) - 1 for k = 1..6: 4.29, 8.57, 12.86, 17.14,
    # 21.43, 25.71 -> 4, 9, 13, 17, 21, 26 -> minus 1
    assert insertion_points("opt-deus", "interleave", 30, 6) == [3, 8, 12, 16, 20, 25]
    assert insertion_points("llama-pro", "top", 2, 2) == [0, 1]
    with pytest.raises(ConfigError, match="expected 1 ... 1 for opt-deus"):
        insertion_points("opt-deus", "top", 2, 2)


def test_hungarian_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(10):
            cost = rng.normal(size=(n, n))
            best = min(
                sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))
            )
            perm = _hungarian(cost)
            assert sorted(perm) == list(range(n))
            assert sum(cost[i, perm[i]] for i in range(n)) == pytest.approx(best)


def random_gqa_perms(n_q, n_kv, gen):
    """A head permutation that keeps each query head with its KV head: KV groups move as
    units (kv_perm) and query heads move only inside their group."""
    g = n_q // n_kv
    kv = torch.randperm(n_kv, generator=gen)
    q = torch.cat([kv[j] * g + torch.randperm(g, generator=gen) for j in range(n_kv)])
    return q, kv


def permute_layer(layer, config, gen):
    """Permute heads, MLP neurons (or experts and their neurons) of one layer; returns maps."""
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    q, kv = random_gqa_perms(n_q, n_kv, gen)
    permute_attention(layer.self_attn, q, kv, head_dim)
    maps = {"q_heads": q.tolist(), "kv_heads": kv.tolist()}
    if hasattr(layer.mlp, "experts"):
        n_e, inter = layer.mlp.experts.down_proj.shape[0], layer.mlp.experts.down_proj.shape[2]
        experts = torch.randperm(n_e, generator=gen)
        permute_experts(
            layer.mlp, experts, [torch.randperm(inter, generator=gen) for _ in range(n_e)]
        )
        maps["experts"] = experts.tolist()
        if getattr(layer.mlp, "shared_expert", None) is not None:
            shared = layer.mlp.shared_expert
            permute_mlp(shared, torch.randperm(shared.gate_proj.out_features, generator=gen))
    else:
        perm = torch.randperm(layer.mlp.gate_proj.out_features, generator=gen)
        permute_mlp(layer.mlp, perm)
        maps["mlp"] = perm
    return maps


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_consistent_permutation_of_a_layer_leaves_the_model_unchanged(
    which, tiny_model_dir, tiny_moe_dir
):
    model = fp32(tiny_model_dir if which == "dense" else tiny_moe_dir)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        permute_layer(model.model.layers[1], model.config, torch.Generator().manual_seed(2))
        after = model(input_ids=ids).logits
    assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which,layer", [("dense", 0), ("dense", 1), ("moe", 2), ("moe2", 1)])
def test_alignment_recovers_a_permutation_and_self_fusion_gives_the_layer_back(
    which, layer, request
):
    """B = layer, A = B with permuted heads / neurons / experts: OT maps A back onto B exactly,
    so fusing A with B averages B with itself and returns B (o_proj, down_proj included)."""
    model = fp32(request.getfixturevalue(FIXTURES[which]))
    b = model.model.layers[layer]
    a = copy.deepcopy(b)
    moved = permute_layer(a, model.config, torch.Generator().manual_seed(3))
    assert moved["q_heads"] != list(range(4)) or moved["kv_heads"] != [0, 1]
    n_q, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    q, kv = match_heads(a.self_attn, b.self_attn, n_q, n_kv)
    # a's head h sits at place moved[h]^-1; alignment must send it back: a[q] == b
    assert torch.equal(torch.as_tensor(moved["q_heads"])[q], torch.arange(n_q))
    assert torch.equal(torch.as_tensor(moved["kv_heads"])[kv], torch.arange(n_kv))
    fused, maps = fuse_layers(a, b, model.config)
    if which != "dense":
        assert torch.equal(
            torch.as_tensor(moved["experts"])[torch.as_tensor(maps["experts"])], torch.arange(8)
        )
    for (name, got), want in zip(fused.named_parameters(), b.parameters()):
        assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    aligned = copy.deepcopy(a)
    align_layer(aligned, b, n_q, n_kv, model.config.hidden_size // n_q)
    for (name, got), want in zip(aligned.named_parameters(), b.parameters()):
        assert torch.equal(got, want), name


def test_fusion_averages_two_different_layers_in_bs_order(tiny_moe_dir):
    """Two different sparse layers: the fused norms are the plain mean; the fused router is the
    mean of B's rows and A's rows reordered by the expert map."""
    model = fp32(tiny_moe_dir)
    a, b = model.model.layers[1], model.model.layers[2]
    fused, maps = fuse_layers(a, b, model.config)
    assert_close(
        fused.input_layernorm.weight, (a.input_layernorm.weight + b.input_layernorm.weight) / 2
    )
    assert_close(
        fused.self_attn.q_norm.weight, (a.self_attn.q_norm.weight + b.self_attn.q_norm.weight) / 2
    )
    experts = torch.as_tensor(maps["experts"])
    assert sorted(experts.tolist()) == list(range(8))
    assert_close(fused.mlp.gate.weight, (a.mlp.gate.weight[experts] + b.mlp.gate.weight) / 2)


CASES = [
    ("dense", "llama-pro", "interleave"),
    ("dense", "opt-deus", "top"),
    ("moe", "llama-pro", "top"),
    ("moe", "opt-deus", "interleave"),
    ("moe", "opt-deus", "top"),
    ("moe2", "llama-pro", "interleave"),
    ("moe2", "opt-deus", "top"),
]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, request):
    """{case: (base folder, expanded folder)} written by expand() and reloaded from disk."""
    root, made = tmp_path_factory.mktemp("expanded"), {}
    for which, method, placement in CASES:
        base = request.getfixturevalue(FIXTURES[which])
        out = root / f"{which}-{method}-{placement}"
        expand(
            base,
            method,
            1 if (which, method) == ("dense", "opt-deus") else 2,
            out,
            placement=placement,
        )
        made[which, method, placement] = base, str(out)
    return made


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_expanded_model_computes_what_the_base_computed(case, expanded):
    base_dir, out = expanded[case]
    base, big = fp32(base_dir), fp32(out)
    meta = read_metadata(out)
    n = base.config.num_hidden_layers + len(meta["new_layers"])
    assert big.config.num_hidden_layers == len(big.model.layers) == n == meta["layers"]
    assert [layer.self_attn.layer_idx for layer in big.model.layers] == list(range(n))
    if case[0] != "dense":  # every layer keeps its kind: moe layer 0 dense; moe2 0 and 2
        kinds = ["experts" in dict(layer.mlp.named_children()) for layer in big.model.layers]
        base_kinds = ["experts" in dict(layer.mlp.named_children()) for layer in base.model.layers]
        assert big.config.mlp_only_layers == [i for i, k in enumerate(kinds) if not k]
        origin = [i for i in range(n) if i not in meta["new_layers"]]
        assert [kinds[i] for i in origin] == base_kinds
        if case == ("moe2", "llama-pro", "interleave"):  # copies of sparse 1 and 3 after them
            assert kinds == [False, True, True, False, True, True]
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(big(input_ids=ids).logits, base(input_ids=ids).logits)
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(big.generate(ids, **greedy), base.generate(ids, **greedy))
    for i in meta["new_layers"]:  # identity: outputs zeroed, the rest is real weights
        layer = big.model.layers[i]
        assert layer.self_attn.o_proj.weight.abs().sum() == 0
        assert layer.self_attn.q_proj.weight.abs().sum() > 0


def nonzero_grads(model):
    return sorted(
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    )


def loss_backward(model):
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids="-".join)
def test_first_step_gradients_reach_only_the_new_output_projections(case, expanded):
    """Full fine-tuning of the new layers: a new layer is x + W_o attn(x) + W_down mlp(x) with
    W_o = W_down = 0, so dL/dW_o = g attn^T and dL/dW_down = g mlp^T are non-zero, while every
    other parameter of the layer (q/k/v, gate/up, norms, router) reaches the loss only through
    W_o or W_down and gets exactly 0. MoE: down_proj of the experts some token was routed to.
    With LoRA on the new layers, lora_B of o_proj / down_proj gets g (A x)^T != 0; lora_A gets
    B^T g = 0 (B = 0 at init), and q/k/v/gate/up adapters sit behind the zero outputs."""
    _, out = expanded[case]
    new = read_metadata(out)["new_layers"]
    model = apply_lora(fp32(out), LoraConfig(enabled=False, targets="new-layers"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if any(f"layers.{i}." in n for i in new)
    }
    loss_backward(model)
    outputs = ("mlp.experts.down_proj",) if case[0] == "moe" else ("mlp.down_proj.weight",)
    want = sorted(
        f"model.layers.{i}.{s}" for i in new for s in ("self_attn.o_proj.weight", *outputs)
    )
    assert nonzero_grads(model) == want
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)

    lora = apply_lora(fp32(out), LoraConfig(r=4, alpha=8, targets="new-layers"))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(any(f"layers.{i}." in n for i in new) for n in names)
    loss_backward(lora)
    got = nonzero_grads(lora)
    assert got and all("lora_B" in n and ("o_proj" in n or "down_proj" in n) for n in got)


def test_new_layers_needs_the_expansion_metadata(tiny_model_dir):
    with pytest.raises(ConfigError, match="posttrain_expand.json: not found"):
        apply_lora(fp32(tiny_model_dir), LoraConfig(r=4, targets="new-layers"))
    with pytest.raises(ConfigError, match="posttrain_expand.json: not found"):
        apply_lora(fp32(tiny_model_dir), LoraConfig(enabled=False, targets="new-layers"))


def test_expand_in_memory_reports_how_each_layer_was_made(tiny_moe_dir):
    """In memory (no reload from disk, which renumbers layers by itself): the KV cache slots
    (layer_idx) must be renumbered, or greedy decoding with the cache goes wrong."""
    model = fp32(tiny_moe_dir)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **greedy)
    meta = expand_model(model, "opt-deus", 2, "interleave")
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **greedy), want)
    # L 3, N 2: floor(3k/3 + 0.5) - 1 = 0, 1: new layers at 1 (from 0, 1) and 3 (from 1, 2)
    assert meta["new_layers"] == [1, 3]
    assert [n["fused_from"] for n in meta["new"]] == [[0, 1], [1, 2]]
    assert meta["new"][0]["alignment"]["mlp"].startswith("B (A's MLP is of another kind")
    assert meta["new"][1]["alignment"]["mlp"] == "fused"


def test_cli_expand_train_new_layers_eval_export(tiny_model_dir, tmp_path, capsys):
    """The verbs end to end (in this process, to save interpreter start-ups): expand, DPO with
    LoRA on the new layers, eval and export of the result."""
    from test_train_offline import write_data

    from posttrain.cli import main

    pairs, _ = write_data(tmp_path / "data", n=4)
    big = tmp_path / "expanded"
    assert (
        main(
            [
                "expand",
                "--model",
                tiny_model_dir,
                "--method",
                "opt-deus",
                "--new-layers",
                "1",
                "--out",
                str(big),
            ]
        )
        == 0
    )
    assert "2 -> 3 layers" in capsys.readouterr().out
    meta = json.loads((big / "posttrain_expand.json").read_text())
    assert meta["new_layers"] == [1] and meta["new"][0]["fused_from"] == [0, 1]
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "dpo",
                "--model",
                str(big),
                "--data",
                str(pairs),
                "--out",
                str(run),
                "--set",
                "dtype=fp32",
                "--set",
                "max_steps=2",
                "--set",
                "batch_size=2",
                "--set",
                "lora.targets=new-layers",
                "--set",
                "lora.r=4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "finished at step 2 of 2" in capsys.readouterr().out
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        f"model.layers.1.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(big),
                "--adapter",
                str(run / "adapter"),
                "--problems",
                "builtin:arith:2?split=test",
                "--max-new-tokens",
                "4",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 2
    assert (
        main(["export", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    )
    assert fp32(str(tmp_path / "merged")).config.num_hidden_layers == 3
    # full fine-tuning of the new layers: the saved model still says which layers are new
    assert (
        main(
            [
                "train",
                "--method",
                "dpo",
                "--model",
                str(big),
                "--data",
                str(pairs),
                "--out",
                str(tmp_path / "full"),
                "--set",
                "dtype=fp32",
                "--set",
                "max_steps=1",
                "--set",
                "batch_size=2",
                "--set",
                "lora.enabled=false",
                "--set",
                "lora.targets=new-layers",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "full" / "model" / "posttrain_expand.json").read_text()) == meta
    assert (
        main(
            [
                "train",
                "--method",
                "dpo",
                "--model",
                tiny_model_dir,
                "--data",
                str(pairs),
                "--out",
                str(tmp_path / "bad"),
                "--set",
                "lora.targets=new-layers",
            ]
        )
        == 1
    )
    assert "posttrain_expand.json: not found" in capsys.readouterr().err
