"""Every recipe shipped in recipes/ loads, validates, and names methods and sources that exist;
sweep grid files (recipes/sweep-*.yaml) validate every run's recipe the same way."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline.run import Recipe, load_recipe, train_inputs
from posttrain.tasks import load_problems
from posttrain.train.stage import resolve_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "default.yaml" for p in RECIPES)


def _recipes(path):
    from posttrain.config import load_yaml

    if {"axes", "runs"} & set(load_yaml(path)):
        from posttrain.pipeline.sweep import load_grid

        _, runs = load_grid(path)
        return [load_recipe(None, data=_as_dict(r.recipe)) for r in runs]
    return [load_recipe(str(path))]


def _as_dict(recipe):
    from dataclasses import asdict

    return asdict(recipe)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path, tmp_path):
    for recipe in _recipes(path):
        _check(recipe)


def _check(recipe):
    assert isinstance(recipe, Recipe)
    assert load_problems(recipe.sample.problems, limit=2)
    for eval_set in recipe.eval:
        assert load_problems(eval_set.problems, limit=2)
    # The train section must be a valid config for its method.
    train, data, problems = train_inputs(recipe, "data.jsonl")  # as `run` gives them
    cfg = resolve_config(
        train.method,
        {"seed": recipe.seed, **train.config},
        model=recipe.model,
        data=data,
        problems=problems,
    )
    assert cfg.method == recipe.train.method


def test_sweep_grids_have_the_runs_they_promise():
    from posttrain.pipeline.sweep import load_grid

    keys, runs = load_grid(RECIPES[[p.name for p in RECIPES].index("sweep-dpo.yaml")])
    assert keys == ["train.config.lr", "train.config.beta"] and len(runs) == 4
    assert {(r.recipe.train.config["lr"], r.recipe.train.config["beta"]) for r in runs} == {
        (1e-4, 0.1),
        (1e-4, 0.3),
        (5e-5, 0.1),
        (5e-5, 0.3),
    }
    _, runs = load_grid(RECIPES[[p.name for p in RECIPES].index("sweep-methods.yaml")])
    assert {r.id: r.recipe.train.method for r in runs} == {
        "sft-foreign": "sft",
        "dft-foreign": "dft",
        "dpo-self": "dpo",
        "grpo": "grpo",
        "chord": "chord",
        "grpo-t0.7": "grpo",
    }
    assert all(r.recipe.train.data == "demonstrations" for r in runs if "foreign" in r.id)
    second = next(r for r in runs if r.id == "grpo-t0.7").recipe.train.config
    assert (second["temperature"], second["lr"]) == (0.7, 5e-5)


def test_default_recipe_trains_and_evaluates_on_disjoint_splits():
    recipe = load_recipe(str(RECIPES[[p.name for p in RECIPES].index("default.yaml")]))
    train_q = {p.question for p in load_problems(recipe.sample.problems)}
    test_q = {p.question for s in recipe.eval for p in load_problems(s.problems)}
    assert train_q and test_q and not train_q & test_q


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\nsampel:\n  n: 2\n")
    with pytest.raises(ConfigError, match="unknown key.*sampel"):
        load_recipe(str(bad))
