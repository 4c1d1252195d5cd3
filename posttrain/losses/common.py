"""What every loss shares: the metrics type, token log-probs, the shape check, masked means.

    python -c "from posttrain.losses.common import token_logps; help(token_logps)"

The conventions of all losses are in posttrain/losses/__init__.py.
"""

from __future__ import annotations

import torch

from posttrain.losses.logprobs import chunked_token_logps

Metrics = dict[str, torch.Tensor]  # name -> 0-dim detached tensor


def metrics_to_floats(metrics: Metrics) -> dict[str, float]:
    """One device->host copy for all metrics (instead of one `.item()` sync each)."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """log softmax(logits)[label] per position, float32, (B, T); 0.0 where label == ignore_index.

    Memory-lean (posttrain.losses.logprobs): computed over chunks of positions, each upcast to
    float32 only while it is processed; backward keeps the logits as they are plus one float32
    logsumexp per position, never a float32 (B, T, V) copy.
    """
    return chunked_token_logps(logits, labels, ignore_index)


# ------------------------------------------------- helpers every loss module shares


def check_tokens(name: str, logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(
            f"{name}: expected logps and mask of one shape (B, T), got "
            f"{tuple(logps.shape)} and {tuple(mask.shape)}"
        )
    return mask.bool()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask==True entries, 0 when there are none; detached (for metrics)."""
    x = x.detach().float()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
