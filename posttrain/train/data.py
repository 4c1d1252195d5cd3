"""Training rows -> token ids: chat-template rendering, prompt masking and the length policy.

    python -c "from posttrain.train.data import load_examples; help(load_examples)"

Accepted rows (one JSON object per line):
- preference pairs (DPO family): `prompt` (chat messages, or a string = one user turn),
  `chosen` and `rejected` (assistant messages, or a string), as written by `posttrain pairs`;
- demonstrations (SFT family): `messages` ending with an assistant turn (only that last turn is
  trained), or `prompt` + `completion`;
- scored samples (rejection-sampling fine-tuning): rows of `posttrain verify` (`messages`,
  `verdict`, `reasoning`, `response`); only `verdict == "correct"` rows are used.

The prompt is rendered with the tokenizer's chat template and `add_generation_prompt=True`; the
completion is what the template adds for the assistant turn(s) when the whole conversation is
rendered (content plus the end-of-turn token, e.g. ChatML `...<|im_end|>`), so the model learns
to stop. Trailing whitespace after the end-of-turn token is not trained (generation stops at
the token). Prompt tokens get no loss.

Length policy (`max_length` counts prompt + the longest completion of a row); nothing is cut
silently, every outcome is counted in `DataReport` (written by training as data_report.json):
- drop (default): rows that do not fit are left out (`dropped_too_long`);
- truncate_completion: completions are cut at their end, every completion of a row (a pair's
  chosen and rejected) to the same budget, max_length - the prompt's tokens (a shorter one
  stays whole); the prompt is never cut, and rows whose prompt alone has max_length tokens or
  more are dropped (`dropped_prompt_too_long`). Counted as `completion_truncated` rows and
  `completion_tokens_cut` tokens. This can cut the final answer and the end-of-turn token out,
  so it is only done when asked for;
- truncate_prompt (SFT family only): the prompt loses tokens from its start (system prompt
  first), the completion stays whole; rows whose completion alone does not fit are dropped.
Pairs (the DPO family) are never given a cut prompt: both answers are judged as replies to the
same whole question, and a prompt cut at its start loses the system prompt and the question's
opening, so the preference would be learned for a question nobody asked. truncate_prompt with
pairs is an error naming `length_policy` (config check and here). A long pair is dropped by
default rather than cut because the cut can remove what makes chosen better than rejected (the
final answer sits at the end of a reasoning trace); truncate_completion cuts both tails to one
budget so neither answer gains length the other lacks.
A file where every row is dropped is an error saying why.

Rendering and batched tokenising (optionally in worker processes): train/tokenizing.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from posttrain.config import ConfigError
from posttrain.pairs import assistant_turn
from posttrain.records import DataError, iter_jsonl
from posttrain.train.tokenizing import TemplateMismatch as TemplateMismatch  # re-exported
from posttrain.train.tokenizing import int32_ids, tokenized_rows
from posttrain.train.tokenizing import tokenize_turn as tokenize_turn  # re-exported


@dataclass(frozen=True, eq=False)
class Example:
    """One training row as token ids: a demonstration (1 completion) or a pair (2).

    Ids are int32 numpy arrays (4 bytes a token; a Python list of ints costs about 36); any
    sequence of ints given to the constructor is converted.
    """

    prompt: np.ndarray  # (P,) int32
    completions: tuple[np.ndarray, ...]  # (completion,) or (chosen, rejected), each (C,) int32
    line: int  # line in the data file, for messages about the row

    def __post_init__(self):
        object.__setattr__(self, "prompt", int32_ids(self.prompt))
        object.__setattr__(self, "completions", tuple(int32_ids(c) for c in self.completions))

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(c) for c in self.completions)


@dataclass
class DataReport:
    path: str
    kind: str = ""  # pairs | demonstrations | scored
    rows: int = 0  # rows read
    not_correct: int = 0  # scored rows left out because their verdict is not "correct"
    kept: int = 0
    dropped_too_long: int = 0
    dropped_prompt_too_long: int = 0  # of those, rows whose prompt alone has max_length tokens
    prompt_truncated: int = 0
    completion_truncated: int = 0
    completion_tokens_cut: int = 0  # completion tokens removed by truncate_completion, all rows
    retokenised: int = 0  # prompt + completion tokenised apart != together; joint ids used
    equal_pairs: int = 0  # kept pairs whose chosen and rejected ids are the same: no signal
    max_length: int = 0
    lengths: dict = field(default_factory=dict)  # min / mean / max tokens of kept rows

    def summary(self) -> str:
        parts = [f"{self.path}: {self.rows} {self.kind} rows"]
        if self.kind == "scored":
            parts.append(f"{self.not_correct} not correct (left out)")
        parts.append(f"{self.kept} used")
        if self.dropped_too_long:
            why = (
                f"; {self.dropped_prompt_too_long} of them by the prompt alone"
                if self.dropped_prompt_too_long
                else ""
            )
            parts.append(
                f"{self.dropped_too_long} dropped (longer than max_length {self.max_length}{why})"
            )
        if self.prompt_truncated:
            parts.append(f"{self.prompt_truncated} with the prompt's start cut")
        if self.completion_truncated:
            parts.append(
                f"{self.completion_truncated} with the completion's END CUT "
                f"({self.completion_tokens_cut} tokens; answer may be missing)"
            )
        if self.equal_pairs:
            parts.append(
                f"{self.equal_pairs} with chosen == rejected (no preference signal; "
                "`posttrain pairs` skips them)"
            )
        if self.lengths:
            parts.append("tokens min/mean/max {min}/{mean:.0f}/{max}".format(**self.lengths))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ reading


def _messages(value, path, line, name: str, default_role: str) -> list[dict]:
    """A message list from a row field; a plain string is one message of `default_role`."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(
            path, line, "expected a non-empty list of chat messages or a string", field=name
        )
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                path, line, f"message {i}: expected {{'role': str, 'content': str}}", field=name
            )
    return value


def _reply(value, path, line, name: str) -> list[dict]:
    msgs = _messages(value, path, line, name, "assistant")
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, line, "the last message must be the assistant's", field=name)
    return msgs


def read_rows(
    path: str | os.PathLike, preference: bool, report: DataReport
) -> Iterator[tuple[int, list[dict], list[list[dict]]]]:
    """Yield (line, prompt messages, [reply messages, ...]): 2 replies per pair, 1 otherwise."""
    for line, row in iter_jsonl(path):
        report.rows += 1
        if preference:
            if "chosen" not in row or "rejected" not in row:
                raise DataError(
                    path,
                    line,
                    "a preference method needs pair rows (prompt, chosen, rejected)",
                    field="chosen" if "chosen" not in row else "rejected",
                )
            report.kind = "pairs"
            prompt = _messages(row.get("prompt"), path, line, "prompt", "user")
            yield (
                line,
                prompt,
                [
                    _reply(row["chosen"], path, line, "chosen"),
                    _reply(row["rejected"], path, line, "rejected"),
                ],
            )
        elif "verdict" in row:
            report.kind = "scored"
            if row["verdict"] != "correct":
                report.not_correct += 1
                continue
            prompt = _messages(row.get("messages"), path, line, "messages", "user")
            if not isinstance(row.get("response"), str) and not isinstance(row.get("text"), str):
                raise DataError(
                    path, line, "missing (a scored row needs the sampled answer)", field="response"
                )
            yield line, prompt, [[{"role": "assistant", "content": assistant_turn(row)}]]
        elif "messages" in row:
            report.kind = "demonstrations"
            msgs = _reply(row["messages"], path, line, "messages")
            if len(msgs) < 2:
                raise DataError(
                    path,
                    line,
                    "expected at least one prompt message before the assistant's",
                    field="messages",
                )
            yield line, msgs[:-1], [msgs[-1:]]
        elif "prompt" in row and "completion" in row:
            report.kind = "demonstrations"
            yield (
                line,
                _messages(row["prompt"], path, line, "prompt", "user"),
                [_reply(row["completion"], path, line, "completion")],
            )
        elif "chosen" in row:
            raise DataError(
                path,
                line,
                "this is a pair row; an SFT method needs demonstrations "
                "(messages, or prompt + completion) or scored samples",
                field="chosen",
            )
        else:
            raise DataError(
                path,
                line,
                "missing: expected messages, prompt + completion, or a "
                "scored sample (messages + verdict)",
                field="messages",
            )


def check_rows(path: str | os.PathLike, preference: bool) -> int:
    """Read every row's fields without a tokenizer, so a bad file fails before any model loads:
    the row count. Pairs whose chosen and rejected texts are all equal are refused here too
    (load_examples compares them again as tokens, after the template)."""
    report = DataReport(path=str(path))
    rows = equal = 0
    for _, _, replies in read_rows(path, preference, report):
        rows += 1
        equal += len(replies) == 2 and replies[0] == replies[1]
    if rows and equal == rows:
        raise DataError(
            path,
            None,
            f"all {rows} pairs have the same text for chosen and rejected: they teach nothing "
            "(DPO loss log 2, gradient 0)",
        )
    if not rows:
        raise DataError(path, None, f"no usable row ({report.not_correct} scored, none correct)")
    return rows


PAIR_PROMPT_CUT = (
    "length_policy: 'truncate_prompt'; expected drop | truncate_completion for pairs "
    "(a pair's prompt is never cut)"
)


def fit_length(
    prompt: list[int], completions: list[list[int]], max_length: int, policy: str
) -> tuple[list[int], list[list[int]], str] | None:
    """Apply the length policy: (prompt, completions, outcome) or None when the row is dropped.

    outcome: "fits" | "prompt_truncated" | "completion_truncated".
    max_length 10, prompt 6, completions 5 and 3 (length 11): drop -> None;
    truncate_prompt -> prompt's last 5 tokens; truncate_completion -> completions cut to 4 and 3.
    A pair (two completions) never has its prompt cut: truncate_prompt is refused for it.
    """
    if policy == "truncate_prompt" and len(completions) > 1:
        raise ConfigError(PAIR_PROMPT_CUT)
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, "fits"
    if policy == "truncate_prompt" and longest < max_length:
        return prompt[len(prompt) - (max_length - longest) :], completions, "prompt_truncated"
    if policy == "truncate_completion" and len(prompt) < max_length:
        room = max_length - len(prompt)
        return prompt, [c[:room] for c in completions], "completion_truncated"
    return None


def load_examples(
    path: str | os.PathLike,
    tokenizer,
    *,
    preference: bool,
    max_length: int,
    length_policy: str = "drop",
    workers: int = 1,
) -> tuple[list[Example], DataReport]:
    """Read, render, tokenise and length-check a data file; DataError names file and line.

    Rows stream through in chunks (one batched tokenizer call each), so memory holds the
    examples' int32 ids and one chunk of text; `workers` > 1 tokenises chunks in that many
    forked processes.
    """
    if preference and length_policy == "truncate_prompt":
        raise ConfigError(PAIR_PROMPT_CUT)
    report = DataReport(path=str(path), max_length=max_length)
    examples = []
    rows = read_rows(path, preference, report)
    for result in tokenized_rows(tokenizer, rows, workers):
        if len(result) == 2:
            line, error = result
            raise DataError(path, line, error)
        line, p, completions, retokenised = result
        report.retokenised += retokenised
        fitted = fit_length(p, completions, max_length, length_policy)
        if fitted is None:
            report.dropped_too_long += 1
            report.dropped_prompt_too_long += len(p) >= max_length
            continue
        full = completions
        p, completions, outcome = fitted
        if outcome != "fits":
            setattr(report, outcome, getattr(report, outcome) + 1)
        if outcome == "completion_truncated":
            report.completion_tokens_cut += sum(map(len, full)) - sum(map(len, completions))
        examples.append(Example(p, tuple(completions), line))
    report.kept = len(examples)
    report.equal_pairs = sum(
        len(e.completions) == 2 and np.array_equal(*e.completions) for e in examples
    )
    if examples and report.equal_pairs == len(examples):
        raise DataError(
            path,
            None,
            f"all {len(examples)} pairs have chosen == rejected: they teach nothing "
            "(DPO loss log 2, gradient 0)",
        )
    if not examples:
        why = "no usable row"
        if report.dropped_too_long:
            why = (
                f"all {report.rows} rows are longer than max_length {max_length} (length_policy "
                f"{length_policy}; {report.dropped_prompt_too_long} by the prompt alone, which is "
                f"{'never cut for pairs' if preference else 'cut only by truncate_prompt'}): "
                "raise max_length"
                + (" or set length_policy=truncate_completion" if length_policy == "drop" else "")
            )
        raise DataError(path, None, why)
    lengths = np.array([e.length for e in examples])
    report.lengths = {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "max": int(lengths.max()),
    }
    return examples, report
