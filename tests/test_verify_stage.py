"""`posttrain verify`: grades a samples file, resumes, and rejects bad rows by file:line:field.

Run: .venv/bin/python -m pytest tests/test_verify_stage.py -q
"""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main as cli_main
from posttrain.records import DataError, read_jsonl
from posttrain.commands.verify import format_counts
from posttrain.verify.files import verify_file


def row(pid, index, response, answer="4", answer_type="exact", finish="stop", **extra):
    r = {
        "problem": {"id": pid, "question": "q?", "answer": answer, "answer_type": answer_type},
        "sample_index": index,
        "messages": [{"role": "user", "content": "q?"}],
        "reasoning": "thinking",
        "response": response,
        "finish_reason": finish,
        "num_tokens": 10,
        "sum_logprob": -2.0,
        "mean_logprob": -0.2,
        "model": "m",
        "engine": "hf",
    }
    r.update(extra)
    return r


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SAMPLES = [
    row("a", 0, "Answer: 4"),
    row("a", 1, "Answer: 5"),
    row("b", 0, "The answer is (C).", answer="C", answer_type="choice"),
    row("c", 0, "\\boxed{\\frac{1}{2}}", answer="0.5", answer_type="math"),
    row("c", 1, "\\boxed{0.5", answer="0.5", answer_type="math", finish="length"),
    row("d", 0, "no idea"),
]


def test_verify_file_grades_every_row(tmp_path):
    samples = write(tmp_path / "samples.jsonl", SAMPLES)
    counts = verify_file(samples, tmp_path / "scored.jsonl", progress=False)
    assert counts == {
        "correct": 3,
        "incorrect": 1,
        "no_answer": 1,
        "truncated": 1,
        "judge_error": 0,
    }
    out = read_jsonl(tmp_path / "scored.jsonl")
    assert [(r["problem"]["id"], r["sample_index"], r["verdict"]) for r in out] == [
        ("a", 0, "correct"),
        ("a", 1, "incorrect"),
        ("b", 0, "correct"),
        ("c", 0, "correct"),
        ("c", 1, "truncated"),
        ("d", 0, "no_answer"),
    ]
    assert out[3]["extracted"] == "\\frac{1}{2}" and out[3]["reward"] == 1.0
    assert out[0]["messages"] == SAMPLES[0]["messages"]  # the sample row is kept whole


def test_rerun_keeps_finished_rows_and_adds_the_rest(tmp_path):
    samples = write(tmp_path / "samples.jsonl", SAMPLES)
    scored = tmp_path / "scored.jsonl"
    # A finished row from an earlier run, marked so we can see it was not graded again, and a
    # torn last line as left by kill -9 in the middle of a write.
    earlier = {**SAMPLES[0], "verdict": "incorrect", "reward": 0.0, "extracted": "kept"}
    scored.write_text(json.dumps(earlier) + "\n" + '{"problem": {"id": "a"}, "sampl')
    counts = verify_file(samples, scored, workers=2, progress=False)
    out = read_jsonl(scored)
    assert len(out) == len(SAMPLES) and out[0]["extracted"] == "kept"
    assert counts["correct"] == 2 and counts["incorrect"] == 2  # the kept row counts as written
    verify_file(samples, scored, progress=False)
    assert read_jsonl(scored) == out  # a third run changes nothing


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"response": None}, "response"),
        ({"finish_reason": None}, "finish_reason"),
        ({"problem": None}, "problem"),
        ({"problem": {"id": "x", "question": "q?", "answer_type": "exact"}}, "problem.answer"),
    ],
)
def test_bad_row_names_file_line_and_field_before_grading(tmp_path, bad, field):
    rows = [SAMPLES[0], {**SAMPLES[1], **bad}]
    samples = write(tmp_path / "samples.jsonl", rows)
    with pytest.raises(DataError) as e:
        verify_file(samples, tmp_path / "scored.jsonl", progress=False)
    assert str(e.value).startswith(f"{samples}:2: field '{field}'")
    assert not (tmp_path / "scored.jsonl").exists()  # nothing half-done to clean up


def test_duplicate_sample_is_rejected(tmp_path):
    samples = write(tmp_path / "samples.jsonl", [SAMPLES[0], SAMPLES[1], SAMPLES[0]])
    with pytest.raises(DataError, match=r"samples.jsonl:3: field 'sample_index': duplicate"):
        verify_file(samples, tmp_path / "scored.jsonl", progress=False)


def test_format_counts_shows_both_accuracies():
    text = format_counts(
        {"correct": 3, "incorrect": 1, "no_answer": 1, "truncated": 1, "judge_error": 0}
    )
    # 3 of 6 samples = 50.0 %; 3 of the 4 graded (correct + incorrect) = 75.0 %.
    assert "accuracy 50.0% of all samples (3/6); 75.0% of graded (3/4)" in text


def test_cli_verify(tmp_path, capsys):
    samples = write(tmp_path / "samples.jsonl", SAMPLES[:3])
    rc = cli_main(["verify", "--samples", str(samples), "--out", str(tmp_path / "s.jsonl")])
    assert rc == 0 and "accuracy 66.7% of all samples (2/3)" in capsys.readouterr().out
    write(samples, [{**SAMPLES[0], "response": 4}])
    rc = cli_main(["verify", "--samples", str(samples), "--out", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{samples}:1: field 'response': expected str, got int" in err
