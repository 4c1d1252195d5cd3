"""The one generation interface every engine implements (transformers, vLLM, OpenAI-compatible).

An engine turns chat prompts into completions. It returns raw completion text (special tokens
removed) plus what training and pair selection need: token ids, why generation stopped, and the
log-probability of the sampled tokens under the model's own distribution at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Messages = list[dict]  # [{"role": "user", "content": "..."}, ...]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (token limit)
    token_ids: list[int] = field(default_factory=list)
    sum_logprob: float | None = None  # sum of log p(token) at temperature 1
    mean_logprob: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Engine(Protocol):
    name: str  # "hf", "vllm", "openai"
    model_id: str

    def render_prompt(self, messages: Messages) -> str:
        """The exact text the model is conditioned on (chat template with generation prompt)."""

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt, `params.n` completions, in order."""
