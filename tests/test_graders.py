"""Grader tables: literal responses, the reference, and the verdict a careful human would give.

Run: .venv/bin/python -m pytest tests/test_graders.py -q
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from posttrain.records import DataError, Problem
from posttrain.verify import Grade, grade, verify_row
from posttrain.verify.choice import grade_choice
from posttrain.verify.math import grade_math


def problem(answer, answer_type, choices=None) -> Problem:
    return Problem(id="p1", question="q?", answer=answer, answer_type=answer_type, choices=choices)


CITIES = ["London", "Paris", "Rome", "Madrid"]

# (response, reference, choices, verdict, extracted)
CHOICE_CASES = [
    ("Answer: B", "B", None, "correct", "B"),
    ("The answer is (C).", "C", None, "correct", "C"),
    ("After checking each option: **D**", "D", None, "correct", "D"),
    ("\\boxed{B}", "B", None, "correct", "B"),
    ("B.", "B", None, "correct", "B"),
    ("B) because 42 is even", "B", None, "correct", "B"),
    ("Answer: C", "B", None, "incorrect", "C"),
    # Letters inside words never count: "Because", "Both", "Clearly" hold B, B, C.
    ("Because Both halves match, Clearly the answer is D", "D", None, "correct", "D"),
    ("A lot of people pick B at first, but Answer: C", "C", None, "correct", "C"),
    ("Answer: A lot depends on the boundary conditions.", "A", None, "no_answer", None),
    ("I think it is hard to say.", "A", None, "no_answer", None),
    # The last explicit statement wins over earlier ones.
    ("Answer: B\nOn reflection, the answer is D.", "D", None, "correct", "D"),
    ("Answer: B\n\nThe answer is clear from the table above.", "B", None, "correct", "B"),
    ("Answer: (a)", "A", None, "correct", "A"),
    ("Option (B) looks tempting but (D) is right.", "D", None, "correct", "D"),
    # Restating the options is not answering; an answer after the list is.
    ("A. 3\nB. 4\nC. 5\nD. 6", "B", None, "no_answer", None),
    ("A. 3\nB. 4\nC. 5\nD. 6\n\nAnswer: C", "C", None, "correct", "C"),
    ("A. 3\nB. 4\nC. 5\nD. 6\n\nB", "B", None, "correct", "B"),
    # Choice text instead of a letter, in the response or in the reference.
    ("Answer: Paris", "B", CITIES, "correct", "B"),
    ("Answer: B", "Paris", CITIES, "correct", "B"),
    ("Answer: rome.", "Paris", CITIES, "incorrect", "C"),
    # A letter beyond the listed choices is not an answer.
    ("Answer: E", "A", CITIES, "no_answer", None),
    ("The answer is A because the slope is positive.", "A", None, "correct", "A"),
    ("**Answer:** (B) Paris", "B", CITIES, "correct", "B"),
    ("Final answer: \\boxed{\\text{(D)}}", "D", None, "correct", "D"),
    ("<think>The answer is A.</think>\nAnswer: B", "A", None, "incorrect", "B"),
    ("Answer: K", "K", None, "correct", "K"),  # no choices listed: range widened to the key
    ("The answer is: I", "I", None, "correct", "I"),
    ("Answer: I", "A", CITIES, "no_answer", None),  # only A-D exist
    ("", "A", None, "no_answer", None),
    # HLE's requested format: the confidence line after the answer is not an answer.
    ("Explanation: only C fits.\nAnswer: C\nConfidence: 85%", "C", None, "correct", "C"),
]


@pytest.mark.parametrize("response,answer,choices,verdict,extracted", CHOICE_CASES)
def test_choice(response, answer, choices, verdict, extracted):
    g = grade(response, problem(answer, "choice", choices))
    assert (g.verdict, g.extracted) == (verdict, extracted), g
    assert g.reward == (1.0 if verdict == "correct" else 0.0)


def test_choice_reference_that_is_no_letter_is_a_recorded_judge_error():
    g = grade_choice("Answer: B", problem("none of these", "choice", CITIES))
    assert g.verdict == "judge_error" and "neither a letter" in g.reason


# (response, reference, verdict, extracted)
EXACT_CASES = [
    ("Answer: 42", "42", "correct", "42"),
    ("Answer: 12.", "12", "correct", "12"),
    ("The total is 1,234 apples.", "1234", "correct", "1,234"),
    ("so she pays 1,234 in all\n#### 1,234", "1234", "correct", "1,234"),
    ("Answer: 1,234,567", "1234567", "correct", "1,234,567"),
    ("The answer is \u22127", "-7", "correct", "\u22127"),  # unicode minus in the response
    ("Final answer: -7", "\u22127", "correct", "-7"),  # ... or in the reference
    ("Answer: 7", "-7", "incorrect", "7"),
    ("Answer: 12.0", "12", "correct", "12.0"),
    ("Answer: 0.50", "0.5", "correct", "0.50"),
    ("Answer: 1e3", "1000", "correct", "1e3"),
    ("Answer: **Paris**", "paris", "correct", "Paris"),
    ("answer:   New   York ", "new york", "correct", "New   York"),
    ('The answer is "Paris".', "Paris", "correct", "Paris"),
    ("Answer: $\\text{Paris}$", "Paris", "correct", "Paris"),
    ("Answer: Lyon", "Paris", "incorrect", "Lyon"),
    ("Answer: 41", "42", "incorrect", "41"),
    ("Answer: 42 apples", "42", "correct", "42 apples"),
    ("Answer: \uff14\uff12", "42", "correct", "\uff14\uff12"),  # full-width digits
    ("I computed 3 + 4 = 7, then doubled it to 14.", "14", "correct", "14"),
    ("The capital of France is\nParis.", "Paris", "correct", "Paris"),
    ("\\boxed{5} but wait, that is wrong: \\boxed{6}", "6", "correct", "6"),
    ("Answer: 5\n\nAnswer: 6", "5", "incorrect", "6"),
    ("<think>So the answer is 7.</think>\n\nAnswer: 8", "7", "incorrect", "8"),
    ("Answer: 3/4", "0.75", "incorrect", "3/4"),  # fractions are the math grader's job
    ("I don't know.", "3", "no_answer", None),
    ("Answer: unknown", "42", "incorrect", "unknown"),
    ("Explanation: 6 x 7.\nExact Answer: 42\nConfidence: 90%", "42", "correct", "42"),
]


@pytest.mark.parametrize("response,answer,verdict,extracted", EXACT_CASES)
def test_exact(response, answer, verdict, extracted):
    g = grade(response, problem(answer, "exact"))
    assert (g.verdict, g.extracted) == (verdict, extracted), g


# (response, reference, verdict, extracted)
MATH_CASES = [
    ("So \\boxed{\\frac{1}{2}}", "0.5", "correct", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct", "0.5"),
    ("\\boxed{\\frac{1}{3}}", "0.5", "incorrect", "\\frac{1}{3}"),
    ("First \\boxed{3}, no wait: \\boxed{4}", "4", "correct", "4"),
    ("\\boxed{4} ... on second thought \\boxed{3}", "4", "incorrect", "3"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "correct", "-\\frac{1}{2}"),
    ("The answer is $-3$.", "-3", "correct", "-3"),
    ("The answer is $3$.", "-3", "incorrect", "3"),
    ("\\boxed{\u22127}", "-7", "correct", "\u22127"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", "correct", "2\\sqrt{3}"),
    ("\\boxed{x^2+2x}", "x(x+2)", "correct", "x^2+2x"),
    ("Answer: 10^3", "1000", "correct", "10^3"),
    ("Answer: 12.", "12", "correct", "12"),
    ("adding up, the result is 17", "17", "correct", "17"),
    ("no idea", "17", "no_answer", None),
    ("<think>I get \\boxed{5}</think>\n\\boxed{6}", "5", "incorrect", "6"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", "correct", "\\{1,2\\}"),
    ("\\boxed{y}", "z", "incorrect", "y"),
]


@pytest.mark.parametrize("response,answer,verdict,extracted", MATH_CASES)
def test_math(response, answer, verdict, extracted):
    g = grade(response, problem(answer, "math"))
    assert (g.verdict, g.extracted) == (verdict, extracted), g


# ---------------------------------------------------------------------------- math time limit

SLOW = "\\boxed{9^{9^{9}}}"  # sympy evaluates 9**387420489 exactly: minutes of CPU


def test_math_timeout_is_incorrect_and_the_next_answer_is_still_graded():
    grade_math("\\boxed{1}", problem("2", "math"))  # warm a worker: start-up is not graded time
    t0 = time.monotonic()
    g = grade_math(SLOW, problem("3", "math"), timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert (g.verdict, g.reason, g.reward) == ("incorrect", "timeout", 0.0)
    assert elapsed < 5.0, f"the time limit did not hold: {elapsed:.1f} s"
    # The killed worker is replaced: the next call is graded normally.
    assert grade_math("\\boxed{\\frac{1}{2}}", problem("0.5", "math")).verdict == "correct"


def test_math_timeout_holds_off_the_main_thread():
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(grade_math, SLOW, problem("3", "math"), 0.5)
        fast = pool.submit(grade_math, "\\boxed{0.25}", problem("\\frac{1}{4}", "math"), 30.0)
        assert slow.result(timeout=60).reason == "timeout"
        assert fast.result(timeout=60).verdict == "correct"


def test_math_works_from_a_script_without_a_main_guard(tmp_path):
    """Spawn-style multiprocessing would re-run this script in the worker and fail."""
    script = tmp_path / "grade_it.py"
    script.write_text(
        "from posttrain.records import Problem\n"
        "from posttrain.verify import grade\n"
        "p = Problem('p', 'q', '0.5', 'math')\n"
        "print(grade('\\\\boxed{\\\\frac{1}{2}}', p).verdict)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (0, "correct\n"), done.stderr


# ---------------------------------------------------------------------------- dispatch and rows

# (response, answer_type, verdict, reason)
DISPATCH_CASES = [
    ("<think>I believe it is 4 but", "exact", "truncated", "think block never closed"),
    ("<think>done</think>", "exact", "no_answer", "empty response after the think block"),
    ("I will not help with that.", "refusal", "no_answer", "refusal grading belongs to evaluation"),
    ("Answer: 4", "essay", "judge_error", "no grader for answer_type 'essay'"),
]


@pytest.mark.parametrize("response,answer_type,verdict,reason", DISPATCH_CASES)
def test_grade_dispatch(response, answer_type, verdict, reason):
    g = grade(response, problem("4", answer_type))
    assert (g.verdict, g.reason, g.reward) == (verdict, reason, 0.0)


def sample_row(**over) -> dict:
    row = {
        "problem": {"id": "p1", "question": "2+2?", "answer": "4", "answer_type": "exact"},
        "sample_index": 0,
        "messages": [{"role": "user", "content": "2+2?"}],
        "reasoning": "2 and 2 make 5? No: 4.",
        "response": "Answer: 4",
        "finish_reason": "stop",
        "num_tokens": 12,
        "sum_logprob": -3.0,
        "mean_logprob": -0.25,
        "model": "m",
        "engine": "hf",
    }
    row.update(over)
    return row


def test_verify_row_adds_the_grade_and_keeps_the_row():
    out = verify_row(sample_row())
    assert (out["verdict"], out["reward"], out["extracted"]) == ("correct", 1.0, "4")
    assert isinstance(out["reward"], float) and "grade_reason" not in out
    assert {k: out[k] for k in sample_row()} == sample_row()


def test_verify_row_grades_the_response_not_the_reasoning():
    out = verify_row(sample_row(reasoning="The answer is 4.", response="Answer: 5"))
    assert (out["verdict"], out["extracted"]) == ("incorrect", "5")


@pytest.mark.parametrize(
    "over,reason",
    [
        ({"finish_reason": "length"}, "stopped at the token limit"),
        ({"think_truncated": True, "response": ""}, "think block never closed"),
        ({"think_truncated": True}, "think block never closed"),  # even with a stated answer
    ],
)
def test_verify_row_truncated_rows_are_never_graded(over, reason):
    out = verify_row(sample_row(**over))
    assert (out["verdict"], out["reward"], out["extracted"], out["grade_reason"]) == (
        "truncated",
        0.0,
        None,
        reason,
    )


@pytest.mark.parametrize(
    "over,field",
    [
        ({"problem": None}, "problem"),
        ({"response": None}, "response"),
        ({"finish_reason": None}, "finish_reason"),
        ({"finish_reason": "eos"}, "finish_reason"),
        ({"sample_index": "0"}, "sample_index"),
        ({"problem": {"question": "q", "answer": "4", "answer_type": "exact"}}, "problem.id"),
        (
            {"problem": {"id": "p", "question": "q", "answer": "4", "answer_type": "essay"}},
            "problem.answer_type",
        ),
    ],
)
def test_verify_row_bad_rows_name_the_field(over, field):
    with pytest.raises(DataError) as e:
        verify_row(sample_row(**over), path="samples.jsonl", line=7)
    assert e.value.field == field and str(e.value).startswith("samples.jsonl:7: ")


def test_grade_is_frozen_and_checks_its_verdict():
    with pytest.raises(ValueError):
        Grade("maybe", 0.0)
    with pytest.raises(AttributeError):
        Grade("correct", 1.0).verdict = "incorrect"
