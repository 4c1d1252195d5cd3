"""Find where a response states its final answer, and clean and normalise what it states.

Shared by the graders (choice, exact, math); `posttrain verify` runs them. Text given here is
the part after the think block: graders split reasoning off before calling these.

An explicit answer statement is one of
  - `\\boxed{X}` or `\\fbox{X}` (braces balanced, so `\\boxed{\\frac{1}{2}}` is whole),
  - "Answer: X", "Final answer: X", "**Answer:** X", "The (correct/final) answer is X",
    "answer = X" (X is the rest of that line, or the next non-blank line when the line ends
    there, as in a "Final answer:" heading),
  - "#### X" at the start of a line (the GSM8K reference format).
Statements are returned in the order they appear; graders take the last one that yields an
answer, because models restate and correct themselves before concluding.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(
    r"\banswer\b(?:\s*\*\*)?\s*(?:[:：=]|\bis\b\s*:?)|^[ \t]*####",
    re.IGNORECASE | re.MULTILINE,
)

# A number as people write it: optional sign (ASCII or the unicode minus U+2212), thousands
# separators in groups of three, decimals, exponent. Not preceded by a letter, digit or dot, so
# "x2", "v1.5" and the "3" of "1.3" are not numbers of their own.
NUMBER_PATTERN = r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"(?<![\w.]){NUMBER_PATTERN}(?!\d)")
_WHOLE_NUMBER = re.compile(NUMBER_PATTERN)

_WRAPPING_COMMANDS = re.compile(
    r"^\\(?:boxed|fbox|text|textbf|mathrm|mathbf|texttt)\s*\{(.*)\}$", re.DOTALL
)
_PAIRED_WRAPPERS = (
    ("**", "**"),
    ("__", "__"),
    ("*", "*"),
    ("`", "`"),
    ("$", "$"),
    ("\\(", "\\)"),
    ("\\[", "\\]"),
    ('"', '"'),
    ("“", "”"),
    ("'", "'"),
)
_TRAILING_PUNCT = ".,;:!"


def boxed_contents(text: str) -> list[tuple[int, str]]:
    """(position, content) of every `\\boxed{...}` / `\\fbox{...}`, braces balanced."""
    found = []
    for m in _BOX_OPEN.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:  # an unclosed box (cut-off text) states nothing
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def phrase_statements(text: str) -> list[tuple[int, str]]:
    """(position, content) of every "Answer: X" / "the answer is X" / "#### X" statement."""
    found = []
    for m in _ANSWER_PHRASE.finditer(text):
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end
        content = text[m.end() : line_end]
        if not clean_answer(content):  # "Final answer:" as a heading: the answer is below
            rest = text[line_end:].lstrip("\n")
            stripped = rest.lstrip()
            if stripped and len(rest) - len(stripped) < 40:  # blank lines only, not a new section
                content = stripped.split("\n", 1)[0]
        if clean_answer(content):
            found.append((m.start(), content.strip()))
    return found


def answer_statements(text: str) -> list[tuple[int, str]]:
    """Every explicit answer statement in order of appearance (boxed and phrase forms)."""
    return sorted(boxed_contents(text) + phrase_statements(text))


def clean_answer(s: str) -> str:
    """Strip what surrounds an answer but is not part of it: whitespace, markdown bold and code,
    math delimiters, `\\boxed{}`/`\\text{}` around the whole, quotes, a trailing full stop.

    "**12.**" -> "12"; "$\\boxed{\\frac{1}{2}}$." -> "\\frac{1}{2}"; "(1, 2)" stays as is
    (brackets can be the answer, e.g. an interval).
    """
    prev = None
    s = s.strip()
    while s != prev:
        prev = s
        s = s.strip().rstrip(_TRAILING_PUNCT).strip().lstrip(":").strip()
        for left, right in _PAIRED_WRAPPERS:
            inner = s[len(left) : len(s) - len(right)]
            # "**B** or **C**" is not one bold answer: the inside must not reopen the wrapper.
            if (
                len(s) >= len(left) + len(right)
                and s.startswith(left)
                and s.endswith(right)
                and left not in inner
            ):
                s = inner
        m = _WRAPPING_COMMANDS.match(s)
        if m and _balanced(m.group(1)):
            s = m.group(1)
        # Unpaired markdown around an answer, e.g. "**Answer:** 12" leaves "** 12".
        s = s.strip("*`").strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def fold_text(s: str) -> str:
    """Unicode compatibility form (full-width digits, ligatures), with the unicode minus and
    other dashes used as minus signs made ASCII."""
    s = unicodedata.normalize("NFKC", s)
    return s.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")


def normalize_text(s: str) -> str:
    """Case, whitespace, wrappers and surrounding punctuation removed: "**Paris.**" -> "paris"."""
    s = fold_text(clean_answer(s)).lower()
    s = re.sub(r"\s+", " ", s).strip()
    return s.strip(".,;:!?'\"“”‘’ ").strip()


def find_numbers(text: str) -> list[str]:
    """Every number in the text as written, in order ("1,234", "−7", "2.5e3")."""
    return [m.group(0) for m in _NUMBER.finditer(text)]


def parse_number(s: str) -> Decimal | None:
    """The value of a string that is one number and nothing else, else None.

    Thousands separators, the unicode minus and a trailing ".0" are accepted: "1,234" ->
    1234, "−7" -> -7, "12.0" == 12, "1e3" == 1000 (Decimal compares values, not digits).
    """
    s = fold_text(s).strip()
    if not _WHOLE_NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid literals
        return None
