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

Tests: `.venv/bin/python -m pytest tests/test_losses.py -q`
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .logprobs import chunked_token_logps

Metrics = dict[str, torch.Tensor]  # name -> 0-dim detached tensor


def metrics_to_floats(metrics: Metrics) -> dict[str, float]:
    """One device->host copy for all metrics (instead of one `.item()` sync each)."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


def token_logps(logits: torch.Tensor, labels: torch.Tensor,
                ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[label] per position, float32, (B, T); 0.0 where label == ignore_index.

    Memory-lean (posttrain.logprobs): computed over chunks of positions, each upcast to
    float32 only while it is processed; backward keeps the logits as they are plus one float32
    logsumexp per position, never a float32 (B, T, V) copy.
    """
    return chunked_token_logps(logits, labels, ignore_index)


# ------------------------------------------------------------------------------ helpers


def _check_tokens(name: str, logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"{name}: expected logps and mask of one shape (B, T), got "
                         f"{tuple(logps.shape)} and {tuple(mask.shape)}")
    return mask.bool()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask==True entries, 0 when there are none; detached (for metrics)."""
    x = x.detach().float()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _aggregate_sft(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
                   num_items_in_batch: float | None) -> torch.Tensor:
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


def _weighted_nll(name: str, logps: torch.Tensor, mask: torch.Tensor, weight_fn, aggregation: str,
                  num_items_in_batch: float | None) -> tuple[torch.Tensor, Metrics]:
    m = _check_tokens(name, logps, mask)
    logps = logps.masked_fill(~m, 0.0)  # (B, T); padding can hold anything, even -inf
    p = logps.detach().exp()  # (B, T) token probability, never differentiated
    weight = weight_fn(p)  # (B, T) detached per-token weight; 1 for plain SFT
    loss = _aggregate_sft(-weight * logps, m, aggregation, num_items_in_batch)
    metrics = {"nll": _masked_mean(-logps, m), "token_prob": _masked_mean(p, m),
               "weight": _masked_mean(weight, m), "tokens": m.sum().float()}
    return loss, metrics


# ------------------------------------------------------------------- demonstrations (SFT)


def sft(logps: torch.Tensor, mask: torch.Tensor, *, aggregation: str = "token_mean",
        num_items_in_batch: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood: per token -logp.

    aggregation: "token_mean" (sum over tokens / number of tokens; `num_items_in_batch`, if given,
    replaces the local count), "sequence_mean" (mean over sequences of each one's token mean),
    "sum". Metrics: nll (token mean), token_prob (mean p), weight, tokens.
    Example: logps [[ln .5, ln .25]] -> token_mean (0.6931 + 1.3863) / 2 = 1.0397.
    """
    return _weighted_nll("sft", logps, mask, torch.ones_like, aggregation, num_items_in_batch)


def dft(logps: torch.Tensor, mask: torch.Tensor, *, aggregation: str = "token_mean",
        num_items_in_batch: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Dynamic Fine-Tuning (Wu et al. 2025): per token -sg(p) * logp, p = exp(logp).

    The weight is detached, so the gradient is -p (SFT's -1 rescaled by the token's own
    probability); the value -p log p peaks at p = 1/e with value 1/e.
    Example: logps [[ln .5]] -> 0.5 * 0.6931 = 0.3466.
    """
    return _weighted_nll("dft", logps, mask, lambda p: p, aggregation, num_items_in_batch)


def sft_phi(logps: torch.Tensor, mask: torch.Tensor, *, aggregation: str = "token_mean",
            num_items_in_batch: float | None = None) -> tuple[torch.Tensor, Metrics]:
    """CHORD's phi-weighted SFT term (Zhang et al. 2025): per token -sg(p(1-p)) * logp.

    p(1-p) down-weights both tokens the policy already predicts (p ~ 1) and tokens far from it
    (p ~ 0), which limits how far off-policy demonstrations pull. The value -p(1-p) log p peaks
    near p = 0.236. Example: logps [[ln .5]] -> 0.25 * 0.6931 = 0.1733.
    """
    return _weighted_nll("sft_phi", logps, mask, lambda p: p * (1 - p), aggregation,
                         num_items_in_batch)


# ---------------------------------------------------------------------- preferences (DPO)

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "bdpo")


def dpo(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float, *,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
        bdpo_lambda: float = 0.5, nll_weight: float = 0.0,
        chosen_nll: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """DPO and variants over per-sequence summed log-probs, each (B,); loss = mean over pairs.

    With chosen ratio c = pc - rc, rejected ratio r = pr - rr, h = c - r, ls = label_smoothing:
    - sigmoid (Rafailov et al. 2023; ls > 0 is conservative DPO):
        -(1-ls) logsig(beta h) - ls logsig(-beta h).
    - ipo (Azar et al. 2023, eq. 17): (h_norm - 1/(2 beta))^2 with each log-ratio divided by its
        response's token count (needs chosen_lengths/rejected_lengths). The paper writes summed
        log-probs; the per-token average follows TRL, which reports the IPO authors confirmed it
        matches the paper's experiments, and keeps beta comparable across lengths.
    - robust (Chowdhury et al. 2024, rDPO; ls = assumed label-flip rate < 0.5):
        [(1-ls)(-logsig(beta h)) - ls(-logsig(-beta h))] / (1 - 2 ls); ls = 0 is sigmoid.
    - bdpo (Cho et al. 2025, Bounded DPO): the rejected policy likelihood is replaced by the
        mixture lam*pi + (1-lam)*pi_ref, so r = log(lam e^(pr-rr) + 1 - lam) >= log(1 - lam):
        pushing the rejected response down can lower the loss only boundedly, which stops the
        rejected term from dominating. Computed in log space with logaddexp; then the sigmoid
        loss (with ls). lam = 1 is plain DPO; lam = 0 makes r = 0 (chosen term only).
        Implemented from this definition: only the paper's abstract could be read here.
    - nll_weight > 0 (RPO, Pang et al. 2024) adds nll_weight * mean(chosen_nll), where
        chosen_nll (B,) or () is the caller's NLL of the chosen response divided by its token
        count, as in RPO.
    Worked example (beta 0.1, pc -10, rc -12, pr -15, rr -14: c = 2, r = -1, h = 3):
        sigmoid: softplus(-0.3) = 0.554355; ls 0.1: 0.9*0.554355 + 0.1*0.854355 = 0.584355.
        robust ls 0.1: (0.9*0.554355 - 0.1*0.854355) / 0.8 = 0.516855.
        ipo, lengths 4 and 2: h_norm = 2/4 + 1/2 = 1; (1 - 5)^2 = 16.
        bdpo lam 0.5: r = log(0.5 e^-1 + 0.5) = -0.379885; softplus(-0.2379885) = 0.581216.
    Metrics: rewards/chosen = mean beta*c, rewards/rejected = mean beta*r (plain implicit reward
    for every loss type), rewards/margins, rewards/accuracies (chosen > rejected, strict),
    logps/chosen, logps/rejected (means of summed log-probs), and nll when RPO is on.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps  # (B,)
    rc, rr = ref_chosen_logps, ref_rejected_logps  # (B,)
    if pc.dim() != 1 or not (pc.shape == pr.shape == rc.shape == rr.shape):
        raise ValueError("dpo: expected four (B,) tensors of summed log-probs, got shapes "
                         f"{[tuple(t.shape) for t in (pc, pr, rc, rr)]}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"dpo: beta must be > 0, got {beta}")
    # ls is an assumed label-flip rate: above 0.5 the preference itself would be reversed, and
    # robust's 1 / (1 - 2 ls) diverges at 0.5.
    ls_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and ls_ok):
        raise ValueError(f"dpo: label_smoothing must be in "
                         f"{'[0, 0.5)' if loss_type == 'robust' else '[0, 0.5]'} for {loss_type}, "
                         f"got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("dpo: label_smoothing has no meaning for ipo; set it to 0")
    chosen_ratio = pc - rc.detach()  # (B,)
    rejected_ratio = pr - rr.detach()  # (B,)
    ls = label_smoothing

    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo: loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        h = (chosen_ratio / chosen_lengths.to(pc.dtype).clamp(min=1)
             - rejected_ratio / rejected_lengths.to(pc.dtype).clamp(min=1))
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        bounded_rejected = rejected_ratio
        if loss_type == "bdpo":
            if not 0.0 <= bdpo_lambda <= 1.0:
                raise ValueError(f"dpo: bdpo_lambda must be in [0, 1], got {bdpo_lambda}")
            # A weight of 0 is a -inf log term: logaddexp(x, -inf) = x, with gradient 1 and 0.
            no_term = torch.full_like(pr, -math.inf)
            log_policy = pr + math.log(bdpo_lambda) if bdpo_lambda > 0 else no_term  # (B,)
            log_ref = rr.detach() + math.log1p(-bdpo_lambda) if bdpo_lambda < 1 else no_term
            log_mix = torch.logaddexp(log_policy, log_ref)  # (B,)
            bounded_rejected = log_mix - rr.detach()
        z = beta * (chosen_ratio - bounded_rejected)  # (B,)
        if loss_type == "robust":
            losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
        else:  # sigmoid, bdpo
            losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    loss = losses.mean()

    chosen_rewards = beta * chosen_ratio.detach()  # (B,)
    rejected_rewards = beta * rejected_ratio.detach()  # (B,)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    if nll_weight:
        if chosen_nll is None:
            raise ValueError("dpo: nll_weight > 0 (RPO) needs chosen_nll")
        nll = chosen_nll.mean()
        loss = loss + nll_weight * nll
        metrics["nll"] = nll.detach()
    return loss, metrics


# ---------------------------------------------------------------------- online RL (GRPO)

AGGREGATIONS = ("grpo", "token_mean", "dapo", "dr_grpo")
# |log ratio| cap: one token whose log-prob drifted far (or -inf in a bf16 forward) would make
# exp() overflow to inf and stop the run; e^20 = 4.9e8 is far past any clip range.
MAX_LOG_RATIO = 20.0


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, *,
                     max_completion_length: int | None = None,
                     num_items_in_batch: float | None = None) -> torch.Tensor:
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


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                ratio_level: str = "token", aggregation: str = "grpo",
                ref_logps: torch.Tensor | None = None, kl_beta: float = 0.0,
                max_completion_length: int | None = None,
                num_items_in_batch: float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """PPO-clipped policy-gradient loss with GRPO / DAPO / Dr. GRPO / GSPO options.

    Per token: -w min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_beta * k3, where
    r = exp(logps - old_logps), clip_high defaults to clip_low (DAPO's clip-higher sets it
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
    m = _check_tokens("policy_loss", logps, mask)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be (B,) = {tuple(logps.shape[:1])}, "
                         f"got {tuple(advantages.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"policy_loss: aggregation must be one of {AGGREGATIONS}, "
                         f"got {aggregation!r}")
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"policy_loss: ratio_level must be token or sequence, got {ratio_level!r}")
    if kl_beta and ref_logps is None:
        raise ValueError("policy_loss: kl_beta > 0 needs ref_logps")
    clip_high = clip_low if clip_high is None else clip_high
    logps = logps.masked_fill(~m, 0.0)  # (B, T)
    old = logps.detach() if old_logps is None else old_logps.detach().masked_fill(~m, 0.0)
    log_ratio = (logps - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # (B, T), 0 on padding
    if ratio_level == "sequence":
        seq_log_ratio = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
        log_ratio = logps - logps.detach() + seq_log_ratio.detach().unsqueeze(-1)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach().to(ratio.dtype).unsqueeze(-1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().masked_fill(~m, 0.0)

    metrics: Metrics = {}
    if ref_logps is not None:
        d = (ref_logps.detach().masked_fill(~m, 0.0) - logps).clamp(-MAX_LOG_RATIO,
                                                                     MAX_LOG_RATIO)  # (B, T)
        kl = torch.exp(d) - d - 1  # (B, T)
        if kl_beta:
            per_token = per_token + kl_beta * kl
        metrics["kl"] = _masked_mean(kl, m)
    per_token = torch.where(m, per_token, 0.0)
    loss = aggregate_tokens(per_token, m, aggregation, max_completion_length=max_completion_length,
                            num_items_in_batch=num_items_in_batch)

    low = (ratio < 1 - clip_low) & (adv < 0)  # (B, T)
    high = (ratio > 1 + clip_high) & (adv > 0)  # (B, T)
    metrics.update({
        "clip_ratio/low": _masked_mean(low.float(), m),
        "clip_ratio/high": _masked_mean(high.float(), m),
        "clip_ratio/region": _masked_mean((low | high).float(), m),
        "ratio/mean": _masked_mean(ratio, m),
    })
    return loss, metrics


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages (N,) for rewards (N,) laid out group by group (group_size per prompt).

    A = r - group mean, divided by (std + eps) where std is the group's ("group", GRPO), the whole
    batch's ("batch") or nothing ("none", Dr. GRPO). std is unbiased (divides by n - 1), as
    torch.std and TRL. A group whose rewards are all equal gets exactly 0 (no rounding residue
    amplified by 1/eps).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: need rewards (N,) with N a multiple of group_size "
                         f">= 2, got shape {tuple(rewards.shape)} and group_size {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be group, batch or none, got {scale!r}")
    grouped = rewards.float().view(-1, group_size)  # (G, K)
    centred = grouped - grouped.mean(-1, keepdim=True)  # (G, K)
    if scale == "group":
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    flat = (grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True))  # (G, 1)
    return centred.masked_fill(flat, 0.0).reshape(-1)


# ----------------------------------------------------------------------------- CHORD


def mu_schedule(step: int, warmup_steps: int, decay_steps: int, peak: float,
                valley: float) -> float:
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


def chord_loss(policy_loss_value: torch.Tensor, sft_loss_value: torch.Tensor,
               mu: float) -> torch.Tensor:
    """CHORD (Zhang et al. 2025): (1 - mu) * policy loss + mu * SFT loss (a scalar, not a pair:
    both parts already came with their own metrics)."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"chord_loss: mu must be in [0, 1], got {mu}")
    return (1 - mu) * policy_loss_value + mu * sft_loss_value
