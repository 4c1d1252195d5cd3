"""Verb `run`: one recipe, the whole loop (posttrain/pipeline/run.py), one output folder.

    posttrain run recipes/default.yaml --out runs/demo [--set train.config.lr=1e-5] \
        [--fail-on-regression]

The recipe and its --set overrides resolve into typed configs (the train config included)
before any stage runs: a bad setting is one line naming the file and key, and no stage folder
is written. Exit code 3 with --fail-on-regression: a guard set dropped significantly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.pipeline.recipe import load_recipe
from posttrain.pipeline.run import REGRESSION_EXIT, run_recipe
from posttrain.records import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/default.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: runs/RECIPE_NAME)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.config.lr=1e-5",
    )
    parser.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"exit {REGRESSION_EXIT} when a guard set drops significantly",
    )


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.set)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    check_output_folder(out)
    report = run_recipe(recipe, out)
    if args.fail_on_regression and report["regression"]:
        return REGRESSION_EXIT
    return 0
