"""A recipe: the typed settings of every stage of `posttrain run` (and of each run of a sweep).

    python -c "from posttrain.pipeline.recipe import load_recipe; print(load_recipe('recipes/default.yaml'))"

`eval` is a list of named evaluation sets (each with its own protocol, sampling, judge and a
`guard` flag); the older single mapping form is read as one set named "eval". A `--set`
override under `eval.` applies to every set (`eval.max_new_tokens=32`), or to one set when its
name comes first (`eval.dna.n=2`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import ConfigError, from_dict, load_yaml, merge, parse_overrides
from posttrain.names import check_name


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
class DemosStage:
    """Demonstrations written from the problems' reference answers (posttrain/demos.py)."""

    style: str = "terse"  # terse: "#### N" | worded: "The answer is N."


@dataclass
class TrainStage:
    method: str = "dpo"
    # what it trains on: auto (pairs for the DPO family, the model's own correct samples for
    # SFT / DFT, the sample problems for online methods) | pairs | scored | demonstrations
    data: str = "auto"
    nproc: int = 1  # > 1: launched as torchrun --nproc_per_node NPROC
    config: dict = field(default_factory=dict)  # TrainConfig keys, e.g. {lr: 5e-5, beta: 0.1}


@dataclass
class JudgeSettings:
    url: str = ""  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str = ""
    key_env: str = "POSTTRAIN_JUDGE_API_KEY"
    template: str | None = None  # file replacing the answer-judging prompt
    concurrency: int = 8  # judgements in flight


@dataclass
class EvalSet:
    name: str = "eval"
    problems: str = "builtin:arith:300?split=test"
    protocol: str = "auto"
    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 128
    batch_size: int | None = None  # the engine's batch_size for this set (None: the engine's)
    system_prompt: str | None = None
    engine: dict = field(default_factory=dict)  # keys over the recipe's engine:, this set only
    guard: bool = False  # a significant drop here is a regression (run --fail-on-regression)
    judge: JudgeSettings | None = None


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | bf16 | fp32 | fp16 (auto: models.resolve_dtype)
    seed: int = 0
    # how sample and eval generate: EngineConfig keys, e.g. {kind: vllm, tensor_parallel_size: 2}
    engine: dict = field(default_factory=dict)
    sample: SampleStage = field(default_factory=SampleStage)
    pairs: PairsStage = field(default_factory=PairsStage)
    demos: DemosStage = field(default_factory=DemosStage)
    train: TrainStage = field(default_factory=TrainStage)
    eval: list[EvalSet] = field(default_factory=lambda: [EvalSet()])


DATA_KINDS = ("auto", "pairs", "scored", "demonstrations")


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    """A validated Recipe from a nested mapping (the YAML with overrides merged in)."""
    data = dict(data)
    sets = data.get("eval", [{}])
    if isinstance(sets, dict):
        sets = [sets]
    if not isinstance(sets, list) or not sets:
        raise ConfigError(f"{where}: eval: expected a mapping or a non-empty list of sets")
    built = [from_dict(EvalSet, s, f"{where}.eval[{i}]") for i, s in enumerate(sets)]
    names = [s.name for s in built]
    for i, name in enumerate(names):  # a set name is a folder: OUT/eval/NAME
        check_name("eval set name", name, f"{where}.eval[{i}]")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: eval: set names must be unique: {names}")
    for s in built:
        if s.judge is not None and not (s.judge.url and s.judge.model):
            raise ConfigError(f"{where}: eval set {s.name!r}: judge needs url and model")
        if s.n > 1 and s.temperature <= 0:
            raise ConfigError(f"{where}: eval set {s.name!r}: n > 1 needs temperature > 0")
    recipe = from_dict(Recipe, {**data, "eval": [{}]}, where)
    recipe.eval = built
    if recipe.train.data not in DATA_KINDS:
        raise ConfigError(
            f"{where}: train.data: {recipe.train.data!r}; expected {' | '.join(DATA_KINDS)}"
        )
    if recipe.train.nproc < 1:
        raise ConfigError(f"{where}: train.nproc: {recipe.train.nproc}; expected >= 1")
    return recipe


def merge_overrides(data: dict, overrides: dict) -> dict:
    """`merge`, except that `eval` overrides reach into the list of sets (see module doc)."""
    extra = dict(overrides)
    eval_over = extra.pop("eval", None)
    out = merge(data, extra)
    if eval_over is None:
        return out
    sets = out.get("eval", [{}])
    if isinstance(sets, dict) or not isinstance(eval_over, dict):
        out["eval"] = merge(sets, eval_over) if isinstance(sets, dict) else eval_over
        return out
    names = [s.get("name", "eval") for s in sets]
    per_set = {k: v for k, v in eval_over.items() if k in names and isinstance(v, dict)}
    common = {k: v for k, v in eval_over.items() if k not in per_set}
    out["eval"] = [merge(merge(s, common), per_set.get(name, {})) for s, name in zip(sets, names)]
    return out


def load_recipe(
    path: str | None, overrides: list[str] | None = None, data: dict | None = None
) -> Recipe:
    """Recipe from a YAML file (or the mapping `data`) plus `--set` overrides; problem sources
    are loaded once (first row) so that a typo fails before any stage runs."""
    base = load_yaml(path) if path else dict(data or {})
    recipe = recipe_from_dict(merge_overrides(base, parse_overrides(overrides)), path or "recipe")
    from posttrain.tasks import load_problems

    for spec in (recipe.sample.problems, *(s.problems for s in recipe.eval)):
        load_problems(spec, limit=1)
    for stage in (recipe.sample, *recipe.eval):
        stage_engine(recipe, stage)  # a bad engine key fails here, not after a stage
    return recipe


# engine keys that say how to reach or drive an engine, not what it generates: a resumed run
# may change them (servers moved, more concurrency) without being refused
TRANSPORT_KEYS = (
    "base_urls",
    "api_key_env",
    "concurrency",
    "timeout",
    "max_retries",
    "gpu_memory_utilization",
)


def stage_engine(recipe: Recipe, stage: SampleStage | EvalSet):
    """The EngineConfig a stage (the sample stage or an eval set) generates with: the recipe's
    engine: block with the stage's engine: keys over it. A stage that switches kind keeps only
    the shared keys of the recipe's block (not the other kind's own)."""
    from posttrain.engines import EngineConfig
    from posttrain.engines.config import KIND_OF

    label = "sample" if isinstance(stage, SampleStage) else f"eval.{stage.name}"
    kind = stage.engine.get("kind", recipe.engine.get("kind", "hf"))
    shared = {k: v for k, v in recipe.engine.items() if KIND_OF.get(k, kind) == kind}
    data = merge(shared, stage.engine)
    if stage.batch_size is not None:
        if data.get("batch_size", stage.batch_size) != stage.batch_size:
            raise ConfigError(
                f"{label}.batch_size ({stage.batch_size}) and the engine's "
                f"batch_size ({data['batch_size']}) are both set; keep one"
            )
        data["batch_size"] = stage.batch_size
    config = from_dict(EngineConfig, data, f"{label}.engine")
    config.check()
    return config


def engine_settings(config) -> dict:
    """What of an engine goes into a stage's settings (so a resumed run refuses another)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(config).items() if k not in TRANSPORT_KEYS}
