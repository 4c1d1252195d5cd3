"""Mixture-of-experts support for the trainers.

    posttrain train --method dpo --model QWEN3_MOE_FOLDER --data pairs.jsonl --out runs/moe \
        --set lora.targets=all-linear,all-router --set router_aux_loss_coef=0.001
    posttrain train --method grpo --model MOE_FOLDER --out runs/r3 --set moe.replay=rollout

    model.py    where routers and experts are (what `all-router` / `experts` LoRA adapts)
    balance.py  the load-balancing loss, routing statistics of a forward, RouterRecorder
    run.py      MoeRun: what a training run does for an MoE model (no-ops on a dense one)
    replay.py   routing replay (moe.replay none | old | rollout) and the drift metrics

The trainers call three hooks, all no-ops on a dense model (`MoeRun.dense()`):
`record(policy)` around a micro-batch's forward, `add_aux(loss, metrics, routing, weight)` before
its backward, and `stats(policy, step)` once per optimizer step (logged every `stats_every`).
The online trainer also routes its forwards through `replay.RouterControl` on an MoE model.

Router logits are taken with forward hooks on the modules transformers itself records as
`router_logits` (the model class's `_can_record_outputs`). The forward never gets `labels` nor
`output_router_logits`, so transformers adds nothing to any loss here: the balance loss is
added once, by `add_aux` (balance.py says how it is computed).
"""

from posttrain.train.moe.balance import (
    RouterRecorder,
    balance_loss,
    resolve_aux_coef,
    routing_stats,
    topk_sets,
)
from posttrain.train.moe.model import (
    MoeShape,
    expert_parameters,
    moe_shape,
    router_modules,
    router_spec,
    router_weights,
    shared_expert_linears,
    transformers_model,
)
from posttrain.train.moe.run import MoeRun, pick_probe, probe_batch, probe_prompt

__all__ = [
    "MoeRun",
    "MoeShape",
    "RouterRecorder",
    "balance_loss",
    "expert_parameters",
    "moe_shape",
    "pick_probe",
    "probe_batch",
    "probe_prompt",
    "resolve_aux_coef",
    "router_modules",
    "router_spec",
    "router_weights",
    "routing_stats",
    "shared_expert_linears",
    "topk_sets",
    "transformers_model",
]
