"""The final table of `posttrain run`: every evaluation set, base vs trained on the same items.

    python -c "from posttrain.pipeline.runtable import format_run_table; help(format_run_table)"

Each row: the set, its n, base and trained score with a 95% interval (accuracy with HLE's Wald
interval, or avg@k with its item-level interval when each item was sampled k > 1 times), the
paired difference with its bootstrap interval, and the exact McNemar p-value. A guard set
(`guard: true`) whose difference is negative with p < 0.05 is a REGRESSION.

With `rounds: K > 1` a second table has one row per round and set (and the base): the round's
score with its interval, its paired difference to the base and to the round before, each with
its bootstrap interval and exact McNemar p (round 1's round before is the base).
"""

from __future__ import annotations

ALPHA = 0.05


def score(summary: dict) -> tuple[float, list[float] | None]:
    """(score, 95% interval): avg@k for k > 1 samples per item, else accuracy (Wald)."""
    if summary.get("avg_at_k"):
        return summary["avg_at_k"]["avg"], summary["avg_at_k"]["interval_95"]
    return summary["accuracy"], summary["interval_95"]


def is_regression(compare: dict, guard: bool, alpha: float = ALPHA) -> bool:
    return bool(guard and compare["difference"] < 0 and compare["p_value"] < alpha)


def set_row(name: str, guard: bool, base: dict, trained: dict, compare: dict) -> dict:
    """One row of the table as plain values (also what report.json stores per set)."""
    b, b_ci = score(base)
    t, t_ci = score(trained)
    return {
        "set": name,
        "guard": guard,
        "metric": base.get("metric", "accuracy"),
        "n": compare["n"],
        "base": b,
        "base_interval_95": b_ci,
        "trained": t,
        "trained_interval_95": t_ci,
        "difference": compare["difference"],
        "difference_interval_95": compare["interval_95"],
        "p_value": compare["p_value"],
        "regression": is_regression(compare, guard),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def with_ci(x: float, ci: list[float] | None, signed: bool = False) -> str:
    f = (lambda v: f"{100 * v:+.1f}") if signed else pct
    return f(x) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def format_run_table(rows: list[dict]) -> str:
    head = [
        "set",
        "n",
        "base % [95% CI]",
        "trained % [95% CI]",
        "difference [95% CI]",
        "p (McNemar)",
        "",
    ]
    body = []
    for r in rows:
        note = "REGRESSION" if r["regression"] else ("guard" if r["guard"] else "")
        body.append(
            [
                r["set"],
                str(r["n"]),
                with_ci(r["base"], r["base_interval_95"]),
                with_ci(r["trained"], r["trained_interval_95"]),
                with_ci(r["difference"], r["difference_interval_95"], signed=True),
                f"{r['p_value']:.2g}",
                note,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    metrics = sorted({r["metric"] for r in rows if r["metric"] != "accuracy"})
    lines += [f"  ({m})" for m in metrics]
    if any(r["regression"] for r in rows):
        lines.append(f"REGRESSION: a guard set dropped significantly (p < {ALPHA}).")
    return "\n".join(lines)


def round_rows(name: str, base: dict, rounds: list[dict]) -> list[dict]:
    """The rounds table's rows of one set: the base, then one per round. `rounds`: per round
    {round, trained (summary), compare (vs base), compare_previous (vs the round before)}."""
    b, b_ci = score(base)
    n = rounds[0]["compare"]["n"] if rounds else base["n"]  # items (each maybe sampled k times)
    rows = [{"set": name, "round": 0, "n": n, "score": b, "interval_95": b_ci}]
    for r in rounds:
        t, t_ci = score(r["trained"])
        c, p = r["compare"], r["compare_previous"]
        rows.append(
            {
                "set": name,
                "round": r["round"],
                "n": c["n"],
                "score": t,
                "interval_95": t_ci,
                "vs_base": c["difference"],
                "vs_base_interval_95": c["interval_95"],
                "p_base": c["p_value"],
                "vs_previous": p["difference"],
                "vs_previous_interval_95": p["interval_95"],
                "p_previous": p["p_value"],
            }
        )
    return rows


def format_rounds_table(rows: list[dict]) -> str:
    head = [
        "set",
        "round",
        "n",
        "score % [95% CI]",
        "vs base [95% CI]",
        "p",
        "vs previous [95% CI]",
        "p",
    ]
    body = []
    for r in rows:
        line = [r["set"], str(r["round"] or "base"), str(r["n"])]
        line.append(with_ci(r["score"], r["interval_95"]))
        if r["round"]:
            line += [
                with_ci(r["vs_base"], r["vs_base_interval_95"], signed=True),
                f"{r['p_base']:.2g}",
                with_ci(r["vs_previous"], r["vs_previous_interval_95"], signed=True),
                f"{r['p_previous']:.2g}",
            ]
        else:
            line += ["", "", "", ""]
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]
    )
