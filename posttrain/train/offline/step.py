"""The gradients of one offline optimizer step: this process's micro-batches, each one's loss
(SFT family or DPO family) scaled by its share of the global batch, backward, accumulated.

    python -c "from posttrain.train.offline.step import step_gradients; help(step_gradients)"

The loop that calls it, and why each loss is scaled by its share of the global batch (the
step's gradients then do not depend on the split into processes and accumulation steps), is
posttrain/train/offline/loop.py.
"""

from __future__ import annotations

import contextlib

import torch

from posttrain import losses
from posttrain.train.batches import collate, micro_batches
from posttrain.train.config import TrainConfig
from posttrain.train.data import Example
from posttrain.train.forward import completion_logps, split_pairs, unpadded_logps
from posttrain.train.modes import layout
from posttrain.train.moe import MoeRun

SFT_LOSSES = {"sft": losses.sft, "dft": losses.dft, "chord-phi": losses.sft_phi}
# method -> losses.dpo's loss_type (one of losses.preference.DPO_LOSS_TYPES); rpo is sigmoid
# DPO plus the chosen answer's NLL (nll_weight)
LOSS_TYPE_OF_METHOD = {
    "dpo": "sigmoid",
    "ipo": "ipo",
    "robust-dpo": "robust",
    "bdpo": "bdpo",
    "rpo": "sigmoid",
}


def global_units(examples: list[Example], cfg: TrainConfig) -> int:
    """What the step's loss averages over: completion tokens (SFT token_mean) or rows."""
    if not cfg.preference and cfg.sft_aggregation == "token_mean":
        return sum(len(e.completions[0]) for e in examples)
    return len(examples)


def micro_batch_loss(
    model,
    examples: list[Example],
    ref: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    pad_id: int,
    device,
    units: int,
    processes: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, int]:
    """(loss scaled to its share of the global batch, metrics, share, tokens processed).

    `units` is global_units() of the whole step; `ref` is (B, 2) reference log-probs.
    """
    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    how = layout(cfg, device)
    logps = (
        completion_logps(model, batch)
        if how == "longest"
        else unpadded_logps(model, examples, device, share_prompt=how == "shared")
    )  # (R, K) float32
    tokens = int(batch["attention_mask"].sum())
    if cfg.preference:
        policy_chosen, policy_rejected = split_pairs(logps.sum(-1))  # (B,), (B,)
        chosen_len, rejected_len = split_pairs(batch["completion_lengths"])
        ref = ref.to(device)
        chosen_nll = -policy_chosen / chosen_len.clamp(min=1) if cfg.nll_weight else None
        loss, metrics = losses.dpo(
            policy_chosen,
            policy_rejected,
            ref[:, 0],
            ref[:, 1],
            cfg.beta,
            loss_type=LOSS_TYPE_OF_METHOD[cfg.method],
            label_smoothing=cfg.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            bdpo_lambda=cfg.bdpo_lambda,
            nll_weight=cfg.nll_weight,
            chosen_nll=chosen_nll,
        )
        share = len(examples) / units
        return loss * (share * processes), metrics, share, tokens
    mask = batch["labels"] != -100  # (R, K)
    fn = SFT_LOSSES[cfg.method]
    if cfg.sft_aggregation == "token_mean":
        loss, metrics = fn(
            logps, mask, aggregation="token_mean", num_items_in_batch=units / processes
        )
        share = float(mask.sum()) / units
    else:
        loss, metrics = fn(logps, mask, aggregation=cfg.sft_aggregation)
        share = len(examples) / units
        loss = loss * (share * processes if cfg.sft_aggregation == "sequence_mean" else processes)
    metrics.pop("tokens", None)  # a count, not a mean: reported as `tokens` by the loop
    return loss, metrics, share, tokens


def step_gradients(
    policy,
    examples: list[Example],
    batch: list[int],
    ref: torch.Tensor | None,
    cfg: TrainConfig,
    accelerator,
    *,
    lengths: list[int],
    pad_id: int,
    moe: MoeRun = MoeRun(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Backward over this process's micro-batches of one global batch; gradients accumulate.

    Returns (this process's summed loss shares, summed metric shares, tokens it processed).
    Summed over processes and divided by their number, the loss is the global batch's loss.
    On an MoE model `moe` adds coef x the balance loss of each micro-batch, with its share.
    """
    P = accelerator.num_processes
    units = global_units([examples[i] for i in batch], cfg)
    one_by_one = layout(cfg, accelerator.device) != "longest"

    def micro(rank: int) -> list[list[int]]:
        runs = micro_batches(batch, lengths, P, rank, cfg.grad_accum)
        # padding none: every row its own micro-batch (its graph is freed by its backward)
        return [[i] for run in runs for i in run] if one_by_one else runs

    mine = micro(accelerator.process_index)
    real = len(mine)
    if getattr(accelerator, "sharded", False):
        # FSDP2's forward and backward are collectives: a process with fewer micro-batches
        # (a short last batch) repeats its first one with zero weight, as often as the busiest.
        most = max(len(micro(r)) for r in range(P))
        mine = mine + [mine[0]] * (most - real)
    loss_sum = torch.zeros((), device=accelerator.device)
    metric_sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for i, rows in enumerate(mine):
        sync = i == len(mine) - 1  # DDP all-reduces gradients on the last backward only
        with contextlib.nullcontext() if sync or P == 1 else accelerator.no_sync(policy):
            with moe.record(policy) as routing:
                loss, metrics, share, n_tokens = micro_batch_loss(
                    policy,
                    [examples[j] for j in rows],
                    ref[rows] if ref is not None else None,
                    cfg,
                    pad_id=pad_id,
                    device=accelerator.device,
                    units=units,
                    processes=P,
                )
            loss = moe.add_aux(loss, metrics, routing, share * P)
            accelerator.backward(loss if i < real else loss * 0.0)
        if i >= real:
            continue
        loss_sum += loss.detach().float()
        tokens += n_tokens
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float() * share
    return loss_sum, metric_sums, tokens
