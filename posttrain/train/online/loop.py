"""Online RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, GSPO, CISPO and CHORD, in one loop.

    posttrain train --method grpo --problems "builtin:arith:512?split=train" --out runs/grpo \
        --set max_steps=40 --set num_generations=4 [--set chord.demos=demos.jsonl] [--resume]
    torchrun --nproc_per_node 2 -m posttrain.cli train --method grpo --out runs/grpo2 ...

The loop, top to bottom, per step: draw `problems_per_step` problems (each process its share;
a group is never split), sample G completions of each through the rollout engine
(train/online/rollout_engine.py) and grade them (train/online/rollouts.py), gather the rewards of every
process and turn them into group-normalised advantages, then take `updates_per_batch`
optimizer steps on the batch (train/online/update.py; losses in posttrain/losses/ and
posttrain/losses/offpolicy.py). The first update's forward also checks that the engine sampled the
current policy (mismatch/* metrics; RolloutSyncError past rollout.max_mismatch_kl) and gives
the rollout-correction weights. After the update a detached engine gets the new adapter
(colocated vLLM sleeps during the update with rollout.sleep, CUDA only).
CHORD adds demonstrations to every step: (1 - mu) * policy loss + mu * SFT.
On a CPU (padding auto -> none) each group is one micro-batch whose prompt runs once
(logps.group_logits); elsewhere left-padded micro-batches of micro_batch_size completions.

Choices worth knowing:
- Dropout stays off for the whole run (the policy stays in eval mode; gradients still flow), so
  a batch's first update sees ratio exactly 1 and the engine samples the policy that is trained.
- The policy trained is softmax(logits / temperature), the distribution sampled from.
- Old log-probs are recomputed in a no-grad pass through the training forward, not taken from
  the engine (whose numerics differ): the PPO ratio measures the policy's change; the engine's
  log-probs are used only for the sync check and the rollout correction.
- The KL reference is the model with the adapter disabled (refused with PiSSA / OLoRA, whose
  residual base is not the model trained from); computed only when kl_beta > 0.
- Reported rewards are over every completion sampled in a step (all processes), before
  dynamic sampling drops groups.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from posttrain.config import ConfigError, save_config
from posttrain.losses import group_advantages, mu_schedule
from posttrain.models import load_model, load_tokenizer, resolve_dtype
from posttrain.records import Problem
from posttrain.train.parallel.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    parameters_finite,
    save_atomic,
    save_checkpoint,
    save_final,
    start_run,
)
from posttrain.train.data import load_examples
from posttrain.train.lora import apply_lora, format_parameter_report, parameter_report
from posttrain.train.metrics import MetricsLog, NonFiniteError, check_finite
from posttrain.train.modes import checkpoint_without_dropout, layout, set_attention
from posttrain.train.moe import MoeRun, probe_prompt
from posttrain.train.online.config import METHODS, RESUME_MAY_CHANGE, OnlineConfig, online_config
from posttrain.train.online.reduce import gather_rollouts, sum_over_processes, token_means
from posttrain.train.optim import clip_gradients, lr_at, make_optimizer, make_scheduler
from posttrain.train.online.update import (
    frozen_logps,
    policy_backward,
    sft_backward,
    step_loss_value,
)
from posttrain.train.online.problem_stream import ShuffledStream
from posttrain.train.online.rollout_engine import (
    AdapterSync,
    check_sync,
    detached_base,
    make_rollout_engine,
    mismatch_threshold,
)
from posttrain.train.online.rollouts import (
    collect_rollouts,
    demonstration_batches,
    rollout_batches,
    rollout_stats,
    score_completion,
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

__all__ = [
    "ConfigError",
    "METHODS",
    "NonFiniteError",
    "OnlineConfig",
    "online_config",
    "train_online",
]


def train_online(
    cfg: OnlineConfig,
    out: str | Path,
    *,
    resume: bool = False,
    model=None,
    tokenizer=None,
    problems: list[Problem] | None = None,
    score=score_completion,
    progress: bool = False,
    engine=None,
) -> dict:
    """Run (or resume) online RL into `out`; returns a summary dict.

    Writes out/config.yaml, out/metrics.jsonl (one line per rollout step), out/checkpoints/ and
    at the end out/adapter/. Tests pass a tiny `model`, `problems`, a stub `score` and may pass
    the rollout `engine` (an AdapterEngine when rollout.sync is adapter).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.check()
    out = Path(out)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    P, rank, main = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    if cfg.problems_per_step % P or (P > 1 and cfg.dynamic_sampling):
        raise ConfigError(
            f"problems_per_step {cfg.problems_per_step} must be a multiple of the "
            f"{P} processes, and dynamic_sampling is single-process for now"
        )
    device = accelerator.device
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)

    tokenizer = tokenizer or load_tokenizer(cfg.model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if problems is None:
        from posttrain.tasks import load_problems

        problems = load_problems(cfg.problems, limit=cfg.limit or None)
    chord = cfg.method == "chord"
    demos = None
    if chord:
        demos, report = load_examples(
            cfg.chord.demos, tokenizer, preference=False, max_length=cfg.chord.max_length
        )
        _say(main, f"demonstrations: {report.summary()}")
    dtype = resolve_dtype(cfg.dtype, device)
    if model is None:
        model = load_model(cfg.model, dtype=dtype)
    model.to(device)
    prompts = (probe_prompt(tokenizer, p, cfg.system_prompt) for p in problems[:256])  # a sample
    longest = max(map(len, prompts), default=0)
    attention = set_attention(model, cfg.attention, device.type, longest + cfg.max_new_tokens)
    how = layout(cfg, device)  # shared: each group a micro-batch, its prompt run once
    moe = MoeRun.setup(
        model,
        cfg.router_aux_loss_coef,
        cfg.moe,
        problems,
        lambda p: probe_prompt(tokenizer, p, cfg.system_prompt),
        seed=cfg.seed,
        pad_id=pad_id,
    )
    detached = cfg.rollout.sync == "adapter" and engine is None and cfg.rollout.engine.kind == "hf"
    base_copy = detached_base(model) if detached else None  # the engine's own weights
    policy = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        checkpoint_without_dropout(policy)  # updates in train mode, dropout zeroed
    policy.eval()  # dropout off for the whole run (module docstring); gradients still flow
    if progress:
        _say(main, format_parameter_report(parameter_report(policy)))
        _say(main, f"{cfg.method}: {cfg.model} in {dtype}, {attention} attention, {how} layout")
    init_adapter = out / "adapter-init"
    if cfg.lora.enabled and cfg.lora.init != "default":
        # PiSSA / OLoRA move part of the base weights into the adapter; the initial adapter
        # converts the synced and the final adapters into plain LoRAs of the untouched base.
        if main and not init_adapter.exists():
            save_atomic(lambda d: policy.save_pretrained(d), init_adapter)
        accelerator.wait_for_everyone()
    else:
        init_adapter = None

    total = cfg.max_steps * cfg.updates_per_batch  # optimizer steps
    optimizer = make_optimizer(
        policy, cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas, eps=cfg.adam_eps
    )
    scheduler = make_scheduler(
        optimizer,
        total_steps=total,
        warmup_steps=round(cfg.warmup_ratio * total),
        schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    state: dict = {}
    if resume and last is not None:
        state = load_checkpoint(last, policy, optimizer, scheduler, rank=rank)
        _say(main, f"resumed from {last} (step {state['step']} of {cfg.max_steps})")
    start = int(state.get("step", 0))
    stream = ShuffledStream(problems, cfg.seed, drawn=int(state.get("problems_drawn", 0)))
    demo_stream = (
        ShuffledStream(demos, cfg.seed + 1, drawn=int(state.get("demos_drawn", 0)))
        if chord
        else None
    )
    if main:
        save_config(cfg, out / "config.yaml")
    log = MetricsLog(
        out / "metrics.jsonl",
        resume_step=start,
        enabled=main,
        trackers=cfg.trackers,
        config=asdict(cfg),
    )
    trained = accelerator.prepare_model(policy) if P > 1 else policy  # DDP under torchrun
    no_sync = (lambda: trained.no_sync()) if P > 1 else None
    owned = engine is None  # an engine built here is closed here (vLLM workers, connections)
    engine = engine or make_rollout_engine(cfg, policy, tokenizer, base_model=base_copy)
    sync = (
        AdapterSync(engine, out, init_adapter, main, accelerator.wait_for_everyone)
        if cfg.rollout.sync == "adapter"
        else None
    )
    if sync:
        sync(policy, start)  # the engine samples the first step with the policy as it is now
    G, U = cfg.num_generations, cfg.updates_per_batch
    # the dtype the model really has (a model passed in may differ from cfg.dtype)
    max_kl = mismatch_threshold(cfg.rollout.max_mismatch_kl, DTYPE_NAMES.get(model.dtype, "bf16"))
    stop = min(cfg.max_steps, cfg.stop_after_steps) if cfg.stop_after_steps else cfg.max_steps

    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=f"train {cfg.method}",
        unit="step",
        disable=not (progress and main),
    )
    row: dict = {}
    for step in range(start, stop):
        t0 = time.perf_counter()
        kept, everything, info = collect_rollouts(
            engine, tokenizer, stream, cfg, step, score, rank=rank, processes=P
        )
        t1 = time.perf_counter()
        every_rank, kept_rewards = gather_rollouts(
            accelerator, everything, [r.reward for r in kept]
        )
        row = {
            "step": step + 1,
            **rollout_stats(every_rank, G),
            "groups_kept": len(kept_rewards) // G,
            **{k: v for k, v in info.items() if not k.startswith("time/")},
        }
        mu = (
            mu_schedule(
                step,
                cfg.chord.mu_warmup_steps,
                cfg.chord.mu_decay_steps,
                cfg.chord.mu_peak,
                cfg.chord.mu_valley,
            )
            if chord
            else None
        )
        demo_batches = []
        if chord:
            chosen = demo_stream.take(max(1, round(cfg.chord.ratio * cfg.problems_per_step)))
            demo_batches = demonstration_batches(chosen, cfg.micro_batch_size, pad_id, device)
        asleep = cfg.rollout.sleep  # colocated vLLM frees the GPU for the update
        if asleep:
            row["rollout/sleep_freed_gib"] = engine.sleep()
        batches = rollout_batches(
            kept, cfg.micro_batch_size, pad_id, cfg.mask_truncated, device, layout=how, group_size=G
        )
        advantages = None
        if kept:  # computed over every process's groups; this process keeps its rows
            everyone = group_advantages(torch.tensor(kept_rewards), G, cfg.advantage_scale)
            advantages = everyone[rank * len(kept) : (rank + 1) * len(kept)]
        tokens = sum_over_processes(
            accelerator, float(sum(int((b["labels"] != -100).sum()) for b, _ in batches))
        )
        # Old log-probs matter only once the policy has moved within the batch.
        old = (
            frozen_logps(policy, batches, cfg.temperature, reference=False)
            if kept and U > 1
            else None
        )
        ref = (
            frozen_logps(policy, batches, cfg.temperature, reference=True)
            if kept and cfg.kl_beta > 0
            else None
        )
        updates, weights = 0, None
        policy.train(cfg.gradient_checkpointing)  # dropout is off either way
        for update in range(U if (kept or chord) else 0):
            metrics: dict = {}
            if kept:
                sums, weights = policy_backward(
                    trained,
                    batches,
                    advantages,
                    old,
                    ref,
                    cfg,
                    mu=mu,
                    total_rows=len(kept_rewards),
                    total_tokens=tokens,
                    processes=P,
                    weights=weights,
                    no_sync=no_sync,
                    moe=moe,
                )
                metrics = token_means(accelerator, sums)
            if update == 0:
                check_sync(
                    {"step": step + 1, **metrics},
                    max_kl,
                    cfg.rollout.engine.kind,
                    sampled=bool(kept),
                )
            if chord:
                metrics.update(sft_backward(trained, demo_batches, cfg, mu, moe=moe))
            loss = step_loss_value(metrics, mu, moe)
            grad_norm = clip_gradients(policy, cfg.max_grad_norm)
            check_finite(step + 1, loss, grad_norm, latest_checkpoint(out))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            metrics.update(loss=loss, grad_norm=grad_norm)
            if update == 0:
                # Loss, entropy, KL and mismatch of the sampling policy (the first update) ...
                row.update(metrics)
            # ... clipping of the last: it only happens once the policy has moved.
            row.update({k: v for k, v in metrics.items() if k.startswith("clip_ratio/")})
        policy.eval()
        t2 = time.perf_counter()
        if asleep:
            engine.wake_up()
        if sync:
            sync(policy, step + 1)  # the next step samples the updated policy
        row.setdefault("kl", None)  # computed only when kl_beta > 0
        row.update(moe.stats(policy, step + 1, last=step + 1 == stop))
        row.update(
            {
                "mu": mu,
                "updates": updates,
                "lr": lr_at(scheduler, step * U),
                "time/generate": info["time/generate"],
                "time/grade": info["time/grade"],
                "time/train": t2 - t1,
                "time/sync": time.perf_counter() - t2,
                "generation_share": info["time/generate"] / max(time.perf_counter() - t0, 1e-9),
            }
        )
        log.write(row)
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['reward/mean']:.3f}", length=f"{row['completion_length/mean']:.0f}"
        )
        done = step + 1
        if done == stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            if not parameters_finite(policy):
                raise NonFiniteError(
                    f"step {done}: the weights hold NaN or inf after the update "
                    f"(lr {cfg.lr}); not checkpointed. The last good checkpoint "
                    f"is {latest_checkpoint(out)}."
                )
            save_checkpoint(
                out,
                done,
                policy,
                optimizer,
                scheduler,
                {
                    "problems_drawn": stream.drawn,
                    "demos_drawn": demo_stream.drawn if demo_stream else 0,
                },
                keep=cfg.keep_checkpoints,
                rank=rank,
                is_main=main,
                barrier=accelerator.wait_for_everyone,
            )
    bar.close()
    log.close()
    if owned and cfg.rollout.sync == "adapter":
        engine.close()
    finished = stop == cfg.max_steps
    if finished and main:
        save_final(policy, out, tokenizer, init_adapter)
    accelerator.wait_for_everyone()
    return {
        "out": str(out),
        "steps": stop,
        "total_steps": cfg.max_steps,
        "finished": finished,
        "last": row,
    }


def _say(main: bool, text: str) -> None:
    if main:
        print(text, flush=True)
