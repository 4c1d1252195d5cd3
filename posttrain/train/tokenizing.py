"""Chat rows -> token ids: render with the chat template, tokenise in batches, optionally in
worker processes; ids come out as int32 arrays.

    python -c "from posttrain.train.tokenizing import tokenize_rows; help(tokenize_rows)"

The prompt is rendered once for all replies of a row; a completion is the text the template
adds for the assistant turn when the whole conversation is rendered. Used by
posttrain/train/data.py (load_examples), which reads the rows and applies the length policy.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from itertools import islice

import numpy as np

CHUNK_ROWS = 64  # rows rendered and tokenised per batched tokenizer call


def int32_ids(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32).reshape(-1)


class TemplateMismatch(ValueError):
    pass


def render(tokenizer, prompt: list[dict], replies: list[list[dict]]) -> tuple[str, list[str]]:
    """(prompt text, [completion text, ...]): the prompt rendered once for all its replies.

    A completion is the text the chat template appends to the generation prompt when it
    renders the whole conversation, so the tokens are the ones the model sees at generation
    time; trailing whitespace after the end-of-turn token is left out.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    completions = []
    for reply in replies:
        full_text = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise TemplateMismatch(
                "the chat template renders the prompt differently inside the "
                "whole conversation, so the completion cannot be located"
            )
        completions.append(full_text[len(prompt_text) :].rstrip())
    return prompt_text, completions


def split_joint(p: list[int], c: list[int], joint: list[int]) -> tuple[list[int], bool]:
    """(completion ids, retokenised) from the prompt's, the completion's and the joint ids.

    `retokenised` is True when the two pieces tokenised apart differ from the whole text
    tokenised at once (a token merging across the boundary); the joint ids are used then.
    """
    if joint == p + c:
        return c, False
    if joint[: len(p)] != p:
        raise TemplateMismatch("the prompt's tokens change when the completion follows it")
    return joint[len(p) :], True


def tokenize_turn(
    tokenizer, prompt: list[dict], reply: list[dict]
) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids, retokenised) for a prompt and one assistant reply."""
    prompt_text, (completion_text,) = render(tokenizer, prompt, [reply])
    p, c, joint = tokenizer(
        [prompt_text, completion_text, prompt_text + completion_text], add_special_tokens=False
    )["input_ids"]
    c, retokenised = split_joint(p, c, joint)
    return p, c, retokenised


def tokenize_rows(tokenizer, rows: list[tuple[int, list[dict], list[list[dict]]]]) -> list:
    """[(line, prompt ids, [completion ids], retokenised) or (line, error message)] per row.

    One batched tokenizer call for the chunk: per row the prompt, each completion, and each
    prompt + completion (to find tokens merging across the boundary).
    """
    texts, spans, out = [], [], []
    for line, prompt, replies in rows:
        try:
            prompt_text, completions = render(tokenizer, prompt, replies)
        except TemplateMismatch as e:
            spans.append((line, str(e), 0, 0))
            continue
        spans.append((line, None, len(texts), len(completions)))
        texts += [prompt_text, *completions, *(prompt_text + c for c in completions)]
    ids = (
        tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        if texts
        else []
    )
    for line, error, start, n in spans:
        if error is not None:
            out.append((line, error))
            continue
        p = ids[start]
        try:
            split = [split_joint(p, ids[start + 1 + k], ids[start + 1 + n + k]) for k in range(n)]
        except TemplateMismatch as e:
            out.append((line, str(e)))
            continue
        out.append((line, int32_ids(p), [int32_ids(c) for c, _ in split], any(r for _, r in split)))
    return out


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_in_worker(rows):
    return tokenize_rows(_WORKER_TOKENIZER, rows)


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(rows, size)):
        yield chunk


def tokenized_rows(tokenizer, rows: Iterator, workers: int = 1) -> Iterator:
    """tokenize_rows over chunks of CHUNK_ROWS rows, in order; `workers` > 1 forks processes."""
    if workers <= 1:
        for chunk in _chunks(rows, CHUNK_ROWS):
            yield from tokenize_rows(tokenizer, chunk)
        return
    # Rows are read (and checked) here, in order; at most 2 chunks per worker are in flight.
    ctx = multiprocessing.get_context("fork")  # the tokenizer is inherited, not pickled
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for chunk in _chunks(rows, CHUNK_ROWS):
            pending.append(pool.apply_async(_tokenize_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
