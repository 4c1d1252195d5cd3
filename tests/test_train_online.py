"""The online RL loop's pieces (rewards, streams, padding, micro-batching, dynamic sampling,
truncation masking) with hand-worked values, then the loop itself on a tiny random Llama with a
stub grader: metrics fields, weights move, resume == uninterrupted, non-finite guard, CHORD mu.

Run: .venv/bin/python -m pytest tests/test_train_online.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.engines.base import Completion
from posttrain.losses import policy_loss
from posttrain.records import Problem
from posttrain.train import online as O
from posttrain.train import online_config as OC
from posttrain.train import policy_update as PU
from posttrain.train import problem_stream as PS
from posttrain.train import rollouts as R



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a CPU shared with other jobs: a second OpenMP thread makes them ~100x
    slower (measured 0.04 vs 12 ms per 64x64 linear under load), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROBLEMS = [Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1),
                    answer_type="exact") for i in range(6)]


def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir), \
        AutoTokenizer.from_pretrained(tiny_model_dir)


def stub_score(problem, index, messages, completion, *, think_open, engine, cfg):
    """Reward 1 when the first sampled token id is even: a random policy gets both, so groups
    have variance, and the policy can learn it."""
    reward = float(completion.token_ids[0] % 2 == 0)
    truncated = completion.finish_reason == "length"
    return {"verdict": "correct" if reward else "incorrect", "correct_reward": reward,
            "format_ok": True, "overlong": 0.0, "reward": reward, "truncated": truncated}


def config(method="grpo", *overrides):
    return OC.online_config(method, overrides=[
        "max_steps=2", "num_generations=3", "problems_per_step=2", "max_new_tokens=4",
        "lr=1e-2", "lora.r=4", "micro_batch_size=4", "checkpoint_every=1", *overrides])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


# ---------------------------------------------------------------------------- rewards


def test_overlong_penalty_is_dapos_soft_ramp():
    """L = 100, buffer 20 %: free up to 80 tokens, then (n - 80) / 20, 1 at the limit."""
    assert R.overlong_penalty(50, 100, 0.2) == 0.0
    assert R.overlong_penalty(80, 100, 0.2) == 0.0
    assert R.overlong_penalty(90, 100, 0.2) == pytest.approx(0.5)
    assert R.overlong_penalty(100, 100, 0.2) == pytest.approx(1.0)
    assert R.overlong_penalty(95, 100, 0.2, factor=0.5) == pytest.approx(0.375)  # 0.75 * 0.5
    assert R.overlong_penalty(100, 100, 0.0) == 0.0  # buffer 0: off


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0])  # groups of 3
    assert R.zero_variance_groups(rewards, 3).tolist() == [True, False, True]


def test_score_completion_uses_the_project_graders_and_adds_reward_terms():
    """Real grading: '4' for 3 + 1 is correct (1.0) + format 0.5; a 10-token answer with
    max_new_tokens 10 and buffer 0.5 is cut (truncated: grader reward 0, no format) and pays
    the full overlong penalty 1.0."""
    problem = Problem(id="a", question="What is 3 + 1?", answer="4", answer_type="exact")
    cfg = OC.OnlineConfig(format_reward=0.5, overlong_buffer=0.5, max_new_tokens=10)

    class Engine:
        name, model_id = "hf", "m"

    ok = R.score_completion(problem, 0, [], Completion("The answer is 4.", "stop", [1, 2, 3]),
                            think_open=False, engine=Engine(), cfg=cfg)
    assert ok == {"verdict": "correct", "correct_reward": 1.0, "format_ok": True,
                  "overlong": 0.0, "reward": 1.5, "truncated": False}
    cut = R.score_completion(problem, 1, [], Completion("The answer is 4", "length",
                                                        list(range(10))),
                             think_open=False, engine=Engine(), cfg=cfg)
    assert cut["verdict"] == "truncated" and cut["truncated"] and not cut["format_ok"]
    assert cut["reward"] == pytest.approx(0.0 + 0.0 - 1.0)


# ---------------------------------------------------------------------------- streams


def test_stream_is_a_permutation_per_pass_and_resumes_exactly():
    full = PS.ShuffledStream(list(range(5)), seed=3)
    first_pass, second_pass = full.take(5), full.take(5)
    assert sorted(first_pass) == sorted(second_pass) == list(range(5))
    assert first_pass != second_pass  # a new shuffle each pass (seed 3)
    resumed = PS.ShuffledStream(list(range(5)), seed=3, drawn=3)
    assert resumed.take(7) == (first_pass + second_pass)[3:]


# ----------------------------------------------------------------------------- batches


def test_collated_logps_and_entropy_match_an_unpadded_forward(tiny_model_dir):
    """Completions sit right-aligned under left padding (batches.collate); each row's
    log-probs and entropies equal those of the same sequence run alone."""
    model, _ = tiny(tiny_model_dir)
    prompts, completions = [[1, 2, 3, 4, 5], [7, 8]], [[9, 10], [11, 12, 13, 14]]
    rollouts = [R.Rollout(PROBLEMS[0], p, Completion("x", "stop", c), "correct", 1.0, True, 0.0,
                          1.0, False) for p, c in zip(prompts, completions)]
    ((batch, rows),) = R.rollout_batches(rollouts, 8, pad_id=0, mask_truncated=False)
    assert rows == slice(0, 2)
    assert batch["labels"].tolist() == [[-100, -100, 9, 10], [11, 12, 13, 14]]
    logps, entropy = PU.sampled_logps(model, batch, 1.0)[::2]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1]  # (len(c), V)
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert_close(logps[i, -len(c):], want, atol=1e-5, rtol=1e-5)
        probs = torch.softmax(logits, -1)
        assert_close(entropy[i, -len(c):], -(probs * probs.log()).sum(-1), atol=1e-4, rtol=1e-4)


def fake_rollouts(lengths, rewards, truncated=None, prompt_len=3):
    truncated = truncated or [False] * len(lengths)
    return [R.Rollout(problem=PROBLEMS[0], prompt_ids=list(range(1, prompt_len + 1)),
                      completion=Completion("x", "length" if t else "stop",
                                            list(range(20, 20 + n))),
                      verdict="correct" if r else "incorrect", correct_reward=r, format_ok=True,
                      overlong=0.0, reward=r, truncated=t)
            for n, r, t in zip(lengths, rewards, truncated)]


def test_truncated_completions_get_no_loss_when_masked():
    rollouts = fake_rollouts([2, 3, 2], [1.0, 0.0, 0.0], truncated=[False, True, False])
    ((masked, _),) = R.rollout_batches(rollouts, 8, pad_id=0, mask_truncated=True)
    assert (masked["labels"] != -100).long().tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 1]]
    ((kept, _),) = R.rollout_batches(rollouts, 8, pad_id=0, mask_truncated=False)
    assert (kept["labels"] != -100).long().tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("aggregation", ["grpo", "token_mean", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_whole_batch_loss(aggregation):
    """Summing micro-batch losses times micro_batch_weight gives the loss of the whole batch
    (bnpo: per-micro-batch token normalisation by definition, so equal micro-batches are used
    and compared with the mean of their own losses)."""
    torch.manual_seed(0)
    logps = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    total_tokens = float(mask.sum())
    kw = dict(aggregation=aggregation, max_completion_length=5)
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        loss, _ = policy_loss(logps[rows], None, adv[rows], mask[rows],
                              num_items_in_batch=total_tokens if aggregation == "dapo" else None,
                              **kw)
        parts.append(loss * PU.micro_batch_weight(aggregation, 2, 4, 2))
    if aggregation == "token_mean":
        halves = [policy_loss(logps[r], None, adv[r], mask[r], **kw)[0]
                  for r in (slice(0, 2), slice(2, 4))]
        whole = (halves[0] + halves[1]) / 2
    else:
        whole, _ = policy_loss(logps, None, adv, mask, **kw)
    assert_close(sum(parts), whole)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_policy_gradients_do_not_depend_on_the_micro_batch_size(tiny_model_dir, aggregation):
    """policy_backward over 6 completions of different lengths: micro-batches of 2 (three
    forwards, each padded differently) give the gradients of one batch of 6."""
    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora

    model, _ = tiny(tiny_model_dir)
    policy = apply_lora(model, LoraConfig(r=4, init="default"))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():  # B = 0 at init would hide A's gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    rollouts = fake_rollouts([2, 5, 3, 1, 4, 2], [1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    advantages = torch.tensor([1.0, -1.0, -0.5, 0.5, 1.0, -1.0])
    cfg = OC.OnlineConfig(aggregation=aggregation, max_new_tokens=5)
    grads = []
    for size in (6, 2):
        policy.zero_grad()
        batches = R.rollout_batches(rollouts, size, 0, False)
        PU.policy_backward(policy, batches, advantages, None, None, cfg, mu=None,
                           total_rows=6, total_tokens=float(sum(
                               int((b["labels"] != -100).sum()) for b, _ in batches)))
        grads.append([p.grad.clone() for p in policy.parameters() if p.requires_grad])
    for whole, split in zip(*grads):
        assert_close(split, whole, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------- dynamic sampling


class ScriptedEngine:
    """Returns completions whose first token is listed per call: [[group tokens], ...]."""

    name, model_id = "scripted", "scripted"

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def render_prompt(self, messages):
        return messages[-1]["content"]

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        groups = self.script.pop(0)
        assert len(groups) == len(prompts)
        return [[Completion("x", "stop", [t, 2]) for t in g] for g in groups]


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 100 for c in text]}


def test_dynamic_sampling_drops_all_equal_groups_and_draws_again():
    """Round 1: groups (even, even) -> all reward 1, dropped; (even, odd) kept. Round 2 draws
    the one missing problem: (odd, even) kept. 3 groups seen, 1 of them with zero variance."""
    cfg = OC.OnlineConfig(num_generations=2, problems_per_step=2, dynamic_sampling=True)
    engine = ScriptedEngine([[[2, 4], [2, 3]], [[3, 6]]])
    kept, everything, info = R.collect_rollouts(engine, CharTokenizer(),
                                                  PS.ShuffledStream(PROBLEMS, 0), cfg, 0,
                                                  score=stub_score)
    assert engine.calls == [2, 1] and info["sampling_rounds"] == 2
    assert [r.reward for r in kept] == [1.0, 0.0, 0.0, 1.0]
    assert len(everything) == 6
    assert R.rollout_stats(everything, 2)["zero_variance_groups"] == pytest.approx(1 / 3)


def test_without_dynamic_sampling_every_group_is_kept():
    cfg = OC.OnlineConfig(num_generations=2, problems_per_step=2)
    engine = ScriptedEngine([[[2, 4], [2, 3]]])
    kept, everything, info = R.collect_rollouts(engine, CharTokenizer(),
                                                  PS.ShuffledStream(PROBLEMS, 0), cfg, 0,
                                                  score=stub_score)
    assert info["sampling_rounds"] == 1 and len(kept) == len(everything) == 4


# ------------------------------------------------------------------------------- loop

METRIC_FIELDS = {
    "step", "reward/mean", "reward/std", "reward/correct", "reward/format",
    "reward/overlong_penalty", "zero_variance_groups", "completion_length/mean",
    "completion_length/max", "truncated_fraction", "groups_kept", "sampling_rounds",
    "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "ratio/mean", "kl", "entropy",
    "loss/policy", "loss", "grad_norm", "updates", "mu", "lr", "time/generate", "time/grade",
    "time/train", "generation_share"}


def test_loop_writes_metrics_and_moves_the_adapter(tiny_model_dir, tmp_path):
    model, tok = tiny(tiny_model_dir)
    cfg = config("grpo", "kl_beta=0.1", "updates_per_batch=2")
    before = None

    def score(*args, **kwargs):
        nonlocal before
        if before is None:  # the adapter exists once the first rollout is graded
            before = adapter_weights(model)
        return stub_score(*args, **kwargs)

    O.train_online(cfg, tmp_path, model=model, tokenizer=tok, problems=PROBLEMS, score=score)
    got = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert METRIC_FIELDS <= set(r), METRIC_FIELDS - set(r)
        assert r["kl"] is not None and r["kl"] >= 0 and r["entropy"] > 0
        assert r["completion_length/max"] <= 4 and r["mu"] is None
        assert r["time/generate"] > 0 and 0 < r["generation_share"] < 1
    after = adapter_weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("method", ["dr-grpo", "dapo", "grpo-token-mean", "gspo", "cispo"])
def test_every_method_preset_trains(tiny_model_dir, tmp_path, method):
    """One step of each preset with two updates per batch (old log-probs, clipping live)."""
    model, tok = tiny(tiny_model_dir)
    O.train_online(config(method, "max_steps=1", "updates_per_batch=2"), tmp_path, model=model,
                   tokenizer=tok, problems=PROBLEMS, score=stub_score)
    (row,) = rows(tmp_path / "metrics.jsonl")
    assert row["updates"] == 2 and math.isfinite(row["loss"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """3 steps in one go == 2 steps, a new process, --resume, 1 more step (bit for bit: same
    problems, same sampling seeds, same optimizer state; two updates per batch exercise the
    old log-probs)."""
    model, tok = tiny(tiny_model_dir)
    O.train_online(config("grpo", "max_steps=3", "updates_per_batch=2"), tmp_path / "full",
                   model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score)
    full = adapter_weights(model)

    model, tok = tiny(tiny_model_dir)  # stopped after step 2 ...
    O.train_online(config("grpo", "max_steps=3", "updates_per_batch=2", "stop_after_steps=2"),
                   tmp_path / "resumed", model=model, tokenizer=tok, problems=PROBLEMS,
                   score=stub_score)
    assert not torch.equal(adapter_weights(model)[next(iter(full))], full[next(iter(full))])
    model, tok = tiny(tiny_model_dir)  # ... and a fresh process resumes to step 3
    O.train_online(config("grpo", "max_steps=3", "updates_per_batch=2"), tmp_path / "resumed",
                   resume=True, model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score)
    resumed = adapter_weights(model)
    for k in full:
        assert_close(resumed[k], full[k], rtol=0, atol=0)
    full_rows, resumed_rows = rows(tmp_path / "full" / "metrics.jsonl"), \
        rows(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3]
    assert [r["reward/mean"] for r in resumed_rows] == [r["reward/mean"] for r in full_rows]


def test_existing_checkpoints_need_resume(tiny_model_dir, tmp_path):
    model, tok = tiny(tiny_model_dir)
    O.train_online(config("grpo", "max_steps=1"), tmp_path, model=model, tokenizer=tok,
                   problems=PROBLEMS, score=stub_score)
    with pytest.raises(O.ConfigError, match="--resume"):
        O.train_online(config("grpo", "max_steps=1"), tmp_path, model=model, tokenizer=tok,
                       problems=PROBLEMS, score=stub_score)


def test_non_finite_loss_stops_before_updating(tiny_model_dir, tmp_path):
    """A NaN reward makes the loss NaN: the offline trainer's guard stops the run with
    NonFiniteError before the optimizer step, so the adapter is unchanged; the checkpoint of
    step 1 is named as the last good one."""
    model, tok = tiny(tiny_model_dir)
    state = {"calls": 0}

    def nan_at_step_2(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 7:  # the first rollout of step 2 (2 problems x 3 per step)
            state["before"] = adapter_weights(model)
        reward = math.nan if state["calls"] > 6 else stub_score(*args, **kwargs)["reward"]
        return {**stub_score(*args, **kwargs), "reward": reward}

    with pytest.raises(O.NonFiniteError, match=r"step 2: non-finite loss.*step-00000001"):
        O.train_online(config("grpo"), tmp_path, model=model, tokenizer=tok, problems=PROBLEMS,
                       score=nan_at_step_2)
    after = adapter_weights(model)
    assert all(torch.equal(state["before"][k], after[k]) for k in after)
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1]


def test_chord_mixes_demonstrations_with_mu_from_the_schedule(tiny_model_dir, tmp_path):
    """warmup 0, decay 2, peak 0.8, valley 0.2: step 0 -> 0.8, step 1 -> cosine midpoint 0.5."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"{i + 1}"}]}) + "\n" for i in range(3)))
    model, tok = tiny(tiny_model_dir)
    cfg = config("chord", f"chord.demos={demos}", "chord.mu_peak=0.8", "chord.mu_valley=0.2",
                 "chord.mu_decay_steps=2", "chord.variant=phi")
    O.train_online(cfg, tmp_path / "run", model=model, tokenizer=tok, problems=PROBLEMS,
                   score=stub_score)
    got = rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["mu"] for r in got] == pytest.approx([0.8, 0.5])
    for r in got:
        assert r["loss/sft"] > 0 and r["sft/tokens"] > 0


def test_presets_and_bad_config():
    dapo = OC.online_config("dapo")
    assert (dapo.aggregation, dapo.clip_high, dapo.dynamic_sampling) == ("dapo", 0.28, True)
    gspo = OC.online_config("gspo")
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    assert OC.online_config("dr-grpo").advantage_scale == "none"
    assert OC.online_config("grpo", overrides=["clip_high=0.3"]).clip_high == 0.3
    with pytest.raises(O.ConfigError, match="num_generations"):
        OC.online_config("grpo", overrides=["num_generations=1"])
    with pytest.raises(O.ConfigError, match="chord.demos"):
        OC.online_config("chord")
    with pytest.raises(O.ConfigError, match="adapter disabled"):
        OC.online_config("grpo", overrides=["kl_beta=0.1", "lora.enabled=false"])


@pytest.mark.slow
def test_cli_grpo_two_steps_on_the_embedded_model(tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("train", "--method", "grpo", "--problems", "builtin:arith:8?split=train",
                   "--out", str(out), "--no-progress", "--set", "max_steps=2",
                   "--set", "num_generations=2", "--set", "problems_per_step=2",
                   "--set", "max_new_tokens=8", "--set", "num_threads=1")
    got = rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    assert all(METRIC_FIELDS <= set(r) for r in got)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert "finished at step 2 of 2" in proc.stdout
