"""Stage `run`: one recipe, the whole loop, one output folder with a subfolder per stage.

    posttrain run recipes/default.yaml --out runs/demo

sample -> verify -> pairs -> train -> eval (base and trained, same items) -> compare. A stage
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
    batch_size: int | None = None  # the engine's batch_size for this stage (None: the engine's)
    system_prompt: str | None = None
    engine: dict = field(default_factory=dict)  # keys over the recipe's engine:, this stage only


@dataclass
class PairsStage:
    strategy: str = "confident-wrong"
    max_pairs_per_problem: int = 1


@dataclass
class TrainStage:
    method: str = "dpo"
    config: dict = field(default_factory=dict)  # TrainConfig keys, e.g. {lr: 5e-5, beta: 0.1}


@dataclass
class EvalStage:
    problems: str = "builtin:arith:300?split=test"
    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 128
    batch_size: int | None = None  # the engine's batch_size for this stage (None: the engine's)
    protocol: str = "auto"
    system_prompt: str | None = None
    engine: dict = field(default_factory=dict)  # keys over the recipe's engine:, this stage only


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | bf16 | fp32 | fp16 (auto: models.resolve_dtype)
    seed: int = 0
    # how sample and eval generate: EngineConfig keys, e.g. {kind: vllm, tensor_parallel_size: 2}
    engine: dict = field(default_factory=dict)
    sample: SampleStage = field(default_factory=SampleStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    train: TrainStage = field(default_factory=TrainStage)
    eval: EvalStage = field(default_factory=EvalStage)


STAGES = ("sample", "verify", "pairs", "train", "eval-base", "eval-trained", "compare")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    recipe = load_config(Recipe, path, overrides)
    from .tasks import load_problems  # validate sources early: a typo should not cost a stage

    for spec in (recipe.sample.problems, recipe.eval.problems):
        load_problems(spec, limit=1)
    for name in ("sample", "eval"):
        stage_engine(recipe, name)  # a bad engine key fails here, not after a stage
    return recipe


# engine keys that say how to reach or drive an engine, not what it generates: a resumed run
# may change them (servers moved, more concurrency) without being refused
TRANSPORT_KEYS = ("base_urls", "api_key_env", "concurrency", "timeout", "max_retries",
                  "gpu_memory_utilization")


def stage_engine(recipe: Recipe, stage_name: str):
    """The EngineConfig stage `stage_name` ("sample" | "eval") generates with: the recipe's
    engine: block with the stage's engine: keys over it. A stage that switches kind keeps only
    the shared keys of the recipe's block (not the other kind's own)."""
    from .config import from_dict, merge
    from .engines import EngineConfig
    from .engines.config import KIND_OF

    stage = getattr(recipe, stage_name)
    kind = stage.engine.get("kind", recipe.engine.get("kind", "hf"))
    shared = {k: v for k, v in recipe.engine.items() if KIND_OF.get(k, kind) == kind}
    data = merge(shared, stage.engine)
    if stage.batch_size is not None:
        if data.get("batch_size", stage.batch_size) != stage.batch_size:
            raise ConfigError(f"{stage_name}.batch_size ({stage.batch_size}) and the engine's "
                              f"batch_size ({data['batch_size']}) are both set; keep one")
        data["batch_size"] = stage.batch_size
    config = from_dict(EngineConfig, data, f"{stage_name}.engine")
    config.check()
    return config


def engine_settings(config) -> dict:
    """What of an engine goes into a stage's settings (so a resumed run refuses another)."""
    return {k: v for k, v in asdict(config).items() if k not in TRANSPORT_KEYS}


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
    from .models import resolve_device, resolve_dtype
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
    sample_engine, eval_engine = stage_engine(r, "sample"), stage_engine(r, "eval")
    # the resolved dtype goes into the stage settings, so a folder resumed on a machine where
    # 'auto' means something else is refused instead of mixing fp32 and bf16 stages
    dtype = resolve_dtype(r.dtype, resolve_device(sample_engine.device, say=False))
    eval_dtype = resolve_dtype(r.dtype, resolve_device(eval_engine.device, say=False))

    def do_sample(folder):
        engine = make_engine(sample_engine, r.model, dtype=dtype)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=r.seed)
        try:
            stats = sample_problems(engine, load_problems(s.problems), folder / "samples.jsonl",
                                    params, system_prompt=s.system_prompt,
                                    chunk_size=getattr(engine, "batch_size", 8))
        finally:
            engine.close()
        print(f"  {stats['tokens_per_second']:.0f} tokens/s")

    stage("sample", {"model": r.model, "dtype": dtype, "seed": r.seed, **asdict(s),
                     "engine": engine_settings(sample_engine)}, do_sample)
    samples = out / "sample" / "samples.jsonl"
    stage("verify", {}, lambda f: verify_file(samples, f / "scored.jsonl"))
    scored = out / "verify" / "scored.jsonl"
    stage("pairs", {**asdict(r.pairs), "seed": r.seed}, lambda f: _verb("pairs", [
        "--scored", str(scored), "--out", str(f / "pairs.jsonl"), "--strategy", r.pairs.strategy,
        "--max-pairs-per-problem", str(r.pairs.max_pairs_per_problem), "--seed", str(r.seed)]))
    pairs = out / "pairs" / "pairs.jsonl"
    made = json.loads(stats_path(pairs).read_text())
    if made["pairs"] == 0:
        raise ConfigError(
            f"{out / 'pairs'}: 0 pairs from {made['samples']} samples of {made['problems']} "
            f"problems ({made['all_wrong']} all wrong, {made['all_right']} all right): raise "
            "sample.n, sample more problems or pick an easier source, with a new --out folder")

    def do_train(folder):
        save_config({"seed": r.seed, **r.train.config}, folder / "recipe-train.yaml")
        argv = ["--method", r.train.method, "--model", r.model, "--data", str(pairs),
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
            engine = make_engine(eval_engine, r.model, dtype=eval_dtype, adapter=adapter_dir)
            try:
                evaluate(engine, eval_problems, folder, params, protocol=e.protocol,
                         system_prompt=e.system_prompt)
            finally:
                engine.close()
        return run

    eval_settings = {"model": r.model, "dtype": eval_dtype, "seed": r.seed, **asdict(e),
                     "engine": engine_settings(eval_engine)}
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
