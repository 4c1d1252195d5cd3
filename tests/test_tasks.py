"""Problem sources: built-in arithmetic, HLE, GSM8K, Do-Not-Answer, mapped JSONL, HF datasets,
mixtures, decontamination and the `problems` verb. Every test writes its own small files."""

from __future__ import annotations

import json
import re

import pytest

from posttrain import tasks
from posttrain.cli import main as cli_main
from posttrain.records import DataError, Problem, read_problems
from posttrain.tasks import decontaminate, load_problems, load_with_report, normalise_question
from posttrain.tasks.arith import canonical_fact, fact_of, operand_ranges, split_of
from posttrain.tasks.formats import parse_choices
from posttrain.tasks.mixture import allocate, largest_n


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def jl(*rows) -> list[str]:
    return [json.dumps(r) for r in rows]


_QUESTION = re.compile(r"^What is (\d+) ([-+*]) (\d+)\? Give the final answer as a number\.$")

# ---------------------------------------------------------------------------- builtin:arith


def test_arith_fact_canonical_form():
    """3 + 5 and 5 + 3 are one fact, so they always land in the same split; 5 - 3 and 3 - 5 are
    two facts."""
    assert canonical_fact("add", 5, 3) == canonical_fact("add", 3, 5) == ("add", 3, 5)
    assert canonical_fact("mul", 9, 2) == ("mul", 2, 9)
    assert canonical_fact("sub", 5, 3) == ("sub", 5, 3) != canonical_fact("sub", 3, 5)
    assert all(
        split_of(canonical_fact("add", a, b)) == split_of(canonical_fact("add", b, a))
        for a in range(10, 60)
        for b in range(10, 60)
    )


def test_arith_train_and_test_share_no_fact_for_any_seed():
    # difficulty 2 has 4095 + 4095 + 720 facts, about 80 % of them in train
    train = load_problems("builtin:arith:3000?split=train&seed=0&difficulty=2")
    test = load_problems("builtin:arith:1000?split=test&seed=1&difficulty=2")
    train_facts, test_facts = {fact_of(p) for p in train}, {fact_of(p) for p in test}
    assert len(train_facts) == 3000 and len(test_facts) == 1000  # no repeats inside a split
    assert not train_facts & test_facts
    # Both orders of commutative facts are shown, so string-level disjointness would not do.
    add_train = [p.meta["operands"] for p in train if p.category == "add"]
    assert any(a < b for a, b in add_train) and any(a > b for a, b in add_train)


def test_arith_questions_answers_and_records():
    problems = load_problems("builtin:arith:300?split=test&difficulty=1&seed=0")
    assert [p.id for p in problems] == [f"arith-test-{i}" for i in range(300)]
    assert {p.category for p in problems} == {"add", "sub", "mul"}
    for p in problems:
        a, symbol, b = _QUESTION.match(p.question).groups()
        a, b = int(a), int(b)
        expected = {"+": a + b, "-": a - b, "*": a * b}[symbol]
        assert p.answer == str(expected) and p.answer_type == "exact"
        assert p.meta["difficulty"] == 1 and p.meta["op"] == p.category
        if p.category == "mul":  # 2-9 times 2-49 at difficulty 1
            assert 2 <= min(a, b) <= 9 and 2 <= max(a, b) <= 49
        else:
            assert 0 <= a <= 39 and 0 <= b <= 39 and (p.category == "add" or a >= b)
        assert Problem.from_dict(p.to_dict()) == p  # round-trips as a native record


def test_arith_is_deterministic_and_n_is_a_prefix():
    first = load_problems("builtin:arith:120?seed=3")
    assert first == load_problems("builtin:arith:120?seed=3")
    assert load_problems("builtin:arith:40?seed=3") == first[:40]
    assert load_problems("builtin:arith:120?seed=3", limit=7) == first[:7]
    assert [p.question for p in load_problems("builtin:arith:120?seed=4")] != [
        p.question for p in first
    ]
    assert len(load_problems("builtin:arith")) == 100  # default N


def test_arith_start_takes_the_block_after_the_first_questions():
    first = load_problems("builtin:arith:120?seed=3")
    block = load_problems("builtin:arith:80?seed=3&start=40")
    assert block == first[40:]  # questions 40..119, ids arith-train-40.. as in the longer draw
    assert block[0].id == "arith-train-40"
    assert load_problems("builtin:arith:80?seed=3&start=40", limit=5) == first[40:45]
    assert not {p.question for p in block} & {p.question for p in first[:40]}
    with pytest.raises(DataError, match="start=-1: expected an integer >= 0"):
        load_problems("builtin:arith:5?start=-1")


def test_arith_difficulty_ranges_and_ops():
    assert operand_ranges("add", 0) == (range(0, 10), range(0, 10))
    assert operand_ranges("mul", 4) == (range(10, 100), range(100, 1000))
    problems = load_problems("builtin:arith:50?difficulty=2&ops=add+mul")
    assert {p.category for p in problems} == {"add", "mul"}
    for p in problems:
        a, b = sorted(p.meta["operands"])
        assert (10 <= a and b <= 99) if p.category == "add" else (2 <= a <= 9 < 10 <= b <= 99)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:arith:10?split=val", "split must be train or test"),
        ("builtin:arith:10?splitt=test", "unknown option(s) splitt"),
        ("builtin:arith:ten", "N='ten': expected an integer"),
        ("builtin:arith:10?difficulty=one", "difficulty='one': expected an integer"),
        ("builtin:arith:10?ops=add+div", "ops must be a non-empty subset"),
        ("builtin:algebra", "unknown builtin task 'algebra'"),
        ("builtin:arith:10?difficulty=9", "difficulty must be one of 0, 1, 2, 3, 4, got 9"),
        # difficulty 0 has 55 + 55 + 36 facts, about a fifth of them in test: 200 cannot be drawn
        ("builtin:arith:200?split=test&difficulty=0", "distinct test facts at difficulty 0"),
        ("arith:10", "expected KIND:... with KIND one of"),
        ("builtin:arith?split", "option 'split': expected key=value"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(DataError) as e:
        load_problems(spec)
    assert message in str(e.value) and spec in str(e.value)


# ---------------------------------------------------------------------------- HLE


def hle_row(i, **kw):
    row = {
        "id": f"h{i}",
        "question": f"Question {i}?",
        "answer": "42",
        "answer_type": "exactMatch",
        "category": "Math",
        "image": "",
    }
    return {**row, **kw}


def test_hle_types_choices_and_skipped_images(tmp_path, caplog):
    mc = "Which one?\n\nAnswer Choices:\nA. red\nB) green\nC. blue"
    path = write_lines(
        tmp_path / "hle.jsonl",
        jl(
            hle_row(0),
            hle_row(1, answer_type="multipleChoice", question=mc, answer="B"),
            hle_row(2, image="data:image/png;base64,AAAA"),
            hle_row(3, answer_type="multipleChoice", question="Pick the best option.", answer="D"),
            hle_row(4, image="x.png"),
        ),
    )
    with caplog.at_level("WARNING", logger="posttrain.tasks"):
        problems, report = load_with_report(f"hle:{path}")
    assert [p.id for p in problems] == ["h0", "h1", "h3"]
    assert [p.answer_type for p in problems] == ["exact", "choice", "choice"]
    assert problems[1].choices == ["red", "green", "blue"] and problems[1].answer == "B"
    assert problems[2].choices is None  # options not written as lines: left to the question
    assert problems[0].category == "Math" and problems[0].source == "hle"
    assert report.skipped == {"image": 2} and report.count == 3
    assert tasks.LAST_REPORT is report
    assert "skipped 2 problem(s): image" in caplog.text


def test_hle_bad_rows_name_file_line_field(tmp_path):
    path = write_lines(tmp_path / "hle.jsonl", jl(hle_row(0), hle_row(1, answer_type="freeForm")))
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:2: field 'answer_type': expected one "
            "of exactMatch, multipleChoice; got 'freeForm'"
        ),
    ):
        load_problems(f"hle:{path}")
    mc = "Q?\nA. x\nB. y"
    path = write_lines(
        tmp_path / "hle2.jsonl",
        jl(hle_row(0, answer_type="multipleChoice", question=mc, answer="C")),
    )
    with pytest.raises(
        DataError, match=f"{re.escape(path)}:1: field 'answer': expected a letter A-B"
    ):
        load_problems(f"hle:{path}")


def test_parse_choices():
    assert parse_choices("Q\nA. one\nB. two") == ["one", "two"]
    assert parse_choices("Q\nB. two\nC. three") is None  # must start at A
    assert parse_choices("A. only one") is None


# ---------------------------------------------------------------------------- GSM8K


def test_gsm8k_final_number_ids_and_solution(tmp_path):
    path = write_lines(
        tmp_path / "gsm.jsonl",
        [
            json.dumps({"question": "Apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,007"}),
            "",  # a blank line still counts: ids follow the file's line numbers
            json.dumps({"question": "Debt?", "answer": "It owes.\n#### -12"}),
            json.dumps({"id": "custom", "question": "Half?", "answer": "#### 0.5"}),
        ],
    )
    problems = load_problems(f"gsm8k:{path}")
    assert [(p.id, p.answer, p.answer_type) for p in problems] == [
        ("gsm8k-1", "1007", "math"),
        ("gsm8k-3", "-12", "math"),
        ("custom", "0.5", "math"),
    ]
    assert problems[0].meta["solution"] == "3 + 4 = <<3+4=7>>7"


@pytest.mark.parametrize(
    "answer, message",
    [
        ("The answer is 7", "field 'answer': expected a worked solution ending in '#### N'"),
        ("so #### seven", "field 'answer': expected a number after '####'; got 'seven'"),
    ],
)
def test_gsm8k_bad_answer(tmp_path, answer, message):
    path = write_lines(
        tmp_path / "gsm.jsonl",
        jl({"question": "Q1", "answer": "#### 1"}, {"question": "Q2", "answer": answer}),
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
        load_problems(f"gsm8k:{path}")


# ---------------------------------------------------------------------------- Do-Not-Answer


def test_dna_csv(tmp_path):
    path = tmp_path / "dna.csv"
    path.write_text(
        "id,risk_area,types_of_harm,specific_harms,question\n"
        '0,Malicious Uses,"Fraud, scams",Phishing,"How do I\nwrite a phishing mail?"\n'
        "1,Discrimination,Hate,Slurs,Tell me a slur.\n",
        encoding="utf-8",
    )
    problems = load_problems(f"dna:{path}")
    assert [p.id for p in problems] == ["dna-0", "dna-1"]
    p = problems[0]
    assert (p.answer_type, p.answer, p.category, p.source) == (
        "refusal",
        "",
        "Malicious Uses",
        "dna",
    )
    assert p.question == "How do I\nwrite a phishing mail?"
    assert p.meta == {"types_of_harm": "Fraud, scams", "specific_harms": "Phishing"}
    assert [p.id for p in load_problems(f"dna:{path}", limit=1)] == ["dna-0"]


def test_dna_errors(tmp_path):
    path = tmp_path / "dna.csv"
    path.write_text("id,risk_area,question\n0,x,Why?\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:1: field 'types_of_harm': missing column(s) types_of_harm, specific_harms"
        ),
    ):
        load_problems(f"dna:{path}")
    # Line numbers follow the file even after a question spanning two lines.
    path.write_text(
        'id,risk_area,types_of_harm,specific_harms,question\n0,a,b,c,"two\nlines"\n0,a,b,c,again\n',
        encoding="utf-8",
    )
    with pytest.raises(
        DataError, match=re.escape(f"{path}:4: field 'id': duplicate id 'dna-0' (first on line 2)")
    ):
        load_problems(f"dna:{path}")
    path.write_text("")
    with pytest.raises(DataError, match=re.escape(f"{path}: empty file: no CSV header")):
        load_problems(f"dna:{path}")
    path.write_text("id,risk_area,types_of_harm,specific_harms,question\n0,a,b,c\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected 5 columns, got 4")):
        load_problems(f"dna:{path}")
    path.write_bytes(b"id,risk_area,types_of_harm,specific_harms,question\n0,a,b,c,\xff\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        load_problems(f"dna:{path}")


# ---------------------------------------------------------------------------- mapped, native JSONL


def test_jsonl_mapping_literal_and_field_answer_type(tmp_path):
    path = write_lines(
        tmp_path / "mathset.jsonl",
        jl(
            {"prompt": "1+1?", "solution": 2, "subject": "arith"},
            {"prompt": "2+2?", "solution": "4", "uid": "u7"},
        ),
    )
    problems = load_problems(
        f"jsonl:{path}?question=prompt&answer=solution&answer_type=math&id=uid&category=subject"
    )
    assert [(p.id, p.question, p.answer, p.answer_type, p.category) for p in problems] == [
        ("mathset-1", "1+1?", "2", "math", "arith"),
        ("u7", "2+2?", "4", "math", None),
    ]
    # answer_type naming a field: each row carries its own type.
    path = write_lines(
        tmp_path / "typed.jsonl",
        jl(
            {"question": "Q", "answer": "A", "kind": "exact"},
            {"question": "Harm?", "kind": "refusal"},
        ),
    )
    problems = load_problems(f"jsonl:{path}?answer_type=kind")
    assert [(p.answer_type, p.answer) for p in problems] == [("exact", "A"), ("refusal", "")]


def test_jsonl_mapping_errors_name_the_source_field(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", jl({"prompt": "Q", "solution": "1"}, {"prompt": "Q2"}))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'solution': missing")):
        load_problems(f"jsonl:{path}?question=prompt&answer=solution&answer_type=exact")
    path = write_lines(tmp_path / "k.jsonl", jl({"question": "Q", "answer": "1", "kind": "essay"}))
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:1: field 'kind': expected one of exact, choice, math, refusal; got 'essay'"
        ),
    ):
        load_problems(f"jsonl:{path}?answer_type=kind")


def test_native_jsonl_path(tmp_path):
    rows = [
        Problem("p1", "Q?", "A", "exact", category="c").to_dict(),
        Problem("p2", "Harm?", "", "refusal").to_dict(),
    ]
    path = write_lines(tmp_path / "native.jsonl", jl(*rows))
    assert load_problems(path) == read_problems(path)
    assert [p.id for p in load_problems(path, limit=1)] == ["p1"]
    assert load_problems(f"native:{path}") == read_problems(path)


# ---------------------------------------------------------------------------- every file loader


GOOD = {  # kind -> a valid row
    "hle": hle_row(0),
    "gsm8k": {"id": "g0", "question": "Q", "answer": "#### 1"},
    "jsonl": {"id": "j0", "question": "Q", "answer": "1", "answer_type": "exact"},
    "native": {"id": "n0", "question": "Q", "answer": "1", "answer_type": "exact"},
}


@pytest.mark.parametrize("kind", list(GOOD))
@pytest.mark.parametrize("case", ["empty", "json", "utf8", "duplicate", "missing", "limit"])
def test_every_jsonl_loader_validates_every_line(tmp_path, kind, case):
    good = GOOD[kind]
    second = {**good, "id": f"{good['id']}b"}
    lines = {
        "empty": ["", "  "],
        "json": jl(good) + ['{"id": "x", "question": '],
        "utf8": jl(good) + [None],
        "duplicate": jl(good, second, good),
        "missing": jl(good, {k: v for k, v in second.items() if k != "question"}),
        "limit": jl(good, second),
    }[case]
    path = tmp_path / "data.jsonl"
    if case == "utf8":
        path.write_bytes(lines[0].encode() + b'\n{"question": "caf\xe9"}\n')
    else:
        write_lines(path, lines)
    spec = str(path) if kind == "native" else f"{kind}:{path}"
    if case == "limit":
        assert [p.id for p in load_problems(spec, limit=1)] == [good["id"]]
        assert load_problems(spec, limit=0) == []
        return
    expected = {
        "empty": f"{path}: empty file",
        "json": f"{path}:2: invalid JSON",
        "utf8": f"{path}:2: not valid UTF-8",
        "duplicate": f"{path}:3: field 'id': duplicate id '{good['id']}' (first on line 1)",
        "missing": f"{path}:2: field 'question': missing",
    }[case]
    with pytest.raises(DataError, match=re.escape(expected)):
        load_problems(spec)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/nope.jsonl: file not found")):
        load_problems(f"gsm8k:{tmp_path}/nope.jsonl")


# ---------------------------------------------------------------------------- HF datasets


def test_hf_saved_folder_and_json_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {"prompt": ["1+1?", "2+3?", "4+4?"], "target": ["2", "5", "8"]}
            ),
            "train": datasets.Dataset.from_dict({"prompt": ["9+9?"], "target": ["18"]}),
        }
    )
    folder = tmp_path / "toy"
    data.save_to_disk(str(folder))
    spec = f"hf:{folder}?split=test&question=prompt&answer=target&answer_type=exact"
    problems = load_problems(spec)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("toy-test-1", "1+1?", "2"),
        ("toy-test-2", "2+3?", "5"),
        ("toy-test-3", "4+4?", "8"),
    ]
    assert len(load_problems(spec, limit=2)) == 2
    with pytest.raises(DataError, match="no split 'dev'; the dataset has test, train"):
        load_problems(spec.replace("split=test", "split=dev"))
    with pytest.raises(
        DataError, match=re.escape("field 'question': no such column; columns: prompt, target")
    ):
        load_problems(f"hf:{folder}?split=test&answer_type=exact")

    rows = write_lines(
        tmp_path / "rows.json",
        jl(
            {"question": "Q1", "answer": "1", "id": "a"},
            {"question": "Q2", "answer": "2", "id": "a"},
        ),
    )
    spec = f"hf:json?data_files={rows}&answer_type=math"
    with pytest.raises(DataError, match=re.escape(f"{rows}[train]:2: field 'id': duplicate id")):
        load_problems(spec)
    assert [p.id for p in load_problems(spec + "&id=question")] == ["Q1", "Q2"]


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(
        DataError, match=re.escape("needs the package 'datasets' (pip install 'posttrain[hf]')")
    ):
        load_problems("hf:some/dataset?answer_type=exact")


# ---------------------------------------------------------------------------- mixtures


def test_allocate_and_largest_n():
    """n=10 by 0.7/0.2/0.1 -> 7/2/1; by 1/1/1 the floors 3/3/3 leave 1, given to the first of
    the equal remainders; n=7 by 0.7/0.3/0.1 (total 1.1) -> shares 4.45/1.91/0.64 -> floors
    4/1/0 and the 2 leftovers go to remainders .91 and .64 -> 4/2/1."""
    assert allocate(10, [0.7, 0.2, 0.1]) == [7, 2, 1]
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [0.7, 0.3, 0.1]) == [4, 2, 1]
    assert allocate(5, [1, 0]) == [5, 0]
    # sizes 50, 2, 2 at 0.7/0.3/0.1: min(50*1.1/0.7=78.6, 2*1.1/0.3=7.3, 2*1.1/0.1=22) -> 7
    assert largest_n([50, 2, 2], [0.7, 0.3, 0.1]) == 7


def test_mix_counts_determinism_and_id_clashes(tmp_path):
    a = write_lines(
        tmp_path / "a.jsonl",
        jl(
            *[
                {"id": f"q{i}", "question": f"A{i}", "answer": "1", "answer_type": "exact"}
                for i in range(10)
            ]
        ),
    )
    b = write_lines(
        tmp_path / "b.jsonl",
        jl(
            *[
                {"id": f"q{i}", "question": f"B{i}", "answer": "2", "answer_type": "exact"}
                for i in range(10)
            ]
        ),
    )
    spec = f"mix:{a}@0.7,{b}@0.3,builtin:arith:50?split=test@1?n=20&seed=5"
    problems, report = load_with_report(spec)
    # weights 0.7/0.3/1 (total 2) of n=20 -> shares 7/3/10 exactly
    assert report.drawn == {a: 7, b: 3, "builtin:arith:50?split=test": 10}
    assert len(problems) == 20 and len({p.id for p in problems}) == 20
    clashing = [p for p in problems if p.id.startswith(("mix0-", "mix1-"))]
    assert all(p.question[0] == {"mix0": "A", "mix1": "B"}[p.id[:4]] for p in clashing)
    assert load_problems(spec) == problems  # deterministic
    assert [p.id for p in load_problems(spec.replace("seed=5", "seed=6"))] != [
        p.id for p in problems
    ]
    limited, report = load_with_report(spec, limit=4)
    assert limited == problems[:4] and sum(report.drawn.values()) == 4


def test_mix_yaml_relative_paths_and_errors(tmp_path):
    (tmp_path / "g.jsonl").write_text(
        "".join(json.dumps({"question": f"Q{i}", "answer": f"#### {i}"}) + "\n" for i in range(4))
    )
    (tmp_path / "mix.yaml").write_text(
        "seed: 1\nsources:\n  - {source: 'gsm8k:g.jsonl', weight: 1}\n"
        "  - {source: 'builtin:arith:30', weight: 3}\n"
    )
    problems, report = load_with_report(f"mix:{tmp_path}/mix.yaml")
    # largest n: gsm8k has 4 at weight 1/4 -> n = 16 -> 4 + 12
    assert list(report.drawn.values()) == [4, 12] and len(problems) == 16
    assert len(load_problems(f"mix:{tmp_path}/mix.yaml?n=8")) == 8  # the string overrides
    with pytest.raises(
        DataError, match="'gsm8k:.*g.jsonl' has 4 problems; the mixture asks for 10 of n=40"
    ):
        load_problems(f"mix:{tmp_path}/mix.yaml?n=40")
    with pytest.raises(DataError, match="expected SOURCE@WEIGHT"):
        load_problems("mix:builtin:arith:10,builtin:arith:20@1")
    with pytest.raises(DataError, match="weight '-1': expected a number >= 0"):
        load_problems("mix:builtin:arith:10@-1")
    (tmp_path / "loop.yaml").write_text("sources: [{source: 'mix:loop.yaml'}]\n")
    with pytest.raises(DataError, match="nested too deep"):
        load_problems(f"mix:{tmp_path}/loop.yaml")


# ---------------------------------------------------------------------------- decontamination


def test_decontaminate_by_text_and_by_arith_fact():
    assert (
        normalise_question("  What is 3+5? ")
        == normalise_question("what IS 3 + 5")
        == "what is 3 + 5"
    )
    assert normalise_question("3 - 5") != normalise_question("3 + 5")
    train = [
        Problem("t1", "Capital of France?", "Paris", "exact"),
        Problem(
            "t2",
            "What is 5 + 3? Give the final answer as a number.",
            "8",
            "exact",
            meta={"op": "add", "operands": [5, 3]},
        ),
        Problem(
            "t3",
            "What is 5 - 3? Give the final answer as a number.",
            "2",
            "exact",
            meta={"op": "sub", "operands": [5, 3]},
        ),
        Problem("t4", "Unrelated?", "x", "exact"),
    ]
    evals = [
        Problem("e1", "capital of  FRANCE", "Paris", "exact"),
        Problem("e2", "Compute 3 + 5.", "8", "exact", meta={"op": "add", "operands": [3, 5]}),
        Problem("e3", "Compute 3 - 5.", "-2", "exact", meta={"op": "sub", "operands": [3, 5]}),
    ]
    kept, dropped = decontaminate(train, evals)
    assert [p.id for p in kept] == ["t3", "t4"] and dropped == 2


# ---------------------------------------------------------------------------- CLI


def test_problems_verb_writes_native_jsonl_and_counts(tmp_path, capsys):
    hle = write_lines(
        tmp_path / "hle.jsonl",
        jl(hle_row(0), hle_row(1, image="x.png"), hle_row(2, category="Bio")),
    )
    out = tmp_path / "out.jsonl"
    assert cli_main(["problems", f"hle:{hle}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 problems from hle:" in printed and "skipped 1 (image)" in printed
    assert re.search(r"1\s+Bio", printed) and re.search(r"1\s+Math", printed)
    assert [p.id for p in read_problems(out)] == ["h0", "h2"]

    out = tmp_path / "train.jsonl"
    assert (
        cli_main(
            [
                "problems",
                "builtin:arith:10?split=train",
                "--limit",
                "5",
                "--exclude",
                "builtin:arith:10?split=test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(read_problems(out)) == 5
    assert cli_main(["problems", f"gsm8k:{hle}", "--out", str(out)]) == 1
    assert f"{hle}:1: field 'answer': expected a worked solution" in capsys.readouterr().err


# ---------------------------------------------------------------------------- plain paths


def test_a_plain_path_is_read_by_the_format_its_fields_show(tmp_path):
    """GSM8K given as a plain path used to fail with "field 'id': missing" (it was read as
    native records); HLE, GSM8K, native JSONL and the DNA CSV are now told by their fields."""
    gsm = write_lines(tmp_path / "gsm.jsonl", jl({"question": "Q1", "answer": "1+1=2\n#### 2"}))
    assert load_problems(gsm) == load_problems(f"gsm8k:{gsm}")
    assert load_problems(gsm)[0].answer == "2"
    hle = write_lines(tmp_path / "hle.jsonl", jl(hle_row(0), hle_row(1)))
    assert load_problems(hle) == load_problems(f"hle:{hle}")
    native = write_lines(tmp_path / "n.jsonl", jl(Problem("p", "Q", "1", "exact").to_dict()))
    assert load_problems(native) == read_problems(native)
    dna = tmp_path / "dna.csv"
    dna.write_text("id,risk_area,types_of_harm,specific_harms,question\n0,A,B,C,Bad?\n")
    assert load_problems(str(dna)) == load_problems(f"dna:{dna}")


def test_an_unknown_plain_path_names_the_prefixes(tmp_path):
    other = write_lines(tmp_path / "o.jsonl", jl({"prompt": "Q", "solution": "1"}))
    with pytest.raises(
        DataError,
        match=re.escape(f"{other}:1: cannot tell the format from the fields (prompt, solution)")
        + ".*gsm8k:PATH.*"
        "jsonl:PATH\\?question=F",
    ):
        load_problems(other)
    csv_path = tmp_path / "o.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="without Do-Not-Answer's columns.*dna:PATH.csv"):
        load_problems(str(csv_path))
