"""The one generation interface every engine implements (transformers, vLLM, OpenAI-compatible).

An engine turns chat prompts into completions. It returns raw completion text (special tokens
removed) plus what training and pair selection need: token ids, why generation stopped, and the
log-probability of the sampled tokens under the model's own distribution at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.errors import UsageError, UserError

Messages = list[dict]  # [{"role": "user", "content": "..."}, ...]


class EngineUnavailable(RuntimeError):
    """The engine's server is gone: connection refused, timeouts, 429 or 5xx after every retry.

    `partial` is, for each prompt of the generate call that failed, its completions when they
    all finished and None otherwise, so a stage can write the finished rows before it stops.
    """

    def __init__(self, message: str, partial: list | None = None):
        super().__init__(message)
        self.partial = partial


class ServerRejected(UserError):
    """A 4xx other than 408/409/429: the server refuses this request (retrying cannot help;
    a setting is wrong). Here, not in client.py, so the CLI can print it as one line without
    importing the HTTP client."""

    def __init__(self, url: str, status: int, message: str):
        self.url, self.status, self.message = url, status, message
        super().__init__(f"{url}: HTTP {status}: {message}")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def check(self, name=lambda field: "--" + field.replace("_", "-"), error=UsageError):
        """Refuse settings no engine can use (an empty file or a silent clamp later): `error`
        naming `name(field)` (a flag by default; a recipe passes its keys) and the range.
        Written so that NaN fails every comparison."""
        for field_, ok, expected in (
            ("n", self.n >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "a value in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ):
            if not ok:
                raise error(f"{name(field_)}: {getattr(self, field_)!r}; expected {expected}")
        return self


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (token limit)
    token_ids: list[int] = field(default_factory=list)
    sum_logprob: float | None = None  # sum of log p(token) at temperature 1
    mean_logprob: float | None = None
    # log p(token) of each sampled token under the raw distribution (temperature 1, no top-p);
    # None where the engine cannot give them (a server that returns no log-probs)
    token_logprobs: list[float] | None = None
    # a server's separate reasoning channel (OpenAI-style `reasoning_content`), when it splits
    # the think block off itself; None when the reasoning, if any, is inside `text`
    reasoning: str | None = None
    # how many tokens were generated, where a server reports the count but not the ids
    token_count: int | None = None
    # mixture-of-experts routing while sampling, where the engine records it (hf with
    # `record_routing`): (prompt + completion - 1 tokens, MoE layers, k) expert indices, the
    # tokens the model ran (every completion token but the last); train/moe/replay.py
    routed_experts: Any = None  # numpy array (uint8 up to 256 experts)

    @property
    def num_tokens(self) -> int:
        if self.token_ids or self.token_count is None:
            return len(self.token_ids)
        return self.token_count


class Engine(Protocol):
    name: str  # "hf", "vllm", "openai"
    model_id: str

    def render_prompt(self, messages: Messages) -> str:
        """The exact text the model is conditioned on (chat template with generation prompt)."""

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt, `params.n` completions, in order. The same prompts, params and seed
        give the same completions (where the engine allows; see each engine's docstring)."""

    def close(self) -> None:
        """Free what the engine holds (GPU memory, worker processes, HTTP connections)."""


class AdapterEngine(Engine, Protocol):
    """An engine that holds its own copy of the weights and takes LoRA adapters from disk
    (vllm, openai with runtime LoRA loading): how online RL syncs its rollout engine."""

    def load_adapter(self, path: str, name: str) -> None:
        """Serve the PEFT adapter folder `path` as `name`; later generate calls use it."""
