"""Grading a samples file: every sampled answer gets verdict, reward and extracted, resumably.

    posttrain verify --samples samples.jsonl --out scored.jsonl [--workers 2] [--math-timeout 5]

(the verb is posttrain/commands/verify.py; the graders are posttrain/verify/__init__.py).

Every input row is checked before any grading (a bad row stops the stage with FILE:LINE: field).
The output is resumable: rows already in --out, keyed by (problem id, sample index), are kept and
not graded again, so a killed run loses nothing. `workers` grades that many rows at once
(threads; math answers each use their own worker process). Both files are streamed: memory
holds the rows' keys and a few hundred rows in flight, never the files
(bench/sample_memory.py measures it).
"""

from __future__ import annotations

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
