"""A grid of runs (`posttrain sweep GRID.yaml`, commands/sweep.py) that share their common stages, and a table that
says which differences are real.

    posttrain sweep recipes/sweep-dpo.yaml --out runs/sweep-dpo
    posttrain sweep GRID.yaml --out DIR --shard 0/4         # job array: runs i, i+4, i+8, ...
    posttrain sweep GRID.yaml --out DIR & posttrain sweep GRID.yaml --out DIR   # two workers

A grid file:

    recipe: default.yaml                 # a recipe file (relative to the grid file) or a mapping
    set: {sample.max_new_tokens: 32}     # optional: overrides for every run
    axes:                                # optional: the product of these values
      train.config.lr: [1.0e-4, 5.0e-5]
      train.config.beta: [0.1, 0.3]
    runs:                                # optional: runs named by hand, each with overrides
      - {id: "59", set: {train.config.lr: 5.0e-5, train.config.lora.r: 8}}

Product runs are named g01, g02, ... in axis order. Folders: DIR/stages/STAGE-DIGEST (each
stage once per distinct setting: sampling, verification and pairs once per data setting, the
base evaluation once per evaluation set), DIR/runs/ID (the run: links to its stages,
report.json, done.json or failed.json), DIR/locks, and DIR/results.{md,csv,json}. A worker
claims a run with a lock that survives its death (posttrain/locks.py); shared stages are
locked too, so no stage is computed twice. Every worker keeps going until every run of its
shard is finished (also those another worker claimed, in case that worker dies), and the
worker that sees all runs finished writes the table (sweeptable.py). Rerunning resumes. A run
that fails on its own (bad data, no pairs, a trainer that stops) is recorded in
runs/ID/failed.json and shown as failed; delete that file to try it again.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import ConfigError, load_yaml, save_config
from posttrain.engines.base import EngineUnavailable
from posttrain.locks import FileLock
from posttrain.names import check_name
from posttrain.pipeline.recipe import (
    Recipe,
    check_models,
    check_sources,
    merge_overrides,
    recipe_from_dict,
)
from posttrain.records import DataError, write_json
from posttrain.pipeline.store import StageBusy

GRID_KEYS = ("recipe", "set", "axes", "runs")


@dataclass
class SweepRun:
    id: str
    settings: dict  # dotted key -> value: what this run changes
    recipe: Recipe
    values: dict | None = None  # every swept key -> this run's value (for the table)


def nested(dotted: dict) -> dict:
    """{'train.config.lr': 1e-4} -> {'train': {'config': {'lr': 1e-4}}}."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_grid(path: str | Path) -> tuple[list[str], list[SweepRun]]:
    """(swept keys, runs) from a grid file; every run's recipe is resolved here (its train
    config included) and its problem sources opened, before any run starts."""
    path = Path(path)
    grid = load_yaml(path)
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(GRID_KEYS)}"
        )
    base = grid.get("recipe")
    if isinstance(base, str):
        base = load_yaml(path.parent / base)
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: recipe: expected a recipe file name or a mapping")
    base = merge_overrides(base, nested(grid.get("set") or {}))
    axes = grid.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: axes: expected a mapping of key -> non-empty list of values")
    for key, values in axes.items():
        if not (isinstance(values, list) and values):
            raise ConfigError(
                f"{path}: axes.{key}: {values!r}; expected a non-empty list of values"
            )
    specs = []
    for i, values in enumerate(itertools.product(*axes.values()) if axes else []):
        specs.append((f"g{i + 1:02d}", dict(zip(axes, values))))
    for i, run in enumerate(grid.get("runs") or []):
        if not isinstance(run, dict) or "id" not in run or set(run) - {"id", "set"}:
            raise ConfigError(f"{path}: runs[{i}]: expected {{id: ..., set: {{key: value}}}}")
        specs.append((str(run["id"]), dict(run.get("set") or {})))
    if not specs:
        specs = [("base-recipe", {})]
    ids = [rid for rid, _ in specs]
    for rid in ids:  # a run id is a folder: SWEEP/runs/ID
        check_name("run id", rid, str(path))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids must be unique: {ids}")
    keys = list(axes) + [k for _, s in specs for k in s if k not in axes]
    keys = list(dict.fromkeys(keys))
    runs = []
    for rid, settings in specs:
        data = merge_overrides(base, nested(settings))
        recipe = recipe_from_dict(data, f"{path} run {rid}")
        values = {k: settings[k] if k in settings else lookup(recipe, k) for k in keys}
        runs.append(SweepRun(rid, settings, recipe, values))
    check_sources([r.recipe for r in runs])
    check_models([r.recipe for r in runs])
    return keys, runs


def lookup(recipe: Recipe, dotted: str):
    """A recipe's value at a dotted key ('train.config.lora.r'); '-' where it has none."""
    from dataclasses import asdict

    node = asdict(recipe)
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "-"
        node = node[part]
    return node


def run_state(folder: Path) -> str | None:
    if (folder / "done.json").exists():
        return "done"
    if (folder / "failed.json").exists():
        return "failed"
    return None


def run_sweep(
    grid_path: str | Path,
    out: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    stale_after: float = 120.0,
    poll: float = 5.0,
    progress: bool = True,
) -> dict | None:
    """Work through this shard's runs; returns the table once every run of the grid is finished
    (None when other shards still have work)."""
    out = Path(out)
    keys, runs = load_grid(grid_path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(
        {
            "grid": str(grid_path),
            "axes": keys,
            "runs": [{"id": r.id, "settings": r.settings} for r in runs],
        },
        out / "sweep.yaml",
    )
    mine = shard_runs(runs, shard)
    while True:
        pending = [r for r in mine if run_state(out / "runs" / r.id) is None]
        if not pending:
            break
        worked = False
        for r in pending:
            lock = FileLock(out / "locks" / f"run-{r.id}.lock", stale_after)
            if not lock.try_acquire():
                continue
            try:
                worked |= work_on(r, out / "runs" / r.id, out / "stages", stale_after, progress)
            finally:
                lock.release()
        if not worked:
            time.sleep(poll)  # the rest is claimed by live workers: wait, take over if one dies
    if any(run_state(out / "runs" / r.id) is None for r in runs):
        print("this shard is finished; other shards still run (rerun any worker for the table)")
        return None
    table = build_table(out, keys, runs)
    from posttrain.pipeline.sweeptable import to_text, write_tables

    write_tables(table, out)
    print("\n" + to_text(table))
    print(f"\nwritten: {out / 'results.md'}, results.csv, results.json")
    return table


def work_on(r: SweepRun, folder: Path, store: Path, stale_after: float, progress: bool) -> bool:
    """Run `r` (its run lock held); True once it is done or failed, False when it was set aside
    because another worker is computing a stage it needs (this worker takes another run)."""
    from posttrain.pipeline.run import run_recipe

    if run_state(folder) is not None:
        return True
    print(f"== run {r.id}: {r.settings}", flush=True)
    start = time.time()
    try:
        run_recipe(
            r.recipe, folder, store=store, stale_after=stale_after, progress=progress, wait=False
        )
    except StageBusy as e:
        print(f"== run {r.id} set aside: {e}", flush=True)
        return False
    except EngineUnavailable:  # a server is down (or a judge failing): every run would fail
        raise  # alike, so the worker stops; rerunning resumes
    except (ConfigError, DataError, RuntimeError) as e:  # this run fails alone
        write_json(folder / "failed.json", {"error": str(e), "trace": traceback.format_exc()})
        print(f"== run {r.id} failed: {e}", flush=True)
        return True
    write_json(
        folder / "done.json", {"id": r.id, "settings": r.settings, "seconds": time.time() - start}
    )
    return True


def build_table(out: Path, keys: list[str], runs: list[SweepRun]) -> dict:
    from posttrain.records import read_jsonl
    from posttrain.pipeline.sweeptable import set_table

    reports, status = {}, {}
    for r in runs:
        folder = out / "runs" / r.id
        status[r.id] = run_state(folder)
        if status[r.id] == "done":
            reports[r.id] = json.loads((folder / "report.json").read_text())
    sets = []
    names = [s.name for s in runs[0].recipe.eval]
    for name in names:
        per_run, base, bases = {}, None, {}
        for rid, rep in reports.items():
            entry = next((s for s in rep["sets"] if s["name"] == name), None)
            if entry is None:
                continue
            base = base or entry["base"]
            link = out / "runs" / rid / "eval" / name / "base"  # -> stages/eval-NAME-base-DIGEST
            key = Path(os.readlink(link)).name if link.is_symlink() else "base"
            bases.setdefault(key, entry["base"])
            trained = entry.get("trained_stage", f"eval/{name}/trained")
            per_run[rid] = {
                "summary": entry["trained"],
                "compare": entry["compare"],
                "base": key,
                "guard": entry["guard"],
                # the last round's evaluation (rounds > 1: under round-K/)
                "items": read_jsonl(out / "runs" / rid / trained / "items.jsonl"),
            }
        if base is not None:
            sets.append(set_table(name, base, per_run, bases))
    return {
        "axes": keys,
        "sets": sets,
        "runs": [
            {
                "id": r.id,
                "settings": r.values or r.settings,
                "changed": r.settings,
                "status": status[r.id],
            }
            for r in runs
        ],
    }


def shard_runs(runs: list, shard: tuple[int, int]) -> list:
    """Shard I of N: the runs at positions I, I + N, I + 2N, ... of the grid."""
    index, count = shard
    return [r for i, r in enumerate(runs) if i % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text!r}: expected 0 <= I < N")
    return i, n
