"""Statistics for evaluation: intervals, calibration error, paired tests. Pure functions.

Used by `posttrain eval` (accuracy with its interval, calibration error) and `posttrain compare`
(paired bootstrap interval on the difference, exact McNemar test). Tests: tests/test_stats.py.

Conventions: accuracies are fractions in [0, 1]; confidences and calibration error are percent
(0-100), as HLE reports them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from posttrain.records import VERDICTS

# ---------------------------------------------------------------------------- intervals


def wald_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """p ± z·sqrt(p(1-p)/n) with p = k/n, clipped to [0, 1]: the interval HLE reports.

    n = 0 returns (0.0, 1.0): with no items every accuracy is possible. Known weakness: at k = 0
    or k = n the width is 0 (e.g. 0/10 gives (0, 0)); `wilson_interval` does not have it.
    """
    _check_counts(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n); n=0: (0, 1)."""
    _check_counts(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def accuracy_summary(verdicts: list[str]) -> dict:
    """n, accuracy, Wald and Wilson 95% intervals, and the count of each verdict.

    Only "correct" counts as right: incorrect, no_answer, truncated and judge_error are all
    wrong, so a flaky judge or a model that runs out of tokens cannot raise the score (HLE also
    divides by every question, answered or not). Unknown verdict strings are an error.
    """
    counts = {v: 0 for v in VERDICTS}
    for v in verdicts:
        if v not in counts:
            raise ValueError(f"unknown verdict {v!r}; expected one of {', '.join(VERDICTS)}")
        counts[v] += 1
    n, k = len(verdicts), counts["correct"]
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "interval_95": list(wald_interval(k, n)),
        "wilson_95": list(wilson_interval(k, n)),
        "counts": counts,
    }


def avg_at_k(per_item_scores: list[list[float]], z: float = 1.96) -> dict:
    """avg@k: the mean over items of each item's mean score over its k samples, with an interval.

    The item is the unit: samples of one item are correlated (same question), so the interval is
    mean ± z·s/sqrt(m) where s is the sample standard deviation of the m per-item means (it
    already contains the within-item sampling noise of a finite k). Clipped to [0, 1] when the
    scores are 0/1. Items may have different k (reported as k_min, k_max). One item: no spread
    to estimate, so `interval_95` is None.
    """
    if not per_item_scores:
        raise ValueError("avg_at_k: no items")
    for i, scores in enumerate(per_item_scores):
        if len(scores) == 0:
            raise ValueError(f"avg_at_k: item {i} has no scores")
    means = np.array([float(np.mean(s)) for s in per_item_scores])  # (m,)
    m = len(means)
    avg = float(means.mean())
    interval = None
    if m > 1:
        half = z * float(means.std(ddof=1)) / math.sqrt(m)
        interval = [avg - half, avg + half]
        if all(0.0 <= x <= 1.0 for s in per_item_scores for x in s):
            interval = [max(0.0, interval[0]), min(1.0, interval[1])]
    ks = [len(s) for s in per_item_scores]
    return {"n_items": m, "k_min": min(ks), "k_max": max(ks), "avg": avg, "interval_95": interval}


# ---------------------------------------------------------------------------- calibration


def calibration_summary(
    confidences: list[float | None],
    correct: list[bool],
    bin_size: int = 100,
    missing_confidence: float | None = 100.0,
    drop_last_bin: bool = False,
    tie_order: str = "stable",
) -> dict:
    """HLE's RMS calibration error, in percent, with the bins it used.

    Method (HLE): sort items by stated confidence; cut them into consecutive bins of `bin_size`
    items, the remainder (N mod bin_size) merged into the last bin; then

        RMS = 100 · sqrt( Σ_b (|b| / N) · (mean confidence_b / 100 - accuracy_b)² ).

    Small sets (our rule, stated in the output as `n_bins`): bin_size stays fixed (100, as HLE)
    so numbers stay comparable across runs; with N < 2·bin_size the remainder merge leaves one
    bin and the value is just |mean confidence - accuracy| (overall over- or under-confidence,
    not a calibration curve). Smaller bins would add noise, not information: a bin's accuracy
    has variance p(1-p)/|b|, which inflates RMS (e.g. |b| = 10, p = 0.5 gives a floor near 16).

    Missing confidence: HLE's judge is told to write 100 when the response states none, so by
    default a missing value counts as 100; `missing_confidence=None` drops those items instead.

    `drop_last_bin=True` reproduces HLE's published script exactly: its loop stops one bin
    short, so the last bin (which holds the remainder) never contributes, while |b| / N still
    divides by all N; with N < 2·bin_size that script returns 0 (and with N < bin_size it fails).
    We include every bin by default; the option exists to match numbers computed with it.

    Ties in stated confidence (common: models state round numbers) decide which items cross a
    bin edge, so their order moves the result. `tie_order="stable"` (default) keeps the input
    order: the same on every machine. `tie_order="hle"` orders them as HLE's script does: it
    sorts the confidences divided by 100 (float64) with numpy's default `np.argsort`, which is
    not stable (introsort, and on CPUs with AVX-512 numpy 2 dispatches it to a SIMD sort), so
    the only faithful equivalent is that very call on the same float64 values. The tie order is
    then as machine-dependent as HLE's own numbers. `hle_compatible_calibration` sets both this
    and `drop_last_bin`.

    Returns {calibration_error (None when no item is usable), n, n_missing_confidence, n_bins,
    bin_size, bins: [{n, mean_confidence, accuracy}], missing_confidence, drop_last_bin}.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness values")
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    conf, right, n_missing = [], [], 0
    for c, ok in zip(confidences, correct):
        if c is None or (isinstance(c, float) and math.isnan(c)):
            n_missing += 1
            if missing_confidence is None:
                continue
            c = missing_confidence
        if not 0.0 <= float(c) <= 100.0:
            raise ValueError(f"confidence {c} outside 0-100")
        conf.append(float(c))
        right.append(1.0 if ok else 0.0)
    out = {
        "calibration_error": None,
        "n": len(conf),
        "n_missing_confidence": n_missing,
        "n_bins": 0,
        "bin_size": bin_size,
        "bins": [],
        "missing_confidence": missing_confidence,
        "drop_last_bin": drop_last_bin,
        "tie_order": tie_order,
    }
    n = len(conf)
    if n == 0:
        return out
    order = confidence_order(conf, tie_order)
    c = np.array(conf)[order] / 100.0  # (N,) as fractions
    r = np.array(right)[order]  # (N,)
    n_bins = max(1, n // bin_size)
    edges = [i * bin_size for i in range(n_bins)] + [n]  # remainder goes into the last bin
    total = 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        mean_c, acc = float(c[lo:hi].mean()), float(r[lo:hi].mean())
        out["bins"].append({"n": hi - lo, "mean_confidence": 100 * mean_c, "accuracy": acc})
        if drop_last_bin and b == n_bins - 1:
            continue
        total += (hi - lo) / n * (mean_c - acc) ** 2
    out["n_bins"] = n_bins
    out["calibration_error"] = 100.0 * math.sqrt(total)
    return out


TIE_ORDERS = ("stable", "hle")


def confidence_order(confidences: list[float], tie_order: str = "stable") -> np.ndarray:
    """Indices that sort `confidences` (percent) ascending; ties as `tie_order` says (above)."""
    values = np.asarray(confidences, dtype=np.float64)  # (N,)
    if tie_order == "hle":
        return np.argsort(values / 100)  # numpy's default kind on HLE's float64 fractions
    return np.argsort(values, kind="stable")


def hle_compatible_calibration(
    confidences: list[float | None], correct: list[bool], bin_size: int = 100
) -> dict:
    """`calibration_summary` as HLE's published script computes it: missing counts as 100,
    numpy's default (unstable) sort order for ties, the last bin dropped."""
    return calibration_summary(
        confidences,
        correct,
        bin_size,
        missing_confidence=100.0,
        drop_last_bin=True,
        tie_order="hle",
    )


def calibration_error(
    confidences: list[float | None],
    correct: list[bool],
    bin_size: int = 100,
    missing_confidence: float | None = 100.0,
) -> float | None:
    """RMS calibration error in percent (see `calibration_summary` for the rules); None if empty."""
    return calibration_summary(confidences, correct, bin_size, missing_confidence)[
        "calibration_error"
    ]


# ---------------------------------------------------------------------------- paired tests


def paired_bootstrap(
    a: list[float], b: list[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), lo, hi): percentile interval from resampling items with replacement.

    a[i] and b[i] are the two systems' scores on the same item i (0/1, or a per-item mean when
    each item was sampled k times); resampling item indices keeps each pair together, so the
    interval reflects the paired design. Deterministic for a given seed.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} scores in a but {len(b)} in b")
    if len(a) == 0:
        raise ValueError("paired_bootstrap: no items")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)  # (n,)
    n = len(d)
    rng = np.random.default_rng(seed)
    # Draw in chunks so n_boot x n indices never need more than ~16 MB at once.
    chunk = max(1, 2_000_000 // n)
    means = np.empty(n_boot)  # (n_boot,)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))  # (size, n)
        means[start : start + size] = d[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value on the discordant pairs.

    Under "no difference" each of the n = a_only + b_only discordant items is equally likely to
    favour either system, so the smaller count is Binomial(n, 1/2):
    p = min(1, 2 · Σ_{i <= min} C(n, i) / 2^n). n = 0 gives 1.0. Exact rational arithmetic.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only}, {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))
