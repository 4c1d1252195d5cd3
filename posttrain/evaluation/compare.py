"""Paired comparison of two eval runs on the same items: difference, interval, exact test.

    posttrain compare runs/base_eval runs/dpo_eval            # table
    posttrain compare A B --json                              # machine-readable
    posttrain compare A B --intersect                         # compare only the shared items

Each folder holds `items.jsonl` (or `eval.jsonl`) from `posttrain eval`: rows with at least
`problem_id` and `verdict`, and `sample_index` when each problem was answered k > 1 times.
An item scores 1 when its verdict is "correct", else 0 (judge errors count as wrong).

With one row per item: the bootstrap resamples 0/1 pairs and McNemar counts the items only one
system got right. With k > 1 rows per item: the bootstrap runs on per-item mean correctness
(avg@k), and McNemar on per-item majority correctness (an item is "right" when more than half
of its samples are; a tie is not a majority), because McNemar needs one yes/no per item.
The verb is posttrain/commands/compare.py. Tests: tests/test_compare.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.config import ConfigError
from posttrain.records import VERDICTS, DataError, iter_jsonl, require
from posttrain.stats import mcnemar_exact, paired_bootstrap

ITEM_FILES = ("items.jsonl", "eval.jsonl")


def load_items(path: str | os.PathLike) -> list[dict]:
    """Rows of an eval folder's items file (or a JSONL file given directly), validated."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ITEM_FILES if (path / name).exists()]
        if not found:
            raise DataError(path, None, f"no {' or '.join(ITEM_FILES)} in this folder")
        path = found[0]
    rows = []
    for line, row in iter_jsonl(path):
        require(row, "problem_id", (str, int), path, line)
        verdict = require(row, "verdict", str, path, line)
        if verdict not in VERDICTS:
            raise DataError(
                path,
                line,
                f"expected one of {', '.join(VERDICTS)}; got {verdict!r}",
                field="verdict",
            )
        require(row, "sample_index", int, path, line, optional=True)
        rows.append({**row, "_where": f"{path}:{line}"})
    return rows


def per_item_scores(rows: list[dict], name: str = "items") -> dict[str, list[float]]:
    """problem id -> list of 0/1 scores, one per sample; duplicate (id, sample_index) rejected."""
    scores: dict[str, list[float]] = {}
    seen: dict[tuple, str] = {}
    for row in rows:
        pid = str(row["problem_id"])
        key = (pid, row.get("sample_index"))
        where = row.get("_where", name)
        if key in seen:
            what = f"sample_index {key[1]}" if key[1] is not None else "row (no sample_index)"
            raise DataError(
                where, None, f"duplicate {what} for problem {pid!r} (first at {seen[key]})"
            )
        seen[key] = where
        scores.setdefault(pid, []).append(1.0 if row["verdict"] == "correct" else 0.0)
    return scores


def compare_items(
    items_a: list[dict],
    items_b: list[dict],
    intersect: bool = False,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """Compare B against A on the same items. difference = accuracy_b - accuracy_a.

    Returns n, accuracy_a, accuracy_b, difference, interval_95 (paired bootstrap), p_value
    (exact McNemar), discordant [a_only, b_only], k_a, k_b (max samples per item), mcnemar_on,
    dropped_a, dropped_b. Different item sets raise DataError unless `intersect`.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(
            f"n_boot must be a whole number >= 1 (bootstrap resamples), got {n_boot!r}"
        )
    sa, sb = per_item_scores(items_a, "A"), per_item_scores(items_b, "B")
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if (only_a or only_b) and not intersect:
        raise DataError(
            None,
            None,
            f"the runs cover different items: {len(only_a)} only in A, "
            f"{len(only_b)} only in B (e.g. {only_a[:3]} and {only_b[:3]}); "
            "pass --intersect to compare the shared items",
        )
    ids = sorted(set(sa) & set(sb))
    if not ids:
        raise DataError(None, None, "the runs share no items")
    mean_a = [sum(sa[i]) / len(sa[i]) for i in ids]
    mean_b = [sum(sb[i]) / len(sb[i]) for i in ids]
    k_a, k_b = max(len(sa[i]) for i in ids), max(len(sb[i]) for i in ids)
    single = k_a == 1 and k_b == 1
    # One yes/no per item for McNemar: the item's only sample, or a strict majority of its k.
    right_a = [m > 0.5 for m in mean_a]
    right_b = [m > 0.5 for m in mean_b]
    a_only = sum(x and not y for x, y in zip(right_a, right_b))
    b_only = sum(y and not x for x, y in zip(right_a, right_b))
    diff, lo, hi = paired_bootstrap(mean_a, mean_b, n_boot=n_boot, seed=seed)
    return {
        "n": len(ids),
        "accuracy_a": sum(mean_a) / len(ids),
        "accuracy_b": sum(mean_b) / len(ids),
        "difference": diff,
        "interval_95": [lo, hi],
        "p_value": mcnemar_exact(a_only, b_only),
        "discordant": [a_only, b_only],
        "k_a": k_a,
        "k_b": k_b,
        "mcnemar_on": "per-item correctness" if single else "per-item majority correctness",
        "dropped_a": len(only_a),
        "dropped_b": len(only_b),
        "n_boot": n_boot,
        "seed": seed,
    }
