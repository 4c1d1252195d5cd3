"""Verb `compare`: paired comparison of two eval folders, as a table or one JSON object.

    posttrain compare runs/base_eval runs/dpo_eval            # table
    posttrain compare A B --json                              # machine-readable
    posttrain compare A B --intersect                         # compare only the shared items

The statistics are posttrain/evaluation/compare.py (`compare_items`).
"""

from __future__ import annotations

import argparse
import json

from posttrain.evaluation.compare import compare_items, load_items


def format_table(result: dict, name_a: str, name_b: str) -> str:
    r = result
    width = max(len(name_a), len(name_b), 8)
    lines = [
        f"{'':<10} {name_a:>{width}} {name_b:>{width}}",
        f"{'accuracy':<10} {100 * r['accuracy_a']:>{width - 1}.1f}% "
        f"{100 * r['accuracy_b']:>{width - 1}.1f}%",
        f"{'samples/k':<10} {r['k_a']:>{width}} {r['k_b']:>{width}}",
        "",
        f"items compared: {r['n']}"
        + (
            f" (dropped {r['dropped_a']} only in A, {r['dropped_b']} only in B)"
            if r["dropped_a"] or r["dropped_b"]
            else ""
        ),
        f"difference B - A: {100 * r['difference']:+.1f} points, 95% interval "
        f"[{100 * r['interval_95'][0]:+.1f}, {100 * r['interval_95'][1]:+.1f}] "
        f"(paired bootstrap, {r['n_boot']} resamples)",
        f"discordant items: A only {r['discordant'][0]}, B only {r['discordant'][1]}; "
        f"exact McNemar p = {r['p_value']:.4g} (on {r['mcnemar_on']})",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="eval folder (or items JSONL) of the baseline, A")
    parser.add_argument("b", help="eval folder (or items JSONL) of the candidate, B")
    parser.add_argument(
        "--intersect",
        action="store_true",
        help="compare only the items both runs cover (says how many were dropped)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def main(args: argparse.Namespace) -> int:
    result = compare_items(
        load_items(args.a),
        load_items(args.b),
        intersect=args.intersect,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps({"a": str(args.a), "b": str(args.b), **result}, indent=2))
    else:
        print(format_table(result, "A", "B"))
        print(f"A = {args.a}\nB = {args.b}")
    return 0
