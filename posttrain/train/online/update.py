"""The online trainer's forward and backward passes over a step's rollouts (and CHORD's demos).

    python -c "from posttrain.train.online.update import micro_batch_weight; help(micro_batch_weight)"

The policy trained is the distribution the rollouts were sampled from: softmax(logits / T)
with T the sampling temperature, so the log-probs, ratios, KL and entropy are all of the
tempered logits. The engines report log-probs under the raw distribution (T = 1; engines/base.py
Completion.token_logprobs), so the sync check and the rollout correction compare them with the
trainer's raw log-probs of the same forward (one more logsumexp, no gradient; none at T = 1):
raw against raw, tempered against nothing else. At T = 1 the two are the same.

One step's update (update_policy): old and reference log-probs when needed, then
`updates_per_batch` optimizer steps, the first one checking the engine's sync.
Per step: the micro-batches' losses are scaled so that, summed over micro-batches (and averaged
over processes by DDP), they are the loss of the whole step (micro_batch_weight).
"""

from __future__ import annotations

import contextlib

import torch

from posttrain.losses import (
    chord_loss,
    distill_advantages,
    metrics_to_floats,
    policy_loss,
    sft,
    sft_phi,
    token_logps,
)
from posttrain.losses.logprobs import token_entropy
from posttrain.losses.offpolicy import cispo_loss, mismatch_metrics, rollout_weights
from posttrain.train.forward import completion_logps, group_logits
from posttrain.train.metrics import check_finite
from posttrain.train.moe import MoeRun
from posttrain.train.moe.replay import StepRouting
from posttrain.train.online.reduce import sum_over_processes, token_means
from posttrain.train.online.rollout_engine import check_sync
from posttrain.train.online.teacher import teacher_logps
from posttrain.train.parallel.checkpoint import latest_checkpoint


def batch_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw logits (b, K, V) that predict a micro-batch's K completion positions, in either
    layout of rollouts.rollout_batches."""
    K = batch["labels"].shape[1]
    if "completion_ids" in batch:  # one group, unpadded (rollouts.rollout_batches layouts)
        return group_logits(model, batch)  # (b, K, V)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=K + 1,
        use_cache=False,
    ).logits[:, :-1]  # (b, K, V): position t predicts token t


def sampled_logps(model, batch: dict[str, torch.Tensor], temperature: float, *, raw: bool = False):
    """One forward: (tempered log-probs with gradient, raw log-probs or None, entropy of the
    tempered distribution), each (b, K) on the completion tokens, 0 elsewhere."""
    logits = batch_logits(model, batch)  # (b, K, V)
    scaled = logits / temperature if temperature != 1.0 else logits  # (b, K, V)
    logps = token_logps(scaled, batch["labels"])  # (b, K)
    with torch.no_grad():
        entropy = token_entropy(scaled.detach())  # (b, K), float32 a chunk of positions at a time
        raw_logps = None
        if raw:
            raw_logps = (
                logps.detach()
                if scaled is logits
                else token_logps(logits.detach(), batch["labels"])
            )
    return logps, raw_logps, entropy


def micro_batch_weight(
    aggregation: str, rows: int, total_rows: int, n_micro: int, processes: int = 1
) -> float:
    """The factor that makes the summed micro-batch losses the loss of the whole step.

    grpo and dr_grpo are means over a micro-batch's sequences: weight rows / total rows (over
    all processes), times the number of processes because DDP averages gradients. dapo is
    given the whole step's token count (`num_items_in_batch`): weight = processes. token_mean
    normalises by each micro-batch's own tokens (TRL's "bnpo"): the mean of this process's.
    """
    if aggregation in ("grpo", "dr_grpo"):
        return rows / total_rows * processes
    if aggregation == "dapo":
        return float(processes)
    return 1.0 / n_micro


@torch.no_grad()
def frozen_logps(
    model,
    batches: list[tuple[dict, slice]],
    temperature: float,
    *,
    reference: bool,
    routing: StepRouting | None = None,
) -> list:
    """Tempered completion log-probs per micro-batch, without gradients: of the policy as it
    is now (the old log-probs; on an MoE model `routing` forces and keeps its routing) or of
    the base model with the adapter disabled (KL reference; routed by its own routers)."""

    def one(i, b):
        if routing is None:
            return sampled_logps(model, b, temperature)[0]
        with routing.control(model, i, "old") as ctl:
            out = sampled_logps(model, b, temperature)[0]
        routing.captured(i, "old", ctl)
        return out

    if reference:
        with model.disable_adapter():
            return [sampled_logps(model, b, temperature)[0] for b, _ in batches]
    return [one(i, b) for i, (b, _) in enumerate(batches)]


def step_loss(
    cfg,
    logps,
    old_logps,
    advantages,
    mask,
    *,
    ref=None,
    is_weights=None,
    total_tokens: float | None = None,
):
    """The loss `cfg` names over one micro-batch: losses.policy_loss (PPO clip; GSPO with
    ratio_level sequence) or offpolicy.cispo_loss, with the method's clip range, aggregation,
    KL and rollout-correction weights. `total_tokens`: the step's token count (dapo)."""
    kwargs = dict(
        clip_low=cfg.clip_low,
        aggregation=cfg.aggregation,
        ref_logps=ref,
        kl_beta=cfg.kl_beta,
        max_completion_length=cfg.max_new_tokens,
        is_weights=is_weights,
        num_items_in_batch=max(total_tokens or 0.0, 1.0)
        if cfg.aggregation == "dapo" and total_tokens is not None
        else None,
    )
    if cfg.loss == "cispo":
        high = cfg.clip_high if cfg.clip_high is not None else cfg.clip_low
        return cispo_loss(logps, old_logps, advantages, mask, clip_high=high, **kwargs)
    return policy_loss(
        logps,
        old_logps,
        advantages,
        mask,
        clip_high=cfg.clip_high,
        ratio_level=cfg.ratio_level,
        **kwargs,
    )


def policy_backward(
    model,
    batches,
    advantages: torch.Tensor,
    old: list | None,
    ref: list | None,
    cfg,
    *,
    mu: float | None,
    total_rows: int,
    total_tokens: float,
    processes: int = 1,
    weights: list | None = None,
    no_sync=None,
    moe: MoeRun = MoeRun(),
    routing: StepRouting | None = None,
    update: int = 0,
    teacher: list | None = None,
) -> tuple[dict[str, float], list | None]:
    """Backward over this process's rollout micro-batches; gradients accumulate.

    `advantages` are this process's rows; `total_rows` / `total_tokens` count the whole step
    over all processes. `weights`: rollout-correction weights from the first update (None on
    it: they are computed here from the engine's log-probs, with the mismatch metrics, and
    returned for the later updates). `no_sync`: a context that skips DDP's all-reduce, used
    on every micro-batch but the last. For CHORD each loss is scaled by (1 - mu). On an MoE
    model `moe` adds coef x the balance loss, token-weighted like the logged metrics, and
    `routing` forces (moe.replay) and keeps the routing of update number `update`.
    `teacher` (method distill): the teacher's log-probs per micro-batch; each token's advantage
    is then log p_teacher - log p_student of the sampling policy (the old log-probs, or this
    forward's on the one update of updates_per_batch 1) + distill.reward_weight x `advantages`.
    Returns (token-weighted sums of the metrics, with "tokens"; the correction weights).
    """
    r = cfg.rollout
    first = weights is None
    weights = [] if first else weights
    sums: dict[str, float] = {"loss/policy": 0.0, "tokens": 0.0, "mismatch/abs_logp_max": 0.0}
    for i, (batch, rows) in enumerate(batches):
        mask = batch["labels"] != -100  # (b, K)
        engine_logps = batch.get("rollout_logps")  # (b, K) raw, or None
        routes = contextlib.nullcontext() if routing is None else routing.control(model, i, update)
        with moe.record(model) as recorded, routes as ctl:
            logps, raw, entropy = sampled_logps(
                model, batch, cfg.temperature, raw=first and engine_logps is not None
            )
        if routing is not None:
            routing.captured(i, update, ctl)
        values: dict[str, float] = {}
        if first:
            w = None
            if raw is not None:
                values.update(metrics_to_floats(mismatch_metrics(raw, engine_logps, mask)))
                if r.correction != "none":
                    w, m = rollout_weights(
                        raw,
                        engine_logps,
                        mask,
                        mode=r.correction,
                        level=r.correction_level,
                        cap=r.tis_cap,
                        low=r.mis_low,
                        high=r.mis_high,
                    )
                    values.update(metrics_to_floats(m))
            weights.append(w)
        adv = advantages[rows].to(logps.device)  # (b,)
        if teacher is not None:
            student = logps.detach() if old is None else old[i]  # the sampling policy's
            adv, distilled = distill_advantages(
                teacher[i],
                student,
                mask,
                sequence_advantages=adv,
                reward_weight=cfg.distill.reward_weight,
            )  # (b, K)
            values.update(metrics_to_floats(distilled))
        loss, metrics = step_loss(
            cfg,
            logps,
            None if old is None else old[i],
            adv,
            mask,
            ref=None if ref is None else ref[i],
            is_weights=weights[i],
            total_tokens=total_tokens,
        )
        loss = loss * micro_batch_weight(
            cfg.aggregation, rows.stop - rows.start, total_rows, len(batches), processes
        )
        n = float(mask.sum())
        # DDP averages gradients over the P processes: the factor P here undoes that for the
        # gradient; the logged loss/aux is the unscaled balance loss (token means over all)
        total = moe.add_aux(loss, metrics, recorded, n / max(total_tokens, 1.0) * processes)
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            (total if mu is None else chord_loss(total, torch.zeros_like(loss), mu)).backward()
        values.update(metrics_to_floats(metrics))
        values["entropy"] = float(entropy[mask].mean()) if n else 0.0
        for k, v in values.items():  # token-weighted: the step's values are token means
            if k == "mismatch/abs_logp_max":
                sums[k] = max(sums[k], v)
            else:
                sums[k] = sums.get(k, 0.0) + v * n
        sums["loss/policy"] += float(loss.detach())
        sums["tokens"] += n
    return sums, weights


def sft_backward(
    model, batches: list[dict], cfg, mu: float, moe: MoeRun = MoeRun()
) -> dict[str, float]:
    """CHORD's SFT part: mu * (plain or phi-weighted) NLL, a token mean over every
    demonstration token of the step; backward per micro-batch. The demonstrations are
    trained at the raw distribution (T = 1), as SFT is."""
    loss_fn = sft_phi if cfg.chord.variant == "phi" else sft
    total = float(sum(int((b["labels"] != -100).sum()) for b in batches))
    sums: dict[str, float] = {"loss/sft": 0.0}
    for batch in batches:
        mask = batch["labels"] != -100  # (b, K)
        with moe.record(model) as routing:
            logps = completion_logps(model, batch)
        loss, metrics = loss_fn(logps, mask, num_items_in_batch=max(total, 1.0))
        share = float(mask.sum()) / max(total, 1.0)
        chord_loss(
            torch.zeros_like(loss), moe.add_aux(loss, metrics, routing, share), mu
        ).backward()
        for k, v in metrics_to_floats(metrics).items():
            if k != "tokens":
                sums[f"sft/{k}"] = sums.get(f"sft/{k}", 0.0) + v * share
        sums["loss/sft"] += float(loss.detach())
    sums["sft/tokens"] = total
    return sums


def step_loss_value(metrics: dict[str, float], mu: float | None, moe: MoeRun = MoeRun()) -> float:
    """The step's loss as logged, from its metrics: the policy loss (CHORD: mixed with the SFT
    loss by mu, losses.chord_loss) plus coef x the MoE balance loss."""
    policy = metrics.get("loss/policy", 0.0)
    if mu is not None:
        policy = float(chord_loss(torch.tensor(policy), torch.tensor(metrics["loss/sft"]), mu))
    return policy + moe.aux_term(metrics, mu)


def update_policy(
    run,
    cfg,
    batches: list,
    advantages: torch.Tensor | None,
    demo_batches: list,
    *,
    mu: float | None,
    moe: MoeRun,
    total_rows: int,
    tokens: float,
    max_kl: float,
    step: int,
    row: dict,
    teacher=None,
) -> int:
    """`updates_per_batch` optimizer steps (`run`: skeleton.Run) on one step's rollouts (`advantages` None: no group
    kept) and CHORD's demonstrations (`mu` not None); adds their metrics to `row`; returns
    the number of updates taken. `teacher`: the teacher model of method distill."""
    procs, trained, policy = run.procs, run.policy, run.model
    sampled, U = advantages is not None, cfg.updates_per_batch
    routing = (
        StepRouting(moe.replay, batches, U, cfg.rollout.engine.kind)
        if sampled and moe.shape is not None and batches and "routes" in batches[0][0]
        else None
    )
    # Old log-probs matter only once the policy has moved within the batch.
    old = (
        frozen_logps(policy, batches, cfg.temperature, reference=False, routing=routing)
        if sampled and U > 1
        else None
    )
    ref = (
        frozen_logps(policy, batches, cfg.temperature, reference=True)
        if sampled and cfg.kl_beta > 0
        else None
    )
    scored = (
        teacher_logps(teacher, batches, cfg.temperature)
        if sampled and teacher is not None
        else None
    )
    updates, weights = 0, None
    policy.train(cfg.gradient_checkpointing)  # dropout is off either way
    for update in range(U if (sampled or mu is not None) else 0):
        metrics: dict = {}
        if sampled:
            sums, weights = policy_backward(
                trained,
                batches,
                advantages,
                old,
                ref,
                cfg,
                mu=mu,
                total_rows=total_rows,
                total_tokens=tokens,
                processes=procs.num_processes,
                weights=weights,
                no_sync=lambda: procs.no_sync(trained),
                moe=moe,
                routing=routing,
                update=update,
                teacher=scored,
            )
            metrics = token_means(procs, sums)
        if update == 0:
            check_sync(
                {"step": step + 1, **metrics}, max_kl, cfg.rollout.engine.kind, sampled=sampled
            )
        if mu is not None:
            metrics.update(sft_backward(trained, demo_batches, cfg, mu, moe=moe))
        loss = step_loss_value(metrics, mu, moe)
        grad_norm = procs.clip(trained, cfg.max_grad_norm)  # over all shards
        check_finite(step + 1, loss, grad_norm, latest_checkpoint(run.out))
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        updates += 1
        metrics.update(loss=loss, grad_norm=grad_norm)
        if update == 0:
            # Loss, entropy, KL and mismatch of the sampling policy (the first update) ...
            row.update(metrics)
        # ... clipping of the last: it only happens once the policy has moved.
        row.update({k: v for k, v in metrics.items() if k.startswith("clip_ratio/")})
    policy.eval()
    if routing is not None:  # shares over every process's (token, layer) cells
        for name, (count, total) in routing.counts().items():
            total = sum_over_processes(procs, float(total))
            row[name] = sum_over_processes(procs, float(count)) / total if total else None
    return updates
