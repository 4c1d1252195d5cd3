"""Split a reasoning model's output into its think block and its answer; read stated confidence.

Answers are graded only from the text after the think block. An output that opens a think block
and never closes it has no answer yet: `Split.truncated` is True and the grader says `truncated`.
Chat templates that end the generation prompt with an opened `<think>` (Qwen3-Thinking, DeepSeek-R1)
produce text that starts inside the block: pass `think_open_in_prompt=True`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # text inside the think block, None when the output has none
    response: str  # text after the think block (the whole text when there is none)
    truncated: bool  # a think block was opened and never closed


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the rendered generation prompt leaves a `<think>` block open."""
    i = prompt_text.rfind(THINK_OPEN)
    return i >= 0 and prompt_text.find(THINK_CLOSE, i) < 0


def split_reasoning(text: str, think_open_in_prompt: bool = False) -> Split:
    start = 0
    if not think_open_in_prompt:
        head = text.lstrip()
        if not head.startswith(THINK_OPEN):
            # A think block may only open the answer; one mentioned later is just text.
            return Split(None, text.strip(), False)
        start = len(text) - len(head) + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    if end < 0:
        return Split(text[start:].strip(), "", True)
    return Split(text[start:end].strip(), text[end + len(THINK_CLOSE) :].strip(), False)


_CONFIDENCE = re.compile(
    r"confidence(?:\s+score)?\s*(?:level)?\s*[:=\-]?\s*\**\s*(\d{1,3}(?:\.\d+)?)\s*%?",
    re.IGNORECASE,
)


def extract_confidence(response: str) -> float | None:
    """The last stated confidence in percent (0-100), e.g. 'Confidence: 85%'; None if absent."""
    found = _CONFIDENCE.findall(response or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 100.0 else None
