"""AdamW over the trainable parameters and the learning-rate schedule (warmup, then decay).

    python -c "from posttrain.train.optim import lr_factor; print(lr_factor(5, 10, 2, 'cosine'))"

Shared by the offline and online trainers.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW on parameters with requires_grad; biases and norms get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 gets 1 / warmup_steps, not 0, so no step is
    wasted), then decay from 1 to `min_ratio` at the last step:
    cosine: min + (1 - min) (1 + cos(pi p)) / 2; linear: 1 - (1 - min) p; constant: 1,
    where p = (step - warmup) / (total - warmup - 1) runs 0 -> 1.
    total 10, warmup 2, cosine: steps 0, 1 -> 0.5, 1.0; step 2 -> 1.0; step 9 -> 0.0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - (1 - min_ratio) * progress
    raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule, min_ratio)
    )


def lr_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> float:
    """The lr optimizer step `step` (0-based) used, whatever the scheduler did since."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the trainable gradients to `max_norm` (0: no clipping); returns the norm before.

    Sharded (FSDP2) gradients are DTensors: clip_grad_norm_ reduces the shards' norms over the
    mesh into the whole gradient's norm (a replicated DTensor) and scales every shard by the
    same factor. Plain tensors (1 process, or DDP after its all-reduce) are whole already.
    """
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
