"""Every recipe shipped in recipes/ loads, validates, and names methods and sources that exist;
sweep grid files (recipes/sweep-*.yaml) validate every run's recipe the same way."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline.recipe import train_config, train_data_kind
from posttrain.pipeline.run import Recipe, load_recipe
from posttrain.tasks import load_problems

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


# recipes whose model is a folder a command makes first (named in the recipe's header)
MADE_FIRST = {"sweep-moe.yaml": "runs/smol-moe-4x2-n01"}


def _stand_in_model(folder):
    """The config of `posttrain expand --method upcycle --experts 4 --top-k 2` on the embedded
    model (a Mixtral), without weights: what a recipe's load reads of its model."""
    import json

    folder.mkdir(parents=True)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path, tmp_path, monkeypatch):
    if path.name in MADE_FIRST:  # its model path is relative to the folder the sweep runs in
        monkeypatch.chdir(tmp_path)
        _stand_in_model(tmp_path / MADE_FIRST[path.name])
    for recipe in _recipes(path):
        _check(recipe)


def _check(recipe):
    assert isinstance(recipe, Recipe)
    sources = recipe.sample.problems  # one source, or one per round (`rounds: K`)
    for source in sources if isinstance(sources, list) else [sources]:
        assert load_problems(source, limit=2)
    for eval_set in recipe.eval:
        assert load_problems(eval_set.problems, limit=2)
    # The train section resolved at load into a valid config for its method, and takes the
    # data file as `run` gives it.
    assert recipe.train.resolved.method == recipe.train.method
    # what load derives is no recipe key: recipe.yaml and the stage digests stay as they were
    assert "resolved" not in str(_as_dict(recipe))
    cfg = train_config(recipe, "data.jsonl")
    assert cfg.method == recipe.train.method and cfg.model == recipe.model
    kind = train_data_kind(recipe)
    if kind == "problems":
        assert cfg.problems == recipe.sample.problems
    elif cfg.method == "chord":
        assert cfg.chord.demos == "data.jsonl" and cfg.problems == recipe.sample.problems
    else:
        assert cfg.data == "data.jsonl"


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


DEFAULT = str(RECIPES[[p.name for p in RECIPES].index("default.yaml")])

# --set override -> words the one-line error must hold (the key, and what it expected)
BAD_SETS = [
    ("train.config.typo=1", "train.config: unknown key(s) typo"),
    ("train.method=nope", "train.method: 'nope'; expected one of sft"),
    ("train.method=ppo", "| grpo |"),  # every method is listed, offline and online
    ("train.config.strategy=nope", "train.config.strategy: 'nope'; expected ddp"),
    ("train.config.lr=fast", "train.config.lr: expected float, got 'fast'"),
    ("sample.n=-1", "sample.n: -1; expected >= 1"),
    ("eval=[]", "eval: expected a mapping or a non-empty list"),
    ("pairs.strategy=best", "pairs.strategy: 'best'; expected random"),
]


def _cli(argv, capsys):
    from posttrain.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("setting,words", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_run_refuses_a_bad_setting_before_any_stage(setting, words, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _cli(["run", DEFAULT, "--out", str(out), "--set", setting], capsys)
    assert rc in (1, 2)
    assert len(err.splitlines()) == 1 and err.startswith(f"posttrain run: error: {DEFAULT}: ")
    assert words in err and "Traceback" not in err
    assert not out.exists()  # no stage folder, not even the run folder


def test_a_sweep_with_a_bad_key_in_one_run_fails_before_the_first_run(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"recipe: {DEFAULT}\n"
        "runs:\n"
        "  - {id: good, set: {train.config.lr: 1.0e-4}}\n"
        "  - {id: bad, set: {train.config.lr_typo: 1.0e-4}}\n"
    )
    out = tmp_path / "sweep"
    rc, err = _cli(["sweep", str(grid), "--out", str(out)], capsys)
    assert rc in (1, 2) and len(err.splitlines()) == 1
    assert err.startswith(f"posttrain sweep: error: {grid} run bad: train.config: unknown key(s)")
    assert "lr_typo" in err and not out.exists()


def test_a_recipe_with_a_bad_lr_fails_in_under_a_second_without_torch(tmp_path):
    """`posttrain run` on a recipe with `train.config.lr: "fast"`: the error comes from the
    resolution at load (no model, no torch import), in well under a second, and leaves no
    folder."""
    import subprocess
    import sys

    recipe = tmp_path / "fast.yaml"
    recipe.write_text("train:\n  config:\n    lr: fast\n")
    out = tmp_path / "out"
    # timed from the verb's start (the interpreter and `posttrain.cli` load for any verb);
    # 0.4-0.5 s measured on a shared 2-core machine at load 10
    code = (
        "import sys, time; from posttrain.cli import main; t = time.perf_counter(); "
        f"rc = main(['run', {str(recipe)!r}, '--out', {str(out)!r}]); "
        "print(rc, time.perf_counter() - t, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rc, seconds, torch_loaded = done.stdout.split()
    assert rc == "1" and torch_loaded == "False", done.stderr
    assert float(seconds) < 1.0
    assert done.stderr.strip() == (
        f"posttrain run: error: {recipe}: train.config.lr: expected float, got 'fast'"
    )
    assert not out.exists()


def test_the_online_check_names_the_aggregations_the_losses_implement():
    """The aggregations are named torch-free for the check at load; they must stay the ones
    losses/policy_gradient.py implements."""
    from posttrain.losses import AGGREGATIONS
    from posttrain.train.online import config as online

    assert online.AGGREGATIONS == AGGREGATIONS


def test_the_moe_sweep_compares_lora_targets_and_replay_at_one_budget(tmp_path, monkeypatch):
    """recipes/sweep-moe.yaml (issue 19 part 5): three RPO runs that differ only in the LoRA
    targets, three GRPO runs that differ only in moe.replay, all on the upcycled model and
    evaluated on the same 300 held-out items."""
    from dataclasses import asdict

    from posttrain.pipeline.sweep import load_grid

    monkeypatch.chdir(tmp_path)
    _stand_in_model(tmp_path / MADE_FIRST["sweep-moe.yaml"])
    _, runs = load_grid(RECIPES[[p.name for p in RECIPES].index("sweep-moe.yaml")])
    cfg = {r.id: r.recipe.train.resolved for r in runs}
    assert {i: (c.method, c.lora.targets) for i, c in cfg.items() if i.startswith("rpo")} == {
        "rpo-linear": ("rpo", "all-linear"),
        "rpo-router": ("rpo", "all-linear,all-router"),
        "rpo-experts": ("rpo", "all-linear,experts"),
    }
    grpo = {i: c for i, c in cfg.items() if i.startswith("grpo")}
    assert {i: c.moe.replay for i, c in grpo.items()} == {
        "grpo-none": "none",
        "grpo-old": "old",
        "grpo-rollout": "rollout",
    }

    def without(c, *keys):
        d = asdict(c)
        for k in keys:
            d.pop(k)
        return d

    rpo = [without(c, "lora") for i, c in cfg.items() if i.startswith("rpo")]
    assert all(d == rpo[0] for d in rpo)  # the targets are all the RPO runs change
    same = [without(c, "moe") for c in grpo.values()]
    assert all(d == same[0] for d in same) and same[0]["updates_per_batch"] > 1  # old needs > 1
    assert {r.recipe.model for r in runs} == {"./" + MADE_FIRST["sweep-moe.yaml"]}
    assert {tuple((s.problems, s.temperature) for s in r.recipe.eval) for r in runs} == {
        (("builtin:arith:300?split=test&difficulty=1", 0.0),)
    }
