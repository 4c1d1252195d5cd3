"""Asynchronous GRPO (rollout.mode async, train/online/async_rollouts.py) on a tiny random Llama
with the detached hf engine in the sampling thread and a stub reward: staleness 0 is the sync
run bit for bit; staleness 1 samples batch t + 1 with the adapter of update t (the engine's
log-probs are then one update stale, which the TIS weights see); a stopped and resumed run
equals the uninterrupted one, and a batch on disk from a future the resume lost is dropped and
counted. The settings an async run cannot honour are refused by name.

    .venv/bin/python -m pytest tests/test_async_grpo.py -q

The same loop with a vLLM server sampling: tests/test_online_engines.py; kill -9: test_faults.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_train_online import PROBLEMS, adapter_weights, config, rows, stub_score, tiny

from posttrain.config import ConfigError
from posttrain.train.online import loop as O

ASYNC = ["rollout.sync=adapter", "rollout.mode=async"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as test_train_online.py (tiny matmuls on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(tiny_model_dir, out, *overrides, resume=False):
    """One run (or resumption); returns its LoRA weights and metrics rows."""
    model, tok = tiny(tiny_model_dir)
    cfg = config("grpo", "rollout.sync=adapter", *overrides)
    O.train_online(
        cfg, out, model=model, tokenizer=tok, problems=PROBLEMS, score=stub_score, resume=resume
    )
    return adapter_weights(model), rows(out / "metrics.jsonl")


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_staleness_0_is_the_sync_run_bit_for_bit(tiny_model_dir, tmp_path):
    """Batch t sampled by version t - 0: the thread waits for each adapter as the sync loop
    does, same seeds, same order of operations: equal losses and adapters (no tolerance)."""
    sync_w, sync_rows = train(tiny_model_dir, tmp_path / "sync", "max_steps=3")
    async_w, async_rows = train(
        tiny_model_dir, tmp_path / "async", "max_steps=3", *ASYNC[1:], "rollout.max_staleness=0"
    )
    assert [r["loss"] for r in async_rows] == [r["loss"] for r in sync_rows]
    assert [r["reward/mean"] for r in async_rows] == [r["reward/mean"] for r in sync_rows]
    assert_same(async_w, sync_w)
    assert [r["async/staleness_mean"] for r in async_rows] == [0.0, 0.0, 0.0]
    assert all(r["async/dropped"] == 0 and r["async/wait_s"] >= 0 for r in async_rows)
    assert all(r["async/engine_idle_s"] >= 0 for r in async_rows)
    assert "async/wait_s" not in sync_rows[0]


def test_staleness_1_samples_with_the_adapter_of_the_last_sync(tiny_model_dir, tmp_path):
    """S 1: batches 0 and 1 by version 0, batch 2 by version 1, so staleness [0, 1, 1]. Step 1
    is the sync run's step 1 (same policy, same samples); from step 2 the engine's log-probs
    are one update (lr 1e-2) behind the trainer's: k3 KL far above step 1's numerical one,
    TIS weights away from 1, and the run differs from the sync run."""
    sync_w, sync_rows = train(tiny_model_dir, tmp_path / "sync", "max_steps=3")
    w, got = train(
        tiny_model_dir,
        tmp_path / "async",
        "max_steps=3",
        *ASYNC[1:],
        "rollout.correction=tis",
        "rollout.max_mismatch_kl=1e-6",  # would stop a stale batch, were it checked
    )
    assert [r["async/staleness_mean"] for r in got] == [0.0, 1.0, 1.0]
    assert got[0]["loss"] == sync_rows[0]["loss"]
    assert got[0]["mismatch/kl"] < 1e-6 and got[0]["correction/weight"] == pytest.approx(1, 1e-3)
    for r in got[1:]:
        assert r["mismatch/kl"] > 100 * got[0]["mismatch/kl"] + 1e-9, r
        assert abs(r["correction/weight"] - 1) > 1e-4, r
    assert any(not torch.equal(w[k], sync_w[k]) for k in w)


def test_a_stopped_async_run_resumes_to_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """S 1, 6 steps, a checkpoint every 2. Straight through == stopped after step 4, its
    checkpoint-4 removed (as a kill while writing it leaves the run), resumed from step 2:
    batches 2 and 3 (versions 1, 2) come from disk; batch 4 on disk was sampled by version 3,
    which the resumed run had not reached: dropped (6 completions counted at step 5) and
    sampled again, identically. Bitwise equal adapters and losses."""
    settings = ["max_steps=6", "checkpoint_every=2", *ASYNC[1:]]
    full_w, full_rows = train(tiny_model_dir, tmp_path / "full", *settings)
    out = tmp_path / "resumed"
    train(tiny_model_dir, out, *settings, "stop_after_steps=4")
    files = sorted(p.name for p in (out / "rollouts").glob("step-*.json"))
    assert files == ["step-00000002.json", "step-00000003.json", "step-00000004.json"]
    (last,) = [p for p in (out / "checkpoints").iterdir() if p.name.endswith("4")]
    shutil.rmtree(last)
    w, got = train(tiny_model_dir, out, *settings, resume=True)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in full_rows]
    assert [r["async/dropped"] for r in got] == [0, 0, 0, 0, 6, 0]
    assert_same(w, full_w)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.mode=async"], "rollout.sync: 'live'; expected adapter with rollout.mode async"),
        (
            [*ASYNC, "rollout.engine.kind=vllm"],
            "rollout.engine.kind: 'vllm'; expected openai (a vLLM / SGLang server",
        ),
        ([*ASYNC, "rollout.max_staleness=-1"], "rollout.max_staleness: -1; expected >= 0"),
        (["rollout.max_staleness=2"], "rollout.max_staleness: set, but not used"),
        (["rollout.mode=later"], "rollout.mode: 'later'; expected sync | async"),
    ],
)
def test_settings_async_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        config("grpo", *overrides)
    assert message in str(e.value)
