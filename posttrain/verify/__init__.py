"""Graders: plain functions `(response, problem) -> Grade`, and the row-level `verify_row`.

`posttrain verify --samples samples.jsonl --out scored.jsonl` (posttrain/verify/files.py) runs
them over a file. One grader per answer_type:
  choice  -> choice.grade_choice    exact -> exact.grade_exact
  math    -> math.grade_math        refusal -> refusal.leave_refusal_ungraded (for evaluation)
Answers are read only from the text after the think block; a response whose think block never
closes, or that stopped at the token limit, is `truncated` and never graded. Reward is 1.0 for
`correct` and 0.0 otherwise, so RL rewards and DPO pair selection reuse the same verdict.
A problem the graders cannot handle (unknown answer_type, unusable reference) is recorded as
`judge_error` with a reason instead of stopping the run.
"""

from __future__ import annotations

from typing import Callable

from posttrain.reasoning import split_reasoning
from posttrain.records import DataError, Problem, require
from posttrain.verify.choice import grade_choice
from posttrain.verify.exact import grade_exact
from posttrain.verify.math import DEFAULT_TIMEOUT_S, grade_math
from posttrain.verify.refusal import leave_refusal_ungraded
from posttrain.verify.result import Grade, ungraded

__all__ = ["Grade", "GRADERS", "grade", "verify_row", "check_sample_row"]

GRADERS: dict[str, Callable[[str, Problem], Grade]] = {
    "choice": grade_choice,
    "exact": grade_exact,
    "math": grade_math,
    "refusal": leave_refusal_ungraded,
}


def grade(response: str, problem: Problem, math_timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Grade one response (think block included or not) against the problem's reference."""
    split = split_reasoning(response or "")
    if split.truncated:
        return ungraded("truncated", "think block never closed")
    grader = GRADERS.get(problem.answer_type)
    if grader is None:
        return ungraded("judge_error", f"no grader for answer_type {problem.answer_type!r}")
    if not split.response.strip():
        return ungraded("no_answer", "empty response after the think block")
    if grader is grade_math:
        return grade_math(split.response, problem, timeout_s=math_timeout_s)
    return grader(split.response, problem)


def check_sample_row(row: dict, path=None, line=None) -> Problem:
    """Validate the fields grading reads; return the row's Problem. DataError names the field."""
    problem = require(row, "problem", dict, path, line)
    try:
        parsed = Problem.from_dict(problem, path, line)
    except DataError as e:  # say that the field is inside `problem`
        field = f"problem.{e.field}" if e.field else "problem"
        raise DataError(path, line, e.message, field=field) from None
    require(row, "sample_index", int, path, line)
    require(row, "response", str, path, line)
    finish = require(row, "finish_reason", str, path, line)
    if finish not in ("stop", "length"):
        raise DataError(
            path, line, f"expected 'stop' or 'length', got {finish!r}", field="finish_reason"
        )
    require(row, "reasoning", str, path, line, optional=True)
    require(row, "think_truncated", bool, path, line, optional=True)
    return parsed


def verify_row(row: dict, math_timeout_s: float = DEFAULT_TIMEOUT_S, path=None, line=None) -> dict:
    """A Sample row plus `verdict`, `reward`, `extracted` (and `grade_reason` when there is one).

    Truncated (finish_reason "length" or think_truncated) rows are never graded.
    """
    problem = check_sample_row(row, path, line)
    if row["finish_reason"] == "length":
        result = ungraded("truncated", "stopped at the token limit")
    elif row.get("think_truncated"):
        result = ungraded("truncated", "think block never closed")
    else:
        result = grade(row["response"], problem, math_timeout_s=math_timeout_s)
    out = {
        k: v for k, v in row.items() if k not in ("verdict", "reward", "extracted", "grade_reason")
    }
    out.update(verdict=result.verdict, reward=result.reward, extracted=result.extracted)
    if result.reason:
        out["grade_reason"] = result.reason
    return out
