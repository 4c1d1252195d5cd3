"""Every recipe shipped in recipes/ loads, validates, and names methods and sources that exist."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline import Recipe, load_recipe
from posttrain.tasks import load_problems
from posttrain.train.stage import resolve_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "default.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path, tmp_path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert load_problems(recipe.sample.problems, limit=2)
    for eval_set in recipe.eval:
        assert load_problems(eval_set.problems, limit=2)
    # The train section must be a valid config for its method.
    cfg = resolve_config(recipe.train.method, {"seed": recipe.seed, **recipe.train.config},
                         model=recipe.model, data="pairs.jsonl", problems=recipe.sample.problems)
    assert cfg.method == recipe.train.method


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
