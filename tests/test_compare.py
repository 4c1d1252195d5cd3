"""`posttrain compare` with hand-worked values.

.venv/bin/python -m pytest tests/test_compare.py -q
"""

import json

import pytest

from posttrain.evaluation.compare import compare_items, load_items
from posttrain.records import DataError


def rows(verdicts: dict) -> list[dict]:
    return [{"problem_id": pid, "verdict": v} for pid, v in verdicts.items()]


C, W = "correct", "incorrect"


def ten_items():
    """A right on p0-p3, B right on p0-p1 and p4-p9 (p2, p3 only A; p4..p9 only B).
    acc A = 4/10, acc B = 8/10, difference +0.4; discordant [2, 6];
    McNemar p = 2*(1 + 8 + 28)/256 = 74/256 = 0.2890625."""
    a = rows({f"p{i}": (C if i < 4 else W) for i in range(10)})
    b = rows({f"p{i}": (C if i < 2 or i >= 4 else W) for i in range(10)})
    return a, b


def test_compare_single_sample_hand_worked():
    a, b = ten_items()
    r = compare_items(a, b, n_boot=2000)
    assert r["n"] == 10
    assert r["accuracy_a"] == pytest.approx(0.4) and r["accuracy_b"] == pytest.approx(0.8)
    assert r["difference"] == pytest.approx(0.4)
    assert r["discordant"] == [2, 6]
    assert r["p_value"] == 0.2890625
    lo, hi = r["interval_95"]
    assert lo < 0.4 < hi and -1 <= lo and hi <= 1
    assert r["mcnemar_on"] == "per-item correctness"


def test_judge_error_counts_as_wrong():
    """A: judge_error on the only item, B: correct -> a_only 0, b_only 1, difference +1."""
    r = compare_items(rows({"x": "judge_error"}), rows({"x": C}), n_boot=100)
    assert r["discordant"] == [0, 1] and r["difference"] == 1.0 and r["p_value"] == 1.0


def test_compare_k_samples_uses_means_and_majority():
    """k=3 per item. Item q1: A 2/3, B 1/3. Item q2: A 0/3, B 3/3.
    Means: A (2/3, 0) -> acc 1/3; B (1/3, 1) -> acc 2/3; difference +1/3.
    Majority: A (yes, no), B (no, yes) -> discordant [1, 1], p = 1."""
    a = [{"problem_id": "q1", "sample_index": i, "verdict": v} for i, v in enumerate([C, C, W])]
    a += [{"problem_id": "q2", "sample_index": i, "verdict": W} for i in range(3)]
    b = [{"problem_id": "q1", "sample_index": i, "verdict": v} for i, v in enumerate([C, W, W])]
    b += [{"problem_id": "q2", "sample_index": i, "verdict": C} for i in range(3)]
    r = compare_items(a, b, n_boot=500)
    assert r["accuracy_a"] == pytest.approx(1 / 3) and r["accuracy_b"] == pytest.approx(2 / 3)
    assert r["difference"] == pytest.approx(1 / 3)
    assert r["discordant"] == [1, 1] and r["p_value"] == 1.0
    assert r["k_a"] == r["k_b"] == 3
    assert r["mcnemar_on"] == "per-item majority correctness"


def test_tie_is_not_a_majority():
    """k=2, A 1/2 on the item, B 2/2: A is not 'right' by majority -> discordant [0, 1]."""
    a = [{"problem_id": 1, "sample_index": i, "verdict": v} for i, v in enumerate([C, W])]
    b = [{"problem_id": 1, "sample_index": i, "verdict": C} for i in range(2)]
    assert compare_items(a, b, n_boot=10)["discordant"] == [0, 1]


def test_different_item_sets_are_an_error_unless_intersect():
    a = rows({"p1": C, "p2": C, "p3": W})
    b = rows({"p2": C, "p3": C, "p4": C, "p5": W})
    with pytest.raises(DataError, match="1 only in A, 2 only in B"):
        compare_items(a, b)
    r = compare_items(a, b, intersect=True, n_boot=100)
    assert r["n"] == 2 and (r["dropped_a"], r["dropped_b"]) == (1, 2)
    assert r["discordant"] == [0, 1]  # p3: A wrong, B right
    with pytest.raises(DataError, match="share no items"):
        compare_items(rows({"x": C}), rows({"y": C}), intersect=True)


def test_duplicate_rows_are_rejected():
    with pytest.raises(DataError, match="duplicate"):
        compare_items(rows({"p1": C}) * 2, rows({"p1": C}))


def test_load_items_names_file_line_and_field(tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text(
        '{"problem_id": "a", "verdict": "correct"}\n{"problem_id": "b", "verdict": "ok"}\n'
    )
    with pytest.raises(DataError, match=r"items.jsonl:2: field 'verdict'"):
        load_items(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_items(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no items.jsonl"):
        load_items(tmp_path / "empty")


def write_run(folder, items):
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / "summary.json").write_text("{}\n")
    return folder


def test_cli_json(tmp_path, capsys):
    a, b = ten_items()
    fa, fb = write_run(tmp_path / "A", a), write_run(tmp_path / "B", b)
    from posttrain.cli import main as cli_main

    rc = cli_main(["compare", str(fa), str(fb), "--json", "--n-boot", "1000"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["difference"] == pytest.approx(0.4)
    assert out["discordant"] == [2, 6] and out["p_value"] == 0.2890625
    assert out["n"] == 10 and out["accuracy_a"] == pytest.approx(0.4)
    assert len(out["interval_95"]) == 2


def test_cli_table_and_error(tmp_path, capsys):
    a, b = ten_items()
    fa, fb = write_run(tmp_path / "A", a), write_run(tmp_path / "B", b[:-1])
    from posttrain.cli import main as cli_main

    assert cli_main(["compare", str(fa), str(fb)]) == 1
    assert "1 only in A, 0 only in B" in capsys.readouterr().err
    assert cli_main(["compare", str(fa), str(fb), "--intersect", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "items compared: 9 (dropped 1 only in A, 0 only in B)" in out
    assert "exact McNemar p" in out
