"""Every loss against numbers worked out by hand, gradients against autograd of the formula
written out here, and the invariances that silently break training (padding, micro-batches).

Run: .venv/bin/python -m pytest tests/test_losses.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain import losses as L

LN2 = math.log(2)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- token_logps


def test_token_logps_matches_cross_entropy_values_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)  # (B, T, V)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # ignored positions come back as 0
    got = L.token_logps(logits, labels)  # (B, T)
    want = -F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # 0 at -100 too
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    assert_close(got, want)
    assert (got[1, 3:] == 0).all()
    assert_close(grad_of(got.sum(), logits), grad_of(want.sum(), logits))


def test_token_logps_bf16_logits_give_float32_close_to_float32_path():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 50).to(torch.bfloat16)
    labels = torch.randint(0, 50, (3, 4))
    got = L.token_logps(logits, labels)
    want = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    assert got.dtype == torch.float32
    assert_close(got, want)  # bf16 inputs upcast exactly, so float32 tolerances hold


def test_token_logps_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"logits \(B, T, V\)"):
        L.token_logps(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long))


# ----------------------------------------------------------------------------- SFT family

# Two sequences: p = [.5, .25 | pad] and [.125 | pad, pad]; -log p = ln2 * [1, 2] and [3].
P = torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.3, 0.7]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def sft_inputs():
    return P.log().clone().requires_grad_(True), MASK


@pytest.mark.parametrize(
    "aggregation, want",
    [
        ("token_mean", 2 * LN2),  # ln2 (1 + 2 + 3) / 3 tokens
        ("sequence_mean", 2.25 * LN2),  # mean(ln2 (1+2)/2, ln2 * 3) = (1.5 + 3) / 2 ln2
        ("sum", 6 * LN2),
    ],
)
def test_sft_aggregations_hand_worked(aggregation, want):
    logps, mask = sft_inputs()
    loss, metrics = L.sft(logps, mask, aggregation=aggregation)
    assert_close(loss, torch.tensor(want))
    assert_close(metrics["nll"], torch.tensor(2 * LN2))  # always the token mean
    assert_close(metrics["token_prob"], torch.tensor((0.5 + 0.25 + 0.125) / 3))
    assert metrics["tokens"].item() == 3 and not metrics["nll"].requires_grad


def test_sft_gradient_is_minus_one_over_token_count_and_zero_on_padding():
    logps, mask = sft_inputs()
    loss, _ = L.sft(logps, mask)
    assert_close(grad_of(loss, logps), -mask.float() / 3)


def test_dft_value_and_gradient():
    """DFT: per token -sg(p) log p. Value ln2 (.5*1 + .25*2 + .125*3) / 3 = 1.375 ln2 / 3;
    gradient -p / 3 (the weight is detached, so not -(p + p log p))."""
    logps, mask = sft_inputs()
    loss, metrics = L.dft(logps, mask)
    assert_close(loss, torch.tensor(1.375 * LN2 / 3))
    assert_close(grad_of(loss, logps), -P * mask / 3)
    assert_close(metrics["weight"], torch.tensor((0.5 + 0.25 + 0.125) / 3))


def test_sft_phi_value_and_gradient():
    """phi weights p(1-p) = .25, .1875, .109375; value ln2 (.25 + .375 + .328125) / 3."""
    logps, mask = sft_inputs()
    loss, _ = L.sft_phi(logps, mask)
    assert_close(loss, torch.tensor(0.953125 * LN2 / 3))
    assert_close(grad_of(loss, logps), -P * (1 - P) * mask / 3)


def _per_token_curve(fn, grid):
    one = torch.ones(1, 1)
    return torch.stack([fn(torch.tensor([[math.log(p)]]), one)[0] for p in grid])


def test_dft_per_token_loss_peaks_at_one_over_e():
    """d/dp (-p ln p) = -(ln p + 1) = 0 at p = 1/e, where the value is 1/e."""
    grid = [i / 1000 for i in range(1, 1000)]
    curve = _per_token_curve(L.dft, grid)
    assert abs(grid[int(curve.argmax())] - 1 / math.e) < 0.01
    assert_close(curve.max(), torch.tensor(1 / math.e), atol=1e-5, rtol=0)


def test_sft_phi_per_token_loss_peaks_near_0_236():
    """d/dp (-p(1-p) ln p) = -(1-2p) ln p - (1-p) = 0 near p = 0.236 (solved on the grid)."""
    grid = [i / 1000 for i in range(1, 1000)]
    curve = _per_token_curve(L.sft_phi, grid)
    assert abs(grid[int(curve.argmax())] - 0.236) < 0.01


@pytest.mark.parametrize("fn", [L.sft, L.dft, L.sft_phi])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_mean_loss_and_gradient_ignore_padding_amount_and_side(fn, side):
    """Extra padding (holding garbage, even -inf) changes neither the loss nor the gradient of
    the real tokens."""
    logps, mask = sft_inputs()
    base_loss, _ = fn(logps, mask)
    base_grad = grad_of(base_loss, logps)
    real = [logps.detach()[0, :2], logps.detach()[1, :1]]
    width = 7
    rows, masks = [], []
    for r in real:
        pad = torch.tensor([-1e4, float("-inf"), 3.0, -7.0, 0.0, -2.0, 5.0])[: width - len(r)]
        rows.append(torch.cat([r, pad]) if side == "right" else torch.cat([pad, r]))
        m = torch.cat([torch.ones(len(r)), torch.zeros(width - len(r))])
        masks.append(m if side == "right" else m.flip(0))
    padded = torch.stack(rows).requires_grad_(True)  # (2, 7)
    pmask = torch.stack(masks)
    loss, _ = fn(padded, pmask)
    assert_close(loss, base_loss)
    g = grad_of(loss, padded)
    assert torch.isfinite(g).all() and (g[pmask == 0] == 0).all()
    assert_close(g[pmask == 1], base_grad[mask == 1])


def test_sft_num_items_in_batch_sums_over_micro_batches():
    """token_mean with num_items_in_batch = 3 over the two sequences split in two: (3 ln2 +
    3 ln2) / 3 = 2 ln2, the full-batch token mean."""
    logps, mask = sft_inputs()
    parts = [L.sft(logps[i : i + 1], mask[i : i + 1], num_items_in_batch=3)[0] for i in range(2)]
    assert_close(parts[0] + parts[1], L.sft(logps, mask)[0])
    with pytest.raises(ValueError, match="only applies to aggregation='token_mean'"):
        L.sft(logps, mask, aggregation="sum", num_items_in_batch=3)


def test_sft_bad_arguments():
    logps, mask = sft_inputs()
    with pytest.raises(ValueError, match="aggregation must be"):
        L.sft(logps, mask, aggregation="mean")
    with pytest.raises(ValueError, match="one shape"):
        L.dft(logps, mask[:, :2])


# ----------------------------------------------------------------------------------- DPO

# beta 0.1, pc -10, rc -12, pr -15, rr -14: chosen ratio 2, rejected ratio -1, h = 3.
WORKED = dict(
    policy_chosen_logps=t(-10.0),
    policy_rejected_logps=t(-15.0),
    ref_chosen_logps=t(-12.0),
    ref_rejected_logps=t(-14.0),
    beta=0.1,
)


@pytest.mark.parametrize(
    "kwargs, want",
    [
        (dict(loss_type="sigmoid"), 0.554355),  # softplus(-0.3) = ln(1 + e^-0.3)
        (dict(loss_type="sigmoid", label_smoothing=0.1), 0.584355),  # .9*.554355 + .1*.854355
        (dict(loss_type="robust", label_smoothing=0.1), 0.516855),  # (.9*.554355 - .1*.854355)/.8
        (dict(loss_type="ipo", chosen_lengths=t(4), rejected_lengths=t(2)), 16.0),  # (2/4+1/2-5)^2
        (dict(loss_type="bdpo", bdpo_lambda=0.5), 0.581216),  # r = ln(.5/e + .5) = -0.379885
    ],
)
def test_dpo_hand_worked_values(kwargs, want):
    loss, _ = L.dpo(**WORKED, **kwargs)
    assert_close(loss, torch.tensor(want), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="sigmoid"),
        dict(loss_type="sigmoid", label_smoothing=0.3),
        dict(loss_type="robust", label_smoothing=0.3),
        dict(loss_type="bdpo", bdpo_lambda=0.3),
    ],
)
def test_dpo_at_zero_margin_is_ln2(kwargs):
    """h = 0: logsig(0) = -ln 2 in every term, and robust's (1 - 2ls) / (1 - 2ls) = 1."""
    x = t(-5.0, -7.0)
    loss, metrics = L.dpo(x, x + 1, x, x + 1, 0.5, **kwargs)  # pc = rc, pr = rr
    assert_close(loss, torch.tensor(LN2))
    if kwargs == dict(loss_type="sigmoid"):
        assert loss.item() == torch.tensor(LN2).item()  # softplus(0) rounds to float32 ln 2
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not counted as correct


def _dpo_inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    pc = (-20 * torch.rand(n, generator=g)).requires_grad_(True)
    pr = (-20 * torch.rand(n, generator=g)).requires_grad_(True)
    rc, rr = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
    return pc, pr, rc, rr


def test_dpo_sigmoid_gradient_closed_form():
    """dL/dpc = -beta sigmoid(-beta h) / B and dL/dpr = +beta sigmoid(-beta h) / B."""
    pc, pr, rc, rr = _dpo_inputs()
    beta = 0.3
    loss, _ = L.dpo(pc, pr, rc, rr, beta)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    h = ((pc - rc) - (pr - rr)).detach()
    assert_close(gc, -beta * torch.sigmoid(-beta * h) / 4)
    assert_close(gr, beta * torch.sigmoid(-beta * h) / 4)


def _written_out(pc, pr, rc, rr, beta, loss_type, ls, lam, lc, lr):
    """The formulas again, naively, in float64 (log of sigmoid, log of a mixture)."""
    pc, pr, rc, rr = (x.double() for x in (pc, pr, rc, rr))
    if loss_type == "ipo":
        return ((((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)) ** 2).mean()
    if loss_type == "bdpo":
        rej = torch.log(lam * torch.exp(pr) + (1 - lam) * torch.exp(rr)) - rr
    else:
        rej = pr - rr
    z = beta * ((pc - rc) - rej)
    clean, flipped = -torch.log(torch.sigmoid(z)), -torch.log(torch.sigmoid(-z))
    if loss_type == "robust":
        return (((1 - ls) * clean - ls * flipped) / (1 - 2 * ls)).mean()
    return ((1 - ls) * clean + ls * flipped).mean()


@pytest.mark.parametrize(
    "loss_type, ls",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.2),
        ("robust", 0.2),
        ("ipo", 0.0),
        ("bdpo", 0.0),
        ("bdpo", 0.1),
    ],
)
def test_dpo_value_and_gradient_match_formula_written_out(loss_type, ls):
    pc, pr, rc, rr = _dpo_inputs(seed=3)
    lc, lr = t(5, 9, 1, 12), t(3, 7, 4, 2)
    beta, lam = 0.2, 0.4
    loss, _ = L.dpo(
        pc,
        pr,
        rc,
        rr,
        beta,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_lengths=lc,
        rejected_lengths=lr,
        bdpo_lambda=lam,
    )
    want = _written_out(pc, pr, rc, rr, beta, loss_type, ls, lam, lc.double(), lr.double())
    assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(torch.autograd.grad(loss, (pc, pr)), torch.autograd.grad(want, (pc, pr))):
        assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-7)


def test_robust_at_zero_smoothing_is_sigmoid_and_rejects_half():
    pc, pr, rc, rr = _dpo_inputs(seed=5)
    assert_close(L.dpo(pc, pr, rc, rr, 0.1, loss_type="robust")[0], L.dpo(pc, pr, rc, rr, 0.1)[0])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) for robust"):
        L.dpo(pc, pr, rc, rr, 0.1, loss_type="robust", label_smoothing=0.5)


def test_bdpo_lambda_one_is_dpo_and_lambda_zero_drops_the_rejected_term():
    """lam = 1: log_mix = pr, so the rejected ratio is pr - rr: plain DPO. lam = 0: log_mix = rr,
    the rejected ratio is 0, the loss is softplus(-beta (pc - rc)) and pr gets no gradient."""
    pc, pr, rc, rr = _dpo_inputs(seed=7)
    dpo_loss, _ = L.dpo(pc, pr, rc, rr, 0.1)
    assert_close(L.dpo(pc, pr, rc, rr, 0.1, loss_type="bdpo", bdpo_lambda=1.0)[0], dpo_loss)
    loss0, _ = L.dpo(pc, pr, rc, rr, 0.1, loss_type="bdpo", bdpo_lambda=0.0)
    assert_close(loss0, F.softplus(-0.1 * (pc - rc)).mean())
    (g,) = torch.autograd.grad(loss0, pr, allow_unused=True, materialize_grads=True)
    assert (g == 0).all()
    tiny, _ = L.dpo(pc, pr, rc, rr, 0.1, loss_type="bdpo", bdpo_lambda=1e-7)
    assert_close(tiny, loss0)
    with pytest.raises(ValueError, match="bdpo_lambda"):
        L.dpo(pc, pr, rc, rr, 0.1, loss_type="bdpo", bdpo_lambda=1.5)


def test_bdpo_bounds_the_reward_from_pushing_rejected_down():
    """pr -> -inf: DPO's loss -> 0, but BDPO's rejected ratio -> ln(1 - lam) = ln 0.5, so the loss
    stays at softplus(-beta (2 + ln 2)) = ln(1 + e^-0.269315) = 0.567529 (chosen ratio 2)."""
    kw = dict(
        policy_chosen_logps=t(-10.0),
        ref_chosen_logps=t(-12.0),
        ref_rejected_logps=t(-14.0),
        beta=0.1,
    )
    far = t(-1e4)
    assert L.dpo(policy_rejected_logps=far, **kw)[0].item() < 1e-30
    loss, _ = L.dpo(policy_rejected_logps=far, loss_type="bdpo", bdpo_lambda=0.5, **kw)
    assert_close(loss, torch.tensor(0.567529), atol=1e-6, rtol=0)


def test_dpo_metrics_exact_names_and_values():
    """beta 0.5; chosen ratios [2, 0, 1], rejected ratios [-2, 0, 3]: rewards [1, 0, .5] and
    [-1, 0, 1.5]; margins mean (2 + 0 - 1) / 3; accuracy 1/3 (the tie does not count)."""
    pc, rc = t(-10, -4, -6), t(-12, -4, -7)
    pr, rr = t(-20, -8, -5), t(-18, -8, -8)
    _, m = L.dpo(pc, pr, rc, rr, 0.5)
    want = {
        "rewards/chosen": 0.5,
        "rewards/rejected": 0.5 / 3,
        "rewards/margins": 1 / 3,
        "rewards/accuracies": 1 / 3,
        "logps/chosen": -20 / 3,
        "logps/rejected": -11.0,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        assert_close(m[k], torch.tensor(v), msg=k)
        assert m[k].dim() == 0 and not m[k].requires_grad


def test_rpo_adds_weighted_chosen_nll():
    pc, pr, rc, rr = _dpo_inputs(seed=9, n=2)
    base, _ = L.dpo(pc, pr, rc, rr, 0.1)
    nll = t(1.5, 2.5)  # caller's length-normalised NLL of each chosen response
    loss, m = L.dpo(pc, pr, rc, rr, 0.1, nll_weight=0.2, chosen_nll=nll)
    assert_close(loss, base + 0.2 * 2.0)
    assert_close(m["nll"], torch.tensor(2.0))
    with pytest.raises(ValueError, match="needs chosen_nll"):
        L.dpo(pc, pr, rc, rr, 0.1, nll_weight=0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ipo"), "needs chosen_lengths and rejected_lengths"),
        (dict(loss_type="ipo", label_smoothing=0.1), "no meaning for ipo"),
        (dict(loss_type="hinge"), "loss_type must be one of"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(label_smoothing=0.6), r"label_smoothing must be in \[0, 0.5\] for sigmoid"),
    ],
)
def test_dpo_bad_arguments(kwargs, message):
    args = {**WORKED, **kwargs}
    with pytest.raises(ValueError, match=message):
        L.dpo(**args)
    with pytest.raises(ValueError, match="four"):
        L.dpo(t(1, 2), t(1), t(1), t(1), 0.1)


# ----------------------------------------------------------------------------- online RL

# 4 completions of one prompt, lengths 3, 1, 2, 2 (8 tokens), T = 4.
LENGTHS = [3, 1, 2, 2]
RL_MASK = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])  # (4, 4)
ADV = t(1.0, -1.0, 0.5, -0.5)  # sums to 0 like any centred group


def rl_logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (-3 * torch.rand(4, 4, generator=g)).requires_grad_(True)


def test_grpo_on_policy_loss_is_zero_and_gradient_is_minus_a_over_length_over_b():
    """ratio 1 everywhere: each sequence's token mean is -A_i, so the loss is -mean(A) = 0; the
    gradient on token t of sequence i is -A_i / |o_i| / B."""
    logps = rl_logps()
    loss, m = L.policy_loss(logps, logps.detach(), ADV, RL_MASK)
    assert_close(loss, torch.tensor(0.0))
    want = -ADV[:, None] / t(*LENGTHS)[:, None] / 4 * RL_MASK
    assert_close(grad_of(loss, logps), want)
    assert m["ratio/mean"].item() == 1.0 and m["clip_ratio/region"].item() == 0.0
    assert "kl" not in m
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("aggregation", ["token_mean", "dapo"])
def test_token_mean_dapo_on_policy_value(aggregation):
    """-sum(|o_i| A_i) / sum |o_i| = -(3 - 1 + 1 - 1) / 8 = -0.25."""
    logps = rl_logps()
    loss, _ = L.policy_loss(logps, None, ADV, RL_MASK, aggregation=aggregation)
    assert_close(loss, torch.tensor(-0.25))


def test_dr_grpo_divides_by_batch_times_max_length():
    """-sum(|o_i| A_i) / (B L) = -2 / (4 * 10) = -0.05 with L = 10; default L = T = 4: -0.125."""
    logps = rl_logps()
    loss, _ = L.policy_loss(
        logps, None, ADV, RL_MASK, aggregation="dr_grpo", max_completion_length=10
    )
    assert_close(loss, torch.tensor(-0.05))
    loss, _ = L.policy_loss(logps, None, ADV, RL_MASK, aggregation="dr_grpo")
    assert_close(loss, torch.tensor(-0.125))


def test_group_advantages_hand_worked():
    """Group 1 [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3) = .577350 -> +-.5 / .577450.
    Group 2 [1, 1, 1, 1]: 0. Batch std of all 8 (mean .75): sqrt(1.5 / 7) = .462910."""
    r = t(1, 0, 0, 1, 1, 1, 1, 1)
    sign = t(1, -1, -1, 1, 0, 0, 0, 0)
    assert_close(L.group_advantages(r, 4), sign * 0.5 / (math.sqrt(1 / 3) + 1e-4))
    assert_close(L.group_advantages(r, 4, scale="batch"), sign * 0.5 / (math.sqrt(1.5 / 7) + 1e-4))
    assert_close(L.group_advantages(r, 4, scale="none"), sign * 0.5)


def test_all_equal_group_has_exactly_zero_advantage():
    """0.1 is not representable, so mean(0.1 x 3) may differ from 0.1 by an ulp; divided by
    (std ~ 1e-9) + 1e-4 that residue would not be 0. The function pins it to exactly 0."""
    r = t(0.1, 0.1, 0.1, 0.7, 0.7, 0.7)
    for scale in ("group", "batch", "none"):
        assert (L.group_advantages(r, 3, scale=scale) == 0).all()
    with pytest.raises(ValueError, match="multiple of group_size"):
        L.group_advantages(r, 4)
    with pytest.raises(ValueError, match="scale must be"):
        L.group_advantages(r, 3, scale="std")


@pytest.mark.parametrize(
    "advantage, ratio, clip_high, active",
    [
        (1.0, 1.2 + 1e-3, None, True),  # A > 0 past 1 + eps: clipped, no gradient
        (1.0, 1.2 - 1e-3, None, False),
        (1.0, 0.5, None, False),  # A > 0 below 1 - eps: min keeps r A, gradient flows
        (-1.0, 0.8 - 1e-3, None, True),  # A < 0 below 1 - eps: clipped
        (-1.0, 0.8 + 1e-3, None, False),
        (-1.0, 1.5, None, False),  # A < 0 above 1 + eps: pessimistic r A kept
        (1.0, 1.25, 0.28, False),  # DAPO clip-higher: 1.25 < 1.28 is inside
        (1.0, 1.29, 0.28, True),
    ],
)
def test_clip_engages_exactly_past_the_boundary(advantage, ratio, clip_high, active):
    """Per token -min(r A, clip(r) A); d/dlogp = -r A when unclipped, 0 when clipped."""
    logps = torch.tensor([[-1.0]], requires_grad=True)
    old = logps.detach() - math.log(ratio)
    loss, m = L.policy_loss(logps, old, t(advantage), torch.ones(1, 1), clip_high=clip_high)
    g = grad_of(loss, logps)
    if active:
        assert g.item() == 0.0
        bound = 1 + (clip_high or 0.2) if advantage > 0 else 0.8
        assert_close(loss, torch.tensor(-bound * advantage))
        assert m["clip_ratio/region"].item() == 1.0
        assert m["clip_ratio/high" if advantage > 0 else "clip_ratio/low"].item() == 1.0
    else:
        assert_close(g, torch.tensor([[-ratio * advantage]]))
        assert m["clip_ratio/region"].item() == 0.0


def test_clip_metrics_are_token_fractions():
    """Tokens (r, A): (1.5, +) high; (0.5, -) low; (1.5, -) none; (0.5, +) none; padding ignored.
    low = 1/4, high = 1/4, region = 2/4, ratio mean = (1.5 + .5 + 1.5 + .5) / 4 = 1."""
    logps = torch.zeros(4, 2)
    old = -torch.log(t(1.5, 0.5, 1.5, 0.5))[:, None].repeat(1, 2)
    mask = torch.tensor([[1.0, 0.0]] * 4)
    _, m = L.policy_loss(logps, old, t(1, -1, -1, 1), mask)
    assert_close(m["clip_ratio/low"], torch.tensor(0.25))
    assert_close(m["clip_ratio/high"], torch.tensor(0.25))
    assert_close(m["clip_ratio/region"], torch.tensor(0.5))
    assert_close(m["ratio/mean"], torch.tensor(1.0))


def test_sequence_ratio_value_and_gradient():
    """GSPO: seq 1 log-ratios [.1, .3] -> s = e^.2 = 1.221403; seq 2 [-.2] -> s = e^-.2 = .818731.
    A = [1, -1], grpo: loss = mean(-1.221403, .818731) = -0.201336. Gradient per token
    -A_i s_i / |o_i| / B: seq 1 -.305351 each, seq 2 +.409365; the same as autograd of
    -mean_i(A_i exp(masked mean log-ratio)) written at sequence level."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], requires_grad=True)
    old = logps.detach() - torch.tensor([[0.1, 0.3], [-0.2, 123.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = t(1.0, -1.0)
    loss, m = L.policy_loss(
        logps, old, adv, mask, ratio_level="sequence", clip_low=0.9, clip_high=10.0
    )
    assert_close(loss, torch.tensor(-0.201336), atol=1e-6, rtol=0)
    assert_close(m["ratio/mean"], torch.tensor((2 * math.exp(0.2) + math.exp(-0.2)) / 3))
    g = grad_of(loss, logps)
    assert_close(g, torch.tensor([[-0.305351, -0.305351], [0.409365, 0.0]]), atol=1e-6, rtol=0)
    s = torch.exp(((logps - old) * mask).sum(-1) / mask.sum(-1))  # (B,)
    assert_close(g, grad_of(-(adv * s).mean(), logps))


def test_k3_kl_zero_at_reference_positive_elsewhere_hand_worked():
    """logp -1, ref -2: d = -1, k3 = e^-1 + 1 - 1 = .367879; logp -2, ref -1: d = 1,
    k3 = e - 2 = .718282; mean .543081. On-policy with A = 0 the loss is kl_beta * that mean,
    the gradient kl_beta (1 - e^d) / 2: .1 (1 - .367879) / 2 = .031606; .1 (1 - e) / 2 = -.085914.
    """
    logps = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
    ref = torch.tensor([[-2.0], [-1.0]])
    loss, m = L.policy_loss(logps, None, t(0.0, 0.0), torch.ones(2, 1), ref_logps=ref, kl_beta=0.1)
    assert_close(m["kl"], torch.tensor(0.543081), atol=1e-6, rtol=0)
    assert_close(loss, torch.tensor(0.0543081), atol=1e-7, rtol=0)
    assert_close(grad_of(loss, logps), torch.tensor([[0.031606], [-0.085914]]), atol=1e-6, rtol=0)
    _, m0 = L.policy_loss(logps, None, t(0.0, 0.0), torch.ones(2, 1), ref_logps=logps.detach())
    assert m0["kl"].item() == 0.0
    rand = rl_logps(1)
    _, mr = L.policy_loss(rand, None, ADV, RL_MASK, ref_logps=rl_logps(2).detach())
    assert mr["kl"].item() > 0
    with pytest.raises(ValueError, match="needs ref_logps"):
        L.policy_loss(logps, None, t(0.0, 0.0), torch.ones(2, 1), kl_beta=0.1)


def _off_policy_batch():
    logps = rl_logps(4)
    old = logps.detach() + 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    ref = logps.detach() - 0.2
    return logps, old, ref


@pytest.mark.parametrize("aggregation", ["token_mean", "dapo"])
@pytest.mark.parametrize("splits", [[2, 2], [1, 3]])
def test_micro_batch_losses_with_num_items_sum_to_the_full_batch(aggregation, splits):
    """With num_items_in_batch = 8 (all tokens), each micro-batch contributes its token sum / 8,
    so the parts add up to the full loss, and so do the gradients (accumulation invariance)."""
    logps, old, ref = _off_policy_batch()
    kw = dict(aggregation=aggregation, kl_beta=0.05, num_items_in_batch=8)
    full, _ = L.policy_loss(logps, old, ADV, RL_MASK, ref_logps=ref, **kw)
    full_grad = grad_of(full, logps)
    total, start = 0.0, 0
    for n in splits:
        sl = slice(start, start + n)
        part, _ = L.policy_loss(logps[sl], old[sl], ADV[sl], RL_MASK[sl], ref_logps=ref[sl], **kw)
        total, start = total + part, start + n
    assert_close(total, full)
    assert_close(grad_of(total, logps), full_grad)
    # Without the global count each part is a local mean and the sum is not the full loss.
    local = sum(
        L.policy_loss(
            logps[i : i + 2],
            old[i : i + 2],
            ADV[i : i + 2],
            RL_MASK[i : i + 2],
            aggregation=aggregation,
        )[0]
        for i in (0, 2)
    )
    assert (
        abs(
            local.item()
            - L.policy_loss(logps, old, ADV, RL_MASK, aggregation=aggregation)[0].item()
        )
        > 1e-3
    )


def test_dr_grpo_equal_micro_batches_average_to_the_full_batch():
    logps, old, _ = _off_policy_batch()
    full, _ = L.policy_loss(logps, old, ADV, RL_MASK, aggregation="dr_grpo")
    parts = [
        L.policy_loss(
            logps[i : i + 2],
            old[i : i + 2],
            ADV[i : i + 2],
            RL_MASK[i : i + 2],
            aggregation="dr_grpo",
        )[0]
        for i in (0, 2)
    ]
    assert_close((parts[0] + parts[1]) / 2, full)


@pytest.mark.parametrize("aggregation", ["grpo", "token_mean", "dapo", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_ignores_extra_padding(aggregation, ratio_level):
    """Three more padded columns holding garbage (and dr_grpo's length fixed at 4) change
    neither the loss nor the gradients of the real tokens."""
    logps, old, ref = _off_policy_batch()
    kw = dict(
        aggregation=aggregation, ratio_level=ratio_level, kl_beta=0.1, max_completion_length=4
    )
    base, _ = L.policy_loss(logps, old, ADV, RL_MASK, ref_logps=ref, **kw)
    base_grad = grad_of(base, logps)
    junk = torch.tensor([[50.0, float("-inf"), -1e4]]).repeat(4, 1)
    padded = torch.cat([logps.detach(), junk], 1).requires_grad_(True)  # (4, 7)
    pmask = torch.cat([RL_MASK, torch.zeros(4, 3)], 1)
    loss, _ = L.policy_loss(
        padded, torch.cat([old, -junk], 1), ADV, pmask, ref_logps=torch.cat([ref, junk], 1), **kw
    )
    assert_close(loss, base)
    g = grad_of(loss, padded)
    assert torch.isfinite(g).all()
    assert_close(g[:, :4], base_grad)


def test_policy_loss_bad_arguments():
    logps = rl_logps()
    with pytest.raises(ValueError, match="advantages must be"):  # neither (B,) nor (B, T)
        L.policy_loss(logps, None, torch.zeros(4, 3), RL_MASK)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        L.policy_loss(logps, None, ADV, RL_MASK, aggregation="mean")
    with pytest.raises(ValueError, match="ratio_level"):
        L.policy_loss(logps, None, ADV, RL_MASK, ratio_level="group")


def test_policy_losses_share_one_ending_hand_worked():
    """finish_policy_loss, the ending of policy_loss and cispo_loss: per-token losses [1, 1, 1]
    and [2, (9 masked)] with lengths 3 and 1; grpo (3/3 + 2/1) / 2 = 1.5. With a reference one
    nat above logp on every token, d = 1: k3 = e - 2 = 0.718282 per token, kl_beta 0.5 adds
    0.359141 to each token's loss: grpo 1.5 + 0.359141; the masked 9 never counts."""
    from posttrain.losses.policy_gradient import finish_policy_loss

    per_token = torch.tensor([[1.0, 1.0, 1.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logps = torch.full((2, 3), -2.0)
    loss, metrics = finish_policy_loss(per_token, logps, mask, aggregation="grpo")
    assert_close(loss, torch.tensor(1.5))
    assert metrics == {}
    loss, metrics = finish_policy_loss(
        per_token, logps, mask, aggregation="grpo", ref_logps=logps + 1.0, kl_beta=0.5
    )
    k3 = math.e - 2.0
    assert_close(loss, torch.tensor(1.5 + 0.5 * k3))
    assert_close(metrics["kl"], torch.tensor(k3))
    # both losses end in it: on-policy, A = 1, one token of logp -1 and KL to logp -1 + 1
    one = torch.tensor([[-1.0]], requires_grad=True)
    m, adv, ref = torch.ones(1, 1, dtype=torch.bool), torch.ones(1), torch.zeros(1, 1)
    from posttrain.losses.offpolicy import cispo_loss

    ppo, pm = L.policy_loss(one, None, adv, m, ref_logps=ref, kl_beta=0.5)
    cis, cm = cispo_loss(one, None, adv, m, aggregation="grpo", ref_logps=ref, kl_beta=0.5)
    assert_close(ppo, torch.tensor(-1.0 + 0.5 * k3))  # -r A with r = 1
    assert_close(cis, torch.tensor(1.0 + 0.5 * k3))  # -sg(r) A logp = 1
    assert_close(pm["kl"], cm["kl"])
    with pytest.raises(ValueError, match="cispo_loss: aggregation must be one of"):
        cispo_loss(one, None, adv, m, aggregation="mean")


# ---------------------------------------------------------------------------------- CHORD


@pytest.mark.parametrize(
    "step, want", [(0, 0.9), (50, 0.7755), (100, 0.475), (150, 0.1745), (200, 0.05), (1000, 0.05)]
)
def test_mu_schedule_table(step, want):
    """valley + (peak - valley)(1 + cos(pi step / 200)) / 2 with peak .9, valley .05."""
    assert abs(L.mu_schedule(step, 0, 200, 0.9, 0.05) - want) < 1e-4


def test_mu_schedule_warmup_ramp():
    """warmup 10: linear 0 -> .9 (step 5 -> .45); then the cosine starts at the peak."""
    assert L.mu_schedule(0, 10, 100, 0.9, 0.05) == 0.0
    assert abs(L.mu_schedule(5, 10, 100, 0.9, 0.05) - 0.45) < 1e-12
    assert abs(L.mu_schedule(10, 10, 100, 0.9, 0.05) - 0.9) < 1e-12
    assert abs(L.mu_schedule(110, 10, 100, 0.9, 0.05) - 0.05) < 1e-12


def test_chord_loss_mixes_and_checks_mu():
    assert_close(L.chord_loss(t(2.0), t(4.0), 0.25), t(2.5))  # .75 * 2 + .25 * 4
    with pytest.raises(ValueError, match="mu must be in"):
        L.chord_loss(t(2.0), t(4.0), 1.5)


def test_metrics_to_floats_converts_all_at_once():
    _, m = L.dpo(**WORKED)
    floats = L.metrics_to_floats(m)
    assert list(floats) == list(m) and all(isinstance(v, float) for v in floats.values())
    assert floats["rewards/chosen"] == pytest.approx(0.2)
    assert L.metrics_to_floats({}) == {}
