"""Preference pairs from graded samples: a correct answer (chosen) against a wrong one (rejected).

    posttrain pairs --scored scored.jsonl --out pairs.jsonl [--strategy confident-wrong]
        [--max-pairs-per-problem 1] [--seed 0] [--allow-truncated-rejected]
        [--allow-no-answer-rejected]      # the verb: posttrain/commands/pairs.py

Only samples of the same problem are paired. Chosen is always `correct`; rejected is
`incorrect`, or also `truncated` / `no_answer` when the flags allow it; `judge_error` samples are
never used. Strategies (the side a strategy names is ranked, the other side is drawn at random):
  random          both sides at random
  confident-wrong rejected = the wrong answer the model was surest of (highest mean token
                  log-prob): the mistakes DPO most needs to push down
  longest-wrong   rejected = the longest wrong answer (num_tokens)
  shortest-right  chosen = the shortest correct answer (num_tokens)
Samples with no value for the ranked field rank last; ties go to the lower sample index. With
K pairs per problem, distinct (chosen, rejected) pairs are taken in order of rank sum (ranks
from 0, the named side's rank breaking ties), so the best meets the best first and then the
runner-ups: ranks (0,0), then (0,1) or (1,0), ... Random draws come from a generator seeded by
(seed, problem id), so a problem's pairs do not depend on the file's row order or other rows.

Output rows are TRL conversational preference rows: `prompt` (the sample's chat messages),
`chosen` and `rejected` (one assistant message each), plus problem_id, strategy, the sample
indices, the rejected verdict and a `why`. The assistant content is the whole turn as produced:
the row's raw `text` when it has one, else "<think>\\n{reasoning}\\n</think>\\n\\n{response}"
when reasoning is not None, else the response. Stats go next to the output (pairs.stats.json).
A pair whose chosen and rejected turns are the same text teaches nothing (DPO's loss is log 2
and its gradient 0 on it): it is skipped and counted (`equal_skipped`).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from posttrain.records import VERDICTS, DataError, iter_jsonl, require, write_json, write_jsonl

STRATEGIES = ("random", "confident-wrong", "longest-wrong", "shortest-right")
HISTOGRAM_BUCKETS = ("0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1")


def assistant_turn(row: dict) -> str:
    """The full assistant turn a sample produced, think block included."""
    if isinstance(row.get("text"), str):
        return row["text"]
    if row.get("reasoning") is not None:
        return f"<think>\n{row['reasoning']}\n</think>\n\n{row['response']}"
    return row["response"]


def build_pairs(
    scored_rows: list[dict],
    strategy: str = "random",
    max_pairs_per_problem: int = 1,
    seed: int = 0,
    *,
    allow_truncated_rejected: bool = False,
    allow_no_answer_rejected: bool = False,
) -> tuple[list[dict], dict]:
    """(pair rows, stats) from scored sample rows; see the module docstring for the rules."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if max_pairs_per_problem < 1:
        raise ValueError(f"max_pairs_per_problem must be at least 1, got {max_pairs_per_problem}")
    rejectable = {"incorrect"}
    rejectable |= {"truncated"} if allow_truncated_rejected else set()
    rejectable |= {"no_answer"} if allow_no_answer_rejected else set()

    groups: dict[str, list[dict]] = {}
    for row in scored_rows:
        groups.setdefault(str(row["problem"]["id"]), []).append(row)
    pairs, pass_rates, pairable, equal = [], [], 0, 0
    for pid, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["sample_index"])
        if any(r["messages"] != rows[0]["messages"] for r in rows):
            raise ValueError(
                f"problem {pid!r}: samples have different prompts (messages); "
                "a pair needs one prompt"
            )
        correct = [r for r in rows if r["verdict"] == "correct"]
        wrong = [r for r in rows if r["verdict"] in rejectable]
        pass_rates.append(len(correct) / len(rows))
        pairable += bool(correct and wrong)
        rng = random.Random(f"{seed}:{pid}")  # str seeds hash with sha512: stable across runs
        for chosen, rejected, why in _select(strategy, correct, wrong, max_pairs_per_problem, rng):
            if assistant_turn(chosen) == assistant_turn(rejected):
                equal += 1
                continue
            pairs.append(
                {
                    "prompt": rows[0]["messages"],
                    "chosen": [{"role": "assistant", "content": assistant_turn(chosen)}],
                    "rejected": [{"role": "assistant", "content": assistant_turn(rejected)}],
                    "problem_id": pid,
                    "strategy": strategy,
                    "chosen_index": chosen["sample_index"],
                    "rejected_index": rejected["sample_index"],
                    "rejected_verdict": rejected["verdict"],
                    "why": why,
                }
            )
    stats = {
        "strategy": strategy,
        "max_pairs_per_problem": max_pairs_per_problem,
        "seed": seed,
        "allow_truncated_rejected": allow_truncated_rejected,
        "allow_no_answer_rejected": allow_no_answer_rejected,
        "samples": len(scored_rows),
        "verdicts": dict(Counter(r["verdict"] for r in scored_rows)),
        "problems": len(groups),
        "mixed": sum(0 < p < 1 for p in pass_rates),
        "all_right": sum(p == 1 for p in pass_rates),
        "all_wrong": sum(p == 0 for p in pass_rates),
        "pairable": pairable,
        "pass_rate_histogram": pass_rate_histogram(pass_rates),
        "pairs": len(pairs),
        "equal_skipped": equal,
    }
    return pairs, stats


def pass_rate_histogram(pass_rates: list[float]) -> dict[str, int]:
    """Problems per pass-rate bucket; exactly 0 and exactly 1 get buckets of their own."""
    counts = dict.fromkeys(HISTOGRAM_BUCKETS, 0)
    for p in pass_rates:
        if p == 0 or p == 1:
            counts[str(int(p))] += 1
        else:
            counts[HISTOGRAM_BUCKETS[math.ceil(p * 4)]] += 1  # (0,.25] -> 1 ... (.75,1) -> 4
    return counts


def _select(
    strategy: str, correct: list[dict], wrong: list[dict], k: int, rng: random.Random
) -> list[tuple[dict, dict, str]]:
    if not correct or not wrong:
        return []
    nc, nw = len(correct), len(wrong)
    if strategy == "random":
        grid = [(i, j) for i in range(nc) for j in range(nw)]
        picked = rng.sample(grid, min(k, len(grid)))
        return [
            (
                correct[i],
                wrong[j],
                f"random: chosen #{correct[i]['sample_index']} and "
                f"rejected #{wrong[j]['sample_index']} drawn from {nc} correct and {nw} wrong",
            )
            for i, j in picked
        ]
    shuffled_correct = rng.sample(correct, nc)
    shuffled_wrong = rng.sample(wrong, nw)
    if strategy == "confident-wrong":
        chosen_order, rejected_order = shuffled_correct, _ranked(wrong, "mean_logprob", True)
    elif strategy == "longest-wrong":
        chosen_order, rejected_order = shuffled_correct, _ranked(wrong, "num_tokens", True)
    else:  # shortest-right
        chosen_order, rejected_order = _ranked(correct, "num_tokens", False), shuffled_wrong
    rejected_named = strategy != "shortest-right"
    grid = sorted(
        ((i, j) for i in range(nc) for j in range(nw)),
        key=lambda ij: (ij[0] + ij[1], ij[1] if rejected_named else ij[0]),
    )
    out = []
    for i, j in grid[:k]:
        chosen, rejected = chosen_order[i], rejected_order[j]
        out.append((chosen, rejected, _why(strategy, chosen, rejected, i, j, nc, nw)))
    return out


def _ranked(rows: list[dict], field: str, highest_first: bool) -> list[dict]:
    def key(r):
        value = r.get(field)
        if value is None:
            return (1, 0.0)
        return (0, -value if highest_first else value)

    return sorted(rows, key=key)  # stable: ties keep sample-index order


def _why(strategy, chosen, rejected, i, j, nc, nw) -> str:
    ci, ri = chosen["sample_index"], rejected["sample_index"]
    if strategy == "shortest-right":
        return (
            f"shortest-right: chosen #{ci} is rank {i + 1} of {nc} correct by length "
            f"({chosen.get('num_tokens')} tokens); rejected #{ri} drawn from {nw} wrong"
        )
    field, what = (
        ("mean_logprob", "confidence (mean log-prob")
        if strategy == "confident-wrong"
        else ("num_tokens", "length (tokens")
    )
    return (
        f"{strategy}: rejected #{ri} ({rejected['verdict']}) is rank {j + 1} of {nw} wrong "
        f"by {what} {rejected.get(field)}); chosen #{ci} drawn from {nc} correct"
    )


# ---------------------------------------------------------------------------- stage


def read_scored(path: str | os.PathLike) -> list[dict]:
    """Scored rows checked for the fields pairing reads; DataError names file, line, field."""
    rows, seen, prompt_line = [], {}, {}
    for line, row in iter_jsonl(path):
        problem = require(row, "problem", dict, path, line)
        pid = str(require(problem, "id", (str, int), path, line))
        index = require(row, "sample_index", int, path, line)
        verdict = require(row, "verdict", str, path, line)
        if verdict not in VERDICTS:
            raise DataError(
                path,
                line,
                f"expected one of {', '.join(VERDICTS)}; got {verdict!r}",
                field="verdict",
            )
        require(row, "messages", list, path, line)
        require(row, "response", str, path, line)
        require(row, "reasoning", str, path, line, optional=True)
        require(row, "text", str, path, line, optional=True)
        require(row, "mean_logprob", (int, float), path, line, optional=True)
        require(row, "num_tokens", int, path, line, optional=True)
        if (pid, index) in seen:
            raise DataError(
                path,
                line,
                f"duplicate sample ({pid!r}, {index}) (first on line {seen[pid, index]})",
                field="sample_index",
            )
        seen[pid, index] = line
        first = prompt_line.setdefault(pid, (line, row["messages"]))
        if row["messages"] != first[1]:
            raise DataError(
                path,
                line,
                f"prompt differs from line {first[0]} of the same problem "
                "(a pair needs one prompt)",
                field="messages",
            )
        rows.append(row)
    return rows


def stats_path(out: str | os.PathLike) -> Path:
    return Path(out).with_suffix(".stats.json")


@dataclass
class PairsConfig:
    """The pairs stage's settings; `make_pairs` runs it (the CLI and `run` both call it)."""

    scored: str
    out: str
    strategy: str = "random"
    max_pairs_per_problem: int = 1
    seed: int = 0
    allow_truncated_rejected: bool = False
    allow_no_answer_rejected: bool = False


def make_pairs(cfg: PairsConfig) -> dict:
    """Read `cfg.scored`, write the pairs to `cfg.out` and their stats beside it; the stats."""
    pairs, stats = build_pairs(
        read_scored(cfg.scored),
        cfg.strategy,
        cfg.max_pairs_per_problem,
        cfg.seed,
        allow_truncated_rejected=cfg.allow_truncated_rejected,
        allow_no_answer_rejected=cfg.allow_no_answer_rejected,
    )
    write_jsonl(cfg.out, pairs)
    stats = {**stats, "scored": str(cfg.scored)}
    write_json(stats_path(cfg.out), stats)
    return stats
