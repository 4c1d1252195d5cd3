"""The whole loop for one recipe (`posttrain run`, commands/run.py), into one output folder
with a subfolder per stage.

    posttrain run recipes/default.yaml --out runs/demo [--fail-on-regression]
    python -c "from posttrain.pipeline.run import run_recipe; help(run_recipe)"

sample -> verify -> pairs -> train -> for each eval set: eval base and trained on the same items
-> compare. (`train.data: demonstrations` replaces the first three by `demos`; online methods
train on the sample problems.) Folders: OUT/sample, verify, pairs (or demos), train, and
OUT/eval/SET/{base,trained,compare} per evaluation set; OUT/report.json holds the table.
A stage that finished writes `done.json` (its settings and wall time) and is skipped next time,
so a killed run resumes where it stopped; the stages themselves resume inside. Running the same
folder with changed settings for a finished stage is an error rather than a silent mix of two
recipes. Every stage is a function call (no argv); `posttrain sweep` composes the same calls.
The recipe arrives resolved (load_recipe): every setting, the train config's included, was
checked before the first stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from posttrain.config import ConfigError, save_config
from posttrain.pipeline.recipe import (
    Recipe,
    TrainStage,
    engine_of,
    engine_settings,
    load_recipe,  # noqa: F401 (imported from here by users and tests)
    resolve,
    train_config,
    train_data_kind,
)
from posttrain.records import write_json
from posttrain.pipeline.steps import (
    eval_set_stage,
    eval_settings,
    sample_stage,
    stage_dtype,
)
from posttrain.pipeline.store import StageRunner

STAGES = ("sample", "verify", "pairs", "train")  # then eval/SET/{base,trained,compare}
REGRESSION_EXIT = 3


def train_block(recipe: Recipe) -> TrainStage:
    """The recipe's `train:` block as it keys the train stage: its config taking the recipe's
    dtype unless it names one, 'auto' resolved for this machine's training device (as
    stage_dtype, and for the same reason: a shared sweep store must not mix bf16 and fp32
    adapters under one digest)."""
    from posttrain.models import resolve_device, resolve_dtype

    dtype = recipe.train.config.get("dtype", recipe.dtype)
    return replace(
        recipe.train,
        config={
            **recipe.train.config,
            "dtype": resolve_dtype(dtype, resolve_device("auto", say=False)),
        },
    )


def prepare_data(recipe: Recipe, stage: StageRunner, progress: bool = True):
    """Run the stages that make the training data; (path or problem source, its digest)."""
    from posttrain.pairs import PairsConfig, make_pairs
    from posttrain.records import write_jsonl
    from posttrain.tasks import load_problems
    from posttrain.verify.files import verify_file

    r, s, kind = recipe, recipe.sample, train_data_kind(recipe)
    if kind == "problems":
        return s.problems, "problems:" + s.problems
    if kind == "demonstrations":
        from posttrain.demos import demonstration_rows

        def do_demos(folder):
            write_jsonl(
                folder / "demos.jsonl",
                demonstration_rows(load_problems(s.problems), r.demos.style, s.system_prompt),
            )

        folder, d = stage(
            "demos",
            {"problems": s.problems, "system_prompt": s.system_prompt, **asdict(r.demos)},
            do_demos,
        )
        return str(folder / "demos.jsonl"), d

    folder, d = stage(
        "sample",
        {
            "model": r.model,
            "dtype": stage_dtype(r, s),
            "seed": r.seed,
            **asdict(s),
            "engine": engine_settings(engine_of(r, s)),
        },
        lambda f: sample_stage(r, f, progress),
    )
    folder, d = stage(
        "verify",
        {"input": d},
        lambda f: verify_file(folder / "samples.jsonl", f / "scored.jsonl", progress=progress),
    )
    scored = folder / "scored.jsonl"
    if kind == "scored":
        return str(scored), d
    folder, d = stage(
        "pairs",
        {**asdict(r.pairs), "seed": r.seed, "input": d},
        lambda f: make_pairs(
            PairsConfig(
                scored=str(scored),
                out=str(f / "pairs.jsonl"),
                strategy=r.pairs.strategy,
                max_pairs_per_problem=r.pairs.max_pairs_per_problem,
                seed=r.seed,
            )
        ),
    )
    made = json.loads((folder / "pairs.stats.json").read_text())
    if made["pairs"] == 0:
        raise ConfigError(
            f"{folder}: 0 pairs from {made['samples']} samples of {made['problems']} "
            f"problems ({made['all_wrong']} all wrong, {made['all_right']} all right): raise "
            "sample.n, sample more problems or pick an easier source, with a new --out folder"
        )
    return str(folder / "pairs.jsonl"), d


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    store: str | Path | None = None,
    stale_after: float = 120.0,
    progress: bool = True,
    wait: bool = True,
) -> dict:
    """Run every stage of `recipe` into `out` (shared stages under `store`); the report.
    With wait=False a stage another worker is computing raises stages.StageBusy."""
    from posttrain.evaluation.compare import compare_items
    from posttrain.records import read_jsonl
    from posttrain.pipeline.runtable import format_run_table, set_row
    from posttrain.train.stage import train_stage

    if recipe.train.resolved is None:  # a Recipe built by hand, not by load_recipe
        recipe = resolve(recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "recipe.yaml")
    stage = StageRunner(out, store, stale_after=stale_after, wait=wait)
    r = recipe
    data, data_digest = prepare_data(r, stage, progress)
    train_folder, train_digest = stage(
        "train",
        {
            "model": r.model,
            "seed": r.seed,
            "method": r.train.method,
            "config": train_block(r).config,
            "data": data_digest,
        },
        lambda f: train_stage(train_config(r, data), f, nproc=r.train.nproc, progress=progress),
    )
    adapter = train_folder / "adapter"

    sets = []
    for es in r.eval:
        settings = eval_settings(r, es)
        base, d_base = stage(
            f"eval/{es.name}/base",
            settings,
            lambda f, es=es: eval_set_stage(r, es, None, f, progress),
        )
        trained, d_trained = stage(
            f"eval/{es.name}/trained",
            {**settings, "adapter": train_digest},
            lambda f, es=es: eval_set_stage(r, es, adapter, f, progress),
        )
        cmp_folder, _ = stage(
            f"eval/{es.name}/compare",
            {"base": d_base, "trained": d_trained},
            lambda f, b=base, t=trained: write_json(
                f / "compare.json",
                compare_items(read_jsonl(b / "items.jsonl"), read_jsonl(t / "items.jsonl")),
            ),
        )
        b_sum = json.loads((base / "summary.json").read_text())
        t_sum = json.loads((trained / "summary.json").read_text())
        c = json.loads((cmp_folder / "compare.json").read_text())
        sets.append(
            {
                "name": es.name,
                "guard": es.guard,
                "problems": es.problems,
                "base": b_sum,
                "trained": t_sum,
                "compare": c,
                "row": set_row(es.name, es.guard, b_sum, t_sum, c),
            }
        )
    rows = [s["row"] for s in sets]
    report = {
        "sets": sets,
        "table": rows,
        "regression": any(x["regression"] for x in rows),
        # the first set at the top level, as reports before several sets had it
        "base": sets[0]["base"],
        "trained": sets[0]["trained"],
        "compare": sets[0]["compare"],
        "seconds": {k: v[0] for k, v in stage.times.items()},
    }
    write_json(out / "report.json", report)
    print("\n" + format_run_table(rows))
    print(format_times(stage.times))
    return report


def format_times(times: dict[str, tuple[float, bool]]) -> str:
    lines = ["", "wall time per stage:"]
    width = max([len(n) for n in times] + [5])
    for name, (seconds, skipped) in times.items():
        lines.append(
            f"  {name:<{width}} {seconds:7.1f} s{'  (skipped: done earlier)' if skipped else ''}"
        )
    lines.append(f"  {'total':<{width}} {sum(t for t, _ in times.values()):7.1f} s")
    return "\n".join(lines)
