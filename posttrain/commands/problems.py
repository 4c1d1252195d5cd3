"""Verb `problems`: load a problem source and write it as native problem JSONL, with counts.

    posttrain problems "builtin:arith:300?split=test" --out test.jsonl
    posttrain problems hle:hle.jsonl --limit 500 --out hle.jsonl
    posttrain problems builtin:arith:2000 --exclude "builtin:arith:300?split=test" --out train.jsonl

Source strings are described in posttrain/tasks/__init__.py.
"""

from __future__ import annotations

import argparse
from collections import Counter

from posttrain.commands.arg_types import int_at_least
from posttrain.records import check_output_file, write_jsonl
from posttrain.tasks import decontaminate, load_problems, load_with_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="problem source, e.g. builtin:arith:300?split=test")
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None, help="keep only the first N problems"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="SOURCE",
        help="drop problems also in this (eval) source; may be repeated",
    )
    parser.add_argument("--out", required=True, help="output JSONL of Problem records")


def summary_lines(problems, report, dropped: int) -> list[str]:
    lines = report.lines()
    lines[0] = f"{len(problems)} problems from {report.spec}"
    if dropped:
        lines.append(f"  dropped {dropped} found in --exclude sources")
    by_category = Counter(p.category or "(none)" for p in problems)
    lines += [f"  {n:6d}  {category}" for category, n in sorted(by_category.items())]
    return lines


def main(args) -> int:
    check_output_file(args.out)
    # With --exclude the limit comes after decontamination, so --limit counts clean problems.
    problems, report = load_with_report(args.source, limit=None if args.exclude else args.limit)
    dropped = 0
    for source in args.exclude:
        problems, n = decontaminate(problems, load_problems(source))
        dropped += n
    problems = problems[: args.limit] if args.limit is not None else problems
    write_jsonl(args.out, (p.to_dict() for p in problems))
    print("\n".join(summary_lines(problems, report, dropped)))
    print(f"wrote {args.out}")
    return 0
