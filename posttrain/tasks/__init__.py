"""Problem sources: one string names where problems come from; `load_problems` reads it.

    posttrain problems "builtin:arith:300?split=test&difficulty=1" --out test.jsonl
    python -c "from posttrain.tasks import load_problems as f; print(len(f('builtin:arith')))"

A source string is `KIND:BODY?key=value&key=value` (options optional, `&`-separated, no URL
escaping; `?` always starts the options, so paths must not contain it):

    builtin:arith[:N]?split=train|test&difficulty=1&seed=0&ops=add+sub+mul&start=0
                              N seeded questions (default 100) from the start-th on,
                              train/test disjoint by fact
                              (see tasks/arith.py for the operand ranges per difficulty)
    hle:PATH.jsonl            Humanity's Last Exam rows; rows with an image are skipped, counted
    gsm8k:PATH.jsonl          GSM8K rows; the answer is the number after `####` (type math)
    dna:PATH.csv              Do-Not-Answer; type refusal, category = risk_area
    jsonl:PATH?question=F&answer=F&answer_type=F&id=F&category=F&choices=F
                              any JSONL; each option names the source field (default: the same
                              name); answer_type may instead be a type name (exact, choice,
                              math, refusal), which wins over a field of that name; ids default
                              to FILESTEM-LINE
    native:PATH.jsonl         native Problem records (posttrain.records.read_problems)
    PATH.jsonl | PATH.csv     a plain path: the format is told from the fields (HLE, native,
                              GSM8K, Do-Not-Answer CSV); otherwise the error names the prefixes
    hf:NAME?split=train&config=C&data_files=F&...mapping as jsonl...
                              a `datasets` dataset: hub name, save_to_disk folder, or a builder
                              such as json with data_files (needs the extra posttrain[hf])
    mix:SPEC@W,SPEC@W?n=N&seed=S   or   mix:PATH.yaml
                              a weighted, seeded mixture (see tasks/mixture.py for the counts)

Every loader validates every row and fails with `FILE:LINE: field 'x': what was expected`
(invalid JSON or UTF-8, empty file, missing field, unknown answer type, duplicate id). `limit`
keeps the first N problems of any source. What a load skipped (e.g. HLE rows with images) and
drew (mixtures) is logged and kept in `LAST_REPORT`; `load_with_report` returns it directly.
"""

from __future__ import annotations

import logging

from posttrain.records import Problem, read_problems
from posttrain.tasks.decontaminate import decontaminate, normalise_question
from posttrain.tasks.spec import LoadReport, Spec, SpecError, parse_spec

__all__ = [
    "load_problems",
    "load_with_report",
    "decontaminate",
    "normalise_question",
    "parse_spec",
    "Spec",
    "SpecError",
    "LoadReport",
    "LAST_REPORT",
]

log = logging.getLogger("posttrain.tasks")
LAST_REPORT: LoadReport | None = None  # the report of the latest load_problems call


def load_problems(spec: str, *, limit: int | None = None) -> list[Problem]:
    """Load the problems a source string names (first `limit` of them when given)."""
    problems, _ = load_with_report(spec, limit=limit)
    return problems


def load_with_report(spec: str, *, limit: int | None = None) -> tuple[list[Problem], LoadReport]:
    """`load_problems` plus what it skipped and, for a mixture, how many each source gave."""
    global LAST_REPORT
    problems, report = _load(str(spec), limit, depth=0)  # str(): a Path to a .jsonl works too
    for reason, n in report.skipped.items():
        if n:
            log.warning("%s: skipped %d problem(s): %s", spec, n, reason)
    LAST_REPORT = report
    return problems, report


def _load(text: str, limit: int | None, depth: int) -> tuple[list[Problem], LoadReport]:
    if limit is not None and limit < 0:
        raise SpecError(text, f"limit must be >= 0, got {limit}")
    spec = parse_spec(text)
    report = LoadReport(spec.text)
    problems = _dispatch(spec, limit, report, depth)
    if not problems and limit != 0:  # every later stage would make an empty file of it
        skipped = "; ".join(f"{n} skipped: {why}" for why, n in report.skipped.items() if n)
        raise SpecError(text, f"no problems{f' ({skipped})' if skipped else ''}")
    if limit is not None:
        problems = problems[:limit]
    if spec.kind == "mix":  # counted after `limit`, so they are the counts actually returned
        for p in problems:
            report.drawn[p.meta["mix_source"]] += 1
    report.count = len(problems)
    return problems, report


def _dispatch(spec: Spec, limit: int | None, report: LoadReport, depth: int) -> list[Problem]:
    skipped = report.skipped
    if spec.kind == "auto":
        from posttrain.tasks.formats import detect_format

        spec = Spec(spec.text, detect_format(spec.body), spec.body, spec.options)
    if spec.kind == "builtin":
        from posttrain.tasks.arith import load

        return load(spec, limit)
    if spec.kind in ("hle", "gsm8k", "dna", "jsonl"):
        from posttrain.tasks import formats

        return getattr(formats, f"load_{spec.kind}")(spec, skipped)
    if spec.kind == "hf":
        from posttrain.tasks.hf import load_hf

        return load_hf(spec, skipped, limit)
    if spec.kind == "mix":
        from posttrain.tasks.mixture import load_mix

        return load_mix(spec, skipped, report.drawn, lambda text, d: _load(text, None, d), depth)
    spec.check_options(set())
    return read_problems(spec.body)
