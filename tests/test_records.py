"""JSONL reading errors name file, line and field; the appender survives a torn last line."""

import json

import pytest

from posttrain.records import DataError, JsonlAppender, Problem, iter_jsonl, read_problems


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ('{"id": 1}\n{oops\n', ":2: invalid JSON"),
        ("[1, 2]\n", ":1: expected a JSON object, got list"),
        (b'{"id": "\xff"}\n', ":1: not valid UTF-8"),
    ],
)
def test_iter_jsonl_errors(tmp_path, content, message):
    path = write(tmp_path / "x.jsonl", content)
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        list(iter_jsonl(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


GOOD = {"id": "a", "question": "1+1?", "answer": "2", "answer_type": "exact"}


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {**GOOD, "answer_type": "free"},
            ":1: field 'answer_type': expected one of exact, choice, math, refusal; got 'free'",
        ),
        ({k: v for k, v in GOOD.items() if k != "question"}, ":1: field 'question': missing"),
        ({**GOOD, "answer": None}, ":1: field 'answer': missing"),
        ({**GOOD, "choices": ["a", 3]}, ":1: field 'choices': expected a list of strings"),
        ({**GOOD, "question": 7}, ":1: field 'question': expected str, got int"),
    ],
)
def test_problem_validation(tmp_path, row, message):
    path = write(tmp_path / "p.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_problems(path)
    assert str(e.value) == f"{path}{message}"


def test_duplicate_ids(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r":2: field 'id': duplicate id 'a' \(first on line 1\)"):
        read_problems(path)


def test_refusal_needs_no_answer(tmp_path):
    row = {"id": 3, "question": "How do I pick a lock?", "answer_type": "refusal"}
    (p,) = read_problems(write(tmp_path / "p.jsonl", json.dumps(row) + "\n"))
    assert p == Problem(id="3", question="How do I pick a lock?", answer="", answer_type="refusal")


def test_appender_resumes_and_cuts_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlAppender(path, key=lambda r: r["k"]) as sink:
        sink.append({"k": 1})
        sink.append({"k": 2})
        sink.append({"k": 2})  # duplicate key: ignored
    with open(path, "a") as f:
        f.write('{"k": 3, "half": "writ')  # what kill -9 mid-write leaves behind
    with JsonlAppender(path, key=lambda r: r["k"]) as sink:
        assert sink.done(1) and sink.done(2) and not sink.done(3)
        sink.append({"k": 3})
    assert [json.loads(line)["k"] for line in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("block", [4, 7, 1 << 16])
def test_appender_cuts_a_torn_tail_longer_than_its_read_block(tmp_path, block):
    """The tail is found by reading backwards `block` bytes at a time: a 40-byte torn line is
    cut with blocks of 4 or 7 bytes as with 64 KiB; a file that is one torn line becomes empty.
    Only keys are kept (`count` is 2 for rows 1, 2), never the rows."""
    path = tmp_path / "out.jsonl"
    path.write_text('{"k": 1}\n{"k": 2}\n{"k": 3, "text": "' + "x" * 30)
    sink = JsonlAppender.__new__(JsonlAppender)
    sink.path = path
    sink._repair_tail(block=block)
    assert path.read_text() == '{"k": 1}\n{"k": 2}\n'
    with JsonlAppender(path, key=lambda r: r["k"]) as sink:
        assert sink.count == 2 and not hasattr(sink, "rows")
    path.write_text('{"k": 1, "te')
    sink._repair_tail(block=block)
    assert path.read_bytes() == b""
