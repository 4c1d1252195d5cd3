"""A recipe: the typed settings of every stage of `posttrain run` (and of each run of a sweep).

    python -c "from posttrain.pipeline.recipe import load_recipe; print(load_recipe('recipes/default.yaml'))"

`eval` is a list of named evaluation sets (each with its own protocol, sampling, judge and a
`guard` flag); the older single mapping form is read as one set named "eval". A `--set`
override under `eval.` applies to every set (`eval.max_new_tokens=32`), or to one set when its
name comes first (`eval.dna.n=2`).

`rounds: K` (iterative DPO, pipeline/run.py) and `train.reference` (previous | base) are
checked here (check_rounds): K > 1 needs an offline method on sampled data and a plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import ConfigError, from_dict, load_yaml, merge, parse_overrides
from posttrain.errors import InputError
from posttrain.names import check_name
from posttrain.pipeline.rounds import (
    REFERENCES,
    SET_BY_ROUNDS,
    check_round_sources,
    check_rounds,
    round_source,
    sources_of,
)


@dataclass
class SampleStage:
    # one source, or with `rounds: K` a list of K sources: round r samples the r-th (fresh
    # problems each round; round_source)
    problems: str | list = "builtin:arith:200?split=train"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int | None = None  # the engine's batch_size for this stage (None: the engine's)
    system_prompt: str | None = None
    engine: dict = field(default_factory=dict)  # keys over the recipe's engine:, this stage only
    # the EngineConfig this stage generates with, resolved once at load (stage_engine); a
    # class attribute, not a field: derived, so neither a recipe key nor part of any digest
    resolved_engine = None


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
    # the DPO family's reference in round r > 1 (recipe `rounds`): previous (round r-1's policy:
    # base + its adapter; the default) | base. Unset: previous.
    reference: str | None = None
    # the typed TrainConfig / OnlineConfig resolved from `config` at load, with a placeholder for
    # what earlier stages provide (the data file); train_config() fills it in. Not a field (so
    # not a key, not in recipe.yaml or any digest).
    resolved = None


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
    resolved_engine = None  # as SampleStage's


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
    # iterative rounds: round r samples with round r-1's trained adapter, verifies, pairs and
    # trains from that adapter (pipeline/run.py); 1: one round, as without the key
    rounds: int = 1


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
        check_eval_set(s, f"{where}: eval set {s.name!r}")
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
    return resolve(recipe, where)


def check_eval_set(s: EvalSet, label: str) -> None:
    """An eval set's protocol and judge (URL scheme, template file and placeholders), checked
    at load: the first judgement is after the whole generation, far too late for a typo."""
    from posttrain.engines.config import check_url
    from posttrain.evaluation.evaluate import PROTOCOLS
    from posttrain.evaluation.judge_prompts import ANSWER_FIELDS, load_template

    if s.protocol not in PROTOCOLS:
        raise ConfigError(f"{label}: protocol: {s.protocol!r}; expected {' | '.join(PROTOCOLS)}")
    if s.judge is None:
        return
    if not (s.judge.url and s.judge.model):
        raise ConfigError(f"{label}: judge needs url and model")
    check_url(s.judge.url, f"{label}: judge.url")
    if s.judge.template:
        try:
            load_template(s.judge.template, ANSWER_FIELDS, ("response", "correct_answer"))
        except InputError as e:
            raise ConfigError(f"{label}: judge.template: {e}") from None
    if s.judge.concurrency < 1:
        raise ConfigError(f"{label}: judge.concurrency {s.judge.concurrency}: expected >= 1")


def check_generation(label: str, stage: SampleStage | EvalSet) -> None:
    """Sampling settings a stage could not use: an error now, not an empty file later (the
    ranges are SamplingParams.check's, which the verbs' flags use too)."""
    from posttrain.engines import SamplingParams

    top_p = getattr(stage, "top_p", 1.0)
    params = SamplingParams(stage.n, stage.temperature, top_p, stage.max_new_tokens)
    params.check(name=lambda field: f"{label}.{field}", error=ConfigError)
    if stage.batch_size is not None and stage.batch_size < 1:
        raise ConfigError(f"{label}.batch_size: {stage.batch_size!r}; expected >= 1")


def resolve(recipe: Recipe, where: str = "recipe") -> Recipe:
    """Check every stage's settings and resolve what is derived from them, once: each stage's
    EngineConfig and the typed train config (with a placeholder for the data file the earlier
    stages write). A bad setting anywhere fails here, before any stage runs."""
    from posttrain.pipeline.stage_engines import stage_engine

    from posttrain.pairs import STRATEGIES

    try:
        check_round_sources(recipe)
        check_generation("sample", recipe.sample)
        for s in recipe.eval:
            check_generation(f"eval.{s.name}", s)
        if recipe.pairs.strategy not in STRATEGIES:
            raise ConfigError(
                f"pairs.strategy: {recipe.pairs.strategy!r}; expected {' | '.join(STRATEGIES)}"
            )
        if recipe.pairs.max_pairs_per_problem < 1:
            raise ConfigError(
                f"pairs.max_pairs_per_problem: {recipe.pairs.max_pairs_per_problem}; expected >= 1"
            )
        for stage in (recipe.sample, *recipe.eval):
            stage.resolved_engine = stage_engine(recipe, stage)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key in SET_BY_ROUNDS:  # before the train config checks them as paths or names
        if key in recipe.train.config:
            raise ConfigError(
                f"{where}: train.config.{key}: set by the run for each round; use "
                "rounds and train.reference (previous | base)"
            )
    recipe.train.resolved = resolve_train(recipe, where)
    check_rounds(recipe, where)
    return recipe


# what the train config holds at load in place of the file an earlier stage writes
PENDING = "<written by an earlier stage>"


def train_data_kind(recipe: Recipe) -> str:
    """What the train stage reads: pairs | scored | demonstrations (a file an earlier stage
    writes) or problems (online methods: the sample problems)."""
    from posttrain.train.config import OFFLINE_METHODS, PREFERENCE_METHODS

    kind, method = recipe.train.data, recipe.train.method
    if method not in OFFLINE_METHODS:
        if kind == "demonstrations" and method == "chord":
            if (recipe.train.config.get("chord") or {}).get("demos"):
                raise ConfigError(
                    "train.config.chord.demos and train.data: demonstrations "
                    "both name chord's demonstrations: keep one"
                )
            return kind  # rollouts on the sample problems, the SFT term on these
        if kind != "auto":
            raise ConfigError(
                f"train.data: {kind!r}; online method {method!r} "
                "trains on the sample problems (auto), and chord also on "
                "demonstrations (train.data: demonstrations)"
            )
        return "problems"
    if kind == "auto":
        return "pairs" if method in PREFERENCE_METHODS else "scored"
    return kind


def resolve_train(recipe: Recipe, where: str = "recipe"):
    """The recipe's typed train config: defaults <- method preset <- train.config <- the recipe's
    model, seed (unless train.config sets one), dtype (likewise; 'auto' stays until
    train_config resolves it for the device) and problems; the data file a placeholder."""
    from posttrain.train.config import config_class, resolve_train_config

    t = recipe.train
    try:
        config_class(t.method)
        kind = train_data_kind(recipe)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(
            f"{where}: {msg if msg.startswith('train.') else 'train.' + msg}"
        ) from None
    settings = {"seed": recipe.seed, "dtype": recipe.dtype, **t.config}
    if kind == "problems" or t.method == "chord":
        flags = {"problems": round_source(recipe, 1)}
        if kind == "demonstrations":
            settings = merge(settings, {"chord": {"demos": PENDING}})
    else:
        flags = {"data": PENDING}
    return resolve_train_config(
        t.method, settings, where=f"{where}: train.config", model=recipe.model, **flags
    )


def train_config(recipe: Recipe, data: str, init_adapter: str | None = None):
    """The train config the train stage runs: the one resolved at load, with the file the
    earlier stages wrote (`data`) and dtype 'auto' resolved for this machine's training device
    (as stage_dtype, and for the same reason: a shared sweep store must not mix bf16 and fp32
    adapters under one digest). In a round r > 1, `init_adapter` is round r-1's adapter and
    the reference follows train.reference. Checked again with the real values; not parsed
    again."""
    import copy

    from posttrain.models import resolve_device, resolve_dtype
    from posttrain.train.config import check_config

    cfg = copy.deepcopy(recipe.train.resolved)
    cfg.dtype = resolve_dtype(cfg.dtype, resolve_device("auto", say=False))
    kind = train_data_kind(recipe)
    if kind == "demonstrations" and recipe.train.method == "chord":
        cfg.chord.demos = data
    elif kind != "problems":
        cfg.data = data
    if init_adapter is not None:
        cfg.init_adapter = str(init_adapter)
        if cfg.preference:
            cfg.reference = REFERENCES[recipe.train.reference or "previous"]
    check_config(cfg, "train.config")
    return cfg


def merge_overrides(data: dict, overrides: dict) -> dict:
    """`merge`, except that `eval` overrides reach into the list of sets (see module doc)."""
    extra = dict(overrides)
    eval_over = extra.pop("eval", None)
    out = merge(data, extra)
    if eval_over is None:
        return out
    sets = out.get("eval", [{}])
    if not isinstance(eval_over, dict):  # a whole new list (or a value recipe_from_dict refuses)
        out["eval"] = eval_over
        return out
    if isinstance(sets, dict):
        out["eval"] = merge(sets, eval_over)
        return out
    if not isinstance(sets, list) or not all(isinstance(s, dict) for s in sets):
        return out  # recipe_from_dict names what is wrong with the recipe's own eval
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
    if path and not base:  # every default, the whole loop: more likely a mistake than meant
        raise ConfigError(
            f"{path}: empty recipe; expected a mapping of settings, as in recipes/default.yaml"
        )
    recipe = recipe_from_dict(merge_overrides(base, parse_overrides(overrides)), path or "recipe")
    check_sources([recipe])
    check_models([recipe])
    return recipe


def check_models(recipes: list[Recipe]) -> None:
    """Each recipe's model path (models.check_model; the train stage always loads it here): a
    typo fails before any stage runs, not when sampling loads it."""
    from posttrain.models import check_model

    for model in dict.fromkeys(r.model for r in recipes):
        check_model(model)


def check_sources(recipes: list[Recipe]) -> None:
    """Load each distinct problem source of `recipes` once (first row): a typo in a source
    fails before any stage runs."""
    from posttrain.tasks import load_problems

    specs = [
        spec
        for r in recipes
        for spec in (*sources_of(r.sample.problems), *(s.problems for s in r.eval))
    ]
    for spec in dict.fromkeys(specs):
        load_problems(spec, limit=1)
