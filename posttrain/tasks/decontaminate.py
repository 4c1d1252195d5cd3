"""Drop training problems that also appear in an eval set.

    posttrain problems builtin:arith:1000 --exclude "builtin:arith:300?split=test" --out train.jsonl

Two problems are the same when their normalised question texts are equal (Unicode NFKC, case
folded, sentence punctuation dropped, math symbols kept, whitespace collapsed), or, for built-in
arithmetic, when they ask the same fact (`3 + 5` and `5 + 3`) whatever the wording.
"""

from __future__ import annotations

import re
import unicodedata

from posttrain.records import Problem
from posttrain.tasks.arith import fact_of

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENTENCE_PUNCTUATION = set(".,;:!?\"'`")  # math symbols (+ - * / = ^ ...) are kept


def normalise_question(text: str) -> str:
    """'  What is 3+5? ' -> 'what is 3 + 5'; '3 - 5' stays apart from '3 + 5'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(t for t in _TOKEN.findall(text) if t not in _SENTENCE_PUNCTUATION)


def decontaminate(train: list[Problem], eval: list[Problem]) -> tuple[list[Problem], int]:
    """(training problems not in `eval`, how many were dropped); order is kept."""
    texts = {normalise_question(p.question) for p in eval}
    facts = {f for f in map(fact_of, eval) if f is not None}
    kept = [
        p for p in train if normalise_question(p.question) not in texts and fact_of(p) not in facts
    ]
    return kept, len(train) - len(kept)
