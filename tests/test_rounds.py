"""Iterative DPO rounds (`rounds: K`): settings checked at load, stage folders keyed per round
(round 1 exactly as a run without rounds), the trainer starting from the last round's adapter
with the reference of `train.reference`, checked by value, the per-round table worked out by
hand, and (slow) two real rounds on the embedded model, killed after round 1 and resumed.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_rounds.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ConfigError
from posttrain.pipeline.recipe import load_recipe, recipe_from_dict, train_config
from posttrain.pipeline.store import digest_of
from posttrain.records import read_jsonl

TINY = {
    "dtype": "fp32",
    "sample": {"problems": "builtin:arith:4?split=train"},
    "train": {"method": "dpo", "config": {"max_steps": 1, "lora": {"r": 4, "alpha": 8}}},
    "eval": {"name": "arith", "problems": "builtin:arith:10?split=test"},
}


def recipe(**over):
    data = json.loads(json.dumps(TINY))
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe_from_dict(data, "r.yaml")


# ------------------------------------------------------------------ settings, at load


@pytest.mark.parametrize(
    "over, message",
    [
        ({"rounds": 0}, "r.yaml: rounds: 0; expected an integer >= 1"),
        ({"rounds": -2}, "rounds: -2; expected an integer >= 1"),
        ({"rounds": "3"}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"rounds": 2, "train.method": "grpo"}, "rounds > 1 need data the model samples"),
        ({"rounds": 2, "train.method": "sft", "train.data": "demonstrations"}, "demonstrations"),
        ({"rounds": 2, "train.config.lora.enabled": False}, "lora.enabled must be true"),
        ({"rounds": 2, "train.config.lora.init": "pissa"}, "lora.init must be default"),
        ({"train.config.init_adapter": "x"}, "train.config.init_adapter: set by the run"),
        ({"train.config.reference": "base"}, "train.config.reference: set by the run"),
        ({"train.reference": "last"}, "train.reference: 'last'; expected previous | base"),
        ({"train.reference": "base", "train.method": "sft"}, "'sft' has no reference model"),
        ({"sample.problems": ["a", "b"]}, "a list of 2 sources with rounds: 1"),
        ({"rounds": 3, "sample.problems": ["a", "b"]}, "so it needs rounds: 2 (>= 2)"),
        ({"rounds": 2, "sample.problems": ["a", 5]}, "expected a source, or a list of sources"),
        ({"rounds": 2, "sample.problems": []}, "expected a source, or a list of sources"),
    ],
)
def test_bad_rounds_settings_fail_at_load(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe(**over)


def test_a_bad_rounds_value_fails_before_any_stage(tmp_path):
    """From the CLI's loader and from a sweep grid (rounds as an axis): refused at load, so no
    stage folder exists."""
    from posttrain.pipeline.sweep import load_grid

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(TINY))
    with pytest.raises(ConfigError, match="rounds: 0"):
        load_recipe(str(path), ["rounds=0"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"recipe": "r.yaml", "axes": {"rounds": [1, 3, 0]}}))
    with pytest.raises(ConfigError, match="run g03: rounds: 0"):
        load_grid(grid)
    grid.write_text(json.dumps({"recipe": "r.yaml", "axes": {"rounds": [1, 3]}}))
    _, runs = load_grid(grid)
    assert [r.recipe.rounds for r in runs] == [1, 3]
    assert set(tmp_path.iterdir()) == {path, grid}


def test_round_train_config_starts_from_the_adapter_with_the_chosen_reference(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    first = train_config(recipe(rounds=2), "d.jsonl")
    assert (first.init_adapter, first.reference) == ("", "init")
    later = train_config(recipe(rounds=2), "d.jsonl", init_adapter=str(adapter))
    assert (later.init_adapter, later.reference) == (str(adapter), "init")
    base = train_config(recipe(rounds=2, **{"train.reference": "base"}), "d.jsonl", str(adapter))
    assert (base.init_adapter, base.reference) == (str(adapter), "base")
    with pytest.raises(ConfigError, match="init_adapter: .*adapter_config.json"):
        train_config(recipe(rounds=2), "d.jsonl", init_adapter=str(tmp_path))


# ------------------------------------------------------- folders per round, the table


# eval items per stage, by hand: 10 items; which ones each model answers correctly
CORRECT = {"base": {0, 1, 2}, 1: {0, 1, 2, 3, 4, 5}, 2: {0, 1, 2, 3, 4, 6, 7, 8}, 3: set(range(9))}


def fake_stages(calls):
    """StageRunner.__call__ that records (name, settings, digest) and writes, instead of
    sampling, training and evaluating, the few files run_recipe reads: a pairs count, and eval
    items with the verdicts of CORRECT. The compare stages run for real."""

    def call(self, name, settings, fn):
        digest = digest_of(settings)
        calls.append((name, settings, digest))
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        if name.endswith("pairs"):
            (folder / "pairs.stats.json").write_text(json.dumps({"pairs": 4}))
        elif name.endswith(("/base", "/trained")):
            from posttrain.stats import accuracy_summary

            which = "base" if name.endswith("base") else (int(name[6]) if "round-" in name else 1)
            verdicts = ["correct" if i in CORRECT[which] else "incorrect" for i in range(10)]
            items = [{"problem_id": str(i), "verdict": v} for i, v in enumerate(verdicts)]
            (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
            (folder / "summary.json").write_text(json.dumps(accuracy_summary(verdicts)))
        elif name.endswith("compare"):
            fn(folder)
        return folder, digest

    return call


def test_rounds_keep_round_one_folders_and_chain_each_round_to_the_last(tmp_path, monkeypatch):
    from posttrain.pipeline.run import StageRunner, run_recipe

    one, three = [], []
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(one))
    run_recipe(recipe(), tmp_path / "one", progress=False)
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(three))
    report = run_recipe(recipe(rounds=3), tmp_path / "three", progress=False)

    # round 1 of three rounds: the very stages (names, settings, digests) of one round
    assert three[: len(one)] == one
    assert [n for n, _, _ in one] == [
        "sample",
        "verify",
        "pairs",
        "train",
        "eval/arith/base",
        "eval/arith/trained",
        "eval/arith/compare",
    ]
    by_name = {n: (s, d) for n, s, d in three}
    for r in (2, 3):
        p, before = f"round-{r}/", "" if r == 2 else f"round-{r - 1}/"
        assert [n for n, _, _ in three if n.startswith(p)] == [
            p + x
            for x in (
                "sample",
                "verify",
                "pairs",
                "train",
                "eval/arith/trained",
                "eval/arith/compare",
            )
        ]
        # round r samples with, and trains from, round r-1's adapter
        trained_before = by_name[before + "train"][1]
        sample = by_name[p + "sample"][0]
        assert sample["adapter"] == trained_before
        assert {k: v for k, v in sample.items() if k != "adapter"} == by_name["sample"][0]
        train = by_name[p + "train"][0]
        assert (train["init"], train["reference"]) == (trained_before, "previous")
        assert train["data"] == by_name[p + "pairs"][1]
        cmp = by_name[p + "eval/arith/compare"][0]
        assert cmp["previous"] == by_name[before + "eval/arith/trained"][1]
    assert "eval/arith/base" in by_name and "round-2/eval/arith/base" not in by_name
    assert report["rounds"] == 3
    assert report["sets"][0]["trained_stage"] == "round-3/eval/arith/trained"


def test_a_list_of_sources_gives_each_round_its_own_problems(tmp_path, monkeypatch):
    from posttrain.pipeline.run import StageRunner, run_recipe

    one, fresh = [], []
    sources = [f"builtin:arith:4?split=train&start={4 * i}" for i in range(3)]
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(one))
    run_recipe(recipe(**{"sample.problems": sources[0]}), tmp_path / "one", progress=False)
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(fresh))
    run_recipe(recipe(rounds=3, **{"sample.problems": sources}), tmp_path / "f", progress=False)
    # round 1: the very stages of a run on the first source alone; round r: the r-th source
    assert fresh[: len(one)] == one
    by_name = {n: s for n, s, _ in fresh}
    assert [by_name[p + "sample"]["problems"] for p in ("", "round-2/", "round-3/")] == sources


def test_the_per_round_table_worked_out_by_hand(tmp_path, monkeypatch, capsys):
    """Rounds 1 and 2 against the base and against each other, on the 10 items of CORRECT.
    Exact McNemar: two-sided binomial(b + c, 1/2) on the items only one side got right.
    round 1 vs base: 6 - 3 = +3 items; 3 only round 1, 0 only base: p = 2 / 2^3 = 0.25
    round 2 vs base: 8 - 3 = +5; 5 vs 0: p = 2 / 2^5 = 0.0625
    round 2 vs round 1: 8 - 6 = +2; 3 only round 2 (6, 7, 8), 1 only round 1 (5):
      p = 2 (C(4,0) + C(4,1)) / 2^4 = 10 / 16 = 0.625"""
    from posttrain.pipeline.run import StageRunner, run_recipe

    calls = []
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(calls))
    report = run_recipe(recipe(rounds=2), tmp_path / "run", progress=False)
    rows = report["sets"][0]["round_rows"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["score"] for r in rows] == [0.3, 0.6, 0.8]
    assert rows[0]["n"] == rows[1]["n"] == rows[2]["n"] == 10
    r1, r2 = rows[1], rows[2]
    assert r1["vs_base"] == pytest.approx(0.3) and r1["p_base"] == pytest.approx(0.25)
    assert r1["vs_previous"] == pytest.approx(0.3) and r1["p_previous"] == pytest.approx(0.25)
    assert r2["vs_base"] == pytest.approx(0.5) and r2["p_base"] == pytest.approx(0.0625)
    assert r2["vs_previous"] == pytest.approx(0.2) and r2["p_previous"] == pytest.approx(0.625)
    # Wald interval of 8 / 10: 0.8 +- 1.96 sqrt(0.8 0.2 / 10)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 10)
    assert r2["interval_95"] == pytest.approx([0.8 - half, min(1.0, 0.8 + half)], abs=1e-9)
    # the main table is the last round against the base, as a run without rounds shows it
    row = report["table"][0]
    assert (row["trained"], row["difference"], row["p_value"]) == (0.8, r2["vs_base"], 0.0625)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("arith") and "  2  " in x)
    assert "80.0" in line and "+50.0" in line and "0.062" in line and "+20.0" in line
    assert "0.62" in line


def test_rounds_as_a_sweep_axis_share_round_one_and_rank_the_last_round(tmp_path, monkeypatch):
    """A grid over rounds [1, 3]: both runs ask for the same round-1 stages (one digest each,
    so a store computes them once), and the results table scores each run by its last round
    (CORRECT: 6 / 10 after one round, 9 / 10 after three)."""
    from posttrain.pipeline.run import StageRunner
    from posttrain.pipeline.sweep import run_sweep

    calls = []
    monkeypatch.setattr(StageRunner, "__call__", fake_stages(calls))
    (tmp_path / "r.yaml").write_text(json.dumps(TINY))
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"recipe": "r.yaml", "axes": {"rounds": [1, 3]}}))
    table = run_sweep(grid, tmp_path / "sweep", progress=False)
    runs = table["sets"][0]["runs"]
    assert (runs["g01"]["score"], runs["g02"]["score"]) == (0.6, 0.9)
    assert runs["g02"]["best"] and runs["g01"]["diff_best"] == pytest.approx(-0.3)
    first = [(n, d) for n, _, d in calls if not n.startswith("round-")]
    assert len(first) == 2 * 7 and len(set(first)) == 7  # round 1 once per distinct stage


def test_each_round_adapter_gets_its_own_name_on_an_openai_server(tmp_path):
    """A vLLM server refuses a second adapter under a name it holds: rounds 1 and 2 (both
    .../adapter) and a folder trained again in place are loaded under different names; the
    same folder unchanged keeps its name (a rerun)."""
    import os

    from posttrain.engines.openai import served_adapter_name

    one, two = tmp_path / "train" / "adapter", tmp_path / "round-2" / "train" / "adapter"
    for folder in (one, two):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    names = [served_adapter_name(one), served_adapter_name(two), served_adapter_name(one)]
    assert names[0] != names[1] and names[0] == names[2]
    assert all(n.startswith("adapter-") and len(n) == len("adapter-") + 8 for n in names)
    os.utime(one / "adapter_model.safetensors", ns=(1, 1))  # written again
    assert served_adapter_name(one) != names[0]


# -------------------------------------------- the trainer: init_adapter and its reference


def write_pairs(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"It is {a + b + 1}."}],
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(model, data, *settings):
    from posttrain.train.config import train_config as offline_config

    return offline_config(
        "dpo",
        None,
        ["dtype=fp32", "batch_size=2", "lora.r=4", "lora.alpha=8", "lr=1e-2", *settings],
        model=model,
        data=str(data),
    )


def logps_with(model_dir, adapter, data):
    """(N, 2) summed log-probs of chosen and rejected: base, or base + adapter unmerged."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.data import load_examples
    from posttrain.train.forward import reference_logps
    from posttrain.train.skeleton import pad_id

    tok = load_tokenizer(model_dir)
    examples, _ = load_examples(str(data), tok, preference=True, max_length=1024)
    model = load_model(model_dir, dtype="fp32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return reference_logps(
        model, examples, batch_size=1, pad_id=pad_id(tok), device="cpu", layout="none"
    )


def cached_reference(data):
    (path,) = data.parent.glob("pairs.jsonl.ref-*.pt")
    table = torch.load(path, weights_only=True)["logps"]
    path.unlink()
    return table


@pytest.mark.usefixtures("one_thread")
def test_round_two_trains_from_round_one_and_its_reference_is_chosen_by_value(
    tiny_model_dir, tmp_path
):
    """Round 2 from round 1's adapter: with reference init its reference log-probs are the
    policy's at round 1's adapter (and the step-1 DPO loss is ln 2: policy = reference); with
    reference base they are the base model's. With lr ~ 0 round 2 ends where it started:
    at round 1's adapter, not at a fresh one (B = 0)."""
    from safetensors.torch import load_file

    from posttrain.train.offline.loop import train

    data1 = write_pairs(tmp_path / "d1")
    train(dpo_config(tiny_model_dir, data1, "max_steps=2"), tmp_path / "r1", progress=False)
    adapter1 = tmp_path / "r1" / "adapter"
    base_logps = cached_reference(data1)
    at_adapter1 = logps_with(tiny_model_dir, adapter1, data1)
    assert not torch.allclose(base_logps, at_adapter1, atol=1e-3)  # round 1 moved the policy

    data2 = write_pairs(tmp_path / "d2")
    cfg = dpo_config(tiny_model_dir, data2, "max_steps=1", "lr=1e-12")
    cfg.init_adapter = str(adapter1)
    train(cfg, tmp_path / "r2", progress=False)
    assert_close(cached_reference(data2), at_adapter1, rtol=0, atol=1e-4)
    (step1,) = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    w1 = load_file(adapter1 / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "r2" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_close(w2[k], w1[k], rtol=0, atol=1e-6)
    assert any(w1[k].abs().max() > 1e-3 for k in w1 if "lora_B" in k)

    cfg.reference = "base"
    train(cfg, tmp_path / "r2-base", progress=False)
    assert_close(cached_reference(data2), base_logps, rtol=0, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_bf16_round_two_starts_exactly_at_its_reference(tiny_model_dir, tmp_path):
    """In bf16 (autocast, the adapter fed bf16 input) the reference pass runs the very forward
    the policy runs at step 1, so the step-1 DPO loss is ln 2 to float precision: every
    reward difference is exactly 0. Against the base instead, round 1's adapter shows."""
    from posttrain.train.offline.loop import train

    data = write_pairs(tmp_path / "d")
    train(dpo_config(tiny_model_dir, data, "max_steps=1", "dtype=bf16"), tmp_path / "r1")
    cfg = dpo_config(tiny_model_dir, data, "max_steps=1", "dtype=bf16")
    cfg.init_adapter = str(tmp_path / "r1" / "adapter")
    train(cfg, tmp_path / "r2", progress=False)
    (step1,) = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step1["rewards/margins"] == 0.0
    cfg.reference = "base"  # the policy starts at round 1's adapter, away from the base
    train(cfg, tmp_path / "r2-base", progress=False)
    (step1,) = [
        json.loads(x) for x in (tmp_path / "r2-base" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert abs(step1["rewards/margins"]) > 1e-4


def test_an_init_adapter_with_other_lora_settings_is_refused(tiny_model_dir, tmp_path):
    from posttrain.train.lora import apply_lora
    from posttrain.models import load_model

    data = write_pairs(tmp_path / "d")
    cfg = dpo_config(tiny_model_dir, data, "max_steps=1")
    model = apply_lora(load_model(tiny_model_dir, dtype="fp32"), cfg.lora)
    model.save_pretrained(tmp_path / "a")
    cfg.lora.r = 8
    with pytest.raises(ConfigError, match="init_adapter: .* its r is 4 but the lora settings"):
        apply_lora(load_model(tiny_model_dir, dtype="fp32"), cfg.lora, str(tmp_path / "a"))
    cfg.lora.r, cfg.lora.targets = 4, "attention"
    with pytest.raises(ConfigError, match="adapts other modules than lora.targets 'attention'"):
        apply_lora(load_model(tiny_model_dir, dtype="fp32"), cfg.lora, str(tmp_path / "a"))
    cfg.lora.targets = "all-linear"
    loaded = apply_lora(load_model(tiny_model_dir, dtype="fp32"), cfg.lora, str(tmp_path / "a"))
    assert sum(p.requires_grad for p in loaded.parameters()) == 2 * 7 * 2  # A, B x 7 x 2 layers


# ----------------------------------------------- two real rounds, killed and resumed (slow)


@pytest.fixture(scope="module")
def coin_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama made to answer like a coin: every token embeds to one vector and the
    layers' output projections are zero, so the last hidden state h is the same everywhere, and
    the head gives "1" and "2" logit 16 and end-of-turn 16 + ln 2 (every other token 0, about
    0.1 % together). An answer is "1" (correct for the problems below) with probability about
    1/4 x 1/2, "2", "12", ... (wrong) or empty (no answer) otherwise: a random model that still
    gives pairs. LoRA on the output projections (B A x, x != 0) can move it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    one, two = tok.convert_tokens_to_ids(["1", "2"])
    with torch.no_grad():
        torch.manual_seed(0)
        e = torch.randn(model.config.hidden_size)
        model.model.embed_tokens.weight[:] = e
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(e[None])[0]
        head = torch.zeros_like(model.lm_head.weight)
        for token, logit in ((one, 16.0), (two, 16.0), (tok.eos_token_id, 16.0 + math.log(2))):
            head[token] = h * logit / h.dot(h)
        model.lm_head.weight.copy_(head)
    out = tmp_path_factory.mktemp("coin-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


TOY = {
    "dtype": "fp32",
    "seed": 0,
    "rounds": 2,
    "sample": {"n": 8, "temperature": 1.0, "max_new_tokens": 4, "batch_size": 16},
    "pairs": {"strategy": "confident-wrong", "max_pairs_per_problem": 1},
    "train": {
        "method": "dpo",
        "config": {"lr": 1.0e-2, "max_steps": 1, "batch_size": 2, "lora": {"r": 4, "alpha": 8}},
    },
    "eval": {"name": "one", "n": 4, "temperature": 1.0, "max_new_tokens": 4, "batch_size": 16},
}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_real_rounds_resume_in_round_two(coin_model_dir, tmp_path, capsys):
    """Every stage for real (hf engine, grader, pairs, trainer) on the coin model: round 2
    samples with round 1's adapter and trains from it with its policy as the reference; killed
    during round 2's training, a rerun skips round 1 and round 2's data and finishes round 2
    with the same adapter and evaluation as the run that was not killed."""
    import shutil

    from posttrain.pipeline.run import run_recipe

    problems = tmp_path / "problems.jsonl"
    rows = [
        {"id": f"p{i}", "question": f"Say one ({i}).", "answer": "1", "answer_type": "exact"}
        for i in range(6)
    ]
    problems.write_text("".join(json.dumps({**r, "source": "test"}) + "\n" for r in rows))
    data = json.loads(json.dumps(TOY))
    data["model"] = str(coin_model_dir)
    data["sample"]["problems"] = data["eval"]["problems"] = str(problems)
    out = tmp_path / "run"
    first = run_recipe(load_recipe(None, data=data), out, progress=False)
    adapter1 = out / "train" / "adapter"
    # round 2 sampled with round 1's adapter and trained from it, its reference that policy
    samples = read_jsonl(out / "round-2" / "sample" / "samples.jsonl")
    assert len(samples) == 6 * 8 and all(r["model"].endswith(f"+{adapter1}") for r in samples)
    assert all(r["model"] == str(coin_model_dir) for r in read_jsonl(out / "sample/samples.jsonl"))
    saved = (out / "round-2" / "train" / "config.yaml").read_text()
    assert f"init_adapter: {adapter1}" in saved and "reference: init" in saved
    items = read_jsonl(out / "round-2" / "eval" / "one" / "trained" / "items.jsonl")
    weights = (out / "round-2" / "train" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert weights != (adapter1 / "adapter_model.safetensors").read_bytes()

    # killed during round 2's training: no done.json there, no adapter, nothing after it
    shutil.rmtree(out / "round-2" / "eval")
    (out / "round-2" / "train" / "done.json").unlink()
    shutil.rmtree(out / "round-2" / "train" / "adapter")
    capsys.readouterr()
    again = run_recipe(load_recipe(None, data=data), out, progress=False)
    said = capsys.readouterr().out
    for name in ("sample", "train", "eval/one/base", "round-2/sample", "round-2/pairs"):
        assert f"[{name}] done earlier" in said
    for name in ("round-2/train", "round-2/eval/one/trained", "round-2/eval/one/compare"):
        assert f"[{name}] running" in said
    assert (out / "round-2" / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        weights
    )
    assert read_jsonl(out / "round-2" / "eval" / "one" / "trained" / "items.jsonl") == items
    assert again["sets"][0]["round_rows"] == first["sets"][0]["round_rows"]
    assert "per round" in said


def test_a_run_saved_before_a_setting_existed_still_resumes(tmp_path):
    """A config.yaml written before `init_adapter` (top level) and `moe.replay` (nested) existed
    resumes when the run keeps their defaults, and refuses when a value differs from them."""
    import yaml

    from posttrain.config import to_dict
    from posttrain.train.parallel.checkpoint import check_resumable

    from posttrain.train.config import TrainConfig

    cfg = TrainConfig(method="dpo")
    saved = to_dict(cfg)
    saved.pop("init_adapter")
    saved["moe"].pop("replay")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resumable(cfg, tmp_path)
    with pytest.raises(ConfigError, match="init_adapter: '' -> '/x'"):
        check_resumable(TrainConfig(method="dpo", init_adapter="/x"), tmp_path)
