"""Verb `report`: one self-contained HTML page for a run folder or a sweep folder.

    posttrain report runs/demo                 # writes runs/demo/report.html
    posttrain report runs/sweep-dpo --out sweep.html

The page is built by posttrain/report/html.py (`write_report`).
"""

from __future__ import annotations

import argparse

from posttrain.report.html import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a run folder (posttrain run) or a sweep folder")
    parser.add_argument("--out", default=None, help="HTML file (default: FOLDER/report.html)")


def main(args) -> int:
    path = write_report(args.folder, args.out)
    print(f"report: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
