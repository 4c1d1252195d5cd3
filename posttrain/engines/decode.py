"""A decoding loop that drops each sequence from the batch as soon as it ends.

    python -c "from posttrain.engines.decode import decode; help(decode)"

`model.generate` keeps every row of a batch until the longest one ends, so a batch of 32 where
one answer rambles to `max_new_tokens` costs 32 full-length rows. Here a finished row leaves the
KV cache at once and each step costs only the rows still going: on SmolLM2 (CPU, fp32) where
answers average about half of `max_new_tokens`, that is most of the difference between decode
cost and useful tokens (bench/sample_throughput.py).

Per step, for the rows still alive: one forward pass of the last token with the cache, then
log p(token) under the raw distribution (temperature 1, no top-p) for the chosen token, which is
what pair selection and policy gradients need; the token itself is the argmax (temperature 0)
or a draw from softmax(logits / T) restricted to the top-p nucleus. With `max_positions` (the
model's context) a row also ends, cut at length, when prompt + answer fill the context: nothing
is generated past the positions the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    token_ids: list[int]  # generated ids, the end-of-sequence token included when it came
    logprobs: list[float]  # raw log p of each generated id
    finish_reason: str  # "stop" (an end-of-sequence id) | "length" (max_new_tokens reached)


def choose_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(A, V) float logits -> (A,) ids: argmax when temperature <= 0, else a nucleus sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (A, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_positions: int | None = None,
    trace: list | None = None,
) -> list[Decoded]:
    """Generate from a left-padded batch (B, T); returns one `Decoded` per row, in order.
    With `max_positions`, every prompt must leave room for one new token (ValueError).
    `trace`: a list that gets, per model forward, the batch rows it ran (the first: all B,
    every position; then one new token of each row still going)."""
    from transformers import DynamicCache

    B = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    finish = ["length"] * B
    if max_new_tokens <= 0:
        return [Decoded([], [], "length") for _ in range(B)]
    # new tokens each row may take: max_new_tokens, or fewer where the context ends first
    room = [max_new_tokens] * B
    if max_positions is not None:
        prompt_lengths = attention_mask.sum(-1).tolist()
        room = [min(max_new_tokens, max_positions - p) for p in prompt_lengths]
        if min(room) < 1:
            raise ValueError(
                f"a prompt of {max(prompt_lengths)} tokens leaves no room in the model's "
                f"context of {max_positions}"
            )
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    cache = DynamicCache()
    alive = torch.arange(B)  # original row of each cache row
    mask = attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding starts at 0
    if trace is not None:
        trace.append(alive.tolist())
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (A, V)
        chosen = choose_tokens(logits, temperature, top_p, generator)  # (A,)
        chosen_logp = torch.log_softmax(logits, -1).gather(-1, chosen[:, None]).squeeze(-1)
        ended = torch.isin(chosen, eos)  # (A,)
        full = torch.tensor([len(tokens[r]) + 1 >= room[r] for r in alive.tolist()])  # (A,)
        for row, t, lp, done in zip(
            alive.tolist(), chosen.tolist(), chosen_logp.tolist(), ended.tolist()
        ):
            tokens[row].append(t)
            logps[row].append(lp)
            if done:
                finish[row] = "stop"
        if step == max_new_tokens - 1:
            break
        keep = (~(ended | full.to(ended.device))).nonzero().squeeze(-1)  # (A',)
        if keep.numel() == 0:
            break
        if keep.numel() < len(alive):
            cache.batch_select_indices(keep)
            alive, mask, chosen = alive[keep.cpu()], mask[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)  # (A', T + step + 1)
        if trace is not None:
            trace.append(alive.tolist())
        out = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        )
    return [Decoded(tokens[i], logps[i], finish[i]) for i in range(B)]
