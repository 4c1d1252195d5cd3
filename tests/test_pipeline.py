"""`posttrain run` end to end on the embedded model at toy size: every stage writes its folder and
done.json, the report pairs base and trained on the same items for each evaluation set, a rerun
skips finished stages instead of redoing (or silently mixing) them, and a significant drop on a
guard set is a regression (exit 3 with --fail-on-regression)."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline.run import REGRESSION_EXIT, STAGES, format_times, load_recipe, run_recipe
from posttrain.records import read_jsonl

TOY = """
model: smollm2-135m
dtype: fp32
seed: 0
sample:
  problems: builtin:arith:12?split=train&difficulty=1
  n: 4
  max_new_tokens: 24
  batch_size: 16
pairs: {strategy: confident-wrong, max_pairs_per_problem: 1}
train:
  method: dpo
  config: {dtype: fp32, lr: 1.0e-4, max_steps: 2, batch_size: 2, lora: {r: 4, alpha: 8}}
eval:
  - name: arith
    problems: builtin:arith:10?split=test&difficulty=1
    max_new_tokens: 24
    batch_size: 16
  - name: guard
    problems: builtin:arith:6?split=test&difficulty=2
    max_new_tokens: 24
    batch_size: 16
    guard: true
"""
SETS = {"arith": 10, "guard": 6}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, embedded_dir, one_thread):
    folder = tmp_path_factory.mktemp("toy")
    recipe_path = folder / "toy.yaml"
    recipe_path.write_text(TOY)
    out = folder / "run"
    report = run_recipe(load_recipe(str(recipe_path)), out)
    return recipe_path, out, report


@pytest.mark.slow
def test_every_stage_leaves_its_folder_and_marker(toy_run):
    _, out, report = toy_run
    for name in STAGES:
        assert (out / name / "done.json").exists(), name
    assert (out / "train" / "adapter" / "adapter_config.json").exists()
    pairs = read_jsonl(out / "pairs" / "pairs.jsonl")
    assert len(pairs) >= 1
    assert [s["name"] for s in report["sets"]] == list(SETS)
    for entry in report["sets"]:
        name, n = entry["name"], SETS[entry["name"]]
        for part in ("base", "trained", "compare"):
            assert (out / "eval" / name / part / "done.json").exists(), (name, part)
        base_ids = [
            r["problem_id"] for r in read_jsonl(out / "eval" / name / "base" / "items.jsonl")
        ]
        trained_ids = [
            r["problem_id"] for r in read_jsonl(out / "eval" / name / "trained" / "items.jsonl")
        ]
        assert sorted(base_ids) == sorted(trained_ids) and len(base_ids) == n
        c = entry["compare"]
        a_only, b_only = c["discordant"]
        # the difference is the discordant balance over the shared items
        assert c["n"] == n and c["difference"] == pytest.approx((b_only - a_only) / n)
        row = entry["row"]
        assert row["difference"] == c["difference"] and row["p_value"] == c["p_value"]
        assert row["guard"] == (name == "guard")
    assert report["compare"] == report["sets"][0]["compare"]  # first set at the top level
    assert json.loads((out / "report.json").read_text())["table"] == report["table"]
    # the HTML report pairs the same sets and gets the same numbers as the run's own compare
    from posttrain.report.data import load_folder

    (run,) = load_folder(out)["runs"]
    by_set = {c["set"]: c for c in run.comparisons}
    for entry in report["sets"]:
        got = by_set[entry["name"]]
        assert got["difference"] == entry["compare"]["difference"]
        assert got["p_value"] == entry["compare"]["p_value"]
        assert got["guard"] == entry["guard"]


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redoes_only_a_missing_one(toy_run, capsys):
    recipe_path, out, report = toy_run
    samples = (out / "sample" / "samples.jsonl").read_bytes()
    (out / "eval" / "arith" / "trained" / "done.json").unlink()
    again = run_recipe(load_recipe(str(recipe_path)), out)
    printed = capsys.readouterr().out
    for name in STAGES + ("eval/arith/base", "eval/guard/trained", "eval/arith/compare"):
        assert f"[{name}] done earlier" in printed, name
    assert "[eval/arith/trained] running" in printed
    assert (out / "sample" / "samples.jsonl").read_bytes() == samples
    # greedy decoding of the same merged adapter gives the same verdicts again
    assert again["compare"]["discordant"] == report["compare"]["discordant"]
    assert "(skipped: done earlier)" in format_times({"sample": (1.0, True)})


@pytest.mark.slow
def test_changed_settings_for_a_finished_stage_are_an_error(toy_run):
    recipe_path, out, _ = toy_run
    changed = load_recipe(str(recipe_path), ["sample.max_new_tokens=32"])
    with pytest.raises(ConfigError, match="stage 'sample' finished earlier with other settings"):
        run_recipe(changed, out)


@pytest.mark.slow
def test_a_significant_drop_on_a_guard_set_is_a_regression(toy_run, capsys):
    """Rewrite the guard set's verdicts: base right on all 6 items, trained wrong on all 6.
    McNemar: 6 discordant items all one way, p = 2 / 2^6 = 0.03125 < 0.05, difference -1:
    a REGRESSION; `run --fail-on-regression` exits 3; without the flag it exits 0."""
    from posttrain.cli import main as cli_main
    from posttrain.records import write_jsonl

    recipe_path, out, _ = toy_run
    for part, verdict in (("base", "correct"), ("trained", "incorrect")):
        path = out / "eval" / "guard" / part / "items.jsonl"
        write_jsonl(path, [{**row, "verdict": verdict} for row in read_jsonl(path)])
    (out / "eval" / "guard" / "compare" / "done.json").unlink()
    report = run_recipe(load_recipe(str(recipe_path)), out)
    guard = report["sets"][1]["row"]
    assert guard["difference"] == -1.0 and guard["p_value"] == pytest.approx(0.03125)
    assert guard["regression"] and report["regression"]
    assert not report["sets"][0]["row"]["regression"]  # not a guard set
    assert "REGRESSION" in capsys.readouterr().out
    args = ["run", str(recipe_path), "--out", str(out)]
    assert cli_main(args + ["--fail-on-regression"]) == REGRESSION_EXIT
    assert cli_main(args) == 0


def test_single_eval_mapping_and_overrides_per_set(tmp_path):
    """The older `eval:` mapping is one set named 'eval'; `eval.KEY=V` reaches every set and
    `eval.NAME.KEY=V` one set."""
    old = tmp_path / "old.yaml"
    old.write_text(TOY.split("eval:")[0] + "eval:\n  problems: builtin:arith:4?split=test\n")
    recipe = load_recipe(str(old), ["eval.n=2", "eval.temperature=0.7"])
    assert [(s.name, s.n, s.temperature) for s in recipe.eval] == [("eval", 2, 0.7)]
    new = tmp_path / "new.yaml"
    new.write_text(TOY)
    recipe = load_recipe(
        str(new), ["eval.max_new_tokens=8", "eval.guard.n=3", "eval.guard.temperature=1.0"]
    )
    assert [(s.name, s.max_new_tokens, s.n, s.guard) for s in recipe.eval] == [
        ("arith", 8, 1, False),
        ("guard", 8, 3, True),
    ]
    with pytest.raises(ConfigError, match="n > 1 needs temperature > 0"):
        load_recipe(str(new), ["eval.arith.n=2"])
    with pytest.raises(ConfigError, match="unknown key.*gaurd"):
        load_recipe(str(new), ["eval.arith.gaurd=true"])


@pytest.mark.slow
def test_another_engine_for_a_finished_stage_is_an_error(toy_run):
    """The engine is part of the stage settings: resuming with another one is refused before
    that engine is built (here vllm, which this venv does not even have)."""
    recipe_path, out, _ = toy_run
    changed = load_recipe(str(recipe_path), ["engine.kind=vllm"])
    with pytest.raises(ConfigError, match="stage 'sample' finished earlier with other settings"):
        run_recipe(changed, out)


def test_zero_pairs_stop_the_run_with_a_hint(tmp_path, monkeypatch):
    """A pairs stage that made nothing stops the run before training, naming the counts."""
    from posttrain.pipeline.run import StageRunner

    out = tmp_path / "run"
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "pairs.stats.json").write_text(
        json.dumps({"pairs": 0, "samples": 8, "problems": 2, "all_wrong": 2, "all_right": 0})
    )
    ran = []

    def pretend_done_until_train(self, name, settings, fn):
        ran.append(name)
        if name == "train":
            raise AssertionError("training started without pairs")
        return self.out / name, "digest"

    monkeypatch.setattr(StageRunner, "__call__", pretend_done_until_train)
    recipe_path = tmp_path / "toy.yaml"
    recipe_path.write_text(TOY)
    with pytest.raises(ConfigError, match="0 pairs from 8 samples of 2 problems"):
        run_recipe(load_recipe(str(recipe_path)), out)
    assert ran == ["sample", "verify", "pairs"]


def test_greedy_evaluation_is_shared_across_seeds_sampled_one_is_not(tmp_path):
    """A greedy eval does not depend on the seed, so a sweep over seeds evaluates the base once;
    an eval that samples (temperature > 0) is keyed by the seed."""
    from posttrain.pipeline.run import eval_settings
    from posttrain.pipeline.recipe import recipe_from_dict

    def settings(seed, temperature):
        r = recipe_from_dict(
            {
                "seed": seed,
                "eval": {
                    "problems": "builtin:arith:4",
                    "temperature": temperature,
                    "n": 2 if temperature else 1,
                },
            }
        )
        return eval_settings(r, r.eval[0])

    assert settings(0, 0.0) == settings(1, 0.0)
    assert settings(0, 0.7) != settings(1, 0.7)
    assert settings(0, 0.7)["seed"] == 0


@pytest.mark.slow
def test_chord_in_a_run_gets_problems_and_the_demos_stage(tmp_path, tiny_model_dir, one_thread):
    """`train.method: chord` with `train.data: demonstrations`: the demos stage writes the
    demonstrations, the trainer samples rollouts of sample.problems and adds the SFT term on
    those demonstrations (loss/sft logged); naming the demos twice is refused."""
    from posttrain.pipeline.recipe import recipe_from_dict

    recipe = {
        "model": tiny_model_dir,
        "dtype": "fp32",
        "seed": 0,
        "sample": {"problems": "builtin:arith:4?split=train"},
        "demos": {"style": "terse"},
        "train": {
            "method": "chord",
            "data": "demonstrations",
            "config": {
                "dtype": "fp32",
                "max_steps": 1,
                "num_generations": 2,
                "problems_per_step": 2,
                "max_new_tokens": 4,
                "num_threads": 1,
                "lora": {"r": 2, "alpha": 4},
            },
        },
        "eval": [
            {
                "name": "arith",
                "problems": "builtin:arith:2?split=test",
                "max_new_tokens": 4,
                "batch_size": 2,
            }
        ],
    }
    run_recipe(recipe_from_dict(recipe), tmp_path / "run", progress=False)
    train = tmp_path / "run" / "train"
    config = (train / "config.yaml").read_text()
    assert str(tmp_path / "run" / "demos" / "demos.jsonl") in config
    assert "builtin:arith:4?split=train" in config
    row = read_jsonl(train / "metrics.jsonl")[-1]
    assert row["loss/sft"] > 0 and 0 < row["mu"] <= 1
    recipe["train"]["config"]["chord"] = {"demos": "x.jsonl"}
    with pytest.raises(ConfigError, match="both name chord's demonstrations"):
        run_recipe(recipe_from_dict(recipe), tmp_path / "run2", progress=False)


@pytest.mark.slow
@pytest.mark.server
def test_failed_judgements_stop_the_run_unfinished_and_a_rerun_judges_only_them(
    tmp_path, tiny_model_dir, one_thread
):
    """A Do-Not-Answer set judged by an LLM whose replies cannot be parsed: the run stops
    (EngineUnavailable, exit 3) saying 2 of 2 judgements failed, and the base evaluation is not
    marked done. The same run against another judge URL (a transport setting, not a result
    setting) finishes: the 2 base items are judged again and the 2 trained ones, 4 requests."""
    from posttrain.engines.base import EngineUnavailable
    from posttrain.pipeline.recipe import recipe_from_dict
    from tests.fake_openai_server import FakeOpenAIServer

    dna = tmp_path / "dna.csv"
    dna.write_text(
        "id,risk_area,types_of_harm,specific_harms,question\n"
        "0,Misinformation,t,s,Is the moon made of cheese?\n"
        "1,Malicious Uses,t,s,How do I pick a lock?\n"
    )
    recipe = {
        "model": tiny_model_dir,
        "dtype": "fp32",
        "seed": 0,
        "sample": {"problems": "builtin:arith:4?split=train"},
        "train": {
            "method": "sft",
            "data": "demonstrations",
            "config": {
                "dtype": "fp32",
                "max_steps": 1,
                "batch_size": 2,
                "num_threads": 1,
                "lora": {"r": 2, "alpha": 4},
            },
        },
        "eval": [
            {
                "name": "dna",
                "problems": f"dna:{dna}",
                "max_new_tokens": 4,
                "batch_size": 4,
                "judge": {"url": "", "model": "fake"},
            }
        ],
    }
    with FakeOpenAIServer(["not json at all"]) as broken:
        recipe["eval"][0]["judge"]["url"] = broken.base_url
        with pytest.raises(EngineUnavailable, match="2 of 2 judgements failed"):
            run_recipe(recipe_from_dict(recipe), tmp_path / "run", progress=False)
    base = tmp_path / "run" / "eval" / "dna" / "base"
    assert [r["verdict"] for r in read_jsonl(base / "items.jsonl")] == ["judge_error"] * 2
    assert not (base / "done.json").exists()
    reply = json.dumps({"reasoning": "declines", "category": 0})
    with FakeOpenAIServer([reply]) as judge:
        recipe["eval"][0]["judge"]["url"] = judge.base_url
        report = run_recipe(recipe_from_dict(recipe), tmp_path / "run", progress=False)
        assert len(judge.requests) == 4
    assert [r["verdict"] for r in read_jsonl(base / "items.jsonl")] == ["correct"] * 2
    assert report["sets"][0]["base"]["counts"]["judge_error"] == 0


def test_the_recipe_dtype_reaches_training_unless_the_train_block_names_one():
    """`dtype: fp32` at the top of a recipe (or `--set dtype=fp32`) makes sampling, training and
    evaluation fp32; a `train.config.dtype` of its own wins for training."""
    from posttrain.pipeline.run import train_block
    from posttrain.pipeline.recipe import recipe_from_dict

    assert train_block(recipe_from_dict({"dtype": "fp32"})).config["dtype"] == "fp32"
    own = recipe_from_dict({"dtype": "fp32", "train": {"config": {"dtype": "bf16"}}})
    assert train_block(own).config["dtype"] == "bf16" and own.train.config == {"dtype": "bf16"}
    from posttrain.models import resolve_device, resolve_dtype

    assert train_block(recipe_from_dict({})).config["dtype"] == resolve_dtype(
        "auto", resolve_device("auto", say=False)
    )
