"""Mixture-of-experts training on a tiny random Qwen3-MoE (hidden 64, 2 layers, 8 experts, top-2;
layer 0 dense, layer 1 sparse): LoRA targets for routers and experts, the load-balancing loss,
routing statistics, merge / export round trips, and the CLI.

    .venv/bin/python -m pytest tests/test_moe.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli
from torch.testing import assert_close

from posttrain.config import ConfigError
from posttrain.train import moe
from posttrain.train.config import LoraConfig, MoeConfig, train_config
from posttrain.train.data import Example
from posttrain.train.lora import apply_lora, lora_targets, parameter_report, peft_targets_as_named

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTER = "model.layers.1.mlp.gate.weight"
EXPERTS = ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]


def qwen3_moe_config(vocab_size=128, **extra):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        **extra,
    )


def tiny_moe():
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(qwen3_moe_config())


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )


def randomise_adapter(model, std=0.3):
    """A trained-looking adapter: B = 0 at init would make every LoRA a no-op."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, embedded_dir):
    """The tiny Qwen3-MoE as a model folder with the SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(
        qwen3_moe_config(
            len(tok),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
        )
    )
    out = tmp_path_factory.mktemp("tiny-qwen3-moe")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------ targets


def test_each_target_selects_what_it_names():
    model = tiny_moe()
    linear, _ = lora_targets(model, "all-linear")
    assert len(linear) == 2 * 4 + 3  # attention in both layers, the dense MLP of layer 0
    assert lora_targets(model, "all-router") == ([], [ROUTER])
    assert lora_targets(model, "experts") == ([], EXPERTS)
    assert lora_targets(model, "all-linear,all-router") == (linear, [ROUTER])
    assert lora_targets(model, ["all-router", "experts"]) == ([], sorted([ROUTER, *EXPERTS]))
    with pytest.raises(ConfigError, match="no shared expert"):
        lora_targets(model, "shared-expert")
    with pytest.raises(ConfigError, match="'al-router'.*known: all-linear"):
        lora_targets(model, "all-linear,al-router")
    dense = tiny_llama()
    for name, what in (("all-router", "no router"), ("experts", "no routed experts")):
        with pytest.raises(ConfigError, match=what):
            lora_targets(dense, f"all-linear,{name}")
    q2 = tiny_qwen2_moe()  # Qwen2-MoE: a shared expert beside the routed ones, in every layer
    assert lora_targets(q2, "shared-expert") == (
        [
            f"model.layers.{i}.mlp.shared_expert.{p}"
            for i in (0, 1)
            for p in ("down_proj", "gate_proj", "up_proj")
        ],
        [],
    )
    assert lora_targets(q2, "all-router")[1] == [
        f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)
    ]  # not shared_expert_gate


def test_parameter_report_counts_router_and_expert_adapters():
    """r 4. Router weight (8, 64): A 4x64 + B 8x4 = 288. Experts, one rank-4 delta per expert
    (PEFT stacks them: A (4*8, in), B (out, 4*8)): gate_up (8, 64, 64): 32*64 + 64*32 = 4096;
    down (8, 64, 32): 32*32 + 64*32 = 3072."""
    model = apply_lora(tiny_moe(), LoraConfig(r=4, alpha=8, targets="all-router,experts"))
    report = parameter_report(model)
    assert report["router"]["trainable"] == 288
    assert report["experts"]["trainable"] == 4096 + 3072
    assert report["attention"]["trainable"] == report["mlp"]["trainable"] == 0
    with pytest.raises(ConfigError, match="dropout 0"):
        apply_lora(tiny_moe(), LoraConfig(r=4, targets="all-router", dropout=0.1))


def sft_examples(n=4, prompt_len=6, completion_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Example(
            tuple(torch.randint(1, 128, (prompt_len + i % 2,), generator=g).tolist()),
            (tuple(torch.randint(1, 128, (completion_len,), generator=g).tolist()),),
            i,
        )
        for i in range(n)
    ]


def one_sft_step(model, run, lr=1e-2):
    """One AdamW step of the offline trainer's SFT loss (+ the aux hook) on 4 rows."""
    from posttrain.train.offline.loop import global_units, micro_batch_loss
    from posttrain.train.optim import make_optimizer

    cfg = train_config("sft", None, ["dtype=fp32"], data="unused.jsonl")
    examples = sft_examples()
    optimizer = make_optimizer(model, lr)
    with run.record(model) as routing:
        loss, metrics, share, _ = micro_batch_loss(
            model,
            examples,
            None,
            cfg,
            pad_id=0,
            device="cpu",
            units=global_units(examples, cfg),
            processes=1,
        )
    run.add_aux(loss, metrics, routing, share).backward()
    optimizer.step()


@pytest.mark.parametrize(
    "targets,touched",
    [
        ("all-router", ["mlp.gate."]),
        ("experts", ["mlp.experts."]),
        ("all-linear,all-router", ["self_attn.", "layers.0.mlp.", "mlp.gate."]),
    ],
)
def test_a_training_step_changes_only_the_named_parameters(targets, touched):
    model = apply_lora(tiny_moe(), LoraConfig(r=4, alpha=8, targets=targets))
    randomise_adapter(model, 0.05)  # so both A and B get gradients
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_sft_step(
        model, moe.MoeRun.setup(model, None, MoeConfig(stats_every=0), [], None, seed=0, pad_id=0)
    )
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    adapters = {k for k in before if "lora_" in k and any(t in k for t in touched)}
    assert changed == adapters and adapters


# ------------------------------------------------------------------ merge, load, export


def test_router_and_expert_adapters_round_trip_through_save_merge_and_export(moe_dir, tmp_path):
    """Logits (fp32) of the adapter model = reloaded adapter = merge_and_unload = the exported
    folder, within 1e-5; and the expert delta is per expert: W_e + (alpha / r) B_e A_e with
    A_e = lora_A rows e*r..(e+1)*r and B_e = lora_B columns e, e + E, e + 2E, ... (PEFT 0.21's
    layout, checked here by building the merged expert weights by hand)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.export import export_merged

    def load():
        return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)

    model = apply_lora(load(), LoraConfig(r=4, alpha=8, targets="all-linear,all-router,experts"))
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = load()(input_ids=ids).logits
        assert (want - base).abs().max() > 1e-2
        with peft_targets_as_named():
            loaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
        assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        exported = AutoModelForCausalLM.from_pretrained(
            export_merged(tmp_path / "adapter", tmp_path / "merged"), dtype=torch.float32
        )
        assert_close(exported(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

        only = apply_lora(load(), LoraConfig(r=4, alpha=8, targets="experts"))
        randomise_adapter(only)
        by_hand = load()
        experts = by_hand.model.layers[1].mlp.experts
        E, r = 8, 4
        for wrapper in (
            only.base_model.model.model.layers[1].mlp.experts,
            only.base_model.model.model.layers[1].mlp.experts.base_layer,
        ):
            A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            W = getattr(experts, wrapper.parameter_name)  # (E, out, in)
            for e in range(E):
                W[e] += (8 / r) * B[:, e::E] @ A[e * r : (e + 1) * r]
        assert_close(
            only(input_ids=ids).logits, by_hand(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------------ balance loss


def test_balance_loss_by_hand():
    """E 4, k 2, one layer, 3 tokens with router probabilities
        t1 [.4 .3 .2 .1] -> top-2 {0, 1};  t2 [.1 .2 .3 .4] -> {2, 3};  t3 [.5 .1 .1 .3] -> {0, 3}
    f = [2, 1, 1, 2] / 3,  P = [1.0, .6, .6, .8] / 3
    aux = 4 * (2 * 1.0 + .6 + .6 + 2 * .8) / 9 = 4 * 4.8 / 9 = 2.1333...
    Mask out t3: f = [1, 1, 1, 1] / 2, P = [.5, .5, .5, .5] / 2 -> aux = 4 * 4 * .125 = 2 (= k:
    balanced). Two layers are pooled rows, as transformers' load_balancing_loss_func does."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]])
    logits = probs.log() + 0.7  # softmax ignores the shift
    assert_close(moe.balance_loss([logits], 4, 2), torch.tensor(4 * 4.8 / 9))
    mask = torch.tensor([[1, 1, 0]])
    assert_close(moe.balance_loss([logits], 4, 2, mask), torch.tensor(2.0))
    other = torch.randn(3, 4)
    for m in (None, mask):
        assert_close(
            moe.balance_loss([logits, other], 4, 2, m),
            load_balancing_loss_func((logits, other), 4, 2, m),
        )


def moe_batch(n=3):
    """Left-padded rows of different lengths (the last has 2 pad tokens)."""
    from posttrain.train.batches import collate

    return collate(sft_examples(n), pad_id=0)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_aux_loss_is_added_once_with_its_coefficient(method):
    """loss(coef) = method loss + coef * aux, where aux equals the model's own aux_loss
    (transformers, output_router_logits=True, same attention mask) — nothing counted twice;
    and with a zero router weight p = 1/8 everywhere, so aux = E * sum_e f_e / E = k = 2 by
    hand whatever the (tied) top-k picks."""
    from posttrain.train.offline.loop import global_units, micro_batch_loss

    model = tiny_moe()
    # padded rows, as the model's own aux_loss below sees them (unpadded DPO routes a pair's
    # prompt once, so its aux counts the prompt tokens once, not twice)
    cfg = train_config(method, None, ["dtype=fp32", "padding=longest"], data="unused.jsonl")
    examples = (
        [Example(e.prompt, e.completions * 2, e.line) for e in sft_examples()]
        if method == "dpo"
        else sft_examples()
    )
    ref = torch.zeros(len(examples), 2) - 20.0

    def loss_with(coef):
        run = moe.MoeRun.setup(model, coef, MoeConfig(stats_every=0), [], None, seed=0, pad_id=0)
        with run.record(model) as routing:
            loss, metrics, share, _ = micro_batch_loss(
                model,
                examples,
                ref if method == "dpo" else None,
                cfg,
                pad_id=0,
                device="cpu",
                units=global_units(examples, cfg),
                processes=1,
            )
        return run.add_aux(loss, metrics, routing, share), loss, metrics, routing.mask

    total, plain, metrics, mask = loss_with(0.5)
    assert_close(total, plain + 0.5 * metrics["loss/aux"])
    from posttrain.train.batches import collate

    batch = collate(examples, 0)
    with torch.no_grad():
        own = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            output_router_logits=True,
        ).aux_loss
    assert_close(metrics["loss/aux"], own)
    assert torch.equal(mask, batch["attention_mask"])
    assert loss_with(0.0)[2].get("loss/aux") is None  # coef 0: not even recorded
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.zero_()
    total, plain, metrics, _ = loss_with(0.001)  # None would pick the config's 0.001 too
    assert_close(metrics["loss/aux"], torch.tensor(2.0))
    assert_close(total, plain + 0.002)


def test_the_coefficient_changes_the_router_gradient():
    """d(loss)/d(router) = d(method)/d(router) + coef * d(aux)/d(router): linear in coef."""
    grads = {}
    for coef in (0.0, 0.1, 0.2):
        model = apply_lora(tiny_moe(), LoraConfig(r=4, alpha=8, targets="all-router"))
        randomise_adapter(model, 0.05)
        run = moe.MoeRun.setup(model, coef, MoeConfig(stats_every=0), [], None, seed=0, pad_id=0)
        one_sft_step(model, run, lr=1e-9)
        grads[coef] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert (grads[0.1] - grads[0.0]).abs().max() > 1e-4
    assert_close(grads[0.2] - grads[0.0], 2 * (grads[0.1] - grads[0.0]), rtol=1e-4, atol=1e-7)


def test_aux_coef_defaults_to_the_model_config_and_is_refused_on_a_dense_model():
    assert moe.resolve_aux_coef(tiny_moe(), None) == 0.001  # Qwen3MoeConfig's default
    assert moe.resolve_aux_coef(tiny_moe(), 0) == 0.0
    assert moe.resolve_aux_coef(tiny_llama(), None) == moe.resolve_aux_coef(tiny_llama(), 0) == 0
    with pytest.raises(ConfigError, match="router_aux_loss_coef: 0.01 but LlamaForCausalLM"):
        moe.resolve_aux_coef(tiny_llama(), 0.01)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        train_config("sft", None, ["router_aux_loss_coef=-1"], data="x.jsonl")


def test_online_policy_loss_gets_the_aux_term_too():
    """GRPO family: the same hook in policy_backward; the logged aux is the model's aux_loss
    of the one micro-batch, and the loss it backpropagates differs by coef * aux."""
    from posttrain.train.online.loop import OnlineConfig
    from posttrain.train.online.update import policy_backward

    batch = moe_batch(2)
    advantages = torch.tensor([1.0, -1.0])
    out = {}
    for coef in (0.0, 0.3):
        model = apply_lora(tiny_moe(), LoraConfig(r=4, alpha=8, targets="all-router"))
        randomise_adapter(model, 0.05)
        run = moe.MoeRun.setup(model, coef, MoeConfig(stats_every=0), [], None, seed=0, pad_id=0)
        tokens = float((batch["labels"] != -100).sum())
        sums, _ = policy_backward(
            model,
            [(batch, slice(0, 2))],
            advantages,
            None,
            None,
            OnlineConfig(),
            mu=None,
            total_rows=2,
            total_tokens=tokens,
            moe=run,
        )
        metrics = {k: v / sums["tokens"] for k, v in sums.items()}  # token-weighted sums
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        out[coef] = (metrics, grad, run.aux_term(metrics))
    with torch.no_grad():  # the adapter model of the last run (no optimizer step was taken)
        own = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            output_router_logits=True,
        ).aux_loss
    metrics, grad, term = out[0.3]
    assert_close(torch.tensor(metrics["loss/aux"]), own)
    assert term == pytest.approx(0.3 * float(own))
    assert "loss/aux" not in out[0.0][0] and out[0.0][2] == 0.0
    assert (grad - out[0.0][1]).abs().max() > 1e-5


def test_a_group_with_its_prompt_shared_counts_only_real_tokens_in_the_balance_loss():
    """logps.group_logits runs a group as two forwards of different shapes (the prompt and the
    first completion; then the other completions, right-padded, on the prompt's cache). The
    recorder's per-call masks keep exactly the real tokens (P + m_0 = 4 + 3 in the first;
    (1 + 2) + (1 + 4) in the second, whose 10 rows hold 2 pads), and the balance loss is that
    of the real rows alone."""
    from posttrain.train.forward import group_logits

    model = tiny_moe()
    completions = [
        torch.tensor([[7, 8, 9]]),
        torch.tensor([[10, 11]]),
        torch.tensor([[12, 13, 14, 15]]),
    ]
    batch = {
        "labels": torch.ones(3, 4, dtype=torch.long),
        "prompt_ids": torch.tensor([[3, 4, 5, 6]]),
        "completion_ids": completions,
        "share_prompt": True,
    }
    with moe.RouterRecorder(model) as rec:
        group_logits(model, batch)
    layers = len(rec.logits) // 2  # MoE layers, each called once per forward
    assert [x.shape[0] for x in rec.logits] == [7] * layers + [10] * layers
    kept = [x.shape[0] if m is None else int(m.sum()) for x, m in zip(rec.logits, rec.row_masks)]
    assert kept == [7] * layers + [8] * layers
    real = [x if m is None else x[m.reshape(-1).bool()] for x, m in zip(rec.logits, rec.row_masks)]
    assert_close(moe.balance_loss(rec.logits, 8, 2, rec.masks()), moe.balance_loss(real, 8, 2))
    assert (moe.balance_loss(rec.logits, 8, 2) - moe.balance_loss(real, 8, 2)).abs() > 1e-6


# ---------------------------------------------------------------------- routing statistics


def test_routing_stats_by_hand():
    """The 3-token example of test_balance_loss_by_hand: top-2 counts per expert [2, 1, 1, 2]
    -> max 2, mean 6 / 4 = 1.5; entropy = mean over tokens of -sum p log p; the same top-k as
    the base -> 0 changed, t2's set changed -> 1 / 3."""
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]])
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    base = moe.topk_sets(probs.log(), 2)
    stats = moe.routing_stats([probs.log()], 2, None, [base])
    assert stats == pytest.approx(
        {
            "moe/tokens_per_expert_max": 2.0,
            "moe/tokens_per_expert_mean": 1.5,
            "moe/router_entropy": entropy,
            "moe/topk_changed": 0.0,
        }
    )
    moved = base.clone()
    moved[1] = torch.tensor([0, 3])
    assert moe.routing_stats([probs.log()], 2, None, [moved])["moe/topk_changed"] == pytest.approx(
        1 / 3
    )


def test_probe_stats_uniform_router_unchanged_model_and_a_moved_router():
    """Zero router weight: entropy log 8 exactly, mean load = 2 * tokens / 8. Right after the
    adapter is added the model is the base: 0 changed. A large router adapter moves routing."""
    model = tiny_moe()
    prompts = [list(e.prompt) for e in sft_examples(6)]
    run = moe.MoeRun.setup(
        model, None, MoeConfig(stats_every=2, probe_size=3), prompts, lambda p: p, seed=0, pad_id=0
    )
    assert run.probe["input_ids"].shape[0] == 3
    tokens = int(run.probe["attention_mask"].sum())
    model = apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-router"))
    assert run.stats(model, 1) == {}  # every 2 steps ...
    stats = run.stats(model, 2)
    assert stats["moe/topk_changed"] == 0.0
    assert stats["moe/tokens_per_expert_mean"] == pytest.approx(2 * tokens / 8)
    randomise_adapter(model, 1.0)
    assert run.stats(model, 3, last=True)["moe/topk_changed"] > 0.2  # ... and the last step
    uniform = tiny_moe()
    with torch.no_grad():
        uniform.model.layers[1].mlp.gate.weight.zero_()
    run = moe.MoeRun.setup(
        uniform, None, MoeConfig(stats_every=1), prompts, lambda p: p, seed=0, pad_id=0
    )
    assert run.stats(uniform, 1)["moe/router_entropy"] == pytest.approx(math.log(8))
    dense = moe.MoeRun.setup(
        tiny_llama(), None, MoeConfig(), prompts, lambda p: p, seed=0, pad_id=0
    )
    assert dense.shape is None and dense.stats(tiny_llama(), 10) == {}


# ----------------------------------------------------------------------------------- CLI


def test_cli_trains_the_router_through_lora_with_the_aux_loss_logged(moe_dir, tmp_path):
    from safetensors.torch import load_file

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(4)
    ]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_cli(
        "train",
        "--method",
        "sft",
        "--model",
        moe_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "lora.targets=all-linear,all-router",
        "--set",
        "max_steps=2",
        "--set",
        "batch_size=2",
        "--set",
        "lr=1e-2",
        "--set",
        "dtype=fp32",
        "--set",
        "moe.stats_every=1",
        "--set",
        "num_threads=1",
    )
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(
        r["loss/aux"] > 0 and r["loss"] == pytest.approx(r["nll"] + 0.001 * r["loss/aux"], rel=1e-5)
        for r in logged
    )
    assert {"moe/tokens_per_expert_max", "moe/router_entropy", "moe/topk_changed"} <= set(
        logged[-1]
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [ROUTER]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    router_b = [v for k, v in weights.items() if "mlp.gate.lora_B" in k]
    assert router_b and router_b[0].abs().max() > 0  # B starts at 0: the router trained


def test_grpo_loop_on_the_moe_logs_aux_and_routing(moe_dir, tmp_path):
    """The online loop end to end on the tiny MoE: router LoRA trains, loss/aux and moe/ logged
    every step with an explicit coefficient (online the default is 0), loss = policy loss +
    0.001 * loss/aux; the live hf engine records its routing, which the first update's forward
    (the old-policy pass here) matches in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.records import Problem
    from posttrain.train.online import loop as online
    from stub_rewards import graded

    def score(problem, index, messages, completion, **kwargs):
        return graded(float(completion.token_ids[0] % 2 == 0), completion.finish_reason == "length")

    problems = [
        Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1), answer_type="exact")
        for i in range(4)
    ]
    cfg = online.online_config(
        "grpo",
        overrides=[
            "max_steps=2",
            "num_generations=2",
            "problems_per_step=2",
            "max_new_tokens=3",
            "lr=1e-2",
            "lora.r=4",
            "lora.targets=all-linear,all-router",
            "moe.stats_every=1",
            "router_aux_loss_coef=0.001",
            "dtype=fp32",
        ],
    )
    online.train_online(
        cfg,
        tmp_path,
        model=AutoModelForCausalLM.from_pretrained(moe_dir),
        tokenizer=AutoTokenizer.from_pretrained(moe_dir),
        problems=problems,
        score=score,
    )
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for r in logged:
        assert r["loss"] == pytest.approx(r["loss/policy"] + 0.001 * r["loss/aux"], rel=1e-5)
        assert 0 <= r["moe/topk_changed"] <= 1 and r["moe/router_entropy"] > 0
        assert r["moe/rollout_agreement"] >= 0.9 and "moe/update_flips" not in r  # 1 update
