"""Every recipe shipped in recipes/ loads, validates, and names methods and sources that exist."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline import Recipe, is_online, load_recipe, uses_samples
from posttrain.tasks import load_problems
from posttrain.train.config import train_config
from posttrain.train.online_config import online_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "default.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path, tmp_path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    if uses_samples(recipe):
        assert load_problems(recipe.sample.problems, limit=2)
    assert load_problems(recipe.eval.problems, limit=2)
    # The train section must be a valid TrainConfig / OnlineConfig for its method.
    import yaml

    cfg_file = tmp_path / "train.yaml"
    config = {"seed": recipe.seed, **recipe.train.config}
    if is_online(recipe.train.method):
        assert load_problems(recipe.train.problems, limit=2)
        if recipe.train.method == "chord":  # the pipeline passes the scored samples
            config["chord"] = {**config.get("chord", {}), "demos": "scored.jsonl"}
        cfg_file.write_text(yaml.safe_dump(config))
        cfg = online_config(recipe.train.method, str(cfg_file), problems=recipe.train.problems)
    else:
        cfg_file.write_text(yaml.safe_dump(config))
        cfg = train_config(recipe.train.method, str(cfg_file), data="pairs.jsonl")
    assert cfg.method == recipe.train.method


def test_online_recipes_ship_and_train_and_eval_splits_are_disjoint():
    names = {p.name for p in RECIPES}
    assert {"grpo.yaml", "chord.yaml"} <= names
    for name in ("grpo.yaml", "chord.yaml"):
        recipe = load_recipe(str(RECIPES[[p.name for p in RECIPES].index(name)]))
        train_q = {p.question for p in load_problems(recipe.train.problems)}
        test_q = {p.question for p in load_problems(recipe.eval.problems)}
        assert train_q and test_q and not train_q & test_q


def test_a_recipe_section_the_method_does_not_use_is_an_error(tmp_path):
    """grpo samples train.problems itself: no train.problems, or a sample / pairs section, is
    an error; an offline method with train.problems too."""
    cases = {
        "model: smollm2-135m\ntrain: {method: grpo}\n": "train.problems is empty",
        "train: {method: grpo, problems: 'builtin:arith:8'}\nsample: {n: 8}\n":
            "sample: is not used by the online method 'grpo'",
        "train: {method: dapo, problems: 'builtin:arith:8'}\npairs: {max_pairs_per_problem: 3}\n":
            "pairs: is not used",
        "train: {method: dpo, problems: 'builtin:arith:8'}\n":
            "train.problems is not used by the offline method 'dpo'",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_recipe(str(path))


def test_default_recipe_trains_and_evaluates_on_disjoint_splits():
    recipe = load_recipe(str(RECIPES[[p.name for p in RECIPES].index("default.yaml")]))
    train_q = {p.question for p in load_problems(recipe.sample.problems)}
    test_q = {p.question for p in load_problems(recipe.eval.problems)}
    assert train_q and test_q and not train_q & test_q


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\nsampel:\n  n: 2\n")
    with pytest.raises(ConfigError, match="unknown key.*sampel"):
        load_recipe(str(bad))
