"""Verb `verify`: grade sampled answers into a scored file, then print the verdict counts.

    posttrain verify --samples samples.jsonl --out scored.jsonl [--workers 2] [--math-timeout 5]

The grading is posttrain/verify/files.py (`verify_file`); this prints a table of verdict counts
and the accuracy over all samples and over the graded ones.
"""

from __future__ import annotations

import argparse

from posttrain.commands.arg_types import int_at_least, positive_float
from posttrain.records import check_output_file
from posttrain.verify.files import verify_file
from posttrain.verify.math import DEFAULT_TIMEOUT_S


def format_counts(counts: dict[str, int]) -> str:
    """Verdict table plus accuracy over all samples and over the graded ones."""
    total = sum(counts.values())
    lines = [f"{'verdict':<12} {'count':>7} {'share':>7}"]
    for verdict, n in counts.items():
        lines.append(f"{verdict:<12} {n:>7} {100 * n / max(total, 1):>6.1f}%")
    lines.append(f"{'total':<12} {total:>7}")
    right, graded = counts.get("correct", 0), counts.get("correct", 0) + counts.get("incorrect", 0)
    lines.append(
        f"accuracy {100 * right / max(total, 1):.1f}% of all samples ({right}/{total}); "
        f"{100 * right / max(graded, 1):.1f}% of graded ({right}/{graded})"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="samples JSONL from `posttrain sample`")
    parser.add_argument("--out", required=True, help="scored JSONL (resumed if it exists)")
    parser.add_argument("--workers", type=int_at_least(1), default=1, help="rows graded at once")
    parser.add_argument(
        "--math-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per math answer before it counts as incorrect (timeout)",
    )


def main(args) -> int:
    check_output_file(args.out)
    counts = verify_file(
        args.samples, args.out, workers=args.workers, math_timeout_s=args.math_timeout
    )
    print(format_counts(counts))
    return 0
