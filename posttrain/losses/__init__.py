"""Every training loss as a pure function over tensors: SFT, DFT, CHORD, DPO (+ variants), GRPO.

Tensors and hyperparameters in, `(loss, metrics)` out; no model, no trainer state. How tokens
and sequences are averaged is always an explicit argument, because that choice silently changes
what a run optimises (a long answer counting as much as a short one, or as much as its tokens).

Conventions (shapes in comments: B sequences, T tokens, V vocabulary):
- `logps` are per-token log-probabilities of the target tokens, float32, (B, T); `mask` is 0/1
  or bool, (B, T). Masked-out positions are zeroed *before* any arithmetic, so whatever sits in
  padding (garbage, -inf) never reaches a value or a gradient.
- DPO takes per-sequence SUMMED log-probs, (B,), and averages over pairs.
- metrics are `dict[str, 0-dim detached tensor]`: no host sync per step on a GPU; call
  `metrics_to_floats` once per logging step (one sync for the whole dict).
- Gradient accumulation: "token_mean", "grpo", "dr_grpo" and DPO are micro-batch means
  (the trainer divides by the number of equal micro-batches); pass `num_items_in_batch` (the
  token count of the whole generation batch, divided by the number of DDP processes because DDP
  averages gradients) to get a loss that sums exactly over micro-batches.

Where each loss lives (every name is importable from `posttrain.losses` too):
- losses/common.py: Metrics, metrics_to_floats, token_logps and the mask helpers;
- losses/sft.py: sft, dft, sft_phi (demonstrations) and CHORD's mu_schedule and chord_loss;
- losses/preference.py: dpo and its variants (DPO_LOSS_TYPES);
- losses/policy_gradient.py: policy_loss, aggregate_tokens, group_advantages (online RL);
- losses/distill.py: distill_advantages (on-policy distillation's per-token advantages).

Tests: `.venv/bin/python -m pytest tests/test_losses.py -q`
"""

from posttrain.losses.common import (
    Metrics,
    check_tokens,
    masked_mean,
    metrics_to_floats,
    token_logps,
)
from posttrain.losses.distill import distill_advantages
from posttrain.losses.policy_gradient import (
    AGGREGATIONS,
    MAX_LOG_RATIO,
    aggregate_tokens,
    group_advantages,
    policy_loss,
)
from posttrain.losses.preference import DPO_LOSS_TYPES, dpo
from posttrain.losses.sft import chord_loss, dft, mu_schedule, sft, sft_phi

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSS_TYPES",
    "MAX_LOG_RATIO",
    "Metrics",
    "check_tokens",
    "masked_mean",
    "aggregate_tokens",
    "chord_loss",
    "dft",
    "distill_advantages",
    "dpo",
    "group_advantages",
    "metrics_to_floats",
    "mu_schedule",
    "policy_loss",
    "sft",
    "sft_phi",
    "token_logps",
]
