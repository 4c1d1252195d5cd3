"""Text generation behind one interface (`engines.base.Engine`), chosen by `EngineConfig`.

`hf` (transformers) is the default and needs nothing more; `vllm` (in-process vllm.LLM) and
`openai` (any OpenAI-compatible server: vllm serve, SGLang, hosted APIs) are the production
paths for large models and plug in behind the same `generate` call.
"""

from __future__ import annotations

from dataclasses import replace

from posttrain.config import ConfigError
from posttrain.engines.base import (
    AdapterEngine,
    Completion,
    Engine,
    EngineUnavailable,
    Messages,
    SamplingParams,
)
from posttrain.engines.config import ENGINES, EngineConfig


def _hf():
    from posttrain.engines.hf import HFEngine

    return HFEngine


def _vllm():
    from posttrain.engines.vllm import VLLMEngine

    return VLLMEngine


def _openai():
    from posttrain.engines.openai import OpenAIEngine

    return OpenAIEngine


# kind -> the engine class (imported on use: vllm is optional, transformers is slow to import).
# Every class is built as `Class(model, config, *, dtype, adapter, trust_remote_code, progress)`.
KINDS = {"hf": _hf, "vllm": _vllm, "openai": _openai}


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
    if isinstance(config, str):
        config = EngineConfig(kind=config)
    if sleep_mode and config.kind != "vllm":
        raise ConfigError("sleep_mode: only the in-process vllm engine can sleep")
    if batch_size is not None:
        config = replace(config, batch_size=batch_size)
    config.check()
    vllm_only = {"max_lora_rank": max_lora_rank, "sleep_mode": sleep_mode}
    return KINDS[config.kind]()(
        model,
        config,
        dtype=dtype,
        adapter=adapter,
        trust_remote_code=trust_remote_code,
        progress=progress,
        **(vllm_only if config.kind == "vllm" else {}),
    )


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
