"""Peak memory of `sample` + `verify` at N and 10N long rows: it must grow by less than the rows.

    .venv/bin/python bench/sample_memory.py [--rows 500] [--tokens 8000] [--code DIR] \
        [--out bench/results/sample_memory.json]

Each size runs in a fresh process (peak RSS, ru_maxrss, is per process): sample_problems writes
N rows through the resumable writer, the process is restarted on the same file to resume (the
writer re-reads it: keys only), and verify_file grades every row into a scored file. The engine
is a synthetic one (this bench measures the writer and the grader, not generation): each sample
is ~`--tokens` words ending in "The answer is 4.", what an 8k-token answer weighs on disk.
Goal (issue 9): peak RSS at 10N minus peak RSS at N is less than the 9N rows' size on disk.
`--code DIR` imports posttrain from another checkout (e.g. `git archive` of an older commit
into DIR) to measure the writer before this change side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class SyntheticEngine:
    """Long deterministic answers, instantly: the Engine interface without a model."""

    name, model_id = "synthetic", "synthetic"

    def __init__(self, words: int):
        self.words = words

    def render_prompt(self, messages) -> str:
        return messages[-1]["content"]

    def generate(self, prompts, params):
        from posttrain.engines import Completion

        def text(i, k):
            return (
                " ".join(f"w{(i * 31 + k * 7 + j) % 997}" for j in range(self.words))
                + "\nThe answer is 4."
            )

        return [
            [
                Completion(text=text(i, k), finish_reason="stop", token_ids=list(range(self.words)))
                for k in range(params.n)
            ]
            for i, _ in enumerate(prompts)
        ]

    def close(self) -> None:
        pass


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(rows: int, words: int, folder: Path, stage: str) -> dict:
    """One stage in this process; returns its peak RSS and the files' sizes."""
    from posttrain.engines import SamplingParams
    from posttrain.records import Problem
    from posttrain.sampling import sample_problems
    from posttrain.verify.files import verify_file

    baseline = rss_mb()
    n = 4
    problems = [
        Problem(id=f"p{i}", question=f"What is 2 + 2? ({i})", answer="4", answer_type="exact")
        for i in range(rows // n)
    ]
    samples, scored = folder / "samples.jsonl", folder / "scored.jsonl"
    t0 = time.time()
    if stage == "sample":
        sample_problems(
            SyntheticEngine(words),
            problems,
            samples,
            SamplingParams(n=n),
            chunk_size=16,
            progress=False,
        )
    elif stage == "resume":  # everything is done: the writer only reads the keys back
        stats = sample_problems(
            SyntheticEngine(words),
            problems,
            samples,
            SamplingParams(n=n),
            chunk_size=16,
            progress=False,
        )
        assert stats["new_samples"] == 0 and stats["rows"] == rows, stats
    else:
        counts = verify_file(samples, scored, workers=2, progress=False)
        assert counts["correct"] == rows, counts
    return {
        "stage": stage,
        "seconds": round(time.time() - t0, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "samples_mb": round(samples.stat().st_size / 2**20, 1),
        "scored_mb": round(scored.stat().st_size / 2**20, 1) if scored.exists() else 0.0,
    }


def run_size(rows: int, words: int, code: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="sample_memory_") as folder:
        stages = []
        for stage in ("sample", "resume", "verify"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    stage,
                    "--rows",
                    str(rows),
                    "--tokens",
                    str(words),
                    "--folder",
                    folder,
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(code)},
            )
            stages.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {rows:>6} rows  {stages[-1]}", flush=True)
    return {
        "rows": rows,
        "stages": stages,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages),
        "rows_mb": stages[-1]["samples_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=500, help="N (rows; 10N is run too)")
    ap.add_argument("--tokens", type=int, default=8000, help="words per sample (~tokens)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/sample_memory.json"))
    ap.add_argument("--code", default=str(ROOT), help="checkout whose posttrain is measured")
    ap.add_argument("--child", choices=["sample", "resume", "verify"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.rows, args.tokens, Path(args.folder), args.child)))
        return
    flags = open("/proc/cpuinfo").read()
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"avx512_bf16={'avx512_bf16' in flags}",
        "load_average_before": os.getloadavg()[0],
        "tokens_per_sample": args.tokens,
        "code": args.code,
        "runs": [
            run_size(args.rows, args.tokens, Path(args.code)),
            run_size(10 * args.rows, args.tokens, Path(args.code)),
        ],
    }
    small, large = result["runs"]
    growth, rows_growth = (
        large["peak_rss_mb"] - small["peak_rss_mb"],
        large["rows_mb"] - small["rows_mb"],
    )
    result.update(
        peak_rss_growth_mb=round(growth, 1),
        rows_growth_mb=round(rows_growth, 1),
        goal_met=growth < rows_growth,
        load_average_after=os.getloadavg()[0],
    )
    print(
        f"peak RSS grows {growth:.1f} MB from {small['rows']} to {large['rows']} rows, "
        f"whose size grows {rows_growth:.1f} MB: goal {'met' if growth < rows_growth else 'MISSED'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
