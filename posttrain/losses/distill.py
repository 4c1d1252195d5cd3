"""On-policy distillation: the per-token advantage of the student's own samples from a teacher.

    .venv/bin/python -m pytest tests/test_distill.py -q

The student samples; the teacher scores exactly those tokens. For a sampled token y_t the
advantage is log p_teacher(y_t) - log p_student(y_t), detached: the negative of the per-token
reverse-KL estimate (the sample's log-ratio under the student's own distribution), so the
policy gradient with this advantage descends KL(student || teacher) on the student's own
prefixes (Agarwal et al. 2024 GKD with lambda 1; Thinking Machines' on-policy distillation
write-up, 2025). A verifiable reward can be added per sequence: A_t += reward_weight * A_seq,
with A_seq the group advantage of the reward (losses.group_advantages).
The loss is then losses.policy_loss with these (B, T) advantages.
Conventions: posttrain/losses/__init__.py.
"""

from __future__ import annotations

import torch

from posttrain.losses.common import Metrics, check_tokens, masked_mean


def distill_advantages(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    sequence_advantages: torch.Tensor | None = None,
    reward_weight: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token advantages (B, T), detached, 0 off the mask:
    A_t = log p_teacher(y_t) - log p_student(y_t) + reward_weight * sequence_advantages[b].

    teacher_logps, student_logps: (B, T) log-probs of the sampled tokens; sequence_advantages
    (B,) is needed when reward_weight != 0. Example: teacher [-1, -2], student [-1.5, -1] ->
    A = [0.5, -1]; with sequence advantage 2 and weight 0.25: [1.0, -0.5].
    Metrics: distill/reverse_kl, the token mean of log p_student - log p_teacher (an unbiased
    estimate of the per-token KL(student || teacher) on the student's samples; it can be < 0
    for a batch), and distill/advantage, the token mean of A.
    """
    m = check_tokens("distill_advantages", student_logps, mask)
    if teacher_logps.shape != student_logps.shape:
        raise ValueError(
            f"distill_advantages: teacher and student log-probs must have one shape, got "
            f"{tuple(teacher_logps.shape)} and {tuple(student_logps.shape)}"
        )
    gap = teacher_logps.detach().float() - student_logps.detach().float()  # (B, T)
    gap = gap.masked_fill(~m, 0.0)
    adv = gap
    if reward_weight:
        if sequence_advantages is None or sequence_advantages.shape != gap.shape[:1]:
            raise ValueError(
                "distill_advantages: reward_weight != 0 needs sequence_advantages (B,) = "
                f"{tuple(gap.shape[:1])}"
            )
        seq = sequence_advantages.detach().float().to(gap.device)  # (B,)
        adv = (gap + reward_weight * seq.unsqueeze(-1)).masked_fill(~m, 0.0)  # (B, T)
    metrics: Metrics = {
        "distill/reverse_kl": masked_mean(-gap, m),
        "distill/advantage": masked_mean(adv, m),
    }
    return adv, metrics
