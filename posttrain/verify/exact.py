"""Exact-match grader: the stated answer, normalised, equals the reference.

Run by `posttrain verify` for problems with answer_type "exact".

What counts as the stated answer: the last explicit answer statement ("Answer: X", "Final
answer: X", "the answer is X", `\\boxed{X}`, GSM8K's "#### X"; see extract.py). Without one,
the last number in the response when the reference is a number (GSM8K's reference scorer also
falls back to the last number), else the last non-blank line.

How it is compared, in the spirit of GSM8K (strip thousands separators, compare the number) and
of HLE's exact-match items (short answers that must mean the same string):
  - a numeric reference is compared by value: "1,234" == "1234", "−7" (unicode minus) == "-7",
    "12.0" == "12", "1e3" == "1000", "Answer: 12." == "12". From a statement that is not a
    single number ("Answer: 42 apples") the first number is taken;
  - any other reference is compared as text after normalisation: unicode compatibility form,
    case, runs of whitespace, markdown bold, math delimiters, `\\text{}`, surrounding quotes and
    punctuation. Nothing else is forgiven (no synonyms, no units): that needs a judge.
"""

from __future__ import annotations

from decimal import Decimal

from posttrain.records import Problem
from posttrain.verify.extract import (
    answer_statements,
    clean_answer,
    find_numbers,
    normalize_text,
    parse_number,
)
from posttrain.verify.result import Grade, graded, ungraded


def grade_exact(response: str, problem: Problem) -> Grade:
    reference = str(problem.answer)
    ref_value = parse_number(clean_answer(reference))
    extracted = extract_exact(response, numeric=ref_value is not None)
    if extracted is None:
        return ungraded("no_answer", "no answer statement, number or line found")
    if ref_value is not None:
        value = number_in(extracted)
        if value is None:
            return graded(False, extracted, "the answer holds no number")
        return graded(value == ref_value, extracted)
    return graded(normalize_text(extracted) == normalize_text(reference), extracted)


def extract_exact(text: str, numeric: bool) -> str | None:
    statements = answer_statements(text)
    if statements:
        return clean_answer(statements[-1][1])
    if numeric:
        numbers = find_numbers(text)
        return numbers[-1] if numbers else None
    lines = [clean_answer(line) for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else None


def number_in(answer: str) -> Decimal | None:
    """The answer's value when it is one number, else the first number written in it."""
    value = parse_number(clean_answer(answer))
    if value is not None:
        return value
    numbers = find_numbers(answer)
    return parse_number(numbers[0]) if numbers else None
