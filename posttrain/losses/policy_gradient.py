"""Policy-gradient losses for online RL: the PPO-clipped loss of GRPO / DAPO / Dr. GRPO / GSPO,
the token aggregations and the group-normalised advantages.

    .venv/bin/python -m pytest tests/test_losses.py -q

Per-token log-probs (B, T), advantages (B,) and a mask in, `(loss, metrics)` out; the
conventions are in posttrain/losses/__init__.py.
"""

from __future__ import annotations

import torch

from posttrain.losses.common import Metrics, check_tokens, masked_mean

AGGREGATIONS = ("grpo", "token_mean", "dapo", "dr_grpo")
# |log ratio| cap: one token whose log-prob drifted far (or -inf in a bf16 forward) would make
# exp() overflow to inf and stop the run; e^20 = 4.9e8 is far past any clip range.
MAX_LOG_RATIO = 20.0


def aggregate_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> torch.Tensor:
    """A per-token loss (B, T) -> scalar, the online aggregations (mask already applied):
      grpo:       mean over sequences of each sequence's token mean (Shao et al. 2024);
      token_mean: sum / number of tokens in this micro-batch (TRL calls it "bnpo");
      dapo:       sum / tokens in the whole generation batch (`num_items_in_batch`; without it
                  the local count, i.e. token_mean); token_mean also honours num_items_in_batch;
      dr_grpo:    sum / (B * max_completion_length) (Liu et al. 2025; default T).
    Lengths 3 and 1, per-token losses [1, 1, 1] and [2]: grpo (1 + 2) / 2 = 1.5;
    token_mean 5 / 4 = 1.25; dr_grpo with L 4: 5 / 8 = 0.625.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation in ("token_mean", "dapo"):
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        return per_token.sum() / denom
    length = per_token.shape[1] if max_completion_length is None else max_completion_length
    return per_token.sum() / (per_token.shape[0] * length)


def add_kl_penalty(per_token, logps, ref_logps, mask, kl_beta: float):
    """per_token + kl_beta * k3, and the masked mean of k3 = exp(d) - d - 1 with
    d = ref - logp (clamped to +-MAX_LOG_RATIO): the KL estimate of Schulman's k3."""
    d = (ref_logps.detach().masked_fill(~mask, 0.0) - logps).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    kl = torch.exp(d) - d - 1  # (B, T)
    if kl_beta:
        per_token = per_token + kl_beta * kl
    return per_token, masked_mean(kl, mask)


def check_policy_inputs(
    name: str,
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    kl_beta: float,
    ref_logps: torch.Tensor | None,
    *,
    per_token: bool = False,
) -> torch.Tensor:
    """The checks every policy loss makes of its inputs; returns the mask as bool (B, T).
    `per_token`: the loss also takes advantages (B, T), one per token (distillation)."""
    m = check_tokens(name, logps, mask)
    if advantages.shape != logps.shape[:1] and not (per_token and advantages.shape == logps.shape):
        shapes = f"(B,) = {tuple(logps.shape[:1])}" + (
            f" or (B, T) = {tuple(logps.shape)}" if per_token else ""
        )
        raise ValueError(f"{name}: advantages must be {shapes}, got {tuple(advantages.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{name}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_beta and ref_logps is None:
        raise ValueError(f"{name}: kl_beta > 0 needs ref_logps")
    return m


def finish_policy_loss(
    per_token: torch.Tensor,
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str,
    ref_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The ending every policy loss shares (policy_loss, offpolicy.cispo_loss): add kl_beta x
    k3 when `ref_logps` is given (and report its mean as `kl`), zero the masked-out tokens,
    aggregate (aggregate_tokens). per_token, logps, mask: (B, T), mask bool."""
    metrics: Metrics = {}
    if ref_logps is not None:
        per_token, metrics["kl"] = add_kl_penalty(per_token, logps, ref_logps, mask, kl_beta)
    per_token = torch.where(mask, per_token, 0.0)  # (B, T)
    loss = aggregate_tokens(
        per_token,
        mask,
        aggregation,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    return loss, metrics


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "grpo",
    ref_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clipped policy-gradient loss with GRPO / DAPO / Dr. GRPO / GSPO options.

    Per token: -w min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_beta * k3, where
    r = exp(logps - old_logps), A one advantage per sequence (B,) or per token (B, T) (on-policy
    distillation, losses/distill.py), clip_high defaults to clip_low (DAPO's clip-higher sets it
    larger) and w is an optional detached rollout-correction weight (offpolicy.py; 1 without).
    `old_logps=None` means on-policy (old = logps.detach(), so r = 1 with gradient).
    Log-ratios are clamped to +-MAX_LOG_RATIO so one drifting token cannot give inf.
    ratio_level "sequence" (GSPO, Zheng et al. 2025): every token of sequence i uses
    s_i = exp(masked mean of (logps - old_logps)); it is built as
    exp(logp_t - sg(logp_t) + sg(log s_i)), whose value is s_i and whose gradient reaches each
    token directly (GSPO-token form; with one advantage per sequence it equals GSPO's gradient
    after the token mean). GSPO uses far smaller clip ranges (~3e-4 / 4e-4): the caller sets them.
    k3 KL (Schulman): exp(ref - logp) - (ref - logp) - 1 >= 0 per token, needs ref_logps.
    Aggregation of the per-token loss: see aggregate_tokens.
    Metrics (token means over the mask): clip_ratio/low (r < 1 - clip_low and A < 0: the low
    clip is active), clip_ratio/high (r > 1 + clip_high and A > 0), clip_ratio/region (either),
    ratio/mean, and kl when ref_logps is given.
    """
    m = check_policy_inputs(
        "policy_loss", logps, advantages, mask, aggregation, kl_beta, ref_logps, per_token=True
    )
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"policy_loss: ratio_level must be token or sequence, got {ratio_level!r}")
    clip_high = clip_low if clip_high is None else clip_high
    logps = logps.masked_fill(~m, 0.0)  # (B, T)
    old = logps.detach() if old_logps is None else old_logps.detach().masked_fill(~m, 0.0)
    log_ratio = (logps - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # (B, T), 0 on padding
    if ratio_level == "sequence":
        seq_log_ratio = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
        log_ratio = logps - logps.detach() + seq_log_ratio.detach().unsqueeze(-1)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach().to(ratio.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv.masked_fill(~m, 0.0)  # (B, 1) or (B, T)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().masked_fill(~m, 0.0)

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
    low = (ratio < 1 - clip_low) & (adv < 0)  # (B, T)
    high = (ratio > 1 + clip_high) & (adv > 0)  # (B, T)
    metrics.update(
        {
            "clip_ratio/low": masked_mean(low.float(), m),
            "clip_ratio/high": masked_mean(high.float(), m),
            "clip_ratio/region": masked_mean((low | high).float(), m),
            "ratio/mean": masked_mean(ratio, m),
        }
    )
    return loss, metrics


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages (N,) for rewards (N,) laid out group by group (group_size per prompt).

    A = r - group mean, divided by (std + eps) where std is the group's ("group", GRPO), the whole
    batch's ("batch") or nothing ("none", Dr. GRPO). std is unbiased (divides by n - 1), as
    torch.std and TRL. A group whose rewards are all equal gets exactly 0 (no rounding residue
    amplified by 1/eps).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: need rewards (N,) with N a multiple of group_size "
            f">= 2, got shape {tuple(rewards.shape)} and group_size {group_size}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be group, batch or none, got {scale!r}")
    grouped = rewards.float().view(-1, group_size)  # (G, K)
    centred = grouped - grouped.mean(-1, keepdim=True)  # (G, K)
    if scale == "group":
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    flat = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)  # (G, 1)
    return centred.masked_fill(flat, 0.0).reshape(-1)
