"""The results table of a sweep: which runs differ from the base, and which from the best.

    python -c "from posttrain.pipeline.sweeptable import holm; print(holm([0.01, 0.04, 0.03]))"

For every evaluation set and run: the trained score with its 95% interval, the paired
difference to the base model on the same items with its exact McNemar p-value (from the run's
own compare stage), and the paired difference to the best run of that set with a McNemar
p-value Holm-corrected across the runs compared with the best. A run whose corrected p is not
below 0.05 is "within noise of best": nobody should crown a winner among those. Written by
posttrain/pipeline/sweep.py as SWEEP/results.md, results.csv and results.json.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from posttrain.pipeline.runtable import ALPHA, pct, score, with_ci


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the m p-values sorted ascending p(1) <= ... <= p(m), the adjusted value of p(i) is
    max over j <= i of min(1, (m - j + 1) p(j)): the running maximum keeps the adjusted values
    in the same order as the raw ones. Rejecting where adjusted < alpha controls the
    family-wise error rate at alpha (Holm 1979)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def set_table(
    name: str, base_summary: dict, runs: dict[str, dict], bases: dict[str, dict] | None = None
) -> dict:
    """One evaluation set. `runs`: run id -> {summary, compare (vs its base), items (trained),
    and `base`: the key of its base in `bases` when runs have different bases (a dtype or
    model axis)}. `bases`: key -> base summary; by default the one `base_summary`."""
    from posttrain.evaluation.compare import compare_items

    bases = bases or {"base": base_summary}
    out = {
        "set": name,
        "base": _score(base_summary),
        "runs": {},
        "bases": {
            key: {
                **_score(b),
                "runs": sorted(rid for rid, r in runs.items() if r.get("base", "base") == key),
            }
            for key, b in bases.items()
        },
    }
    if not runs:
        return out
    scores = {rid: score(r["summary"])[0] for rid, r in runs.items()}
    best = max(scores, key=lambda rid: (scores[rid], -list(runs).index(rid)))
    others = [rid for rid in runs if rid != best]
    vs_best = {rid: compare_items(runs[best]["items"], runs[rid]["items"]) for rid in others}
    adjusted = dict(zip(others, holm([vs_best[rid]["p_value"] for rid in others])))
    for rid, r in runs.items():
        c = r["compare"]
        row = {
            **_score(r["summary"]),
            "diff_base": c["difference"],
            "diff_base_interval_95": c["interval_95"],
            "p_base": c["p_value"],
            "regression": bool(r.get("guard") and c["difference"] < 0 and c["p_value"] < ALPHA),
            "best": rid == best,
        }
        if rid == best:
            row.update(diff_best=0.0, p_best=None, p_best_holm=None, within_noise_of_best=True)
        else:
            b = vs_best[rid]
            row.update(
                diff_best=b["difference"],
                diff_best_interval_95=b["interval_95"],
                p_best=b["p_value"],
                p_best_holm=adjusted[rid],
                within_noise_of_best=adjusted[rid] >= ALPHA,
            )
        out["runs"][rid] = row
    out["best"] = best
    return out


def _score(summary: dict) -> dict:
    s, ci = score(summary)
    return {
        "score": s,
        "interval_95": ci,
        "n": summary["n"],
        "metric": summary.get("metric", "accuracy"),
    }


def note(row: dict) -> str:
    if row.get("regression"):
        return "REGRESSION"
    if row["best"]:
        return "best"
    return "within noise of best" if row["within_noise_of_best"] else "worse than best"


def short_names(keys: list[str]) -> list[str]:
    """Each dotted setting key cut to its shortest suffix that no other key ends with:
    train.config.lr -> lr, train.method -> method; train.config.lora.r -> r, or lora.r if
    another key ends in r."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out.append(tail)
    return out


def flat_rows(table: dict, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the whole table: one row per run plus the base. `short`:
    setting columns named by short_names (the Markdown, text and HTML tables; CSV and JSON keep
    the full keys)."""
    axes, sets = table["axes"], table["sets"]
    head = ["run", *(short_names(axes) if short else axes)]
    for s in sets:
        n = s["set"]
        head += [f"{n} % [95% CI]", f"{n} vs base (p)", f"{n} vs best (Holm p)", f"{n} note"]
    rows = base_rows(table)
    for run in table["runs"]:
        row = [run["id"], *[_fmt(run["settings"].get(a)) for a in axes]]
        for s in sets:
            r = s["runs"].get(run["id"])
            if r is None:
                row += [run.get("status", "missing"), "", "", ""]
                continue
            vs_best = "-" if r["best"] else f"{100 * r['diff_best']:+.1f} ({r['p_best_holm']:.2g})"
            row += [
                with_ci(r["score"], r["interval_95"]),
                f"{100 * r['diff_base']:+.1f} ({r['p_base']:.2g})",
                vs_best,
                note(r),
            ]
        rows.append(row)
    return head, rows


def base_rows(table: dict) -> list[list[str]]:
    """One row per distinct base evaluation (one, unless an axis such as dtype or model changes
    the base), its axis columns the values every run measured against it shares."""
    axes, sets = table["axes"], table["sets"]
    settings = {run["id"]: run["settings"] for run in table["runs"]}
    keys = list(dict.fromkeys(k for s in sets for k in s.get("bases", {"base": None})))
    rows = []
    for key in keys:
        entries = [s.get("bases", {"base": s["base"]}).get(key) for s in sets]
        users = sorted({rid for e in entries if e for rid in e.get("runs", [])})
        shared = [{_fmt(settings[rid].get(a)) for rid in users if rid in settings} for a in axes]
        row = ["base", *[next(iter(v)) if len(keys) > 1 and len(v) == 1 else "-" for v in shared]]
        for e in entries:
            row += [with_ci(e["score"], e["interval_95"]) if e else "", "", "", ""]
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def to_markdown(table: dict) -> str:
    head, rows = flat_rows(table, short=True)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += [
        "",
        f"Scores in %, 95% intervals; differences in points with exact McNemar "
        f"p-values on the same items; 'vs best' p-values Holm-corrected across runs. "
        f"Runs 'within noise of best' are not distinguishable from the best at "
        f"p < {ALPHA}.",
    ]
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    head, rows = flat_rows(table)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head)
    writer.writerows(rows)
    return buf.getvalue()


def to_text(table: dict) -> str:
    head, rows = flat_rows(table, short=True)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]
    )


def write_tables(table: dict, folder: Path) -> None:
    from posttrain.records import write_json

    write_json(folder / "results.json", table)
    for name, text in (("results.md", to_markdown(table)), ("results.csv", to_csv(table))):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)


__all__ = ["holm", "set_table", "to_markdown", "to_csv", "to_text", "write_tables", "pct"]
