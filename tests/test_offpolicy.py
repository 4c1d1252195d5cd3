"""Rollout correction (TIS / MIS, token and sequence level), the mismatch metrics and CISPO,
each against values worked out by hand; the log-ratio clamp of policy_loss.

Run: .venv/bin/python -m pytest tests/test_offpolicy.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain import losses as L
from posttrain.losses.offpolicy import cispo_loss, mismatch_metrics, rollout_weights

LN2, LN4 = math.log(2), math.log(4)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_mismatch_metrics_hand_worked():
    """d = [0, ln 2, -ln 4] (+ one padded token holding junk): k3 = e^d - 1 - d =
    [0, 1 - .693147, .25 - 1 + 1.386294] -> mean (0 + .306853 + .636294) / 3 = .314382;
    max |d| = ln 4; outside [.5, 2]: only r = 1/4 -> 1/3."""
    rollout = torch.tensor([[-1.0, -2.0, -1.0, 7.0]])
    trainer = rollout + torch.tensor([[0.0, LN2, -LN4, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    m = mismatch_metrics(trainer, rollout, mask)
    assert_close(m["mismatch/kl"], torch.tensor(0.314382), atol=1e-6, rtol=0)
    assert_close(m["mismatch/abs_logp_max"], torch.tensor(LN4))
    assert_close(m["mismatch/ratio_outside"], torch.tensor(1 / 3))
    same = mismatch_metrics(rollout, rollout, mask)
    assert same["mismatch/kl"].item() == 0.0 and same["mismatch/ratio_outside"].item() == 0.0


def test_truncated_and_masked_importance_weights_token_and_sequence():
    """Token log-ratios [ln 3, ln .25, 0] (and a padded token), cap 2, [.5, 2]:
    tis token [min(3, 2), .25, 1] = [2, .25, 1]; mis token [0 (3 > 2), 0 (.25 < .5), 1].
    Sequence: w = 3 * .25 * 1 = .75 on every token: tis [.75] * 3, mis [1] * 3 (inside).
    A second sequence with log-ratios [ln 3, ln 3]: w = 9 -> tis 2 on both, mis 0 on both."""
    rollout = torch.zeros(2, 4)
    trainer = torch.tensor(
        [[math.log(3), math.log(0.25), 0.0, 50.0], [math.log(3), math.log(3), 0.0, 0.0]]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kw = dict(cap=2.0, low=0.5, high=2.0)
    w, m = rollout_weights(trainer, rollout, mask, mode="tis", **kw)
    assert_close(w, torch.tensor([[2.0, 0.25, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0]]))
    assert_close(m["correction/capped"], torch.tensor(3 / 5))
    w, m = rollout_weights(trainer, rollout, mask, mode="mis", **kw)
    assert_close(w, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(m["correction/masked"], torch.tensor(4 / 5))
    w, _ = rollout_weights(trainer, rollout, mask, mode="tis", level="sequence", **kw)
    assert_close(w, torch.tensor([[0.75, 0.75, 0.75, 0.0], [2.0, 2.0, 0.0, 0.0]]))
    w, m = rollout_weights(trainer, rollout, mask, mode="mis", level="sequence", **kw)
    assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(m["correction/weight"], torch.tensor(3 / 5))
    w, _ = rollout_weights(trainer, rollout, mask, mode="none")
    assert_close(w, mask.float())
    with pytest.raises(ValueError, match="mode none"):
        rollout_weights(trainer, rollout, mask, mode="clip")


def test_correction_weights_scale_the_policy_loss_per_token():
    """On-policy, grpo, one sequence of 2 tokens, A = 1: per token -w A -> loss -(2 + .25) / 2
    = -1.125 with w = [2, .25]; the gradient is -w A / 2 per token."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w = torch.tensor([[2.0, 0.25]])
    loss, _ = L.policy_loss(logps, None, torch.tensor([1.0]), torch.ones(1, 2), is_weights=w)
    assert_close(loss, torch.tensor(-1.125))
    assert_close(grad_of(loss, logps), torch.tensor([[-1.0, -0.125]]))


def test_cispo_keeps_a_clipped_detached_weight_on_every_token():
    """One token, logp -1, A = 2. r = 1.5 -> w = min(1.5, 1.28) = 1.28: loss -1.28 * 2 * (-1)
    = 2.56, gradient -2.56 (PPO's clip would give 0 here). r = .5: no lower bound (clip_low 1),
    loss .5 * 2 = 1.0, gradient -1.0. A = -2, r = .5: loss -1, gradient +1."""
    for ratio, adv, loss_want, grad_want in [
        (1.5, 2.0, 2.56, -2.56),
        (0.5, 2.0, 1.0, -1.0),
        (0.5, -2.0, -1.0, 1.0),
    ]:
        logps = torch.tensor([[-1.0]], requires_grad=True)
        old = logps.detach() - math.log(ratio)
        loss, m = cispo_loss(
            logps, old, torch.tensor([adv]), torch.ones(1, 1), clip_low=1.0, clip_high=0.28
        )
        assert_close(loss, torch.tensor(loss_want))
        assert_close(grad_of(loss, logps), torch.tensor([[grad_want]]))
        assert m["clip_ratio/high"].item() == float(ratio > 1.28)
    ppo, _ = L.policy_loss(
        torch.tensor([[-1.0]], requires_grad=True),
        torch.tensor([[-1.0 - math.log(1.5)]]),
        torch.tensor([2.0]),
        torch.ones(1, 1),
        clip_high=0.28,
    )
    assert ppo.grad_fn is not None  # PPO: clipped, its gradient is exactly 0 (other tests)


def test_cispo_token_mean_over_padding_and_is_weight():
    """Two sequences (lengths 2, 1), on-policy (w = 1), A = [1, -1], token_mean over 3
    tokens: -(1 * -1 + 1 * -2) / 3 - (-1 * -0.5) / 3 = (3 - 0.5) / 3 = .833333; an IS weight
    .5 on the last token makes it (3 - .25) / 3 = .916667. Padding junk changes nothing."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, float("-inf")]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = cispo_loss(logps, None, torch.tensor([1.0, -1.0]), mask, aggregation="token_mean")
    assert_close(loss, torch.tensor(2.5 / 3))
    loss, _ = cispo_loss(
        logps,
        None,
        torch.tensor([1.0, -1.0]),
        mask,
        aggregation="token_mean",
        is_weights=torch.tensor([[1.0, 1.0], [0.5, 0.0]]),
    )
    assert_close(loss, torch.tensor(2.75 / 3))


def test_a_drifting_token_cannot_make_the_loss_infinite():
    """old = -1e4 on one token: log-ratio 1e4 - 1 would be e^9999 = inf; clamped at 20 it is
    e^20, clipped (A > 0), so the loss stays finite: grpo over one sequence of 2 tokens,
    A = 1: -(1.2 + 1) / 2 = -1.1. The k3 KL with ref = -1e4 stays finite as well."""
    logps = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1e4, -1.0]])
    loss, m = L.policy_loss(
        logps,
        old,
        torch.tensor([1.0]),
        torch.ones(1, 2),
        ref_logps=torch.tensor([[1e4, -1.0]]),
        kl_beta=0.0,
    )
    assert torch.isfinite(loss) and torch.isfinite(m["kl"]) and torch.isfinite(m["ratio/mean"])
    assert_close(loss, torch.tensor(-1.1))
    assert torch.isfinite(grad_of(loss, logps)).all()
