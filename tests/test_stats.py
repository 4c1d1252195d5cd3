"""Statistics with hand-worked values. Run: .venv/bin/python -m pytest tests/test_stats.py -q"""

import math

import numpy as np
import pytest

from posttrain.stats import (
    accuracy_summary,
    avg_at_k,
    calibration_error,
    calibration_summary,
    mcnemar_exact,
    paired_bootstrap,
    wald_interval,
    wilson_interval,
)

# ---------------------------------------------------------------------------- intervals


def test_wald_interval_matches_hle_formula():
    """k=30, n=100: p=0.3, half = 1.96*sqrt(0.3*0.7/100) = 1.96*0.0458258 = 0.0898185."""
    lo, hi = wald_interval(30, 100)
    assert lo == pytest.approx(0.3 - 0.0898185, abs=1e-6)
    assert hi == pytest.approx(0.3 + 0.0898185, abs=1e-6)


def test_wald_interval_clips_and_degenerates():
    """k=1, n=2: p=0.5, half = 1.96*sqrt(0.25/2) = 0.69296 -> clipped to (0, 1).
    k=0: width 0, the known flaw of Wald. n=0: (0, 1), nothing is known."""
    assert wald_interval(1, 2) == (0.0, 1.0)
    assert wald_interval(0, 10) == (0.0, 0.0)
    assert wald_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wald_interval(5, 4)


def test_wilson_interval_hand_worked():
    """k=0, n=10, z=1.96: z²=3.8416; centre = (0 + 3.8416/20)/(1 + 0.38416) = 0.19208/1.38416
    = 0.138770; half = 1.96*sqrt(0 + 3.8416/400)/1.38416 = 1.96*0.098/1.38416 = 0.138770;
    so (0, 0.277540): unlike Wald, zero successes still give a non-zero upper bound."""
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.277540, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_symmetric_case():
    """k=50, n=100: centre = (0.5 + 0.019208)/1.038416 = 0.5; half = 1.96*sqrt(0.0025 +
    0.00009604)/1.038416 = 1.96*0.0509514/1.038416 = 0.0961704."""
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.5 - 0.0961704, abs=1e-6)
    assert hi == pytest.approx(0.5 + 0.0961704, abs=1e-6)


def test_accuracy_summary_counts_every_non_correct_as_wrong():
    """5 items, 2 correct: accuracy 0.4 even though one is judge_error and one truncated.
    Wald half = 1.96*sqrt(0.4*0.6/5) = 1.96*0.219089 = 0.429415 -> (0, 0.829415)."""
    s = accuracy_summary(["correct", "incorrect", "judge_error", "correct", "truncated"])
    assert s["n"] == 5 and s["correct"] == 2
    assert s["accuracy"] == pytest.approx(0.4)
    assert s["interval_95"] == pytest.approx([0.0, 0.829415], abs=1e-6)
    assert s["counts"] == {
        "correct": 2,
        "incorrect": 1,
        "no_answer": 0,
        "truncated": 1,
        "judge_error": 1,
    }
    assert s["wilson_95"][0] > 0.0


def test_accuracy_summary_rejects_unknown_verdict_and_handles_empty():
    with pytest.raises(ValueError, match="Correct"):
        accuracy_summary(["Correct"])
    s = accuracy_summary([])
    assert s["n"] == 0 and s["accuracy"] is None and s["interval_95"] == [0.0, 1.0]


def test_avg_at_k_items_are_the_unit():
    """Items [1,1,0,0] -> 0.5, [1,1,1,1] -> 1.0, [0,0,0,0] -> 0.0: avg = 0.5.
    Item means (0.5, 1, 0): sample sd = sqrt(((0)² + 0.5² + 0.5²)/2) = 0.5;
    half = 1.96*0.5/sqrt(3) = 0.565803 -> (0, 1) after clipping at 0 and 1."""
    s = avg_at_k([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert s["avg"] == pytest.approx(0.5)
    assert s["n_items"] == 3 and s["k_min"] == s["k_max"] == 4
    assert s["interval_95"] == pytest.approx([0.0, 1.0])
    # Four items with means 0.5, 0.5, 0.75, 0.25: avg 0.5, sd = sqrt((0+0+1/16+1/16)/3)
    # = 0.204124, half = 1.96*0.204124/2 = 0.200041.
    s = avg_at_k([[1, 0], [0, 1], [1, 1, 1, 0], [0, 0, 0, 1]])
    assert s["interval_95"] == pytest.approx([0.5 - 0.200041, 0.5 + 0.200041], abs=1e-6)
    assert (s["k_min"], s["k_max"]) == (2, 4)
    assert avg_at_k([[1, 0]])["interval_95"] is None
    with pytest.raises(ValueError):
        avg_at_k([[1], []])


# ---------------------------------------------------------------------------- calibration


def test_calibration_single_bin_is_overall_overconfidence():
    """4 items, bin_size 100 -> one bin. Mean confidence (90+90+50+70)/4 = 75%, accuracy 2/4 =
    50%: RMS = 100*sqrt(1 * (0.75 - 0.5)²) = 25."""
    s = calibration_summary([90, 90, 50, 70], [True, False, True, False])
    assert s["calibration_error"] == pytest.approx(25.0)
    assert s["n_bins"] == 1 and s["bins"][0]["n"] == 4


def test_calibration_two_bins_with_remainder_merged():
    """bin_size 2, N=5 -> bins of 2 and 3 (remainder merged into the last).
    Sorted by confidence: (10,F) (20,F) | (80,T) (90,T) (100,F).
    Bin 1: conf 0.15, acc 0 -> diff² = 0.0225, weight 2/5 -> 0.009.
    Bin 2: conf 0.9, acc 2/3 -> diff² = (0.233333)² = 0.0544444, weight 3/5 -> 0.0326667.
    RMS = 100*sqrt(0.0416667) = 20.41241."""
    conf = [90, 10, 100, 20, 80]
    correct = [True, False, False, False, True]
    s = calibration_summary(conf, correct, bin_size=2)
    assert [b["n"] for b in s["bins"]] == [2, 3]
    assert s["calibration_error"] == pytest.approx(20.41241, abs=1e-4)
    assert calibration_error(conf, correct, bin_size=2) == pytest.approx(20.41241, abs=1e-4)
    # HLE's script skips the last bin: only bin 1 counts -> 100*sqrt(0.009) = 9.486833.
    s_hle = calibration_summary(conf, correct, bin_size=2, drop_last_bin=True)
    assert s_hle["calibration_error"] == pytest.approx(9.486833, abs=1e-5)


def test_calibration_missing_confidence_counts_as_100_or_is_dropped():
    """[None (wrong), 50 (right)]: as 100 -> mean conf 0.75, acc 0.5 -> 25.
    Dropped -> one item, conf 0.5, acc 1 -> 50."""
    s = calibration_summary([None, 50], [False, True])
    assert s["calibration_error"] == pytest.approx(25.0) and s["n_missing_confidence"] == 1
    s = calibration_summary([None, 50], [False, True], missing_confidence=None)
    assert s["calibration_error"] == pytest.approx(50.0) and s["n"] == 1
    assert calibration_error([], []) is None
    with pytest.raises(ValueError):
        calibration_error([120], [True])


def test_calibration_perfectly_calibrated_is_zero():
    """Two bins of 4: confidence 25 with 1/4 right, confidence 75 with 3/4 right -> 0."""
    conf = [25] * 4 + [75] * 4
    correct = [True, False, False, False, True, True, True, False]
    assert calibration_error(conf, correct, bin_size=4) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- paired tests


def test_mcnemar_exact_hand_worked():
    """0 vs 6: 2*(1/64) = 0.03125. 1 vs 9: 2*(1+10)/1024 = 0.021484375.
    5 vs 5: 2*(1+10+45+120+210+252)/1024 = 1.246 -> capped at 1. 0 vs 0: 1."""
    assert mcnemar_exact(0, 6) == 0.03125
    assert mcnemar_exact(6, 0) == 0.03125
    assert mcnemar_exact(1, 9) == 0.021484375
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # 2 vs 8: 2*(1+10+45)/1024 = 112/1024 = 0.109375
    assert mcnemar_exact(2, 8) == 0.109375
    # Large n stays exact and finite: 400 vs 600 is far beyond 1e-9.
    assert 0 < mcnemar_exact(400, 600) < 1e-9


def test_paired_bootstrap_degenerate_and_two_point():
    """All differences equal -> the interval is that value. d = [1, 0]: the resampled mean is
    0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 and 97.5 percentiles are 0 and 1."""
    assert paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    diff, lo, hi = paired_bootstrap([0, 1], [1, 1], n_boot=4000)
    assert (diff, lo, hi) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_matches_normal_approximation():
    """100 items: 30 only B right (d=+1), 10 only A right (d=-1), 60 ties (d=0).
    mean d = 0.2; var d = E[d²] - 0.04 = 0.4 - 0.04 = 0.36; se = sqrt(0.36/100) = 0.06;
    normal 95% interval 0.2 ± 1.96*0.06 = (0.0824, 0.3176). The bootstrap agrees to ~0.01."""
    a = [0] * 30 + [1] * 10 + [1] * 30 + [0] * 30
    b = [1] * 30 + [0] * 10 + [1] * 30 + [0] * 30
    diff, lo, hi = paired_bootstrap(a, b, n_boot=10000, seed=0)
    assert diff == pytest.approx(0.2)
    assert lo == pytest.approx(0.0824, abs=0.012)
    assert hi == pytest.approx(0.3176, abs=0.012)
    # Same seed, same answer; another seed moves the bounds by at most a step or two of 0.01.
    assert paired_bootstrap(a, b, seed=0) == (diff, lo, hi)
    _, lo1, hi1 = paired_bootstrap(a, b, seed=1)
    assert abs(lo1 - lo) <= 0.02 and abs(hi1 - hi) <= 0.02


def test_paired_bootstrap_keeps_pairs_together():
    """B = A on every item: an unpaired bootstrap would give a wide interval around 0; the
    paired one resamples differences, all 0, so the interval is exactly (0, 0)."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, size=200).tolist()
    assert paired_bootstrap(a, list(a)) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1], [1, 0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_paired_bootstrap_accepts_per_item_means():
    """Per-item means (k=2 samples): d = [0.5, 0.5, 0.5] -> exactly 0.5 everywhere."""
    diff, lo, hi = paired_bootstrap([0.0, 0.5, 0.0], [0.5, 1.0, 0.5], n_boot=500)
    assert math.isclose(diff, 0.5) and math.isclose(lo, 0.5) and math.isclose(hi, 0.5)


def _hle_script_calibration(confidence_pct, correct, beta):
    """Reference, written from HLE's published calibration steps (run_judge_results.py): the
    confidences / 100 as float64, np.argsort with numpy's default kind, bins of `beta` with the
    remainder merged into the last, the loop stopping before the last bin; RMS over the rest."""
    conf = np.asarray(confidence_pct, dtype=np.float64) / 100
    right = np.asarray(correct, dtype=bool)
    order = np.argsort(conf)
    conf, right = conf[order], right[order]
    n = len(conf)
    starts = list(range(0, (n // beta) * beta, beta))
    ends = starts[1:] + [n]
    total = 0.0
    for lo, hi in list(zip(starts, ends))[:-1]:
        total += (hi - lo) / n * (conf[lo:hi].mean() - right[lo:hi].mean()) ** 2
    return 100 * np.sqrt(total)


def test_hle_compatible_calibration_orders_ties_as_hle_does():
    """Integer confidences tie a lot; which tied items cross a bin edge moves the figure.
    The HLE-compatible mode must equal HLE's own computation on 300 items with 3 distinct
    confidences (ties straddle every bin edge), and missing confidences count as 100."""
    from posttrain.stats import hle_compatible_calibration

    rng = np.random.default_rng(3)
    conf = [int(c) for c in rng.choice([30, 60, 90], size=300)]
    right = [bool(x) for x in rng.random(300) < 0.5]
    ours = hle_compatible_calibration(conf, right, bin_size=50)["calibration_error"]
    assert ours == pytest.approx(_hle_script_calibration(conf, right, 50), abs=1e-9)
    stable = calibration_summary(conf, right, bin_size=50, drop_last_bin=True)["calibration_error"]
    if not np.array_equal(
        np.argsort(np.array(conf) / 100), np.argsort(np.array(conf) / 100, kind="stable")
    ):
        # numpy's default sort did reorder ties here, and that moves the figure
        assert abs(ours - stable) > 1e-6
    with_missing = [None if i % 7 == 0 else c for i, c in enumerate(conf)]
    as_100 = [100 if c is None else c for c in with_missing]
    assert hle_compatible_calibration(with_missing, right, 50)[
        "calibration_error"
    ] == pytest.approx(_hle_script_calibration(as_100, right, 50), abs=1e-9)
