"""Losses and weights for samples that did not come exactly from the policy being trained.

    .venv/bin/python -m pytest tests/test_offpolicy.py -q

A rollout engine (vLLM, a server, a detached copy) never computes exactly the trainer's
log-probabilities: kernels, precision and batching differ, and a broken weight sync makes it
sample an old policy. Three pure functions, in the conventions of posttrain/losses/:
- `mismatch_metrics`: how far the engine's log-probs of the sampled tokens are from the
  trainer's (the sync check of the online loop uses mismatch/kl).
- `rollout_weights`: truncated (TIS) or masked (MIS) importance sampling weights
  w = pi_trainer / pi_rollout, per token or per sequence, that multiply the per-token loss.
- `cispo_loss`: CISPO (MiniMax-M1, Chen et al. 2025): the clipped importance weight, detached,
  scales every token's log-prob gradient, so no token's update is dropped by the clip.
"""

from __future__ import annotations

import torch

from posttrain.losses.common import Metrics, check_tokens, masked_mean
from posttrain.losses.policy_gradient import (
    MAX_LOG_RATIO,
    check_policy_inputs,
    finish_policy_loss,
)


def _log_ratio(trainer_logps, rollout_logps, m):
    d = trainer_logps.detach().float() - rollout_logps.detach().float()  # (B, T)
    return d.masked_fill(~m, 0.0).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def mismatch_metrics(
    trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor
) -> Metrics:
    """Per sampled token, d = log pi_trainer - log pi_rollout and r = e^d (no gradient):
    mismatch/kl: mean of k3 = (r - 1) - d, an unbiased estimate of KL(rollout || trainer) from
        the rollout's own samples (Schulman's k3), >= 0 per token;
    mismatch/abs_logp_max: max |d|; mismatch/ratio_outside: share of tokens with r outside
    [0.5, 2]. d = [0, ln 2, -ln 4]: k3 = [0, 1 - .693147, -.75 + 1.386294] -> mean .314382;
    max |d| 1.386294; outside 1/3 (r = 1/4; r = 2 is on the boundary, inside).
    """
    m = check_tokens("mismatch_metrics", trainer_logps, mask)
    d = _log_ratio(trainer_logps, rollout_logps, m)
    r = torch.exp(d)
    return {
        "mismatch/kl": masked_mean(r - 1 - d, m),
        "mismatch/abs_logp_max": torch.where(m, d.abs(), 0.0).max() if m.any() else torch.zeros(()),
        "mismatch/ratio_outside": masked_mean(((r < 0.5) | (r > 2.0)).float(), m),
    }


def rollout_weights(
    trainer_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    level: str = "token",
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[torch.Tensor, Metrics]:
    """Detached weights (B, T) for the per-token loss, from w = pi_trainer / pi_rollout.

    level token: w per token; sequence: w_i = exp(sum over the sequence of the log-ratios),
    the ratio of the sequence probabilities, on every token of sequence i.
    mode tis (truncated IS): min(w, cap); mis (masked IS): 1 where low <= w <= high, else 0
    (the token, or the whole sequence, gets no loss); none: 1 everywhere.
    Token log-ratios [ln 3, ln .25, 0], cap 2, [.5, 2]: tis [2, .25, 1]; mis [0, 0, 1].
    As one sequence: w = 3 * .25 = .75; tis [.75] * 3; mis [1] * 3.
    Metrics: correction/weight (token mean), correction/capped (tis: share with w > cap),
    correction/masked (mis: share of tokens given weight 0).
    """
    m = check_tokens("rollout_weights", trainer_logps, mask)
    if mode not in ("none", "tis", "mis") or level not in ("token", "sequence"):
        raise ValueError(
            f"rollout_weights: mode none | tis | mis and level token | sequence, "
            f"got {mode!r}, {level!r}"
        )
    d = _log_ratio(trainer_logps, rollout_logps, m)  # (B, T)
    if level == "sequence":
        d = d.sum(-1, keepdim=True).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).expand_as(d)
    w = torch.exp(d)  # (B, T)
    metrics: Metrics = {}
    if mode == "tis":
        metrics["correction/capped"] = masked_mean((w > cap).float(), m)
        w = w.clamp(max=cap)
    elif mode == "mis":
        keep = (w >= low) & (w <= high)
        metrics["correction/masked"] = masked_mean((~keep).float(), m)
        w = keep.float()
    else:
        w = torch.ones_like(w)
    w = w.masked_fill(~m, 0.0)
    metrics["correction/weight"] = masked_mean(w, m)
    return w, metrics


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    aggregation: str = "token_mean",
    ref_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO: per token -sg(clip(r, 1 - clip_low, 1 + clip_high)) * w * A * logp (+ kl_beta k3).

    Unlike PPO's clip, which zeroes the gradient of a token whose ratio left the range, every
    token keeps a gradient -clip(r) w A; the paper sets no lower bound (clip_low 1 -> 0).
    r = exp(logps - old_logps) (old None: on-policy, r = 1); w an optional rollout weight.
    Example, one token, logp -1, A = 2: r = 1.5, clip_high .28 -> loss 1.28 * 2 * 1 = 2.56,
    gradient -2.56; r = .5 -> loss 1.0, gradient -1.0 (no lower clip).
    Metrics: clip_ratio/high (share of tokens with r > 1 + clip_high), clip_ratio/low (r below
    1 - clip_low), ratio/mean, kl when ref_logps is given.
    """
    m = check_policy_inputs("cispo_loss", logps, advantages, mask, aggregation, kl_beta, ref_logps)
    logps = logps.masked_fill(~m, 0.0)  # (B, T)
    old = logps.detach() if old_logps is None else old_logps.detach().masked_fill(~m, 0.0)
    ratio = torch.exp((logps.detach() - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (B, T)
    weight = ratio.clamp(max(0.0, 1 - clip_low), 1 + clip_high)  # (B, T), no gradient
    if is_weights is not None:
        weight = weight * is_weights.detach()
    adv = advantages.detach().to(logps.dtype).unsqueeze(-1)  # (B, 1)
    per_token = -weight * adv * logps  # (B, T)
    loss, metrics = finish_policy_loss(
        per_token,
        logps,
        m,
        aggregation=aggregation,
        ref_logps=ref_logps,
        kl_beta=kl_beta,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    metrics.update(
        {
            "clip_ratio/low": masked_mean((ratio < 1 - clip_low).float(), m),
            "clip_ratio/high": masked_mean((ratio > 1 + clip_high).float(), m),
            "ratio/mean": masked_mean(ratio, m),
        }
    )
    metrics["clip_ratio/region"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"]
    return loss, metrics
