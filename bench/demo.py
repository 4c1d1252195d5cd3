"""The default recipe's two figures from issue 4: wall time (limit 20 min on the 2-core CPU) and
the held-out improvement's McNemar p (must be < 0.05).

    .venv/bin/python bench/demo.py [--recipe recipes/default.yaml] [--out runs/bench-demo] \
        [--fresh-cache] [--json bench/results/demo.json]

Runs `posttrain run` into a new folder (finished stages would be skipped, so an existing folder
is refused) and writes the per-stage seconds, total wall time, accuracies, difference, interval
and p-value together with the machine's load and CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument(
        "--fresh-cache",
        action="store_true",
        help="convert the embedded model again, into a temporary $POSTTRAIN_HOME",
    )
    ap.add_argument("--json", default="bench/results/demo.json")
    args = ap.parse_args()
    if Path(args.out).exists():
        sys.exit(f"{args.out} exists: a rerun would skip its finished stages; pick a new --out")
    env = dict(os.environ)
    if args.fresh_cache:
        env["POSTTRAIN_HOME"] = tempfile.mkdtemp(prefix="posttrain-home-")
    load = os.getloadavg()
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "run", args.recipe, "--out", args.out],
        check=True,
        env=env,
    )
    wall = time.time() - start
    report = json.loads((Path(args.out) / "report.json").read_text())
    c = report["compare"]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result = {
        "recipe": args.recipe,
        "fresh_model_cache": args.fresh_cache,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "load_average_at_start": load,
        "wall_seconds": wall,
        "stage_seconds": report["seconds"],
        "base_accuracy": report["base"]["accuracy"],
        "base_interval_95": report["base"]["interval_95"],
        "trained_accuracy": report["trained"]["accuracy"],
        "trained_interval_95": report["trained"]["interval_95"],
        "difference": c["difference"],
        "difference_interval_95": c["interval_95"],
        "mcnemar_p": c["p_value"],
        "discordant": c["discordant"],
        "n": c["n"],
        "within_20_minutes": wall <= 20 * 60,
        "significant": c["p_value"] < 0.05,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
