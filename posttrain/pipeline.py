"""Stage `run`: one recipe, the whole loop, one output folder with a subfolder per stage.

    posttrain run recipes/default.yaml --out runs/demo

sample -> verify -> pairs -> train -> eval (base and trained, same items) -> compare. With an
online method (grpo, dapo, ..., train/online_config.py) the trainer samples its own rollouts of
`train.problems`: sample, verify and pairs do not run (CHORD keeps sample and verify: its
demonstrations are the correct sampled answers unless train.config.chord.demos names a file),
and a section the method does not use is an error rather than silently ignored. A stage
that finished writes `STAGE/done.json` (its settings and wall time) and is skipped next time,
so a killed run resumes where it stopped; the stages themselves resume inside (sampling keeps
finished rows, training continues from its last checkpoint). Running the same folder with
changed settings for a finished stage is an error rather than a silent mix of two recipes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, load_config, save_config
from .records import write_json


@dataclass
class SampleStage:
    problems: str = "builtin:arith:200?split=train"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    system_prompt: str | None = None


@dataclass
class PairsStage:
    strategy: str = "confident-wrong"
    max_pairs_per_problem: int = 1


@dataclass
class TrainStage:
    method: str = "dpo"
    # online methods only: the problems the trainer samples its rollouts of
    problems: str = ""
    config: dict = field(default_factory=dict)  # TrainConfig / OnlineConfig keys, e.g. {lr: 5e-5}


@dataclass
class EvalStage:
    problems: str = "builtin:arith:300?split=test"
    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 128
    batch_size: int = 16
    protocol: str = "auto"
    system_prompt: str | None = None


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | bf16 | fp32 | fp16 (auto: models.resolve_dtype)
    seed: int = 0
    sample: SampleStage = field(default_factory=SampleStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    train: TrainStage = field(default_factory=TrainStage)
    eval: EvalStage = field(default_factory=EvalStage)


STAGES = ("sample", "verify", "pairs", "train", "eval-base", "eval-trained", "compare")


def is_online(method: str) -> bool:
    from .train.online_config import METHODS, RENAMED

    return method in METHODS or method in RENAMED


def uses_samples(recipe: Recipe) -> bool:
    """Whether the sample and verify stages feed the training (offline methods; CHORD without
    its own demonstrations file)."""
    t = recipe.train
    if not is_online(t.method):
        return True
    return t.method == "chord" and not (t.config.get("chord") or {}).get("demos")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    recipe = load_config(Recipe, path, overrides)
    from .tasks import load_problems  # validate sources early: a typo should not cost a stage

    t = recipe.train
    if is_online(t.method):
        if not t.problems:
            raise ConfigError(f"{path}: train.problems is empty; the online method "
                              f"{t.method!r} samples its own completions of these problems, "
                              "e.g. builtin:arith:512?split=train")
        if not uses_samples(recipe) and recipe.sample != SampleStage():
            raise ConfigError(f"{path}: sample: is not used by the online method {t.method!r} "
                              "(it samples train.problems itself); remove the section")
        if recipe.pairs != PairsStage():
            raise ConfigError(f"{path}: pairs: is not used by the online method {t.method!r}; "
                              "remove the section")
        load_problems(t.problems, limit=1)
    elif t.problems:
        raise ConfigError(f"{path}: train.problems is not used by the offline method "
                          f"{t.method!r} (it trains on the pairs or samples of the recipe)")
    specs = [recipe.eval.problems] + ([recipe.sample.problems] if uses_samples(recipe) else [])
    for spec in specs:
        load_problems(spec, limit=1)
    return recipe


class StageRunner:
    """Runs a stage unless its `done.json` says it finished with the same settings."""

    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, tuple[float, bool]] = {}  # stage -> (seconds, skipped)

    def __call__(self, name: str, settings: dict, fn) -> Path:
        folder = self.out / name
        marker = folder / "done.json"
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        if marker.exists():
            done = json.loads(marker.read_text())
            if done["settings_hash"] != digest:
                raise ConfigError(
                    f"{marker}: stage '{name}' finished earlier with other settings; "
                    f"use a new --out folder or delete {folder}")
            self.times[name] = (done["seconds"], True)
            print(f"[{name}] done earlier ({done['seconds']:.0f} s): skipped")
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] running ...", flush=True)
        start = time.time()
        fn(folder)
        seconds = time.time() - start
        write_json(marker, {"settings": settings, "settings_hash": digest, "seconds": seconds})
        self.times[name] = (seconds, False)
        return folder


def _verb(verb: str, argv: list[str]) -> None:
    from .cli import main as cli_main

    rc = cli_main([verb, *argv])
    if rc != 0:
        raise RuntimeError(f"stage '{verb}' failed with exit code {rc}")


def run_recipe(recipe: Recipe, out: str | Path) -> dict:
    from .compare import compare_items
    from .engines import SamplingParams, make_engine
    from .evaluate import evaluate
    from .models import resolve_dtype
    from .pairs import stats_path
    from .records import read_jsonl
    from .sample import sample_problems
    from .tasks import load_problems
    from .verify.stage import verify_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "recipe.yaml")
    stage = StageRunner(out)
    r, s, e = recipe, recipe.sample, recipe.eval
    # the resolved dtype goes into the stage settings, so a folder resumed on a machine where
    # 'auto' means something else is refused instead of mixing fp32 and bf16 stages
    dtype = resolve_dtype(r.dtype)

    def do_sample(folder):
        engine = make_engine("hf", r.model, dtype=dtype, batch_size=s.batch_size)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=r.seed)
        stats = sample_problems(engine, load_problems(s.problems), folder / "samples.jsonl",
                                params, system_prompt=s.system_prompt, chunk_size=s.batch_size)
        print(f"  {stats['tokens_per_second']:.0f} tokens/s")

    online, samples = is_online(r.train.method), uses_samples(recipe)
    if samples:
        stage("sample", {"model": r.model, "dtype": dtype, "seed": r.seed, **asdict(s)},
              do_sample)
        samples_file = out / "sample" / "samples.jsonl"
        stage("verify", {}, lambda f: verify_file(samples_file, f / "scored.jsonl"))
    scored = out / "verify" / "scored.jsonl"
    pairs = out / "pairs" / "pairs.jsonl"
    if not online:
        stage("pairs", {**asdict(r.pairs), "seed": r.seed}, lambda f: _verb("pairs", [
            "--scored", str(scored), "--out", str(f / "pairs.jsonl"), "--strategy",
            r.pairs.strategy, "--max-pairs-per-problem", str(r.pairs.max_pairs_per_problem),
            "--seed", str(r.seed)]))
        made = json.loads(stats_path(pairs).read_text())
        if made["pairs"] == 0:
            raise ConfigError(
                f"{out / 'pairs'}: 0 pairs from {made['samples']} samples of {made['problems']} "
                f"problems ({made['all_wrong']} all wrong, {made['all_right']} all right): raise "
                "sample.n, sample more problems or pick an easier source, with a new --out folder")

    def do_train(folder):
        config = {"seed": r.seed, **r.train.config}
        if online and samples:  # CHORD: the correct sampled answers are its demonstrations
            config["chord"] = {**(config.get("chord") or {}), "demos": str(scored)}
        save_config(config, folder / "recipe-train.yaml")
        data = ["--problems", r.train.problems] if online else ["--data", str(pairs)]
        argv = ["--method", r.train.method, "--model", r.model, *data,
                "--out", str(folder), "--config", str(folder / "recipe-train.yaml")]
        if (folder / "checkpoints").exists():
            argv.append("--resume")
        _verb("train", argv)

    stage("train", {"model": r.model, "seed": r.seed, **asdict(r.train)}, do_train)
    adapter = out / "train" / "adapter"

    eval_problems = load_problems(e.problems)
    params = SamplingParams(n=e.n, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                            seed=r.seed)

    def do_eval(adapter_dir):
        def run(folder):
            engine = make_engine("hf", r.model, dtype=dtype, batch_size=e.batch_size,
                                 adapter=adapter_dir)
            evaluate(engine, eval_problems, folder, params, protocol=e.protocol,
                     system_prompt=e.system_prompt)
        return run

    eval_settings = {"model": r.model, "dtype": dtype, "seed": r.seed, **asdict(e)}
    stage("eval-base", eval_settings, do_eval(None))
    stage("eval-trained", {**eval_settings, "train": asdict(r.train)}, do_eval(adapter))

    def do_compare(folder):
        result = compare_items(read_jsonl(out / "eval-base" / "items.jsonl"),
                               read_jsonl(out / "eval-trained" / "items.jsonl"))
        write_json(folder / "compare.json", result)

    stage("compare", {}, do_compare)
    result = json.loads((out / "compare" / "compare.json").read_text())
    base = json.loads((out / "eval-base" / "summary.json").read_text())
    trained = json.loads((out / "eval-trained" / "summary.json").read_text())
    report = {"base": base, "trained": trained, "compare": result,
              "seconds": {k: v[0] for k, v in stage.times.items()}}
    write_json(out / "report.json", report)
    print(format_report(report, stage.times))
    return report


def format_report(report: dict, times: dict[str, tuple[float, bool]]) -> str:
    def score(s):
        lo, hi = s["interval_95"]
        return f"{100 * s['accuracy']:5.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]"

    c = report["compare"]
    lo, hi = c["interval_95"]
    a_only, b_only = c["discordant"]
    lines = [
        "",
        f"{'':<9}{'accuracy':>8}  95% interval      n",
        f"{'base':<9}{score(report['base'])}  {report['base']['n']}",
        f"{'trained':<9}{score(report['trained'])}  {report['trained']['n']}",
        f"difference {100 * c['difference']:+.1f} points, 95% paired-bootstrap interval "
        f"[{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar exact p = {c['p_value']:.2g} "
        f"(base-only {a_only}, trained-only {b_only})",
        "",
        "wall time per stage:",
    ]
    for name in STAGES:
        if name in times:
            seconds, skipped = times[name]
            lines.append(f"  {name:<13} {seconds:7.1f} s{'  (skipped: done earlier)' if skipped else ''}")
    lines.append(f"  {'total':<13} {sum(t for t, _ in times.values()):7.1f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/default.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: runs/RECIPE_NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.config.lr=1e-5")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.set)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    run_recipe(recipe, out)
    return 0
