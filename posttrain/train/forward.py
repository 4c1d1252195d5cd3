"""Per-token log-probabilities of the completions in a collated batch (one forward pass).

    python -c "from posttrain.train.forward import completion_logps; help(completion_logps)"

Only the last K + 1 positions reach the language-model head (`logits_to_keep`): with left
padding every completion ends at the last position, so the head and the log-softmax never run
over prompt tokens. For the decoder families in FUSED_HEAD_MODELS (whose forward returns the
head's output unchanged) the head itself is fused with the log-softmax for the duration of the
call (posttrain.losses.logprobs.linear_token_logps): no (R, K, V) logits tensor exists at all, only
one chunk of positions at a time, and only completion tokens are projected. The head runs
inside the model's own forward, so DDP / FSDP hooks see an ordinary forward pass. Other models
(Gemma's soft-capping, Granite's and Cohere's logit scaling, LoRA on the head) get their logits
and a chunked log-softmax.

`unpadded_logps` gives the same (R, K) table with every sequence in its own forward pass, without
padding: no compute on pad tokens, causal attention without a mask, and a sequence's log-probs
that do not depend on which rows it is batched with. That last point matters in bf16, where the
rounding after each GEMM depends on the batch's shape (SmolLM2, CPU bf16: one ~190-token
sequence's summed log-prob moved by up to 0.5 nats between batches); the reference pass and the
policy then compute every sequence identically, and the step-1 DPO loss is ln 2 exactly.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import nn

from posttrain.losses.logprobs import linear_token_logps
from posttrain.losses import token_logps

# model_type values whose causal-LM forward is `logits = lm_head(hidden[:, keep])`, nothing more.
FUSED_HEAD_MODELS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "olmo",
        "olmo2",
        "phi3",
        "deepseek_v3",
    }
)


def _inner(model):
    """The causal LM under DDP (`.module`); PEFT and FSDP2 models forward the attributes."""
    return getattr(model, "module", model)


def fused_head(model) -> nn.Linear | None:
    """The output head when the fused log-softmax is exact for this model, else None."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not _plain_linear(head) or getattr(config, "model_type", None) not in FUSED_HEAD_MODELS:
        return None
    return head


def _plain_linear(module) -> bool:
    """An nn.Linear computing nothing but its weight and bias: the class itself, or the one
    FSDP2 makes when it shards the head as a unit of its own (FSDPLinear(FSDPModule, Linear),
    processes.shard). Other subclasses (a LoRA layer, a quantized one) may compute something
    else."""
    if type(module) is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without distributed)
        return False
    return type(module).__bases__ == (FSDPModule, nn.Linear)


@contextlib.contextmanager
def _head_returns_logps(head: nn.Linear, targets: torch.Tensor):
    """While inside, `head(hidden)` returns log p(targets) (R, K+1) instead of the logits."""
    head.forward = lambda hidden: linear_token_logps(hidden, head.weight, targets, head.bias)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, K) float32 log p(token) on completion tokens, 0.0 elsewhere (see batches.collate)."""
    labels = batch["labels"]  # (R, K)
    K = labels.shape[1]
    cache = batch.get("past_key_values")  # a prompt's keys and values (unpadded_logps)
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=K + 1,
        use_cache=cache is not None,
        past_key_values=cache,
    )
    head = fused_head(model)
    if head is not None:
        # Position t predicts token t + 1; the last kept position predicts nothing.
        targets = nn.functional.pad(labels, (0, 1), value=-100)  # (R, K + 1)
        with _head_returns_logps(head, targets):
            return model(**inputs).logits[:, :-1]  # (R, K)
    logits = model(**inputs).logits[:, :-1]  # (R, K, V): position t predicts token t + 1
    return token_logps(logits, labels)  # (R, K)


@functools.cache
def _prefix_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer  # imported on first use

    class PrefixLayer(DynamicLayer):
        """prefix_layer's class: a DynamicLayer whose update never stores."""

        def __init__(self, keys=None, values=None):
            super().__init__()
            self.first = None  # the (keys, values) of the first update
            if keys is not None:
                self.dtype, self.device = keys.dtype, keys.device
                self.keys, self.values = keys, values
                self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if self.first is None:
                self.first = (key_states, value_states)
            if not self.is_initialized or self.keys.numel() == 0:
                return key_states, value_states
            return (
                torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2),
            )

    return PrefixLayer


def prefix_layer(keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
    """A cache layer holding a fixed prefix of keys and values (none: empty) that it never
    changes: `update` returns prefix + the new states without storing them, so a layer run
    again (gradient checkpointing's recompute in backward) sees exactly the states of its first
    run, and the first states it is given (the original forward's, with their autograd graph)
    are kept in `.first`. transformers' own DynamicLayer appends on every update, which is why
    its decoder layers drop any cache under checkpointing unless told the cache is only read
    (`_can_checkpoint_with_cache`, set by keep_cache_under_checkpointing)."""
    return _prefix_layer_class()(keys, values)


def _decoder_layers(model) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def cache_survives_checkpointing() -> bool:
    """Whether this transformers lets a decoder layer keep a read-only cache under gradient
    checkpointing (GradientCheckpointingLayer._can_checkpoint_with_cache); without it a shared
    prompt cannot run with checkpointing (modes.layout runs every sequence whole then)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


@contextlib.contextmanager
def keep_cache_under_checkpointing(model):
    """While inside, checkpointed decoder layers keep the prefix cache they are given (it is
    only read: prefix_layer) instead of dropping it, which would let every later completion
    attend to nothing of the prompt but its last token, silently."""
    layers = _decoder_layers(model) if cache_survives_checkpointing() else []
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_can_checkpoint_with_cache", None)


def prefix_cache(prefix: list | None, n_layers: int):
    """A DynamicCache of prefix_layer()s: `prefix` is every layer's (keys, values), or None for
    an empty cache that records the first forward's states (`cache.layers[i].first`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if prefix is None:
        cache.layers = [prefix_layer() for _ in range(n_layers)]
    else:
        cache.layers = [prefix_layer(k, v) for k, v in prefix]
    return cache


def _prompt_prefix(cache, P: int, n: int = 1) -> list:
    """Every layer's (keys, values) of prompt tokens 0 .. P-2 from a recording cache, copied
    (so the whole first sequence's states are not kept alive by a view), expanded to n rows."""
    return [
        (
            layer.first[0][:, :, : P - 1].clone().expand(n, -1, -1, -1),
            layer.first[1][:, :, : P - 1].clone().expand(n, -1, -1, -1),
        )
        for layer in cache.layers
    ]


def _n_layers(model) -> int:
    config = getattr(_inner(model), "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.num_hidden_layers)


def prompt_shared_forwards(model, prompt: torch.Tensor, completions, share: bool, run) -> list:
    """`run(inputs, labels, cache)` for every completion of one prompt, unpadded, one sequence
    per forward pass; returns the outputs in order.

    With `share` (and more than one completion) the prompt runs once: the first completion's
    forward runs the whole sequence and keeps its keys and values; each later one runs only the
    prompt's last token (which predicts the completion's first) and the completion, attending to
    the first forward's keys and values of the other prompt tokens. Gradients reach the prompt's
    activations from every completion. (A forward of the prompt alone would be cheaper on paper,
    but its short matmuls run far below the long ones' speed in bf16 on a CPU: measured slower
    than not sharing at all.) The caches never change once written (prefix_cache), so gradient
    checkpointing can recompute a layer in backward. Without `share` every sequence runs
    whole. `prompt` (1, P), `completions` (1, m) each, on the model's device.
    """
    P = prompt.shape[1]
    share = share and len(completions) > 1 and P > 1
    prefix = None  # every layer's (keys, values) of prompt tokens 0 .. P-2
    outputs = []
    n_layers = _n_layers(model) if share else 0
    with keep_cache_under_checkpointing(model) if share else contextlib.nullcontext():
        for labels in completions:
            if prefix is None:
                # plain full-length layers, even for sliding-window models (whose cache layers
                # would keep only the window): the mask still applies the window by position
                cache = prefix_cache(None, n_layers) if share else None
                inputs = torch.cat([prompt, labels], dim=1)  # (1, P + m)
            else:
                cache = prefix_cache(prefix, n_layers)
                inputs = torch.cat([prompt[:, -1:], labels], dim=1)  # (1, 1 + m)
            outputs.append(run(inputs, labels, cache))
            if share and prefix is None:
                prefix = _prompt_prefix(cache, P)
    return outputs


def unpadded_logps(model, examples, device, share_prompt: bool = True) -> torch.Tensor:
    """completion_logps(model, collate(examples)) computed one sequence per forward pass, with
    no padding: the same (R, K) layout (chosen rows, then rejected; 0.0 left of a completion).
    A pair's prompt runs once (prompt_shared_forwards; share_prompt=False: every sequence whole).
    """

    def run(inputs, labels, cache):
        batch = {
            "input_ids": inputs,
            "attention_mask": None,
            "position_ids": None,
            "labels": labels,
            "past_key_values": cache,
        }
        return completion_logps(model, batch)  # (1, m)

    n_comp = len(examples[0].completions)
    K = max(len(c) for e in examples for c in e.completions)
    rows: list[list[torch.Tensor]] = [[] for _ in range(n_comp)]
    for e in examples:
        prompt = torch.from_numpy(e.prompt.astype(np.int64))[None].to(device)  # (1, P)
        completions = [
            torch.from_numpy(c.astype(np.int64))[None].to(device) for c in e.completions
        ]  # (1, m) each
        for k, logps in enumerate(
            prompt_shared_forwards(model, prompt, completions, share_prompt, run)
        ):
            rows[k].append(nn.functional.pad(logps, (K - logps.shape[1], 0)))
    return torch.cat([r for per_completion in rows for r in per_completion])  # (R, K)


def group_logits(model, batch: dict) -> torch.Tensor:
    """(G, K, V) logits of one group's completions (one prompt, G completions: a grouped batch
    of rollouts.rollout_batches): row i's logits at positions K - m_i .. K - 1 predict its m_i
    tokens (the collate layout of `labels`), zeros left of them.

    share_prompt: the first completion's forward runs the whole sequence and keeps the prompt's
    keys and values; the other G - 1 run as one batch of the prompt's last token and their
    completion, right-padded to the longest (the pads follow every real token, so causal
    attention keeps them out; the attention mask marks them for the MoE balance loss), all
    attending to those keys and values. Two forwards a group, no prompt computed twice, and
    matmuls of (G - 1) x the completion length rows (one completion's rows alone run far below
    the GEMM's speed on a CPU). Without share_prompt every sequence runs whole, one at a time.
    """
    K = batch["labels"].shape[1]
    prompt, completions = batch["prompt_ids"], batch["completion_ids"]  # (1, P), [(1, m_i)]
    P = prompt.shape[1]

    def right_aligned(logits):  # (m, V) -> (K, V)
        return nn.functional.pad(logits, (0, 0, K - logits.shape[0], 0))

    def whole(inputs, labels, cache):
        m = labels.shape[1]
        out = model(
            input_ids=inputs,
            logits_to_keep=m + 1,
            use_cache=cache is not None,
            past_key_values=cache,
        )
        return right_aligned(out.logits[0, :-1])  # position t predicts token t + 1

    if not batch["share_prompt"] or len(completions) == 1 or P == 1:
        return torch.stack(prompt_shared_forwards(model, prompt, completions, False, whole))
    n_layers = _n_layers(model)
    cache = prefix_cache(None, n_layers)
    with keep_cache_under_checkpointing(model):
        first = whole(torch.cat([prompt, completions[0]], dim=1), completions[0], cache)  # (K, V)
    rest = completions[1:]
    n, M = len(rest), max(c.shape[1] for c in rest)
    ids = prompt.new_zeros((n, 1 + M))  # the prompt's last token, the completion, pads
    mask = prompt.new_zeros((n, P + M))  # over the cached P - 1 prompt tokens and the inputs
    ids[:, 0] = prompt[0, -1]
    mask[:, :P] = 1
    for i, c in enumerate(rest):
        ids[i, 1 : 1 + c.shape[1]] = c[0]
        mask[i, P : P + c.shape[1]] = 1
    prefix = _prompt_prefix(cache, P, n)
    with keep_cache_under_checkpointing(model):
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=prefix_cache(prefix, n_layers),
            use_cache=True,
            logits_to_keep=M + 1,
        ).logits[:, :-1]  # (n, M, V): column t predicts token t of each completion
    rows = [first] + [right_aligned(logits[i, : c.shape[1]]) for i, c in enumerate(rest)]
    return torch.stack(rows)  # (G, K, V)


def split_pairs(per_sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) values of a pair batch -> chosen (B,), rejected (B,) (collate's row order)."""
    half = per_sequence.shape[0] // 2
    return per_sequence[:half], per_sequence[half:]


@torch.no_grad()
def reference_logps(
    model, examples, *, batch_size: int, pad_id: int, device, layout: str = "longest"
) -> torch.Tensor:
    """(N, 2) summed completion log-probs (chosen, rejected) of `model` for every pair.

    layout longest: rows in left-padded batches of `batch_size` pairs, longest first (little
    padding); none / shared: every pair alone (unpadded_logps, its prompt once if shared), as
    the policy runs in training then. The result is in input order.
    """
    padded = layout == "longest"
    from posttrain.train.batches import collate

    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    step = batch_size if padded else 1
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), step):
        idx = order[s : s + step]
        rows = [examples[i] for i in idx]
        if padded:
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            logps = completion_logps(model, batch)  # (2b, K)
        else:
            logps = unpadded_logps(model, rows, device, share_prompt=layout == "shared")
        chosen, rejected = split_pairs(logps.sum(-1))
        out[idx, 0] = chosen.float().cpu()
        out[idx, 1] = rejected.float().cpu()
    model.train(was_training)
    return out
