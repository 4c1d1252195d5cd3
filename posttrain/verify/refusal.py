"""Refusal grader placeholder: refusal (Do-Not-Answer style) items are graded by evaluation.

Run by `posttrain verify` for problems with answer_type "refusal". Whether a response refuses
harmful requests is a judgement the evaluation stage makes (with its own judge); training-data
verification leaves these samples ungraded so they never become chosen or rejected answers.
"""

from __future__ import annotations

from posttrain.records import Problem
from posttrain.verify.result import Grade, ungraded


def grade_refusal(response: str, problem: Problem) -> Grade:
    return ungraded("no_answer", "refusal grading belongs to evaluation")
