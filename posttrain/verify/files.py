"""Stage `verify`: grade every sampled answer, adding verdict, reward and extracted to each row.

    posttrain verify --samples samples.jsonl --out scored.jsonl [--workers 2] [--math-timeout 5]

Every input row is checked before any grading (a bad row stops the stage with FILE:LINE: field).
The output is resumable: rows already in --out, keyed by (problem id, sample index), are kept and
not graded again, so a killed run loses nothing. `--workers` grades that many rows at once
(threads; math answers each use their own worker process). At the end a table of verdict counts
and the accuracy are printed. Both files are streamed: memory holds the rows' keys and a few
hundred rows in flight, never the files (bench/sample_memory.py measures it).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

from tqdm.auto import tqdm

from posttrain.records import VERDICTS, DataError, JsonlAppender, iter_jsonl
from posttrain.verify import check_sample_row, verify_row
from posttrain.verify.math import DEFAULT_TIMEOUT_S


def sample_key(row: dict) -> tuple[str, int]:
    return str(row["problem"]["id"]), int(row["sample_index"])


def check_samples(path: str | os.PathLike) -> dict[tuple[str, int], int]:
    """{(problem id, index): line} for every sample row, all checked, read one line at a time;
    a duplicate (problem id, index) is rejected."""
    seen: dict[tuple[str, int], int] = {}
    for line, row in iter_jsonl(path):
        check_sample_row(row, path, line)
        key = sample_key(row)
        if key in seen:
            raise DataError(
                path,
                line,
                f"duplicate sample {key} (first on line {seen[key]})",
                field="sample_index",
            )
        seen[key] = line
    return seen


def verify_file(
    samples_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    workers: int = 1,
    math_timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> dict[str, int]:
    """Grade `samples_path` into `out_path` (resuming); return {verdict: count} for all rows."""
    wanted = check_samples(samples_path)

    def key(row: dict):
        try:
            return sample_key(row)
        except (KeyError, TypeError, ValueError):
            raise DataError(
                out_path,
                None,
                "a row without problem.id / sample_index: is --out "
                "a scored file from another stage?",
            ) from None

    def grade_one(item):
        line, row = item
        return verify_row(row, math_timeout_s=math_timeout_s, path=samples_path, line=line)

    with JsonlAppender(out_path, key) as sink:
        todo = (
            (line, row) for line, row in iter_jsonl(samples_path) if not sink.done(sample_key(row))
        )
        bar = tqdm(
            total=sum(not sink.done(k) for k in wanted),
            desc="verify",
            unit="sample",
            disable=not progress,
        )
        in_flight = 64 * max(1, workers)  # rows read ahead of the graders, at most
        with ThreadPoolExecutor(max(1, workers)) as pool:
            while batch := list(islice(todo, in_flight)):
                for scored in pool.map(grade_one, batch):  # input order, each row written at once
                    sink.append(scored)
                    bar.update(1)
        bar.close()
    counts, counted = Counter(), set()
    for _, row in iter_jsonl(out_path, allow_empty=True):
        k = key(row)
        if k in wanted and k not in counted:  # the first row of a key is the one kept
            counted.add(k)
            counts[row.get("verdict")] += 1
    return {v: counts.get(v, 0) for v in VERDICTS}


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
    parser.add_argument("--workers", type=int, default=1, help="rows graded at once")
    parser.add_argument(
        "--math-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per math answer before it counts as incorrect (timeout)",
    )


def main(args) -> int:
    counts = verify_file(
        args.samples, args.out, workers=args.workers, math_timeout_s=args.math_timeout
    )
    print(format_counts(counts))
    return 0
