"""Figures a person would rather look at than read: training curves, the same metric overlaid
across the runs of a sweep, a reliability diagram for stated confidence, per-category accuracy.

    from posttrain.report.plots import curve_panels, training_curves
    png = training_curves({"run": rows})       # PNG bytes (matplotlib, Agg backend)

Every function returns PNG bytes (or None when there is nothing to draw), so the HTML report
can inline them and the CLI can write them next to the run.
"""

from __future__ import annotations

import io
import math

# One panel per quantity; the first keys present in a run's metrics.jsonl are drawn. DPO family:
# loss, rewards, margins, accuracy; GRPO family: reward, KL, entropy, clipping, length; MoE
# and rollout-sync panels appear when those metrics were logged.
PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss"]),
    ("implicit rewards", ["rewards/chosen", "rewards/rejected"]),
    ("reward margin", ["rewards/margins"]),
    ("preference accuracy", ["rewards/accuracies"]),
    ("reward", ["reward/mean"]),
    ("KL to reference", ["kl"]),
    ("entropy", ["entropy"]),
    ("clip fraction", ["clip_ratio/region"]),
    ("completion length", ["completion_length/mean"]),
    ("load-balancing loss", ["loss/aux"]),
    ("rollout mismatch (k3 KL)", ["mismatch/kl"]),
    ("router entropy", ["moe/router_entropy"]),
    ("routing changed vs base", ["moe/topk_changed"]),
    # shares of (token, layer): top-k set as the engine's = the old-policy pass's; changed
    # from the old-policy pass to the batch's last update (train/moe/replay.py)
    ("routing drift", ["moe/rollout_agreement", "moe/update_flips"]),
    ("grad norm", ["grad_norm"]),
    ("learning rate", ["lr"]),
]


def _figure(ncols: int, nrows: int, width: float = 4.2, height: float = 2.9):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row.get("step", len(xs) + 1))
            ys.append(float(value))
    return xs, ys


def curve_panels(runs: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """The PANELS with data in at least one run (a panel keeps only keys that have data)."""
    out = []
    for title, keys in PANELS:
        present = [k for k in keys if any(_series(rows, k)[1] for rows in runs.values())]
        if present:
            out.append((title, present))
    return out


def training_curves(runs: dict[str, list[dict]], ncols: int = 3) -> bytes | None:
    """A grid of panels; each run is one colour, each key of a panel one line style. With one
    run this is that run's curves; with several it overlays the same metric across a sweep."""
    panels = curve_panels(runs)
    if not panels:
        return None
    nrows = math.ceil(len(panels) / ncols)
    plt, fig, axes = _figure(min(ncols, len(panels)), nrows)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes, panels):
        for i, (name, rows) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                xs, ys = _series(rows, key)
                if ys:
                    label = name if len(keys) == 1 else f"{name} {key.split('/')[-1]}"
                    ax.plot(
                        xs, ys, styles[j % len(styles)], color=f"C{i % 10}", lw=1.4, label=label
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    return _png(plt, fig)


def reliability_bins(confidences: list[float], correct: list[bool], width: int = 10) -> list[dict]:
    """Items binned by stated confidence (0-100) in bins of `width` points: per bin its range,
    count, mean confidence and accuracy. The top bin includes 100."""
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidences, correct):
        b = min(int(c // width), (100 // width) - 1)
        bins.setdefault(b, []).append((c, ok))
    return [
        {
            "low": b * width,
            "high": (b + 1) * width,
            "n": len(v),
            "confidence": sum(c for c, _ in v) / len(v),
            "accuracy": sum(ok for _, ok in v) / len(v),
        }
        for b, v in sorted(bins.items())
    ]


def reliability_diagram(
    confidences: list[float], correct: list[bool], title: str = ""
) -> bytes | None:
    """Accuracy per confidence bin against the diagonal of perfect calibration; the bar
    labels give each bin's item count."""
    bins = reliability_bins(confidences, correct)
    if not bins:
        return None
    plt, fig, (ax,) = _figure(1, 1, width=4.4, height=3.6)
    ax.plot([0, 100], [0, 100], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar(
        [(b["low"] + b["high"]) / 2 for b in bins],
        [100 * b["accuracy"] for b in bins],
        width=9,
        alpha=0.7,
        color="C0",
        label="accuracy",
    )
    for b in bins:
        ax.text(
            (b["low"] + b["high"]) / 2,
            100 * b["accuracy"] + 2,
            str(b["n"]),
            ha="center",
            fontsize=7,
        )
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 108)
    ax.set_xlabel("stated confidence (%)", fontsize=9)
    ax.set_ylabel("accuracy (%)", fontsize=9)
    ax.set_title(title or "reliability", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _png(plt, fig)


def category_bars(by_model: dict[str, dict[str, dict]], title: str = "") -> bytes | None:
    """Accuracy per category with 95% interval whiskers, one bar colour per model
    (`by_model[model][category] = {"accuracy", "interval_95", "n"}`)."""
    cats = sorted({c for cats in by_model.values() for c in cats})
    if len(cats) < 2:
        return None
    plt, fig, (ax,) = _figure(1, 1, width=max(4.4, 0.9 * len(cats) * len(by_model)), height=3.4)
    width = 0.8 / len(by_model)
    for i, (model, stats) in enumerate(by_model.items()):
        xs = [k + i * width for k in range(len(cats))]
        acc = [100 * stats.get(c, {}).get("accuracy", 0.0) for c in cats]
        lo = [a - 100 * stats.get(c, {}).get("interval_95", [0, 0])[0] for a, c in zip(acc, cats)]
        hi = [100 * stats.get(c, {}).get("interval_95", [0, 0])[1] - a for a, c in zip(acc, cats)]
        ax.bar(xs, acc, width=width, yerr=[lo, hi], capsize=2, label=model, color=f"C{i}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cats))])
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)", fontsize=9)
    ax.set_title(title or "per category", fontsize=10)
    ax.legend(fontsize=7)
    return _png(plt, fig)
