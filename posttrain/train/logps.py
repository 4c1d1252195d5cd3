"""Per-token log-probabilities of the completions in a collated batch (one forward pass).

    python -c "from posttrain.train.logps import completion_logps; help(completion_logps)"

Only the last K + 1 positions get logits (`logits_to_keep`): with left padding every completion
ends at the last position, so the language-model head and the log-softmax never run over prompt
tokens, which on a 49k-token vocabulary is a large share of the compute and memory.
"""

from __future__ import annotations

import torch

from ..losses import token_logps


def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, K) float32 log p(token) on completion tokens, 0.0 elsewhere (see batches.collate)."""
    labels = batch["labels"]  # (R, K)
    K = labels.shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=K + 1, use_cache=False)
    logits = out.logits[:, :-1]  # (R, K, V): position t predicts token t + 1
    return token_logps(logits, labels)  # (R, K)


def split_pairs(per_sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) values of a pair batch -> chosen (B,), rejected (B,) (collate's row order)."""
    half = per_sequence.shape[0] // 2
    return per_sequence[:half], per_sequence[half:]


@torch.no_grad()
def reference_logps(model, examples, *, batch_size: int, pad_id: int, device) -> torch.Tensor:
    """(N, 2) summed completion log-probs (chosen, rejected) of `model` for every pair.

    Rows are processed longest first so each batch pads little; the result is in input order.
    """
    from .batches import collate

    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        chosen, rejected = split_pairs(completion_logps(model, batch).sum(-1))
        out[idx, 0] = chosen.float().cpu()
        out[idx, 1] = rejected.float().cpu()
    model.train(was_training)
    return out
