"""Verb `pairs`: preference pairs from graded samples, with their stats printed.

    posttrain pairs --scored scored.jsonl --out pairs.jsonl [--strategy confident-wrong]
        [--max-pairs-per-problem 1] [--seed 0] [--allow-truncated-rejected]
        [--allow-no-answer-rejected]

The rules (strategies, ranks, the row format) are in posttrain/pairs.py; stats go next to the
output (pairs.stats.json).
"""

from __future__ import annotations

import argparse

from posttrain.commands.arg_types import int_at_least
from posttrain.pairs import STRATEGIES, PairsConfig, make_pairs
from posttrain.records import check_output_file


def format_stats(stats: dict) -> str:
    hist = ", ".join(f"{k}: {v}" for k, v in stats["pass_rate_histogram"].items())
    return (
        f"problems {stats['problems']} (mixed {stats['mixed']}, all right "
        f"{stats['all_right']}, all wrong {stats['all_wrong']}; pairable {stats['pairable']})\n"
        f"pass-rate histogram  {hist}\n"
        f"pairs written {stats['pairs']} ({stats['strategy']}, up to "
        f"{stats['max_pairs_per_problem']} per problem, seed {stats['seed']})"
        + (
            f"; {stats['equal_skipped']} skipped: chosen and rejected are the same text"
            if stats.get("equal_skipped")
            else ""
        )
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scored", required=True, help="scored JSONL from `posttrain verify`")
    parser.add_argument("--out", required=True, help="pairs JSONL (stats: OUT.stats.json)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="random")
    parser.add_argument("--max-pairs-per-problem", type=int_at_least(1), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allow-truncated-rejected",
        action="store_true",
        help="truncated samples may be rejected answers",
    )
    parser.add_argument(
        "--allow-no-answer-rejected",
        action="store_true",
        help="samples with no extractable answer may be rejected answers",
    )


def main(args) -> int:
    check_output_file(args.out)
    stats = make_pairs(
        PairsConfig(
            scored=args.scored,
            out=args.out,
            strategy=args.strategy,
            max_pairs_per_problem=args.max_pairs_per_problem,
            seed=args.seed,
            allow_truncated_rejected=args.allow_truncated_rejected,
            allow_no_answer_rejected=args.allow_no_answer_rejected,
        )
    )
    print(format_stats(stats))
    if not stats["pairs"]:
        print("warning: no pairs: no problem has both a correct and a rejectable sample")
    return 0
