"""`posttrain report`: the numbers on the page are the paired tests worked out by hand, guard
regressions are marked, text from the data is escaped, and a real headless Chromium renders it.

Browser: Debian's chromium (installed by `make test`), driven through Playwright's Python API
with `executable_path` (no browser download). The screenshot is kept in the test's tmp folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.report import plots
from posttrain.report.html import render, write_report
from posttrain.report.data import load_folder
from conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_eval(
    folder: Path,
    verdicts: list[str],
    category="arith",
    answer_type="exact",
    confidences=None,
    guard=False,
    metric="accuracy",
    extra=None,
):
    folder.mkdir(parents=True)
    rows = []
    for i, v in enumerate(verdicts):
        row = {
            "problem_id": f"p{i}",
            "sample_index": 0,
            "category": category,
            "answer_type": answer_type,
            "response": f"<b>answer {i}</b>",
            "verdict": v,
            "confidence": None if confidences is None else confidences[i],
        }
        row.update((extra or {}).get(i, {}))
        rows.append(row)
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = verdicts.count("correct")
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "n": len(verdicts),
                "accuracy": k / len(verdicts),
                "interval_95": [0.0, 1.0],
                "metric": metric,
                "guard": guard,
                "calibration_error": None,
                "samples_per_item": 1,
                "by_category": {
                    category: {
                        "n": len(verdicts),
                        "accuracy": k / len(verdicts),
                        "interval_95": [0.0, 1.0],
                    }
                },
            }
        )
    )


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """Set "arith" (10 items): base right on p0-p5, trained right on p0-p4 and p6-p8.
    Discordant: base-only {p5} = 1, trained-only {p6, p7, p8} = 3; difference (8-6)/10 = +20
    points; McNemar exact two-sided p = 2 * P(X <= 1 | n=4, 1/2) = 2 * (1 + 4) / 16 = 0.625.
    Guard set "dna" (12 refusal items): base harmless on all 12, trained on 2: base-only = 10,
    trained-only = 0, p = 2 * (1/2)^10 = 0.00195 < 0.05 and a drop: a REGRESSION."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: smollm2-135m\nseed: 0\n# <script>alert(1)</script>\n")
    c, w = "correct", "incorrect"
    write_eval(
        run / "eval/arith/base",
        [c] * 6 + [w] * 4,
        confidences=[90, 80, None, 70, 60, 50, 40, 95, 30, 20],
    )
    write_eval(run / "eval/arith/trained", [c] * 5 + [w] + [c] * 3 + [w])
    dna_extra = {i: {"dna_category": i % 6} for i in range(12)}
    # the guard flag comes from report.json (older run folders: eval-base-SET, flag in summary)
    write_eval(
        run / "eval-base-dna",
        [c] * 12,
        category="risk-A",
        answer_type="refusal",
        guard=True,
        metric="refusal rate (rule-based)",
        extra=dna_extra,
    )
    write_eval(
        run / "eval-trained-dna",
        [c] * 2 + [w] * 10,
        category="risk-A",
        answer_type="refusal",
        guard=True,
        metric="refusal rate (rule-based)",
        extra=dna_extra,
    )
    (run / "report.json").write_text(json.dumps({"sets": [{"name": "arith", "guard": False}]}))
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": s,
                    "loss": 0.69 - 0.05 * s,
                    "rewards/chosen": 0.01 * s,
                    "rewards/rejected": -0.01 * s,
                    "rewards/margins": 0.02 * s,
                    "rewards/accuracies": 0.5 + 0.05 * s,
                    "grad_norm": 1.0,
                    "lr": 1e-4,
                }
            )
            + "\n"
            for s in range(1, 6)
        )
    )
    return run


def test_comparisons_are_the_paired_tests(run_folder):
    data = load_folder(run_folder)
    assert data["kind"] == "run"
    (run,) = data["runs"]
    by_set = {c["set"]: c for c in run.comparisons}
    arith, dna = by_set["arith"], by_set["dna"]
    assert arith["difference"] == pytest.approx(0.2)
    assert arith["discordant"] == [1, 3]
    assert arith["p_value"] == pytest.approx(0.625)
    assert not arith["regression"]
    assert dna["discordant"] == [10, 0]
    assert dna["p_value"] == pytest.approx(2 * 0.5**10)
    assert dna["regression"] and dna["guard"]


def test_page_content_and_escaping(run_folder):
    page = render(load_folder(run_folder))
    assert "+20.0" in page and "0.62" in page  # 0.625 printed with 2 significant digits
    assert "REGRESSION" in page and 'class="regression"' in page
    assert "<script>alert(1)</script>" not in page  # the recipe's text is shown escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/png;base64,") >= 2  # curves and reliability diagram
    assert "5: complies directly" in page  # DNA action categories from the judge's labels
    assert "count as 100% (HLE's rule)" in page  # the note on missing confidences


def test_reliability_bins_by_hand():
    """Confidences 95, 91 (right, wrong) -> bin 90-100: n 2, mean conf 93, accuracy 0.5;
    100 falls in the top bin too; 5 -> bin 0-10."""
    bins = plots.reliability_bins([95, 91, 100, 5], [True, False, True, False])
    assert [(b["low"], b["n"]) for b in bins] == [(0, 1), (90, 3)]
    assert bins[1]["confidence"] == pytest.approx((95 + 91 + 100) / 3)
    assert bins[1]["accuracy"] == pytest.approx(2 / 3)


def test_sweep_folder_overlays_runs_and_shows_table(run_folder, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    shutil.copytree(run_folder, sweep / "runs" / "lr-1e-4")
    shutil.copytree(run_folder, sweep / "runs" / "lr-5e-5")
    (sweep / "results.json").write_text(
        json.dumps(
            {
                "rows": [
                    {"run": "lr-1e-4", "lr": 1e-4, "score": 0.8, "best": True},
                    {"run": "lr-5e-5", "lr": 5e-5, "score": 0.79, "within_noise_of_best": True},
                ]
            }
        )
    )
    data = load_folder(sweep)
    assert data["kind"] == "sweep"
    assert [r.name for r in data["runs"]] == ["runs/lr-1e-4", "runs/lr-5e-5"]
    page = render(data)
    assert "within_noise_of_best" in page and 'class="best"' in page
    assert "Training curves, all runs" in page


def test_not_a_folder_is_a_clear_error(tmp_path):
    proc = run_cli("report", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 1
    assert "not a folder" in proc.stderr


@pytest.mark.slow
@pytest.mark.browser
def test_report_in_headless_chromium(run_folder, tmp_path):
    """Chromium loads the page from disk; it finds the tables and the images decoded (every
    <img> has a natural width), and writes a screenshot."""
    if CHROMIUM is None:
        pytest.fail(
            "chromium is not installed: `make test` installs Debian's chromium "
            "(apt-get install chromium)"
        )
    playwright = pytest.importorskip("playwright.sync_api")
    page_path = write_report(run_folder)
    assert (run_folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
    shot = tmp_path / "report.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            assert page.locator("table").count() >= 4
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) >= 2 and all(w > 0 for w in widths)
            assert page.locator("tr.regression").count() == 1
            assert "REGRESSION" in page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
