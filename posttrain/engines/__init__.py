"""Text generation behind one interface (`engines.base.Engine`).

`hf` (transformers) is the default and needs nothing more; `vllm` and `openai` are the
production paths for large models and plug in behind the same `generate` call.
"""

from __future__ import annotations

from .base import Completion, Engine, Messages, SamplingParams

ENGINES = ("hf",)


def make_engine(kind: str, model: str, *, dtype: str = "auto", batch_size: int = 8,
                trust_remote_code: bool = False, adapter=None, progress: bool = False) -> Engine:
    if kind == "hf":
        from .hf import HFEngine

        engine = HFEngine.from_name(model, dtype=dtype, batch_size=batch_size,
                                    trust_remote_code=trust_remote_code, adapter=adapter)
        engine.progress = progress
        return engine
    raise ValueError(f"engine {kind!r}: expected one of {', '.join(ENGINES)}")


__all__ = ["Completion", "Engine", "Messages", "SamplingParams", "make_engine", "ENGINES"]
