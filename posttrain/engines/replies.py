"""Reading chat-completions replies of OpenAI-compatible servers into Completions: the text,
the server's reasoning channel, per-token log-probs, token ids and finish_reason; used by the
openai engine (engines/openai.py).

    python -c "from posttrain.engines.replies import parse_choices; help(parse_choices)"

Tests: tests/test_openai_engine.py (literal tables of replies).
"""

from __future__ import annotations

import json
import logging
import math
import re

from posttrain.engines.base import Completion

log = logging.getLogger("posttrain.engines.openai")

# finish_reason -> ours; anything else (None, "abort", "content_filter") did not end normally
# and counts as cut off, so the grader says truncated instead of grading a partial answer
FINISH = {
    "stop": "stop",
    "eos": "stop",
    "end_turn": "stop",
    "tool_calls": "stop",
    "function_call": "stop",
    "length": "length",
}
_TOKEN_ID = re.compile(r"token_id:(\d+)")


def reply_problem(reply: dict) -> str | None:
    """What makes a chat-completions reply unusable (no non-empty `choices` list of objects
    with a `message` object), or None. Such a reply is asked again, never kept as empty."""
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        return f"reply without a choices list: {json.dumps(reply)[:200]}"
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        return f"reply whose choices are not messages: {json.dumps(reply)[:200]}"
    return None


def parse_choices(reply: dict, n: int) -> list[Completion]:
    """The completions in a chat-completions reply (one `reply_problem` passed), in choice
    order. Fewer than `n` choices are returned as they are (the caller asks again)."""
    choices = reply.get("choices") if isinstance(reply.get("choices"), list) else []
    choices = sorted(
        (c for c in choices if isinstance(c, dict)),
        key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0,
    )
    out = [parse_choice(c) for c in choices[:n]]
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
    if len(out) == 1 and out[0].token_count is None and not out[0].token_ids:
        count = usage.get("completion_tokens")
        out[0].token_count = count if isinstance(count, int) else None
    return out


def parse_choice(choice: dict) -> Completion:
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = message.get("content")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    finish = FINISH.get(choice.get("finish_reason"), "length")
    token_logprobs, tokens = _logprobs(choice.get("logprobs"))
    ids = choice.get("token_ids")
    if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        ids = [int(m.group(1)) for t in tokens if (m := _TOKEN_ID.fullmatch(t or ""))]
        ids = ids if tokens and len(ids) == len(tokens) else []
    completion = Completion(
        text=text if isinstance(text, str) else "",
        finish_reason=finish,
        token_ids=ids,
        token_logprobs=token_logprobs,
        reasoning=reasoning if isinstance(reasoning, str) else None,
    )
    if token_logprobs:
        completion.sum_logprob = math.fsum(token_logprobs)
        completion.mean_logprob = completion.sum_logprob / len(token_logprobs)
        if not ids:
            completion.token_count = len(token_logprobs)
    return completion


def _logprobs(block) -> tuple[list[float] | None, list[str]]:
    """(log-prob of each sampled token, token strings) from `logprobs.content`; (None, [])
    when the server gave none or any value is not a finite number."""
    content = block.get("content") if isinstance(block, dict) else None
    if not isinstance(content, list) or not content:
        return None, []
    values, tokens = [], []
    for entry in content:
        lp = entry.get("logprob") if isinstance(entry, dict) else None
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            return None, []
        values.append(float(lp))
        tokens.append(entry.get("token") if isinstance(entry.get("token"), str) else None)
    return values, tokens
