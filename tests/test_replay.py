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
