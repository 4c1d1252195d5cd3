"""The transformers engine: batched, left-padded generation with per-token log-probs.

The default engine; it needs nothing beyond transformers and also serves online RL, where it
samples from the live (LoRA-wrapped) policy. Each sequence stops at its end-of-sequence token and
leaves the batch there (engines/decode.py). Log-probs are of the sampled tokens under the model's
raw distribution (temperature 1, no top-p), which is what confident-wrong pair selection and
policy-gradient methods need. Nothing is generated past the model's context
(`max_position_embeddings`): an answer that reaches it ends cut at length, and a prompt that
leaves no room for one new token is an empty completion cut at length (graded `truncated`),
with a warning giving its token count, instead of text the model was never trained to produce.
With `record_routing` on a mixture-of-experts model, each completion carries the experts its
tokens were routed to while sampling (`Completion.routed_experts`; train/moe/replay.py), taken
with hooks on the routers; the online trainer turns it on for routing replay and drift metrics.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from posttrain.engines.base import Completion, Messages, SamplingParams
from posttrain.engines.config import EngineConfig, batch_size as batch_size_of
from posttrain.engines.decode import decode

log = logging.getLogger("posttrain.engines.hf")


class HFEngine:
    name = "hf"

    def __init__(
        self,
        model: str,
        config: EngineConfig | None = None,
        *,
        dtype: str = "auto",
        adapter=None,
        trust_remote_code: bool = False,
        progress: bool = False,
    ):
        """Load `model` (plus `adapter`, merged) as `config` says. `config.device` auto: CUDA
        when present (several GPUs when the model outgrows one), else the CPU, said on stderr;
        `dtype` auto is resolved for that device."""
        from posttrain.models import load_tokenizer, load_with_adapter, resolve_device

        config = config or EngineConfig(kind="hf")
        device = resolve_device(config.device)
        loaded = load_with_adapter(
            model, adapter, dtype=dtype, trust_remote_code=trust_remote_code, device=device
        )
        loaded.eval()
        self._attach(
            loaded,
            load_tokenizer(model, trust_remote_code=trust_remote_code),
            model_id=model if adapter is None else f"{model}+{adapter}",
            batch_size=batch_size_of(config),
            chat_template_kwargs=config.chat_template_kwargs,
        )
        self.progress = progress

    @classmethod
    def on_model(
        cls,
        model,
        tokenizer,
        *,
        model_id: str = "model",
        batch_size: int = 8,
        chat_template_kwargs: dict | None = None,
    ) -> "HFEngine":
        """An engine sampling a model already in memory (the online trainer's live policy)."""
        engine = cls.__new__(cls)
        engine._attach(
            model,
            tokenizer,
            model_id=model_id,
            batch_size=batch_size,
            chat_template_kwargs=chat_template_kwargs,
        )
        return engine

    def _attach(self, model, tokenizer, *, model_id, batch_size, chat_template_kwargs) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size = batch_size
        self.progress = False
        self.record_routing = False
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        config = getattr(model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)  # None: no limit

    def close(self) -> None:
        self.model = None  # the weights go with the last reference

    def render_prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
        )

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        texts = [self.render_prompt(m) for m in prompts]
        flat = [t for t in texts for _ in range(params.n)]  # prompt i's samples are adjacent
        out: list[Completion] = []
        bar = tqdm(total=len(flat), desc="generate", disable=not self.progress, leave=False)
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            out.extend(self._generate_batch(chunk, params, seed=params.seed + start))
            bar.update(len(chunk))
        bar.close()
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, texts: list[str], params: SamplingParams, seed: int):
        tok = self.tokenizer
        tok.padding_side = "left"
        # The chat template already carries special tokens (e.g. <|im_start|>).
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        limit = self.max_positions
        fits = [limit is None or n < limit for n in lengths]  # room for one new token
        for n in (n for n, ok in zip(lengths, fits) if not ok):
            log.warning(
                "a prompt of %d tokens does not fit the model's context of %d: "
                "recorded as truncated",
                n,
                limit,
            )
        if not any(fits):
            return [Completion(text="", finish_reason="length") for _ in texts]
        if not all(fits):  # generate the others, then put the cut-off ones back in place
            done = iter(self._generate_batch([t for t, ok in zip(texts, fits) if ok], params, seed))
            return [
                next(done) if ok else Completion(text="", finish_reason="length") for ok in fits
            ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        trace: list = []
        with self._routing() as routing:
            rows = decode(
                self.model,
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=params.max_new_tokens,
                eos_ids=self.eos_ids,
                temperature=params.temperature,
                top_p=params.top_p,
                generator=generator,
                max_positions=self.max_positions,
                trace=trace,
            )
        records = (
            routed_experts(routing.natural, trace, enc["attention_mask"], self.model)
            if routing is not None
            else [None] * len(rows)
        )
        completions = []
        for row, record in zip(rows, records):
            ids = row.token_ids
            total = float(sum(row.logprobs))
            completions.append(
                Completion(
                    text=tok.decode(ids, skip_special_tokens=True),
                    finish_reason=row.finish_reason,
                    token_ids=ids,
                    sum_logprob=total,
                    mean_logprob=total / len(ids) if ids else None,
                    token_logprobs=list(row.logprobs),
                    routed_experts=record,
                )
            )
        return completions

    def _routing(self):
        """The recording context while decoding: moe.replay.RouterControl on an MoE model with
        `record_routing`, else one that records nothing (and yields None)."""
        import contextlib

        from posttrain.train.moe import router_modules
        from posttrain.train.moe.replay import RouterControl

        if not self.record_routing or not router_modules(self.model):
            return contextlib.nullcontext()
        return RouterControl(self.model)


def routed_experts(natural: list, trace: list, attention_mask: torch.Tensor, model) -> list:
    """Per row of a decoded batch, the (P + n - 1, layers, k) experts of its tokens as a numpy
    array: the prompt's rows of the first (prefill) forward, then one row per later forward it
    ran in. `natural`: each forward's (rows, layers, k) indices; `trace`: each forward's rows."""
    from posttrain.train.moe import moe_shape
    from posttrain.train.moe.replay import record_dtype

    B, T = attention_mask.shape
    prefill = natural[0].reshape(B, T, *natural[0].shape[1:])  # (B, T, layers, k)
    lengths = attention_mask.sum(-1).tolist()
    parts = [[prefill[b, T - lengths[b] :]] for b in range(B)]  # left padding
    for rows, chosen in zip(trace[1:], natural[1:]):  # (A, layers, k): one token per row
        for j, b in enumerate(rows):
            parts[b].append(chosen[j : j + 1])
    dtype = record_dtype(moe_shape(model).num_experts)
    return [torch.cat(p).numpy().astype(dtype) for p in parts]
