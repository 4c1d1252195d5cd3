"""Demonstrations written from the problems' reference answers, in a style that is not the
model's own: the "foreign data" whose SFT the seed team found to hurt a strong base.

    python -c "from posttrain.demos import demonstration_rows as d; from posttrain.tasks \
import load_problems as l; print(d(l('builtin:arith:2'), 'terse')[0])"

Each row is a TRL conversational demonstration (`messages`: the same prompt `sample` sends,
then one assistant turn) plus `problem_id`, read by posttrain/train/data.py. Styles:
  terse   "#### N"               (GSM8K's answer marker, nothing else)
  worded  "The answer is N."
Used by `run` when `train.data: demonstrations` (posttrain/pipeline/run.py).
"""

from __future__ import annotations

from posttrain.records import Problem
from posttrain.sampling import prompt_messages

STYLES = {"terse": "#### {answer}", "worded": "The answer is {answer}."}


def demonstration_rows(
    problems: list[Problem], style: str = "terse", system_prompt: str | None = None
) -> list[dict]:
    if style not in STYLES:
        raise ValueError(f"demos.style: {style!r}; expected {' | '.join(STYLES)}")
    rows = []
    for p in problems:
        if p.answer_type == "refusal":
            continue  # no reference answer to write out
        reply = STYLES[style].format(answer=p.answer)
        rows.append(
            {
                "messages": prompt_messages(p, system_prompt)
                + [{"role": "assistant", "content": reply}],
                "problem_id": p.id,
                "style": style,
            }
        )
    return rows
