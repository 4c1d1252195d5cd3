"""`posttrain run` end to end on the embedded model at toy size: every stage writes its folder and
done.json, the report pairs base and trained on the same items, and a rerun skips finished stages
instead of redoing (or silently mixing) them."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline import STAGES, format_report, load_recipe, run_recipe
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
  problems: builtin:arith:10?split=test&difficulty=1
  max_new_tokens: 24
  batch_size: 16
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, embedded_dir):
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
    base_ids = [r["problem_id"] for r in read_jsonl(out / "eval-base" / "items.jsonl")]
    trained_ids = [r["problem_id"] for r in read_jsonl(out / "eval-trained" / "items.jsonl")]
    assert sorted(base_ids) == sorted(trained_ids) and len(base_ids) == 10
    c = report["compare"]
    assert c["n"] == 10
    a_only, b_only = c["discordant"]
    # the difference is the discordant balance over the shared items
    assert c["difference"] == pytest.approx((b_only - a_only) / 10)
    assert report["base"]["n"] == report["trained"]["n"] == 10
    assert json.loads((out / "report.json").read_text())["compare"] == c


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redoes_only_a_missing_one(toy_run, capsys):
    recipe_path, out, report = toy_run
    samples = (out / "sample" / "samples.jsonl").read_bytes()
    (out / "eval-trained" / "done.json").unlink()
    again = run_recipe(load_recipe(str(recipe_path)), out)
    printed = capsys.readouterr().out
    for name in STAGES:
        if name != "eval-trained":
            assert f"[{name}] done earlier" in printed, name
    assert "[eval-trained] running" in printed
    assert (out / "sample" / "samples.jsonl").read_bytes() == samples
    # greedy decoding of the same merged adapter gives the same verdicts again
    assert again["compare"]["discordant"] == report["compare"]["discordant"]
    assert "(skipped: done earlier)" in format_report(again, {"sample": (1.0, True)})


@pytest.mark.slow
def test_changed_settings_for_a_finished_stage_are_an_error(toy_run):
    recipe_path, out, _ = toy_run
    changed = load_recipe(str(recipe_path), ["sample.max_new_tokens=32"])
    with pytest.raises(ConfigError, match="stage 'sample' finished earlier with other settings"):
        run_recipe(changed, out)


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
    from posttrain.pipeline import StageRunner

    out = tmp_path / "run"
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "pairs.stats.json").write_text(json.dumps(
        {"pairs": 0, "samples": 8, "problems": 2, "all_wrong": 2, "all_right": 0}))
    ran = []

    def pretend_done_until_train(self, name, settings, fn):
        ran.append(name)
        if name == "train":
            raise AssertionError("training started without pairs")
        return self.out / name

    monkeypatch.setattr(StageRunner, "__call__", pretend_done_until_train)
    recipe_path = tmp_path / "toy.yaml"
    recipe_path.write_text(TOY)
    with pytest.raises(ConfigError, match="0 pairs from 8 samples of 2 problems"):
        run_recipe(load_recipe(str(recipe_path)), out)
    assert ran == ["sample", "verify", "pairs"]
