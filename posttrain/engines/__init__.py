"""Text generation behind one interface (`engines.base.Engine`), chosen by `EngineConfig`.

`hf` (transformers) is the default and needs nothing more; `vllm` (in-process vllm.LLM) and
`openai` (any OpenAI-compatible server: vllm serve, SGLang, hosted APIs) are the production
paths for large models and plug in behind the same `generate` call.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import ConfigError
from posttrain.engines.base import (
    AdapterEngine,
    Completion,
    Engine,
    EngineUnavailable,
    Messages,
    SamplingParams,
)
from posttrain.engines.config import ENGINES, EngineConfig, batch_size as batch_size_of


def make_engine(
    config: EngineConfig | str,
    model: str,
    *,
    dtype: str = "auto",
    adapter=None,
    trust_remote_code: bool = False,
    progress: bool = False,
    batch_size: int | None = None,
    max_lora_rank: int | None = None,
    sleep_mode: bool = False,
) -> Engine:
    """The engine `config` describes, serving `model` (plus `adapter`, a PEFT folder).

    `config` may be a kind name ("hf") for the defaults of that kind; `batch_size`, when given,
    overrides config.batch_size (the stages' own --batch-size). `max_lora_rank` (vllm) starts
    the engine ready for adapters that `load_adapter` brings later (online RL); `sleep_mode`
    (vllm on CUDA) lets colocated online RL put it to sleep during the update.
    """
    if sleep_mode and (config if isinstance(config, str) else config.kind) != "vllm":
        raise ConfigError("sleep_mode: only the in-process vllm engine can sleep")
    if isinstance(config, str):
        config = EngineConfig(kind=config)
    if batch_size is not None:
        config = EngineConfig(**{**config.__dict__, "batch_size": batch_size})
    config.check()
    if config.kind == "hf":
        from posttrain.engines.hf import HFEngine

        engine = HFEngine.from_name(
            model,
            dtype=dtype,
            batch_size=batch_size_of(config),
            trust_remote_code=trust_remote_code,
            adapter=adapter,
            device=config.device,
            chat_template_kwargs=config.chat_template_kwargs,
        )
        engine.progress = progress
        return engine
    if config.kind == "vllm":
        from posttrain.engines.vllm import VLLMEngine

        return VLLMEngine(
            model,
            config,
            dtype=dtype,
            adapter=adapter,
            max_lora_rank=max_lora_rank,
            trust_remote_code=trust_remote_code,
            progress=progress,
            sleep_mode=sleep_mode,
        )
    if config.kind == "openai":
        from posttrain.engines.openai import OpenAIEngine

        engine = OpenAIEngine(
            config.base_urls,
            model,
            served_model=config.served_model,
            api_key_env=config.api_key_env,
            concurrency=config.concurrency,
            timeout=config.timeout,
            max_retries=config.max_retries,
            chat_template_kwargs=config.chat_template_kwargs,
            send_seed=config.send_seed,
        )
        engine.progress = progress
        if adapter is not None:  # a PEFT folder the servers can read, served under its name
            engine.load_adapter(str(adapter), name=Path(adapter).name)
            engine.model_id = f"{model}+{adapter}"
        return engine
    raise NotImplementedError(f"engine {config.kind!r} is not built yet")


__all__ = [
    "AdapterEngine",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineUnavailable",
    "Messages",
    "SamplingParams",
    "make_engine",
    "ENGINES",
]
