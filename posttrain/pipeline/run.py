"""The whole loop for one recipe (`posttrain run`, commands/run.py), into one output folder
with a subfolder per stage.

    posttrain run recipes/default.yaml --out runs/demo [--fail-on-regression]
    python -c "from posttrain.pipeline.run import run_recipe; help(run_recipe)"

sample -> verify -> pairs -> train -> for each eval set: eval base and trained on the same items
-> compare. (`train.data: demonstrations` replaces the first three by `demos`; online methods
train on the sample problems.) Folders: OUT/sample, verify, pairs (or demos), train, and
OUT/eval/SET/{base,trained,compare} per evaluation set; OUT/report.json holds the table.
With `rounds: K > 1` (iterative DPO) round r > 1 samples with round r-1's adapter, verifies,
pairs, trains from that adapter (the DPO family's reference: round r-1's policy, or the base
with train.reference: base) and evaluates, under OUT/round-r/{sample,...,eval/SET/compare}; its
compare stage also holds the paired comparison with round r-1. Round 1 keeps the folders and
digests of a run without rounds, and a second table shows one row per round.
A stage that finished writes `done.json` (its settings and wall time) and is skipped next time,
so a killed run resumes where it stopped; the stages themselves resume inside. Running the same
folder with changed settings for a finished stage is an error rather than a silent mix of two
recipes. Every stage is a function call (no argv); `posttrain sweep` composes the same calls.
The recipe arrives resolved (load_recipe): every setting, the train config's included, was
checked before the first stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from posttrain.config import ConfigError, save_config
from posttrain.pipeline.recipe import (
    Recipe,
    TrainStage,
    load_recipe,  # noqa: F401 (imported from here by users and tests)
    resolve,
    train_config,
    train_data_kind,
)
from posttrain.pipeline.rounds import round_source
from posttrain.pipeline.stage_engines import engine_of, engine_settings
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


@dataclass
class Round:
    """A finished round's training: its number, adapter folder and train stage digest."""

    number: int
    adapter: Path
    digest: str


def round_prefix(number: int) -> str:
    """Where round `number`'s stages live under OUT: round 1 where a run without rounds puts
    them (its folders and digests unchanged), round r > 1 under round-r/."""
    return "" if number == 1 else f"round-{number}/"


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


def prepare_data(
    recipe: Recipe,
    stage: StageRunner,
    progress: bool = True,
    previous: Round | None = None,
):
    """Run the stages that make the training data; (path or problem source, its digest).
    `previous`: in round r > 1, round r-1, whose adapter samples (stages under round-r/)."""
    from posttrain.pairs import PairsConfig, make_pairs
    from posttrain.records import write_jsonl
    from posttrain.tasks import load_problems
    from posttrain.verify.files import verify_file

    r, s, kind = recipe, recipe.sample, train_data_kind(recipe)
    source = round_source(r, previous.number + 1 if previous else 1)
    if kind == "problems":
        return source, "problems:" + source
    if kind == "demonstrations":
        from posttrain.demos import demonstration_rows

        def do_demos(folder):
            write_jsonl(
                folder / "demos.jsonl",
                demonstration_rows(load_problems(source), r.demos.style, s.system_prompt),
            )

        folder, d = stage(
            "demos",
            {"problems": source, "system_prompt": s.system_prompt, **asdict(r.demos)},
            do_demos,
        )
        return str(folder / "demos.jsonl"), d

    prefix = round_prefix(previous.number + 1) if previous else ""
    adapter = {"adapter": previous.digest} if previous else {}  # round 1: as without rounds
    folder, d = stage(
        prefix + "sample",
        {
            "model": r.model,
            "dtype": stage_dtype(r, s),
            "seed": r.seed,
            **asdict(s),
            "problems": source,  # this round's (a run without rounds: its one source)
            "engine": engine_settings(engine_of(r, s)),
            **adapter,
        },
        lambda f: sample_stage(
            r,
            f,
            progress,
            adapter=previous.adapter.absolute() if previous else None,
            problems=source,
        ),
    )
    folder, d = stage(
        prefix + "verify",
        {"input": d},
        lambda f: verify_file(folder / "samples.jsonl", f / "scored.jsonl", progress=progress),
    )
    scored = folder / "scored.jsonl"
    if kind == "scored":
        return str(scored), d
    folder, d = stage(
        prefix + "pairs",
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
    from posttrain.pipeline.runtable import format_rounds_table, format_run_table
    from posttrain.train.stage import train_stage

    if recipe.train.resolved is None:  # a Recipe built by hand, not by load_recipe
        recipe = resolve(recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "recipe.yaml")
    stage = StageRunner(out, store, stale_after=stale_after, wait=wait)
    r = recipe
    bases = {}  # eval set -> (folder, digest) of its base evaluation
    trained = {es.name: [] for es in r.eval}  # eval set -> per round (folder, digest)
    per_round = {es.name: [] for es in r.eval}  # eval set -> per round its results
    previous: Round | None = None
    for number in range(1, r.rounds + 1):
        prefix = round_prefix(number)
        data, data_digest = prepare_data(r, stage, progress, previous)
        settings = {
            "model": r.model,
            "seed": r.seed,
            "method": r.train.method,
            "config": train_block(r).config,
            "data": data_digest,
        }
        # absolute: round r's train config records it, and a resume may run from another cwd
        init = previous.adapter.absolute() if previous else None
        if previous:  # round 1: the settings of a run without rounds
            settings["init"] = previous.digest
            if r.train.resolved.preference:
                settings["reference"] = r.train.reference or "previous"
        train_folder, train_digest = stage(
            prefix + "train",
            settings,
            lambda f, data=data, init=init: train_stage(
                train_config(r, data, init), f, nproc=r.train.nproc, progress=progress
            ),
        )
        current = Round(number, train_folder / "adapter", train_digest)
        for es in r.eval:
            if es.name not in bases:
                bases[es.name] = stage(
                    f"eval/{es.name}/base",
                    eval_settings(r, es),
                    lambda f, es=es: eval_set_stage(r, es, None, f, progress),
                )
            entry = evaluate_round(
                r, es, stage, current, bases[es.name], trained[es.name], progress
            )
            per_round[es.name].append(entry)
        previous = current

    sets = [finish_set(es, per_round[es.name]) for es in r.eval]
    rows = [s["row"] for s in sets]
    report = {
        "rounds": r.rounds,
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
    if r.rounds > 1:
        print("\nper round (each against the base and against the round before):")
        print(format_rounds_table([row for s in sets for row in s["round_rows"]]))
    print(format_times(stage.times))
    return report


def evaluate_round(
    r: Recipe, es, stage: StageRunner, current: Round, base, earlier: list, progress: bool
) -> dict:
    """Evaluate round `current`'s adapter on set `es` and compare it, on the same items, with
    the base (`base`: its folder and digest) and with the round before (`earlier`: the
    (folder, digest) of every earlier round on this set; current's is appended)."""
    from posttrain.evaluation.compare import compare_items
    from posttrain.records import read_jsonl

    prefix = round_prefix(current.number)
    b_folder, d_base = base
    settings = eval_settings(r, es)
    adapter = current.adapter
    folder, digest = stage(
        f"{prefix}eval/{es.name}/trained",
        {**settings, "adapter": current.digest},
        lambda f: eval_set_stage(r, es, adapter, f, progress),
    )
    prev_folder, d_prev = earlier[-1] if earlier else (b_folder, d_base)
    earlier.append((folder, digest))

    def compare(f):
        items = read_jsonl(folder / "items.jsonl")
        write_json(f / "compare.json", compare_items(read_jsonl(b_folder / "items.jsonl"), items))
        if current.number > 1:
            against = read_jsonl(prev_folder / "items.jsonl")
            write_json(f / "compare-previous.json", compare_items(against, items))

    # round 1: the compare stage of a run without rounds (its previous is the base)
    extra = {"previous": d_prev} if current.number > 1 else {}
    cmp_folder, _ = stage(
        f"{prefix}eval/{es.name}/compare",
        {"base": d_base, "trained": digest, **extra},
        compare,
    )
    c = json.loads((cmp_folder / "compare.json").read_text())
    name = "compare-previous.json" if current.number > 1 else "compare.json"
    return {
        "round": current.number,
        "trained_stage": f"{prefix}eval/{es.name}/trained",
        "trained": json.loads((folder / "summary.json").read_text()),
        "compare": c,
        "compare_previous": json.loads((cmp_folder / name).read_text()),
        "base": json.loads((b_folder / "summary.json").read_text()),
    }


def finish_set(es, rounds: list[dict]) -> dict:
    """A set's entry of report.json: the last round against the base (as a run without rounds
    reports it), and one row per round."""
    from posttrain.pipeline.runtable import round_rows, set_row

    last = rounds[-1]
    return {
        "name": es.name,
        "guard": es.guard,
        "problems": es.problems,
        "base": last["base"],
        "trained": last["trained"],
        "compare": last["compare"],
        "trained_stage": last["trained_stage"],
        "row": set_row(es.name, es.guard, last["base"], last["trained"], last["compare"]),
        "round_rows": round_rows(es.name, last["base"], rounds),
    }


def format_times(times: dict[str, tuple[float, bool]]) -> str:
    lines = ["", "wall time per stage:"]
    width = max([len(n) for n in times] + [5])
    for name, (seconds, skipped) in times.items():
        lines.append(
            f"  {name:<{width}} {seconds:7.1f} s{'  (skipped: done earlier)' if skipped else ''}"
        )
    lines.append(f"  {'total':<{width}} {sum(t for t, _ in times.values()):7.1f} s")
    return "\n".join(lines)
