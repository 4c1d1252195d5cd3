"""The engine each generating stage of a recipe uses: the recipe's `engine:` block with the
stage's own `engine:` keys over it, resolved once at load (recipe.resolve) and read back with
engine_of; engine_settings is what of it keys a stage's folder."""

from __future__ import annotations

from posttrain.config import ConfigError, from_dict, merge
from posttrain.pipeline.recipe import EvalSet, Recipe, SampleStage


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


def engine_of(recipe: Recipe, stage: SampleStage | EvalSet):
    """The EngineConfig resolved for `stage` at load (stage_engine on a recipe built by hand)."""
    return stage.resolved_engine or stage_engine(recipe, stage)


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
