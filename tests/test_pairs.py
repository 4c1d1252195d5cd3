"""Pair selection: each strategy picks the sample worked out by hand; truncated is never chosen.

Run: .venv/bin/python -m pytest tests/test_pairs.py -q
"""

from __future__ import annotations

import json
import random

import pytest

from posttrain.cli import main as cli_main
from posttrain.pairs import assistant_turn, build_pairs, pass_rate_histogram
from posttrain.records import read_jsonl

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def scored(pid, index, verdict, mean_logprob, num_tokens, **extra):
    row = {
        "problem": {"id": pid, "question": "2+2?", "answer": "4", "answer_type": "exact"},
        "sample_index": index,
        "messages": MESSAGES,
        "reasoning": f"r{index}",
        "response": f"Answer: {index}",
        "finish_reason": "stop",
        "num_tokens": num_tokens,
        "mean_logprob": mean_logprob,
        "verdict": verdict,
    }
    row.update(extra)
    return row


# One problem, six samples. By hand:
#   most confident wrong (highest mean log-prob among incorrect): #1 (-0.2 > -0.9)
#   longest wrong: #2 (80 tokens > 50)          shortest right: #3 (20 tokens < 30)
#   truncated #4 (-0.05, 128 tokens) beats both when allowed as rejected;
#   no_answer #5 (-0.01, the most confident of all) wins confident-wrong when allowed.
P = [
    scored("p", 0, "correct", -0.5, 30),
    scored("p", 1, "incorrect", -0.2, 50),
    scored("p", 2, "incorrect", -0.9, 80),
    scored("p", 3, "correct", -0.1, 20),
    scored("p", 4, "truncated", -0.05, 128, finish_reason="length"),
    scored("p", 5, "no_answer", -0.01, 10),
]


# (strategy, flags, chosen indices allowed, rejected index expected)
STRATEGY_CASES = [
    ("confident-wrong", {}, {0, 3}, 1),
    ("longest-wrong", {}, {0, 3}, 2),
    ("shortest-right", {}, {3}, {1, 2}),
    ("random", {}, {0, 3}, {1, 2}),
    ("confident-wrong", {"allow_truncated_rejected": True}, {0, 3}, 4),
    ("longest-wrong", {"allow_truncated_rejected": True}, {0, 3}, 4),
    ("confident-wrong", {"allow_no_answer_rejected": True}, {0, 3}, 5),
    ("longest-wrong", {"allow_no_answer_rejected": True}, {0, 3}, 2),  # #5 is short
]


@pytest.mark.parametrize("strategy,flags,chosen,rejected", STRATEGY_CASES)
def test_strategy_picks_the_hand_worked_sample(strategy, flags, chosen, rejected):
    rejected = rejected if isinstance(rejected, set) else {rejected}
    for seed in range(5):  # the named side must not depend on the seed
        pairs, _ = build_pairs(P, strategy, seed=seed, **flags)
        assert len(pairs) == 1
        assert pairs[0]["chosen_index"] in chosen and pairs[0]["rejected_index"] in rejected


@pytest.mark.parametrize(
    "strategy", ["random", "confident-wrong", "longest-wrong", "shortest-right"]
)
def test_truncated_and_no_answer_are_never_chosen(strategy):
    flags = {"allow_truncated_rejected": True, "allow_no_answer_rejected": True}
    for seed in range(10):
        pairs, _ = build_pairs(P, strategy, max_pairs_per_problem=20, seed=seed, **flags)
        assert {p["chosen_index"] for p in pairs} <= {0, 3}
        # 2 correct x 4 rejectable (#1, #2, #4, #5) = 8 distinct pairs at most.
        assert len(pairs) == 8 == len({(p["chosen_index"], p["rejected_index"]) for p in pairs})


def test_without_flags_truncated_and_no_answer_are_not_rejected_either():
    pairs, _ = build_pairs(P, "random", max_pairs_per_problem=20)
    assert {p["rejected_index"] for p in pairs} == {1, 2} and len(pairs) == 4  # 2 x 2


def test_k_pairs_walk_the_ranks_from_the_top():
    """confident-wrong ranks rejected [#1, #2]; grid order (i+j, j) gives (0,0), (1,0): both
    correct samples against #1 first. shortest-right ranks chosen [#3, #0]; tie broken by i:
    (0,0), (0,1): #3 against both wrong samples."""
    pairs, _ = build_pairs(P, "confident-wrong", max_pairs_per_problem=2)
    assert [p["rejected_index"] for p in pairs] == [1, 1]
    assert {p["chosen_index"] for p in pairs} == {0, 3}
    pairs, _ = build_pairs(P, "shortest-right", max_pairs_per_problem=2)
    assert [p["chosen_index"] for p in pairs] == [3, 3]
    assert {p["rejected_index"] for p in pairs} == {1, 2}
    pairs, _ = build_pairs(P, "confident-wrong", max_pairs_per_problem=3)
    assert [p["rejected_index"] for p in pairs] == [1, 1, 2]  # the third is rank sum 1: (0,1)


def many_problems(n=30):
    rows = []
    for k in range(n):
        rows += [
            scored(f"q{k}", i, "correct" if i % 2 else "incorrect", -0.1 * i, 10 + i)
            for i in range(6)
        ]
    return rows


def picks(pairs):
    return [(p["problem_id"], p["chosen_index"], p["rejected_index"]) for p in pairs]


@pytest.mark.parametrize("strategy", ["random", "confident-wrong"])
def test_seeded_and_independent_of_row_order(strategy):
    rows = many_problems()
    first, _ = build_pairs(rows, strategy, max_pairs_per_problem=2, seed=7)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again, _ = build_pairs(shuffled, strategy, max_pairs_per_problem=2, seed=7)
    assert sorted(picks(first)) == sorted(picks(again))
    other, _ = build_pairs(rows, strategy, max_pairs_per_problem=2, seed=8)
    # 30 problems, 3 correct x 3 wrong each: another seed changes some random draws.
    assert picks(other) != picks(first)


def test_pair_rows_are_trl_conversational():
    pairs, _ = build_pairs(P, "shortest-right", seed=0)
    pair = pairs[0]
    assert pair["prompt"] == MESSAGES
    assert pair["chosen"] == [
        {"role": "assistant", "content": "<think>\nr3\n</think>\n\nAnswer: 3"}
    ]
    assert pair["rejected"][0]["role"] == "assistant"
    assert (pair["problem_id"], pair["strategy"], pair["rejected_verdict"]) == (
        "p",
        "shortest-right",
        "incorrect",
    )
    assert pair["why"].startswith("shortest-right: chosen #3 is rank 1 of 2 correct")
    json.dumps(pair)  # plain JSON


@pytest.mark.parametrize(
    "extra,turn",
    [
        ({"reasoning": "think hard"}, "<think>\nthink hard\n</think>\n\nAnswer: 4"),
        ({"reasoning": None}, "Answer: 4"),
        ({"reasoning": "x", "text": "<think>raw</think>Answer: 4"}, "<think>raw</think>Answer: 4"),
    ],
)
def test_assistant_turn(extra, turn):
    assert assistant_turn({"response": "Answer: 4", **extra}) == turn


def test_stats_count_outcomes_and_bucket_pass_rates():
    rows = (
        P
        + [scored("all-right", i, "correct", -0.1, 5) for i in range(2)]
        + [scored("all-wrong", i, "incorrect", -0.1, 5) for i in range(2)]
        + [scored("s", 0, "correct", -0.1, 5), scored("s", 1, "truncated", -0.1, 9)]
    )
    _, stats = build_pairs(rows, "random")
    # pass rates: p 2/6 = 0.33, all-right 1, all-wrong 0, s 1/2 = 0.5
    assert (stats["problems"], stats["mixed"], stats["all_right"], stats["all_wrong"]) == (
        4,
        2,
        1,
        1,
    )
    assert stats["pairable"] == 1 and stats["pairs"] == 1  # s has no rejectable sample
    assert stats["pass_rate_histogram"] == {
        "0": 1,
        "(0,0.25]": 0,
        "(0.25,0.5]": 2,
        "(0.5,0.75]": 0,
        "(0.75,1)": 0,
        "1": 1,
    }
    _, stats = build_pairs(rows, "random", allow_truncated_rejected=True)
    assert stats["pairable"] == 2 and stats["pairs"] == 2


@pytest.mark.parametrize(
    "rate,bucket",
    [
        (0.0, "0"),
        (0.25, "(0,0.25]"),
        (0.26, "(0.25,0.5]"),
        (0.75, "(0.5,0.75]"),
        (0.9, "(0.75,1)"),
        (1.0, "1"),
    ],
)
def test_pass_rate_bucket_edges(rate, bucket):
    assert pass_rate_histogram([rate])[bucket] == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_pairs(P, "best")
    with pytest.raises(ValueError, match="at least 1"):
        build_pairs(P, "random", max_pairs_per_problem=0)


# ---------------------------------------------------------------------------- stage


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_pairs_writes_pairs_and_stats(tmp_path, capsys):
    scored_file = write(tmp_path / "scored.jsonl", P)
    out = tmp_path / "pairs.jsonl"
    rc = cli_main(
        [
            "pairs",
            "--scored",
            str(scored_file),
            "--out",
            str(out),
            "--strategy",
            "confident-wrong",
            "--max-pairs-per-problem",
            "2",
            "--seed",
            "3",
        ]
    )
    assert rc == 0 and "pairs written 2" in capsys.readouterr().out
    pairs = read_jsonl(out)
    assert [p["rejected_index"] for p in pairs] == [1, 1]
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert (stats["pairs"], stats["mixed"], stats["seed"]) == (2, 1, 3)


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"verdict": "maybe"}, "verdict"),
        ({"verdict": None}, "verdict"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "user", "content": "other"}]}, "messages"),
        ({"sample_index": 0}, "sample_index"),  # duplicate of line 1
        ({"mean_logprob": "high"}, "mean_logprob"),
    ],
)
def test_cli_pairs_bad_row_names_file_line_field(tmp_path, capsys, bad, field):
    scored_file = write(tmp_path / "scored.jsonl", [P[0], {**P[1], **bad}])
    rc = cli_main(["pairs", "--scored", str(scored_file), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 1 and f"{scored_file}:2: field '{field}'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
