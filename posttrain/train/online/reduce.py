"""What the online loop exchanges between its processes: every process's rollouts and rewards
(gathered), token counts (summed), and the token means of policy_backward's sums.

    torchrun --nproc_per_node 2 -m posttrain.cli train --method grpo ...   # where P > 1

In a single process nothing is exchanged: gather_rollouts and sum_over_processes return their
input, token_means divides this process's own sums.
Called by posttrain/train/online/loop.py.
"""

from __future__ import annotations

import torch


def gather_rollouts(accelerator, everything: list, kept_rewards: list[float]) -> tuple[list, list]:
    """Every process's rollouts and kept rewards, in rank order (itself alone: unchanged)."""
    if accelerator.num_processes == 1:
        return everything, kept_rewards
    from accelerate.utils import gather_object

    parts = gather_object([(everything, kept_rewards)])
    return [r for e, _ in parts for r in e], [x for _, k in parts for x in k]


def sum_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum"))


def token_means(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """policy_backward's token-weighted sums over every process -> token means; the loss is
    the sum of its scaled parts over processes / P, mismatch/abs_logp_max the maximum."""
    names = sorted(k for k in sums if k not in ("tokens", "mismatch/abs_logp_max"))
    P = accelerator.num_processes
    values = torch.tensor([sums["tokens"], *[sums[k] for k in names]], dtype=torch.float64)
    peak = torch.tensor(sums["mismatch/abs_logp_max"], dtype=torch.float64)
    if P > 1:
        import torch.distributed as dist

        values, peak = values.to(accelerator.device), peak.to(accelerator.device)
        dist.all_reduce(values)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens, *rest = values.tolist()
    out = {k: v / max(tokens, 1.0) for k, v in zip(names, rest)}
    out["loss/policy"] = dict(zip(names, rest))["loss/policy"] / P
    if any(k.startswith("mismatch/") for k in names):
        out["mismatch/abs_logp_max"] = float(peak)
    return out
