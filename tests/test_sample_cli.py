"""`posttrain sample` through the CLI: row fields, kill -9 and resume, bad input, and the
embedded model end to end with `posttrain verify`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli

SAMPLE_FIELDS = {
    "problem",
    "sample_index",
    "messages",
    "reasoning",
    "response",
    "finish_reason",
    "num_tokens",
    "sum_logprob",
    "mean_logprob",
    "model",
    "engine",
    "sampling",
}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sample_rows_have_the_documented_fields(tmp_path, tiny_model_dir):
    out = tmp_path / "s.jsonl"
    run_cli(
        "sample",
        "--model",
        tiny_model_dir,
        "--problems",
        "builtin:arith:3",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
    )
    got = rows(out)
    assert len(got) == 6
    for row in got:
        assert set(row) == SAMPLE_FIELDS
        assert row["finish_reason"] in ("stop", "length")
        assert row["engine"] == "hf" and row["num_tokens"] <= 8
        assert row["messages"][-1] == {"role": "user", "content": row["problem"]["question"]}
        # The mean is the sum over the tokens it was taken over.
        assert row["mean_logprob"] * row["num_tokens"] == pytest.approx(
            row["sum_logprob"], rel=1e-6
        )
    assert sorted((r["problem"]["id"], r["sample_index"]) for r in got) == sorted(
        {(r["problem"]["id"], i) for r in got for i in range(2)}
    )


@pytest.mark.slow
def test_kill_dash_nine_then_resume_keeps_rows_and_writes_no_duplicates(tmp_path, tiny_model_dir):
    out = tmp_path / "s.jsonl"
    args = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "sample",
        "--model",
        tiny_model_dir,
        "--problems",
        "builtin:arith:20",
        "--n",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "32",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = {(r["problem"]["id"], r["sample_index"]): r for r in rows(out)}
    assert 4 <= len(before) < 40
    with open(out, "a") as f:  # and a torn line, as a kill in the middle of a write leaves
        f.write('{"problem": {"id": "arith-tr')
    run_cli(*args[3:])
    after = rows(out)
    keys = [(r["problem"]["id"], r["sample_index"]) for r in after]
    assert len(keys) == len(set(keys)) == 40
    for key, row in before.items():  # finished rows are kept as they were
        assert after[keys.index(key)] == row


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        (
            '{"id": "a", "question": "q", "answer": "1", "answer_type": "free"}\n',
            ":1: field 'answer_type': expected one of exact, choice, math, refusal",
        ),
        (
            '{"id": "a", "question": "q", "answer": "1", "answer_type": "exact"}\nnot json\n',
            ":2: invalid JSON",
        ),
    ],
)
def test_sample_reports_bad_problem_files(tmp_path, content, message):
    src = tmp_path / "problems.jsonl"
    src.write_text(content)
    proc = run_cli(
        "sample", "--problems", str(src), "--out", str(tmp_path / "s.jsonl"), check=False
    )
    assert proc.returncode == 1
    assert message in proc.stderr and str(src) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.slow
def test_embedded_model_sample_then_verify(tmp_path):
    samples, scored = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    proc = run_cli(
        "sample",
        "--problems",
        "builtin:arith:8",
        "--n",
        "2",
        "--max-new-tokens",
        "48",
        "--out",
        str(samples),
    )
    assert "tokens/s" in proc.stdout
    got = rows(samples)
    assert len(got) == 16 and all(set(r) == SAMPLE_FIELDS for r in got)
    assert all(r["model"] == "smollm2-135m" for r in got)
    assert all(r["mean_logprob"] < 0 for r in got if r["num_tokens"])
    run_cli("verify", "--samples", str(samples), "--out", str(scored))
    graded = rows(scored)
    assert len(graded) == 16
    for row in graded:
        assert row["verdict"] in ("correct", "incorrect", "no_answer", "truncated")
        assert isinstance(row["reward"], float)
        assert row["reward"] == (1.0 if row["verdict"] == "correct" else 0.0)
        assert "extracted" in row
    assert all(r["verdict"] == "truncated" for r in graded if r["finish_reason"] == "length")
