"""Verb `sweep`: a grid of recipes sharing their stages (posttrain/pipeline/sweep.py), and a
table that says which differences are real.

    posttrain sweep recipes/sweep-dpo.yaml --out runs/sweep-dpo [--shard 0/4]

Every run of the grid resolves into typed configs (train config included) before the first run
starts: a bad key in any run is one line naming the grid file, the run and the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.commands.arg_types import positive_float
from posttrain.pipeline.sweep import parse_shard, run_sweep
from posttrain.records import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="grid YAML, e.g. recipes/sweep-dpo.yaml")
    parser.add_argument("--out", default=None, help="sweep folder (default: runs/GRID_NAME)")
    parser.add_argument("--shard", default="0/1", help="I/N: this worker does runs I, I+N, ...")
    parser.add_argument(
        "--stale-after",
        type=positive_float,
        default=120.0,
        help="seconds without a heartbeat after which a lock is taken over",
    )
    parser.add_argument(
        "--poll",
        type=positive_float,
        default=5.0,
        help="seconds between looks at runs and stages other workers hold",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    out = args.out or str(Path("runs") / Path(args.grid).stem)
    check_output_folder(out)
    run_sweep(
        args.grid,
        out,
        shard=parse_shard(args.shard),
        stale_after=args.stale_after,
        poll=args.poll,
        progress=not args.no_progress,
    )
    return 0
