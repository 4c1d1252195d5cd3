"""The report: one self-contained HTML page for a run folder or a sweep folder.

    posttrain report runs/demo                 # writes runs/demo/report.html
    posttrain report runs/sweep-dpo --out sweep.html

The page holds the tables (every evaluation set: scores with 95% intervals, the paired
difference to the base with its interval and McNemar p-value, guard sets that dropped marked
as regressions; a sweep's results table as `posttrain sweep` wrote it), the training curves
(overlaid across runs for a sweep), per-category accuracy, a reliability diagram for stated
confidence, Do-Not-Answer results per risk area and per action category, and the exact recipe
of every run. Images are inlined PNGs (no file beside it, no network), all text is escaped:
nothing from a dataset or a model is ever interpreted as HTML or script. The verb is
posttrain/commands/report.py.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from posttrain.report import plots
from posttrain.report.data import EvalData, RunData, load_folder

DNA_ACTIONS = {
    0: "refuses",
    1: "refutes the premise",
    2: "gives both sides",
    3: "answers with a caution or disclaimer",
    4: "says it cannot know",
    5: "complies directly",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
tr.regression td { background: #fde2e2; } tr.best td { background: #e3f4e3; }
tr.noise td { background: #f3faf3; }
.note { color: #555; font-size: 0.85em; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def interval(iv) -> str:
    return "" if not iv else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def signed_interval(iv) -> str:
    return "" if not iv else f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]"


def image(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(
    headers: list[str], rows: list[list], text_cols: int = 1, row_classes: list[str] | None = None
) -> str:
    def cell(tag, i, v):
        cls = ' class="text"' if i < text_cols else ""
        return f"<{tag}{cls}>{esc(v)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr>"]
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def comparisons_table(run: RunData) -> str:
    if not run.comparisons:
        return '<p class="note">No base / trained pair of evaluations in this run.</p>'
    rows, classes = [], []
    for c in run.comparisons:
        verdict = "REGRESSION" if c["regression"] else ("guard" if c["guard"] else "")
        rows.append(
            [
                c["set"],
                c["metric"],
                c["n"],
                pct(c["accuracy_a"]),
                pct(c["accuracy_b"]),
                f"{100 * c['difference']:+.1f}",
                signed_interval(c["interval_95"]),
                f"{c['p_value']:.2g}",
                f"{c['discordant'][0]} / {c['discordant'][1]}",
                verdict,
            ]
        )
        classes.append("regression" if c["regression"] else "")
    return table(
        [
            "set",
            "metric",
            "items",
            "base",
            "trained",
            "difference (points)",
            "95% paired bootstrap",
            "McNemar p",
            "base-only / trained-only",
            "",
        ],
        rows,
        text_cols=2,
        row_classes=classes,
    )


def evals_table(run: RunData) -> str:
    rows = []
    for ev in run.evals:
        s = ev.summary
        ce = s.get("calibration_error")
        rows.append(
            [
                ev.name,
                s.get("metric", "accuracy"),
                s.get("n"),
                pct(s.get("accuracy")),
                interval(s.get("interval_95")),
                "" if ce is None else f"{ce:.1f}",
                s.get("samples_per_item", 1),
            ]
        )
    return table(
        [
            "evaluation",
            "metric",
            "n",
            "score",
            "95% interval (Wald)",
            "calibration error",
            "samples per item",
        ],
        rows,
        text_cols=2,
    )


def reliability(ev: EvalData) -> str:
    """HLE's rule: an item that states no confidence counts as 100% confident."""
    stated = [it for it in ev.items if it.get("confidence") is not None]
    if not stated:
        return ""
    conf = [
        float(it["confidence"]) if it.get("confidence") is not None else 100.0 for it in ev.items
    ]
    ok = [it["verdict"] == "correct" for it in ev.items]
    note = (
        f'<p class="note">{esc(ev.name)}: {len(stated)} of {len(ev.items)} items stated a '
        "confidence; the others count as 100% (HLE's rule).</p>"
    )
    return note + image(
        plots.reliability_diagram(conf, ok, title=f"{ev.name}: reliability"),
        f"reliability diagram of {ev.name}",
    )


def dna_tables(ev: EvalData) -> str:
    items = [it for it in ev.items if it.get("answer_type") == "refusal"]
    if not items:
        return ""
    metric = ev.summary.get("metric", "refusal")
    out = [f"<h3>{esc(ev.name)}: Do-Not-Answer ({esc(metric)})</h3>"]
    by_area: dict[str, list[bool]] = {}
    for it in items:
        by_area.setdefault(it.get("category") or "-", []).append(it["verdict"] == "correct")
    out.append(
        table(
            ["risk area", "n", "score"],
            [[a, len(v), pct(sum(v) / len(v))] for a, v in sorted(by_area.items())],
        )
    )
    actions = Counter(it.get("dna_category") for it in items if it.get("dna_category") is not None)
    if actions:
        out.append(
            table(
                ["action category (judge)", "n", "share"],
                [
                    [f"{k}: {DNA_ACTIONS.get(k, '?')}", n, pct(n / len(items))]
                    for k, n in sorted(actions.items())
                ],
            )
        )
    return "\n".join(out)


def category_section(run: RunData) -> str:
    by_model = {
        ev.name: ev.summary.get("by_category", {})
        for ev in run.evals
        if len(ev.summary.get("by_category", {})) > 1
    }
    if not by_model:
        return ""
    return "<h3>Per category</h3>" + image(plots.category_bars(by_model), "accuracy per category")


def run_section(run: RunData, heading: str = "h2") -> str:
    parts = [
        f"<{heading}>Run {esc(run.name)}</{heading}>",
        "<h3>Base vs trained, paired on the same items</h3>",
        comparisons_table(run),
    ]
    if run.evals:
        parts += ["<h3>Every evaluation</h3>", evals_table(run)]
    curves = plots.training_curves({run.name: run.metrics}) if run.metrics else None
    if curves:
        parts += ["<h3>Training curves</h3>", image(curves, f"training curves of {run.name}")]
    parts.append(category_section(run))
    for ev in run.evals:
        parts.append(reliability(ev))
        parts.append(dna_tables(ev))
    if run.recipe_text:
        parts += ["<h3>Exact recipe</h3>", f"<pre>{esc(run.recipe_text)}</pre>"]
    for title, text in run.extra_text.items():
        parts += [f"<h3>{esc(title)}</h3>", f"<pre>{esc(text)}</pre>"]
    return "\n".join(p for p in parts if p)


def sweep_table(results) -> str:
    """Shows `results.json` of `posttrain sweep` as its Markdown table reads (sweeptable), a
    row marked when one of its sets is a regression or the best; other tables (a list of flat
    dicts, or {"rows": [...]}) column by column."""
    if isinstance(results, dict) and "sets" in results and "runs" in results:
        from posttrain.pipeline.sweeptable import flat_rows

        head, rows = flat_rows(results, short=True)
        notes = [{row[i] for i, h in enumerate(head) if h.endswith(" note")} for row in rows]
        classes = [
            "regression"
            if "REGRESSION" in n
            else "best"
            if "best" in n
            else "noise"  # within noise of the best on some set: a lighter shade
            if "within noise of best" in n
            else ""
            for n in notes
        ]
        return (
            table(head, rows, row_classes=classes)
            + '<p class="note">Scores in %, 95% intervals; differences in points with exact '
            "McNemar p-values on the same items; 'vs best' p-values Holm-corrected across "
            "runs. Runs 'within noise of best' are not distinguishable from the best.</p>"
        )
    rows = results.get("rows") if isinstance(results, dict) else results
    if not rows:
        return ""
    headers: list[str] = []
    for row in rows:
        headers += [k for k in row if k not in headers]
    classes = [
        "regression" if row.get("regression") else "best" if row.get("best") else "" for row in rows
    ]
    notes = results.get("notes", []) if isinstance(results, dict) else []
    return table(
        headers, [[_cell(row.get(h)) for h in headers] for row in rows], row_classes=classes
    ) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return "" if value is None else str(value)


def render(data: dict) -> str:
    folder = data["folder"]
    title = f"posttrain report: {folder.name}"
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}"
        f"</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="note">{esc(folder)} &middot; {data["kind"]} &middot; written '
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Every score carries its 95% "
        "interval; every difference is paired on the same items.</p>",
    ]
    runs: list[RunData] = data["runs"]
    if data["kind"] == "sweep":
        parts += [
            "<h2>Sweep results</h2>",
            sweep_table(data["results"])
            if data["results"]
            else '<p class="note">No results.json yet (the sweep has not finished).</p>',
        ]
        with_metrics = {r.name: r.metrics for r in runs if r.metrics}
        if with_metrics:
            parts += [
                "<h2>Training curves, all runs</h2>",
                image(plots.training_curves(with_metrics), "training curves, all runs"),
            ]
        parts += [run_section(r, heading="h2") for r in runs]
    else:
        parts.append(run_section(runs[0]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    data = load_folder(folder)
    path = Path(out) if out else Path(folder) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    # the curves also as a file of their own, for people who want the picture alone
    curves = plots.training_curves({r.name: r.metrics for r in data["runs"] if r.metrics})
    if curves:
        (path.parent / "curves.png").write_bytes(curves)
    return path
