"""Losses over demonstrations: SFT, DFT and CHORD (its phi-weighted SFT and the mu mix with RL).

    .venv/bin/python -m pytest tests/test_losses.py -q

Per-token log-probs (B, T) and a mask in, `(loss, metrics)` out; the conventions are in
posttrain/losses/__init__.py.
"""

from __future__ import annotations

import math

import torch

from posttrain.losses.common import Metrics, check_tokens, masked_mean


def _aggregate_sft(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, num_items_in_batch: float | None
) -> torch.Tensor:
    per_token = torch.where(mask, per_token, 0.0)  # (B, T)
    if aggregation == "token_mean":
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        return per_token.sum() / denom
    if num_items_in_batch is not None:
        raise ValueError("num_items_in_batch only applies to aggregation='token_mean'")
    if aggregation == "sequence_mean":
        # An all-padding row counts as a sequence with loss 0 (it stays in the denominator B).
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "sum":
        return per_token.sum()
    raise ValueError(f"aggregation must be token_mean, sequence_mean or sum, got {aggregation!r}")


def _weighted_nll(
    name: str,
    logps: torch.Tensor,
    mask: torch.Tensor,
    weight_fn,
    aggregation: str,
    num_items_in_batch: float | None,
) -> tuple[torch.Tensor, Metrics]:
    m = check_tokens(name, logps, mask)
    logps = logps.masked_fill(~m, 0.0)  # (B, T); padding can hold anything, even -inf
    p = logps.detach().exp()  # (B, T) token probability, never differentiated
    weight = weight_fn(p)  # (B, T) detached per-token weight; 1 for plain SFT
    loss = _aggregate_sft(-weight * logps, m, aggregation, num_items_in_batch)
    metrics = {
        "nll": masked_mean(-logps, m),
        "token_prob": masked_mean(p, m),
        "weight": masked_mean(weight, m),
        "tokens": m.sum().float(),
    }
    return loss, metrics


# ------------------------------------------------------------------- demonstrations (SFT)


def sft(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str = "token_mean",
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood: per token -logp.

    aggregation: "token_mean" (sum over tokens / number of tokens; `num_items_in_batch`, if given,
    replaces the local count), "sequence_mean" (mean over sequences of each one's token mean),
    "sum". Metrics: nll (token mean), token_prob (mean p), weight, tokens.
    Example: logps [[ln .5, ln .25]] -> token_mean (0.6931 + 1.3863) / 2 = 1.0397.
    """
    return _weighted_nll("sft", logps, mask, torch.ones_like, aggregation, num_items_in_batch)


def dft(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str = "token_mean",
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Dynamic Fine-Tuning (Wu et al. 2025): per token -sg(p) * logp, p = exp(logp).

    The weight is detached, so the gradient is -p (SFT's -1 rescaled by the token's own
    probability); the value -p log p peaks at p = 1/e with value 1/e.
    Example: logps [[ln .5]] -> 0.5 * 0.6931 = 0.3466.
    """
    return _weighted_nll("dft", logps, mask, lambda p: p, aggregation, num_items_in_batch)


def sft_phi(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str = "token_mean",
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CHORD's phi-weighted SFT term (Zhang et al. 2025): per token -sg(p(1-p)) * logp.

    p(1-p) down-weights both tokens the policy already predicts (p ~ 1) and tokens far from it
    (p ~ 0), which limits how far off-policy demonstrations pull. The value -p(1-p) log p peaks
    near p = 0.236. Example: logps [[ln .5]] -> 0.25 * 0.6931 = 0.1733.
    """
    return _weighted_nll(
        "sft_phi", logps, mask, lambda p: p * (1 - p), aggregation, num_items_in_batch
    )


# ----------------------------------------------------------------------------- CHORD


def mu_schedule(
    step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float
) -> float:
    """CHORD's SFT weight mu: linear 0 -> peak over warmup, cosine peak -> valley over decay.

    warmup 0, decay 200, peak 0.9, valley 0.05: steps 0/50/100/150/200 ->
    0.9, 0.05 + 0.85 * (1 + cos(pi/4)) / 2 = 0.7755, 0.475, 0.1745, 0.05 (and 0.05 after).
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step < warmup_steps + decay_steps:
        progress = (step - warmup_steps) / decay_steps
        return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * progress))
    return valley


def chord_loss(
    policy_loss_value: torch.Tensor, sft_loss_value: torch.Tensor, mu: float
) -> torch.Tensor:
    """CHORD (Zhang et al. 2025): (1 - mu) * policy loss + mu * SFT loss (a scalar, not a pair:
    both parts already came with their own metrics)."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"chord_loss: mu must be in [0, 1], got {mu}")
    return (1 - mu) * policy_loss_value + mu * sft_loss_value
