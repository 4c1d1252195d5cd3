"""Iterative rounds (`rounds: K`, pipeline/run.py) as a recipe states them: `train.reference`
(previous | base), the problem source of each round (`sample.problems`: one source, or one per
round for fresh problems each round), and what rounds can repeat (check_rounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.config import ConfigError

if TYPE_CHECKING:
    from posttrain.pipeline.recipe import Recipe


def sources_of(problems: str | list) -> list[str]:
    """`sample.problems` as a list of sources (one, or one per round)."""
    return [problems] if isinstance(problems, str) else list(problems)


def round_source(recipe: Recipe, number: int) -> str:
    """The problem source round `number` (1-based) samples: the one source, or the list's
    number-th (check_round_sources made the list one source per round)."""
    p = recipe.sample.problems
    return p if isinstance(p, str) else p[number - 1]


def check_round_sources(recipe: Recipe) -> None:
    """`sample.problems` as a list: strings, exactly one per round, and more than one round."""
    p, k = recipe.sample.problems, recipe.rounds
    if isinstance(p, str):
        return
    if not p or not all(isinstance(x, str) and x for x in p):
        raise ConfigError(
            f"sample.problems: {p!r}; expected a source, or a list of sources one per round"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or len(p) != k:
        raise ConfigError(
            f"sample.problems: a list of {len(p)} sources with rounds: {k!r}; a list gives "
            f"round r the r-th source, so it needs rounds: {len(p)} (>= 2)"
        )


REFERENCES = {"previous": "init", "base": "base"}  # train.reference -> TrainConfig.reference
SET_BY_ROUNDS = ("init_adapter", "reference")  # TrainConfig keys the pipeline sets


def check_rounds(recipe: Recipe, where: str = "recipe") -> None:
    """`rounds` and `train.reference`: values, and a method and data that rounds can repeat
    (an offline method on what the model samples, continuing a LoRA adapter)."""
    t, k = recipe.train, recipe.rounds
    if t.reference is not None:
        if t.reference not in REFERENCES:
            raise ConfigError(
                f"{where}: train.reference: {t.reference!r}; expected {' | '.join(REFERENCES)}"
            )
        if not getattr(t.resolved, "preference", False):
            raise ConfigError(
                f"{where}: train.reference: {t.reference!r}; method {t.method!r} has no "
                "reference model (only the DPO family)"
            )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{where}: rounds: {k!r}; expected an integer >= 1")
    if k == 1:
        return
    from posttrain.pipeline.recipe import train_data_kind  # recipe.py imports this module

    kind, lora = train_data_kind(recipe), t.resolved.lora
    for ok, problem in (
        (
            kind in ("pairs", "scored"),
            f"need data the model samples (train.data pairs or scored, "
            f"an offline method), not {kind} ({t.method})",
        ),
        (lora.enabled, "continue a LoRA adapter: train.config.lora.enabled must be true"),
        (
            lora.init == "default",
            f"continue an adapter: lora.init must be default, not {lora.init!r}",
        ),
    ):
        if not ok:
            raise ConfigError(f"{where}: rounds: {k}; rounds > 1 {problem}")
