"""Preference losses over pairs: DPO and its variants (conservative, IPO, robust, BDPO, RPO).

    .venv/bin/python -m pytest tests/test_losses.py -q

Per-sequence summed log-probs (B,) of the policy and the reference in, `(loss, metrics)` out;
the conventions are in posttrain/losses/__init__.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from posttrain.losses.common import Metrics

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "bdpo")


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bdpo_lambda: float = 0.5,
    nll_weight: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
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
        raise ValueError(
            "dpo: expected four (B,) tensors of summed log-probs, got shapes "
            f"{[tuple(t.shape) for t in (pc, pr, rc, rr)]}"
        )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"dpo: beta must be > 0, got {beta}")
    # ls is an assumed label-flip rate: above 0.5 the preference itself would be reversed, and
    # robust's 1 / (1 - 2 ls) diverges at 0.5.
    ls_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and ls_ok):
        raise ValueError(
            f"dpo: label_smoothing must be in "
            f"{'[0, 0.5)' if loss_type == 'robust' else '[0, 0.5]'} for {loss_type}, "
            f"got {label_smoothing}"
        )
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("dpo: label_smoothing has no meaning for ipo; set it to 0")
    chosen_ratio = pc - rc.detach()  # (B,)
    rejected_ratio = pr - rr.detach()  # (B,)
    ls = label_smoothing

    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo: loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        h = chosen_ratio / chosen_lengths.to(pc.dtype).clamp(
            min=1
        ) - rejected_ratio / rejected_lengths.to(pc.dtype).clamp(min=1)
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
