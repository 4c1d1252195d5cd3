"""The engine-driven stages of a run as functions: sampling the training problems and
evaluating one eval set, each with the engine and dtype the recipe resolves for it.

    python -c "from posttrain.pipeline.steps import eval_set_stage; help(eval_set_stage)"

Used by `posttrain run` and `posttrain sweep` (pipeline.py). `eval_settings` is what keys an
evaluation stage: a greedy evaluation does not depend on the seed, and a judge's URL is how to
reach it, not what it judges.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from posttrain.pipeline.recipe import EvalSet, Recipe, SampleStage
from posttrain.pipeline.rounds import round_source
from posttrain.pipeline.stage_engines import engine_of, engine_settings


def make_stage_engine(recipe: Recipe, stage: SampleStage | EvalSet, adapter=None):
    """Every engine `run` and `sweep` use is built here: the recipe's engine: block with the
    stage's keys over it (recipe.stage_engine, resolved once at load), in the dtype
    stage_dtype resolves."""
    from posttrain.engines import make_engine

    return make_engine(
        engine_of(recipe, stage), recipe.model, dtype=stage_dtype(recipe, stage), adapter=adapter
    )


def stage_dtype(recipe: Recipe, stage: SampleStage | EvalSet) -> str:
    """The resolved dtype of a stage, on the device its engine runs on. It goes into the stage
    settings, so a folder resumed on a machine where 'auto' means something else is refused
    instead of mixing fp32 and bf16 stages."""
    from posttrain.models import resolve_device, resolve_dtype

    return resolve_dtype(recipe.dtype, resolve_device(engine_of(recipe, stage).device, say=False))


def sample_stage(
    recipe: Recipe, folder: Path, progress: bool = True, adapter=None, problems: str | None = None
) -> dict:
    """Sample `recipe.sample.n` answers per training problem into FOLDER/samples.jsonl, with
    the model plus `adapter` (a round's trained LoRA) when given; `problems`: the source (a
    round's, when sample.problems lists one per round; default: the one source)."""
    from posttrain.engines import SamplingParams
    from posttrain.sampling import sample_problems
    from posttrain.tasks import load_problems

    s = recipe.sample
    engine = make_stage_engine(recipe, s, adapter=adapter)
    params = SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.max_new_tokens,
        seed=recipe.seed,
    )
    try:
        stats = sample_problems(
            engine,
            load_problems(problems if problems is not None else round_source(recipe, 1)),
            folder / "samples.jsonl",
            params,
            system_prompt=s.system_prompt,
            chunk_size=getattr(engine, "batch_size", 8),
            progress=progress,
        )
    finally:
        engine.close()
    print(f"  {stats['tokens_per_second']:.0f} tokens/s")
    return stats


def eval_set_stage(
    recipe: Recipe, es: EvalSet, adapter, folder: Path, progress: bool = True
) -> dict:
    """Evaluate the model (plus `adapter`) on one evaluation set into `folder`."""
    from posttrain.engines import SamplingParams
    from posttrain.evaluation.evaluate import evaluate
    from posttrain.tasks import load_problems

    judge = None
    if es.judge is not None:
        from posttrain.evaluation.judge import Judge

        judge = Judge(
            es.judge.url,
            es.judge.model,
            api_key_env=es.judge.key_env,
            template_path=es.judge.template,
        )
    engine = make_stage_engine(recipe, es, adapter=adapter)
    params = SamplingParams(
        n=es.n, temperature=es.temperature, max_new_tokens=es.max_new_tokens, seed=recipe.seed
    )
    try:
        summary = evaluate(
            engine,
            load_problems(es.problems),
            folder,
            params,
            protocol=es.protocol,
            system_prompt=es.system_prompt,
            judge=judge,
            judge_concurrency=es.judge.concurrency if es.judge else 1,
            progress=progress,
        )
    finally:
        engine.close()
    failed = summary.get("counts", {}).get("judge_error", 0)
    if failed:  # a score with failed judgements counted wrong is not a result: stop, unfinished
        from posttrain.engines.base import EngineUnavailable

        raise EngineUnavailable(
            f"eval set {es.name!r}: {failed} of {summary['n']} judgements failed after retries "
            f"({folder / 'items.jsonl'}); run the same command again: graded items are kept "
            "and only the failed ones are judged again"
        )
    return summary


def eval_settings(recipe: Recipe, es: EvalSet) -> dict:
    """What determines an evaluation's output (not the set's name or guard flag); the engine
    as resolved, less the keys that only say how to reach it."""
    settings = {k: v for k, v in asdict(es).items() if k not in ("name", "guard", "engine")}
    if settings["judge"] is not None:  # which judge model and prompt, not how to reach it
        settings["judge"] = {
            k: v for k, v in settings["judge"].items() if k not in ("url", "key_env", "concurrency")
        }
    seed = {"seed": recipe.seed} if es.temperature > 0 else {}  # greedy: the seed changes nothing
    return {
        "model": recipe.model,
        "dtype": stage_dtype(recipe, es),
        **seed,
        **settings,
        "engine": engine_settings(engine_of(recipe, es)),
    }
