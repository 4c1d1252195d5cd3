"""Faults a long stage must survive, each with real parts (issue 22, "Faults"): `kill -9` of a
real `python -m posttrain.cli` process in the middle of a stage, then the same command again
(no row lost, none duplicated, training ends bitwise equal to an uninterrupted run in fp32),
and OpenAI-compatible servers on 127.0.0.1 (tests/fake_openai_server.py) that, while a stage
runs, hang past the client's timeout, answer 500 before they answer, or die and come back.

    .venv/bin/python -m pytest tests/test_faults.py -q     # -m 'not slow': the server faults only

Fault kinds covered elsewhere (not repeated here): kill -9 of `sample` (test_sample_cli.py), of
2-process training offline and online (test_train_fsdp.py, test_train_online.py), of a `sweep`
worker (test_sweep.py); a server killed mid-run and restarted on its port for a rerun
(test_openai_engine.py), 503/502 then success and 429 with Retry-After for one request
(test_openai_engine.py, test_judge.py), malformed replies (test_holes.py), a judge timing out
or dying (test_judge.py, test_holes.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from fake_openai_server import FakeOpenAIServer, completion_reply
from safetensors.torch import load_file
from test_train_offline import write_data

from posttrain import cli

ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
YES = '{"extracted_final_answer": "4", "reasoning": "same", "correct": "yes", "confidence": 90}'


def good(body: dict) -> dict:
    return completion_reply(body, ["The answer is 4."] * body.get("n", 1))


def slowly(seconds: float, reply):
    """A scripted step that answers `reply(body)` (or the string `reply`) after `seconds`."""

    def step(body):
        time.sleep(seconds)
        return reply(body) if callable(reply) else reply

    return step


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m posttrain.cli ARGS` in a session of its own (so that its children can be
    seen to go), output to `log`."""
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", *args],
            cwd=REPO,
            env={**os.environ, **ENV},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 5 ms); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended before it was killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def complete_rows(path: Path) -> list[dict]:
    """The finished rows of a JSONL file a kill may have left with a torn last line."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines() if x.strip()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ---------------------------------------------------------------------- eval, killed


def eval_argv(server, out: Path, judge=None) -> list[str]:
    argv = ["eval", "--engine", "openai", "--base-url", server.base_url, "--model", "fake"]
    argv += ["--problems", "builtin:arith:30", "--batch-size", "2", "--out", str(out)]
    argv += ["--engine-set", "concurrency=2"]
    if judge is not None:
        argv += ["--judge", judge.base_url, "--judge-model", "m", "--judge-concurrency", "2"]
    return argv


def check_eval_folder(out: Path, before: list[dict], before_items: list[dict]) -> None:
    """30 samples and 30 items, one per problem; what was on disk at the kill is kept as it was;
    the summary counts all 30."""
    samples = complete_rows(out / "samples.jsonl")
    ids = [r["problem"]["id"] for r in samples]
    assert len(ids) == len(set(ids)) == 30
    assert samples[: len(before)] == before
    items = complete_rows(out / "items.jsonl")
    item_ids = [it["problem_id"] for it in items]
    assert item_ids == ids  # rewritten in sample order, each once
    by_id = {it["problem_id"]: it for it in items}
    for it in before_items:
        assert by_id[it["problem_id"]] == it
    assert json.loads((out / "summary.json").read_text())["n"] == 30


@pytest.mark.slow
@pytest.mark.server
def test_eval_killed_while_generating_resumes_without_asking_twice(tmp_path):
    """`eval` of 30 problems against a server answering in 50 ms (2 requests at once) gets
    kill -9 once 4 samples are on disk. The same command then asks the server only for the
    problems with no sample on disk (30 - k requests), keeps the k rows as they were, and
    writes 30 samples, 30 items and a summary of n 30."""
    out, log = tmp_path / "e", tmp_path / "killed.log"
    with FakeOpenAIServer([slowly(0.05, good)]) as server:
        proc = start(eval_argv(server, out), log)
        kill_when(proc, lambda: count_lines(out / "samples.jsonl") >= 4, log)
        before = complete_rows(out / "samples.jsonl")
        assert 4 <= len(before) < 30 and not (out / "summary.json").exists()
        asked = len(server.requests)
        assert cli.main(eval_argv(server, out)) == 0  # the same command, in this process
        assert len(server.requests) - asked == 30 - len(before)
    check_eval_folder(out, before, [])


@pytest.mark.slow
@pytest.mark.server
def test_eval_killed_while_judging_resumes_judging_only_the_rest(tmp_path):
    """`eval` of 30 problems with a judge answering in 50 ms (2 at once) gets kill -9 once 4
    items are judged (all 30 samples are on disk by then). The same command asks the engine
    nothing, asks the judge only for the 30 - k items not on disk, keeps the k items as they
    were and scores all 30 as the judge said (correct)."""
    out, log = tmp_path / "e", tmp_path / "killed.log"
    with FakeOpenAIServer([good]) as server, FakeOpenAIServer([slowly(0.05, YES)]) as judge:
        proc = start(eval_argv(server, out, judge), log)
        kill_when(proc, lambda: count_lines(out / "items.jsonl") >= 4, log)
        samples = complete_rows(out / "samples.jsonl")
        items = complete_rows(out / "items.jsonl")
        assert len(samples) == 30 and 4 <= len(items) < 30
        asked, judged = len(server.requests), len(judge.requests)
        assert cli.main(eval_argv(server, out, judge)) == 0
        assert len(server.requests) == asked
        assert len(judge.requests) - judged == 30 - len(items)
    check_eval_folder(out, samples, items)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 1.0


# ---------------------------------------------------------------------- servers that fail


def sample_argv(server, out: Path, *settings: str) -> list[str]:
    """`posttrain sample` of builtin:arith:4, one answer each, all 4 prompts in one chunk;
    `settings` are engine keys (concurrency, timeout, max_retries)."""
    argv = ["sample", "--engine", "openai", "--base-url", server.base_url, "--model", "fake"]
    argv += ["--problems", "builtin:arith:4", "--n", "1", "--batch-size", "4", "--out", str(out)]
    for item in settings:
        argv += ["--engine-set", item]
    return argv


def keys(path: Path) -> list[str]:
    return [r["problem"]["id"] for r in complete_rows(path)]


@pytest.mark.server
def test_a_server_hanging_past_the_timeout_stops_the_stage_and_the_rerun_finishes(tmp_path, capsys):
    """The server does not answer the question "What is 12 * 4?" for 3 s (the client's timeout
    is 0.4 s, 1 retry) and answers the 3 others at once. `sample` asks that prompt twice,
    stops unfinished with exit 3 saying it timed out, and keeps the 3 answered rows; the same
    command against a server that answers asks for that one prompt only and ends with 4 rows,
    one per problem, the first 3 as they were."""
    out = tmp_path / "s.jsonl"
    hangs = {"on": True}

    def step(body):
        if hangs["on"] and "12 * 4" in body["messages"][-1]["content"]:
            time.sleep(3.0)
        return good(body)

    with FakeOpenAIServer([step]) as server:
        argv = sample_argv(server, out, "concurrency=4", "timeout=0.4", "max_retries=1")
        assert cli.main(argv) == 3
        end = time.monotonic()
        err = capsys.readouterr().err
        hung = [r["t"] for r in server.requests if "12 * 4" in r["body"]["messages"][-1]["content"]]
        assert len(hung) == 2 and len(server.requests) == 5
        # each attempt is given up on its 0.4 s timeout, not after the server's 3 s
        assert 0.4 <= hung[1] - hung[0] < 2.9 and 0.4 <= end - hung[1] < 2.9
        assert "timed out (0.4 s) after 2 attempt(s)" in err and "rerun" in err, err
        before = out.read_text().splitlines()
        assert sorted(keys(out)) == ["arith-train-0", "arith-train-2", "arith-train-3"]
        hangs["on"] = False
        assert cli.main(argv) == 0
        assert len(server.requests) == 6  # the rerun asked for the missing prompt only
    assert sorted(keys(out)) == [f"arith-train-{i}" for i in range(4)]
    assert out.read_text().splitlines()[:3] == before


@pytest.mark.server
def test_a_server_answering_500_then_recovering_writes_each_row_once(tmp_path):
    """Every prompt's first request gets HTTP 500 (no Retry-After: the client's own backoff),
    its second an answer. `sample` of 4 prompts, 4 at once, finishes in one run: 8 requests,
    2 per question, 4 rows, one per problem."""
    out = tmp_path / "s.jsonl"
    seen: set[str] = set()
    lock = threading.Lock()

    def step(body):
        question = body["messages"][-1]["content"]
        with lock:
            first = question not in seen
            seen.add(question)
        return (500, {"error": {"message": "internal error"}}) if first else good(body)

    with FakeOpenAIServer([step]) as server:
        assert (
            cli.main(sample_argv(server, out, "concurrency=4", "timeout=5", "max_retries=2")) == 0
        )
    asked = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert len(asked) == 8 and all(asked.count(q) == 2 for q in asked)
    assert sorted(keys(out)) == [f"arith-train-{i}" for i in range(4)]


@pytest.mark.server
def test_a_server_that_dies_and_returns_within_the_retries_loses_and_repeats_nothing(
    tmp_path,
):
    """The server stops for good after answering its 2nd request and a new one listens on the
    same port 0.3 s later. `sample` of 4 prompts, one at a time, 3 retries (0.5 s backoff
    doubling, on the refused connection) rides it out: exit 0 in one run, the new server asked
    for prompts 3 and 4 only, 4 rows, one per problem."""
    out = tmp_path / "s.jsonl"
    first = FakeOpenAIServer([good], die_after=2).start()
    port = first.httpd.server_address[1]
    again: list[FakeOpenAIServer] = []

    def come_back():
        while not first._stopped:
            time.sleep(0.01)
        time.sleep(0.3)
        again.append(FakeOpenAIServer([good], port=port).start())

    thread = threading.Thread(target=come_back, daemon=True)
    thread.start()
    try:
        argv = sample_argv(first, out, "concurrency=1", "timeout=5", "max_retries=3")
        assert cli.main(argv) == 0
    finally:
        thread.join(timeout=10)
        first.stop()
        for server in again:
            server.stop()
    assert again and len(first.requests) == 2 and len(again[0].requests) == 2
    assert sorted(keys(out)) == [f"arith-train-{i}" for i in range(4)]


# ---------------------------------------------------------------------- train, killed

TRAIN_SETTINGS = ["dtype=fp32", "lora.r=4", "lora.alpha=8", "lr=1e-3", "num_threads=1"]


def train_argv(out: Path, *extra: str) -> list[str]:
    argv = ["train", "--out", str(out), "--no-progress", *extra]
    for item in TRAIN_SETTINGS:
        argv += ["--set", item]
    return argv


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(straight: Path, resumed: Path, steps: int) -> None:
    """Bitwise-equal adapters (that did train) and the same logged loss at every step."""
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7  # A and B, 2 layers x 7 linears
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = metrics(straight), metrics(resumed)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def kill_mid_training(argv: list[str], out: Path, steps: int, tmp_path: Path) -> int:
    """Kill -9 once 3 steps are logged (a checkpoint every 2 steps: the newest is step 2, or
    being written), check it stopped short, rerun with --resume. Returns the steps logged
    before the kill."""
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: count_lines(out / "metrics.jsonl") >= 3, log)
    before = count_lines(out / "metrics.jsonl")
    assert 3 <= before < steps and not (out / "adapter").exists()
    assert cli.main([*argv, "--resume"]) == 0
    return before


@pytest.mark.slow
def test_offline_train_killed_resumes_to_a_bitwise_equal_adapter(
    tiny_model_dir, tmp_path, one_thread
):
    """SFT of a tiny model, 12 steps, LoRA dropout 0.1 (so the RNG state matters), a
    checkpoint every 2 steps, one process: a run straight through; a `posttrain train`
    process killed with -9 after step 3, then the same command with --resume. fp32 adapters
    bitwise equal, every logged loss equal, steps 1..12 logged once each."""
    _, demos = write_data(tmp_path / "data", n=8)
    extra = ["--method", "sft", "--model", tiny_model_dir, "--data", str(demos)]
    for item in ("lora.dropout=0.1", "batch_size=2", "max_steps=12", "checkpoint_every=2"):
        extra += ["--set", item]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(train_argv(straight, *extra)) == 0
    kill_mid_training(train_argv(resumed, *extra), resumed, 12, tmp_path)
    assert_same_training(straight, resumed, 12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "rollouts",
    [[], ["rollout.sync=adapter", "rollout.mode=async"]],
    ids=["sync", "async"],
)
def test_online_train_killed_resumes_to_a_bitwise_equal_adapter(
    tiny_model_dir, tmp_path, one_thread, rollouts
):
    """CHORD (GRPO rollouts sampled at temperature 1 from the tiny model + an SFT term on
    demonstrations, so the weights move although a random model earns no reward), 8 steps, a
    checkpoint every 2, one process: straight through == killed with -9 after step 3 and rerun
    with --resume (sampling seeds, problem and demonstration streams, optimizer and RNG all
    come back from the checkpoint). async: the detached hf engine samples a batch ahead in a
    thread; the batches on disk that the resumed run can use are used, the others sampled
    again (train/online/async_rollouts.py)."""
    _, demos = write_data(tmp_path / "data", n=8)
    extra = ["--method", "chord", "--model", tiny_model_dir]
    extra += ["--problems", "builtin:arith:8?split=train"]
    for item in (
        f"chord.demos={demos}",
        "num_generations=3",
        "problems_per_step=2",
        "max_new_tokens=4",
        "micro_batch_size=4",
        "temperature=1.0",
        "max_steps=8",
        "checkpoint_every=2",
        *rollouts,
    ):
        extra += ["--set", item]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(train_argv(straight, *extra)) == 0
    kill_mid_training(train_argv(resumed, *extra), resumed, 8, tmp_path)
    assert_same_training(straight, resumed, 8)


# ---------------------------------------------------------------------- run, killed


@pytest.mark.slow
def test_run_killed_in_a_later_stage_resumes_that_stage_only(
    tiny_model_dir, tmp_path, capsys, one_thread
):
    """`posttrain run` of a tiny model (demonstrations -> 2 SFT steps -> eval of 24 items,
    base and trained, 2 per batch) killed with -9 once the trained model's evaluation has
    written 2 samples. The same command skips every finished stage (demos, train, the base
    evaluation), keeps the adapter and the k samples on disk as they were, and finishes the
    trained evaluation with each of the 6 items once."""
    recipe = {
        "model": tiny_model_dir,
        "dtype": "fp32",
        "seed": 0,
        "sample": {"problems": "builtin:arith:4?split=train"},
        "train": {
            "method": "sft",
            "data": "demonstrations",
            "config": {"max_steps": 2, "batch_size": 2, "num_threads": 1, "lora": {"r": 2}},
        },
        "eval": [
            {
                "name": "arith",
                "problems": "builtin:arith:6?split=test",
                "max_new_tokens": 4,
                "batch_size": 2,
            }
        ],
    }
    path, out = tmp_path / "recipe.yaml", tmp_path / "run"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    trained = out / "eval" / "arith" / "trained"
    log = tmp_path / "killed.log"
    argv = ["run", str(path), "--out", str(out)]
    kill_when(start(argv, log), lambda: count_lines(trained / "samples.jsonl") >= 2, log)
    before = complete_rows(trained / "samples.jsonl")
    adapter = (out / "train" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert len(before) >= 2 and not (trained / "done.json").exists()
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("demos", "train", "eval/arith/base"):
        assert f"[{stage}] done earlier" in printed, stage
    assert "[eval/arith/trained] running" in printed
    assert (out / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    rows = complete_rows(trained / "samples.jsonl")
    ids = [r["problem"]["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6 and rows[: len(before)] == before
    items = complete_rows(trained / "items.jsonl")
    assert sorted(it["problem_id"] for it in items) == sorted(ids)
    assert (trained / "done.json").exists() and (out / "report.json").exists()
