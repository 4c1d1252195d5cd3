"""Grade: what every grader returns (a verdict, the reward derived from it, and why).

Used by the graders in posttrain/verify/ and by `posttrain verify`; kept apart from
`__init__` so grader modules can import it without a circular import.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.records import VERDICTS


@dataclass(frozen=True)
class Grade:
    verdict: str  # one of posttrain.records.VERDICTS
    reward: float  # 1.0 when correct, else 0.0; RL rewards reuse this value
    extracted: str | None = None  # the answer read from the response, as written
    reason: str | None = None  # why, when the verdict is not self-explaining

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {VERDICTS}")


def graded(is_correct: bool, extracted: str | None, reason: str | None = None) -> Grade:
    """A Grade for an answer that was read and compared."""
    if is_correct:
        return Grade("correct", 1.0, extracted, reason)
    return Grade("incorrect", 0.0, extracted, reason)


def ungraded(verdict: str, reason: str | None = None, extracted: str | None = None) -> Grade:
    """A Grade for a response that could not be compared (no_answer, truncated, judge_error)."""
    return Grade(verdict, 0.0, extracted, reason)
