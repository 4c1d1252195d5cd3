"""Multiple-choice grader: read the letter a response chose and compare it to the reference.

Run by `posttrain verify` for problems with answer_type "choice".

Rules (in the spirit of the MMLU / GPQA / HLE multiple-choice scorers, which compare one
extracted letter with the key):
  1. The last explicit answer statement that names a letter wins ("Answer: B", "**Answer:**
     (B)", "The answer is B", `\\boxed{B}`, "Final answer: B) Paris"). A statement may also
     give the text of a choice instead of its letter ("Answer: Paris").
  2. Without one, a letter marked as an answer anywhere counts, the last one winning: "(B)",
     "**B**", a line "B", "B." or "B) text". Line-start markers are ignored when the response
     lists two or more of them, because then it is restating the options, not answering.
  3. Letters are whole words only: the "B" of "Because" never counts. "A" and "I" are also
     English words, so inside a statement they count only when marked ("(A)", "A.", "A)",
     "A," at the end) or followed by a word that explains a choice ("A because ..."): "Answer:
     A lot depends on ..." names no letter.
  4. Valid letters are the first len(choices) of the alphabet when the choices are known, else
     A-J (ten options, as in MMLU-Pro), widened to reach the reference letter if it is later.
The reference (problem.answer) is a letter, or the text of one of the choices.
"""

from __future__ import annotations

import re
import string

from posttrain.records import Problem
from posttrain.verify.extract import answer_statements, clean_answer, normalize_text
from posttrain.verify.result import Grade, graded, ungraded

DEFAULT_LETTERS = 10  # A-J

_BARE_LETTER = re.compile(r"(?:(?:option|choice)\s*)?\(?\s*([A-Za-z])\s*\)?", re.IGNORECASE)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’_\\])([A-Z])(?![A-Za-z0-9'’_])")
_EXPLAINING_WORD = re.compile(r"\s+(?:because|since|as|which|is|and|for|-|–|—)(?!\w)")
_MARK_BEFORE = re.compile(r"(?:\(|\*\*|\b(?:option|choice)\s*)$", re.IGNORECASE)
_MARK_AFTER = re.compile(r"(?:[).:,;]|\*\*|\s*$)")

# Letters marked as answers outside a statement (rule 2); group 1 is the letter.
_IN_PASSING = (
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"\*\*\(?([A-Z])\)?[.):]?\*\*"),
    re.compile(r"^[ \t]*([A-Z])[ \t]*$", re.MULTILINE),
)
_LINE_START = re.compile(r"^[ \t]*(?:\*\*)?\(?([A-Z])[.)]", re.MULTILINE)


def grade_choice(response: str, problem: Problem) -> Grade:
    reference = reference_letter(problem)
    if reference is None:
        return ungraded(
            "judge_error",
            f"reference answer {problem.answer!r} is neither a letter "
            "nor the text of one of the choices",
        )
    letters = valid_letters(problem, reference)
    if reference not in letters:
        return ungraded(
            "judge_error", f"reference letter {reference} is beyond the {len(letters)} choices"
        )
    chosen = extract_choice(response, letters, problem.choices)
    if chosen is None:
        return ungraded("no_answer", "no choice letter found")
    return graded(chosen == reference, chosen)


def reference_letter(problem: Problem) -> str | None:
    answer = clean_answer(str(problem.answer))
    m = _BARE_LETTER.fullmatch(answer)
    if m:
        return m.group(1).upper()
    return _letter_of_choice_text(answer, problem.choices)


def valid_letters(problem: Problem, reference: str | None = None) -> str:
    if problem.choices:
        return string.ascii_uppercase[: len(problem.choices)]
    n = DEFAULT_LETTERS
    if reference:
        n = max(n, string.ascii_uppercase.index(reference) + 1)
    return string.ascii_uppercase[:n]


def extract_choice(text: str, letters: str, choices: list[str] | None = None) -> str | None:
    """The chosen letter (upper case) or None; `letters` are the valid ones, e.g. "ABCD"."""
    for _, content in reversed(answer_statements(text)):
        letter = _letter_in_statement(content, letters, choices)
        if letter:
            return letter
    return _letter_in_passing(text, letters)


def _letter_in_statement(content: str, letters: str, choices: list[str] | None) -> str | None:
    cleaned = clean_answer(content)
    m = _BARE_LETTER.fullmatch(cleaned)
    if m:  # the whole statement is one letter; lower case is fine here ("answer: b")
        letter = m.group(1).upper()
        return letter if letter in letters else None
    by_text = _letter_of_choice_text(cleaned, choices)
    if by_text and by_text in letters:
        return by_text
    for m in _STANDALONE.finditer(cleaned):
        letter = m.group(1)
        if letter not in letters:
            continue
        if letter in "AI" and not _marked(cleaned, m.start(), m.end()):
            continue  # rule 3: "A lot", "I think"
        return letter
    return None


def _marked(text: str, start: int, end: int) -> bool:
    return bool(
        _MARK_BEFORE.search(text[:start])
        or _MARK_AFTER.match(text, end)
        or _EXPLAINING_WORD.match(text, end)
    )


def _letter_in_passing(text: str, letters: str) -> str | None:
    line_marks = list(_LINE_START.finditer(text))
    listing = len({m.group(1) for m in line_marks}) >= 2  # restating the options, not answering
    skip = [m.span() for m in line_marks] if listing else []
    found = [] if listing else [(m.start(1), m.group(1)) for m in line_marks]
    for pattern in _IN_PASSING:
        for m in pattern.finditer(text):
            if not any(a <= m.start(1) < b for a, b in skip):
                found.append((m.start(1), m.group(1)))
    found = [(pos, letter) for pos, letter in found if letter in letters]
    return max(found)[1] if found else None


def _letter_of_choice_text(answer: str, choices: list[str] | None) -> str | None:
    if not choices:
        return None
    wanted = normalize_text(answer)
    for i, choice in enumerate(choices[:26]):
        if wanted and normalize_text(choice) == wanted:
            return string.ascii_uppercase[i]
    return None
