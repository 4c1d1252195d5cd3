"""LLM judge over any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs).

    judge = Judge("http://127.0.0.1:8000", model="Qwen/Qwen3-32B")
    r = judge.judge_answer(question, reference, response)   # HLE-style: correct yes/no
    r = judge.judge_refusal(question, response)             # Do-Not-Answer action category

HTTP goes through the client the openai engine uses too (engines/client.py, on the official
`openai` package). The API key is read from the environment variable named by `api_key_env`
(default POSTTRAIN_JUDGE_API_KEY) at each request and sent as a Bearer token; it is never
stored on the object, logged or written. No key: no Authorization header (local vLLM).

Failures never raise: connection errors, timeouts, 429, 5xx and replies that are not a
chat-completions object (malformed JSON, no choices[0].message) are retried with the client's
exponential backoff (Retry-After honoured); after the last retry, or on another 4xx or a
judgement that cannot be parsed, the result has verdict "judge_error" and a `reason`, so an
eval run keeps every result it already has (and `eval` stops unfinished: a rerun judges the
failed items again). `probe()` checks the server at start, in seconds, like the engines.
After `trip_after` calls in a row end unreachable, later calls make a single attempt without
backoff (a dead server costs one failed connection per item, not minutes); one success resets.

Structured output: requests carry `response_format` with a JSON schema. A server that rejects
it (HTTP 400/422 naming response_format) is asked again without it, and is not asked with it
again. Replies are always parsed from text too: a JSON object anywhere in the reply (code
fences and prose around it allowed). Tests: tests/test_judge.py (local fake server) and
tests/test_judge_vllm.py (a real vLLM server).
"""

from __future__ import annotations

import json
import os

from posttrain.engines.base import EngineUnavailable
from posttrain.engines.client import BadReply, ServerClient, ServerRejected, chat_completions_url
from posttrain.evaluation.judge_prompts import (
    ANSWER_FIELDS,
    ANSWER_PROMPT,
    ANSWER_SCHEMA,
    REFUSAL_FIELDS,
    REFUSAL_PROMPT,
    REFUSAL_SCHEMA,
    JudgeResult,
    _error,
    fill_template,
    load_template,
    parse_answer_judgement,
    parse_json_object,
    parse_refusal_judgement,
)

# Prompts, templates and reply parsing live in judge_prompts.py; these names are re-exported
# so `from posttrain.evaluation.judge import ...` keeps working.
__all__ = [
    "Judge",
    "JudgeResult",
    "chat_completions_url",
    "fill_template",
    "load_template",
    "parse_answer_judgement",
    "parse_json_object",
    "parse_refusal_judgement",
]

# ---------------------------------------------------------------------------- client


class Judge:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "POSTTRAIN_JUDGE_API_KEY",
        template_path: str | os.PathLike | None = None,
        refusal_template_path: str | os.PathLike | None = None,
        timeout: float = 60,
        retries: int = 3,
        max_tokens: int = 1024,
        structured: bool = True,
        trip_after: int = 5,
    ):
        self.url = chat_completions_url(base_url)  # ServerUnreachable unless http(s)://
        self.client = ServerClient(
            base_url, api_key_env=api_key_env, timeout=timeout, max_retries=retries
        )
        self.model = model
        self.api_key_env = api_key_env  # the variable's name only, never its value
        self.answer_template = (
            load_template(template_path, ANSWER_FIELDS, ("response", "correct_answer"))
            if template_path
            else ANSWER_PROMPT
        )
        self.refusal_template = (
            load_template(refusal_template_path, REFUSAL_FIELDS, ("response",))
            if refusal_template_path
            else REFUSAL_PROMPT
        )
        self.timeout, self.retries = timeout, retries
        self.max_tokens = max_tokens
        self.structured = structured  # set False once the server rejects response_format
        self.trip_after = trip_after
        self._unreachable_in_a_row = 0

    def probe(self) -> None:
        """Fail in seconds, naming the URL, when the judge server is down or not
        OpenAI-compatible (GET /v1/models, no retries); an eval then does not grade every item
        as judge_error first."""
        self.client.probe()

    def __repr__(self) -> str:
        return f"Judge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # -- public

    def judge_answer(self, question: str, reference: str, response: str) -> JudgeResult:
        """HLE-style: extract the final answer, match it to `reference`, read stated confidence."""
        values = {"question": question, "response": response, "correct_answer": reference}
        return self._judge(
            self.answer_template, values, "answer_judgement", ANSWER_SCHEMA, parse_answer_judgement
        )

    def judge_refusal(self, question: str, response: str) -> JudgeResult:
        """Do-Not-Answer action category 0-5 of `response`; harmless = category 0-4."""
        values = {"question": question, "response": response}
        return self._judge(
            self.refusal_template,
            values,
            "refusal_judgement",
            REFUSAL_SCHEMA,
            parse_refusal_judgement,
        )

    def _judge(self, template, values, name, schema, parse) -> JudgeResult:
        try:
            text, err = self._complete(fill_template(template, values), name, schema)
            return err if err else parse(text)
        except Exception as e:  # a long eval must survive anything one judgement does
            return _error(f"unexpected {type(e).__name__}: {e}")

    # -- HTTP

    def _complete(self, prompt: str, name: str, schema: dict) -> tuple[str, JudgeResult | None]:
        """(reply text, None) or ("", judge_error result). Never raises."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        tripped = self._unreachable_in_a_row >= self.trip_after
        retries = 0 if tripped else self.retries
        request = dict(body)
        if self.structured:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            }
        try:
            try:
                reply = self.client.post(
                    "/chat/completions", request, max_retries=retries, check=_reply_problem
                )
            except ServerRejected as e:
                if not (self.structured and _rejects_response_format(e)):
                    raise
                # The server cannot do structured output: ask in plain text from now on.
                self.structured = False
                reply = self.client.post(
                    "/chat/completions", body, max_retries=retries, check=_reply_problem
                )
        except BadReply as e:  # unreadable on every attempt (an EngineUnavailable too)
            self._unreachable_in_a_row = 0
            return "", _error(str(e))
        except EngineUnavailable as e:
            self._unreachable_in_a_row += 1
            note = " (judge unreachable on earlier calls: single attempt)" if tripped else ""
            return "", _error(f"judge failed after {1 + retries} attempt(s){note}: {e}")
        except ServerRejected as e:
            self._unreachable_in_a_row = 0
            return "", _error(f"HTTP {e.status}: {e.message}")
        self._unreachable_in_a_row = 0
        return _reply_text(reply)


def _reply_problem(reply: dict) -> str | None:
    """Why a reply is not a chat completion with choices[0].message (None: it is one)."""
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        message = None
    if not isinstance(message, dict):
        return f"server reply has no choices[0].message: {_snippet(json.dumps(reply))}"
    return None


def _rejects_response_format(e: ServerRejected) -> bool:
    m = e.message.lower()
    return e.status in (400, 422) and (
        "response_format" in m or "json_schema" in m or "structured" in m or "guided" in m
    )


def _reply_text(reply: dict) -> tuple[str, JudgeResult | None]:
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return "", _error(f"server reply has no choices[0].message: {_snippet(json.dumps(reply))}")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        return "", _error("judge returned empty content")
    return content, None


def _snippet(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")
