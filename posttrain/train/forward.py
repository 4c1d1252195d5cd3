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
    if type(head) is not nn.Linear or getattr(config, "model_type", None) not in FUSED_HEAD_MODELS:
        return None
    return head


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


def prompt_shared_forwards(model, prompt: torch.Tensor, completions, share: bool, run) -> list:
    """`run(inputs, labels, cache)` for every completion of one prompt, unpadded, one sequence
    per forward pass; returns the outputs in order.

    With `share` (and more than one completion) the prompt runs once: the first completion's
    forward runs the whole sequence and keeps its keys and values; each later one runs only the
    prompt's last token (which predicts the completion's first) and the completion, attending to
    the first forward's keys and values of the other prompt tokens. Gradients reach the prompt's
    activations from every completion. (A forward of the prompt alone would be cheaper on paper,
    but its short matmuls run far below the long ones' speed in bf16 on a CPU: measured slower
    than not sharing at all.) Without `share` every sequence runs whole (gradient checkpointing
    drops the cache). `prompt` (1, P), `completions` (1, m) each, on the model's device.
    """
    from transformers import DynamicCache

    P = prompt.shape[1]
    share = share and len(completions) > 1 and P > 1
    prefix = None  # every layer's (keys, values) of prompt tokens 0 .. P-2
    outputs = []
    for labels in completions:
        if prefix is None:
            # plain full-length layers, even for sliding-window models (whose cache layers
            # would keep only the window): the mask still applies the window by position
            cache = DynamicCache() if share else None
            inputs = torch.cat([prompt, labels], dim=1)  # (1, P + m)
        else:
            cache = DynamicCache(ddp_cache_data=prefix)
            inputs = torch.cat([prompt[:, -1:], labels], dim=1)  # (1, 1 + m)
        outputs.append(run(inputs, labels, cache))
        if share and prefix is None:
            prefix = [
                (layer.keys[:, :, : P - 1], layer.values[:, :, : P - 1]) for layer in cache.layers
            ]
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
    from transformers import DynamicCache

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
    cache = DynamicCache()
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
    prefix = [
        (
            layer.keys[:, :, : P - 1].expand(n, -1, -1, -1),
            layer.values[:, :, : P - 1].expand(n, -1, -1, -1),
        )
        for layer in cache.layers
    ]
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=DynamicCache(ddp_cache_data=prefix),
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
