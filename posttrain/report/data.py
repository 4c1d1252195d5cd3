"""What a report shows, read from a run folder or a sweep folder (no rendering here).

    from posttrain.report.data import load_folder
    data = load_folder("runs/demo")       # {"kind": "run", "runs": [RunData], ...}

A *run folder* is what `posttrain run` writes: `recipe.yaml`, `report.json`, a training folder
with `metrics.jsonl`, and per evaluation set `eval/SET/base` and `eval/SET/trained` (each with
`summary.json` and `items.jsonl`; older runs: `eval-base`, `eval-trained`). Base and trained
evaluations of one set are compared on the same items here (posttrain.evaluation.compare), so the report
never shows a difference without its paired test; a set's guard flag comes from report.json.
A *sweep folder* holds run folders below it (any depth up to 3) and, when `posttrain sweep`
wrote it, a `results.json` table that the report shows as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.evaluation.compare import compare_items, load_items
from posttrain.records import DataError, iter_jsonl

BASE, TRAINED = "eval-base", "eval-trained"


@dataclass
class EvalData:
    name: str  # folder name, e.g. eval-base or eval-trained-hle
    folder: Path
    summary: dict
    items: list[dict]


@dataclass
class RunData:
    name: str
    folder: Path
    recipe_text: str | None  # the exact recipe (or training config) as written by the run
    metrics: list[dict]  # training metrics.jsonl rows
    evals: list[EvalData] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)  # per eval set: base vs trained
    extra_text: dict[str, str] = field(default_factory=dict)  # other configs worth showing


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for _, row in iter_jsonl(path, allow_empty=True):
            rows.append(row)
    return rows


def _eval_set(name: str) -> tuple[str, str] | None:
    """eval/hle/base -> ("base", "hle"); eval-base-hle -> ("base", "hle"); eval-trained ->
    ("trained", ""); other -> None."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("base", "trained"):
        return parts[2], parts[1]
    for role, prefix in (("base", BASE), ("trained", TRAINED)):
        if name == prefix or name.startswith(prefix + "-"):
            return role, name[len(prefix) + 1 :]
    return None


def is_run_folder(folder: Path) -> bool:
    return (
        (folder / "recipe.yaml").exists()
        or (folder / "eval").is_dir()
        or any((folder / name / "summary.json").exists() for name in (BASE, TRAINED))
        or (folder / "train" / "metrics.jsonl").exists()
    )


def load_run(folder: str | Path, name: str | None = None) -> RunData:
    folder = Path(folder)
    recipe = folder / "recipe.yaml"
    run = RunData(
        name=name or folder.name,
        folder=folder,
        recipe_text=recipe.read_text(encoding="utf-8") if recipe.exists() else None,
        metrics=[],
    )
    for metrics in sorted(folder.glob("*/metrics.jsonl")) + [folder / "metrics.jsonl"]:
        if metrics.exists():
            run.metrics = _read_metrics(metrics)
            config = metrics.parent / "config.yaml"
            if config.exists():
                run.extra_text[f"{config.parent.name}/config.yaml (resolved training config)"] = (
                    config.read_text(encoding="utf-8")
                )
            break
    for summary in sorted(folder.glob("*/summary.json")) + sorted(
        folder.glob("eval/*/*/summary.json")
    ):
        items_folder = summary.parent
        try:
            items = load_items(items_folder)
        except DataError:
            items = []
        run.evals.append(
            EvalData(
                str(items_folder.relative_to(folder)),
                items_folder,
                json.loads(summary.read_text(encoding="utf-8")),
                items,
            )
        )
    report = folder / "report.json"
    guards = {}
    if report.exists():
        sets = json.loads(report.read_text(encoding="utf-8")).get("sets", [])
        guards = {s.get("name"): bool(s.get("guard")) for s in sets if isinstance(s, dict)}
    by_set: dict[str, dict[str, EvalData]] = {}
    for ev in run.evals:
        parsed = _eval_set(ev.name)
        if parsed:
            by_set.setdefault(parsed[1], {})[parsed[0]] = ev
    for set_name, pair in sorted(by_set.items()):
        if "base" in pair and "trained" in pair and pair["base"].items and pair["trained"].items:
            result = compare_items(pair["base"].items, pair["trained"].items, intersect=True)
            summary = pair["base"].summary
            guard = guards.get(set_name, False) or bool(summary.get("guard"))
            result.update(
                set=set_name or "default",
                metric=summary.get("metric", "accuracy"),
                guard=guard,
                regression=guard and result["difference"] < 0 and result["p_value"] < 0.05,
            )
            run.comparisons.append(result)
    return run


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    """Run folders below `folder` (not itself), nearest first, in name order."""
    found: list[Path] = []
    level = [folder]
    for _ in range(depth):
        nxt = []
        for parent in level:
            for child in sorted(p for p in parent.iterdir() if p.is_dir()):
                if child.name.startswith(".") or child.name == "stages":
                    continue
                if is_run_folder(child):
                    found.append(child)
                else:
                    nxt.append(child)
        level = nxt
    return found


def load_folder(folder: str | Path) -> dict:
    """{"kind": "run" | "sweep", "folder", "runs": [RunData], "results": sweep table or None}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "not a folder: expected a run folder or a sweep folder")
    results = folder / "results.json"
    table = json.loads(results.read_text(encoding="utf-8")) if results.exists() else None
    if is_run_folder(folder) and table is None:
        return {"kind": "run", "folder": folder, "runs": [load_run(folder)], "results": None}
    runs = find_runs(folder)
    if not runs and table is None:
        raise DataError(
            folder,
            None,
            "no run folder inside (expected recipe.yaml, eval-base/, "
            "eval-trained/ or train/metrics.jsonl) and no results.json",
        )
    return {
        "kind": "sweep",
        "folder": folder,
        "runs": [load_run(r, name=str(r.relative_to(folder))) for r in runs],
        "results": table,
    }
