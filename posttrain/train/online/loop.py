"""Online RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, GSPO, CISPO, CHORD and on-policy
distillation, in one loop.

    posttrain train --method grpo --problems "builtin:arith:512?split=train" --out runs/grpo \
        --set max_steps=40 --set num_generations=4 [--set chord.demos=demos.jsonl] [--resume]
    torchrun --nproc_per_node 2 -m posttrain.cli train --method grpo --out runs/grpo2 ...
    posttrain train --nproc 2 --method grpo ... --set strategy=fsdp2 --set rollout.sync=adapter

The processes and the model's spread over them are the offline loop's (parallel/processes.py:
ddp | fsdp2; deepspeed is refused, and fsdp2 with rollout.sync live, since generate on a
sharded model would run a different number of all-gathers on each process); set-up and
tear-down are train/skeleton.py's; the policy's start (whole, or under fsdp2 built on the meta
device with each process reading its own shards) train/online/policy_start.py.
The loop, top to bottom, per step: draw `problems_per_step` problems (each process its share;
a group is never split), sample G completions of each through the rollout engine
(train/online/rollout_engine.py) and grade them (train/online/rollouts.py), gather the
rewards of every process and turn them into group-normalised advantages, then take
`updates_per_batch` optimizer steps on the batch (train/online/update.py update_policy;
losses in posttrain/losses/, off-policy ones in losses/offpolicy.py). The first update's forward also checks that the engine sampled the
current policy (mismatch/* metrics; RolloutSyncError past rollout.max_mismatch_kl) and gives
the rollout-correction weights. After the update a detached engine gets the new adapter
(colocated vLLM sleeps during the update with rollout.sleep, CUDA only).
rollout.mode async (train/online/async_rollouts.py): a thread samples batch t + 1 while the step
updates on batch t, with the adapter of update t + 1 - max_staleness; the step takes its batch
from it (waiting if need be) and publishes each new adapter to it; async/* metrics.
CHORD adds demonstrations to every step: (1 - mu) * policy loss + mu * SFT.
distill scores the rollouts with a teacher (train/online/teacher.py) before the updates: each
token's advantage is log p_teacher - log p_student (losses/distill.py), plus
distill.reward_weight x the group advantage of the reward.
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
- Mixture-of-experts models: the hf engine records the experts it routed each token to;
  `moe.replay` old / rollout forces the old-policy pass's / the engine's top-k sets in the
  trainer's forwards (train/moe/replay.py), and every step logs moe/rollout_agreement and
  (updates_per_batch > 1) moe/update_flips. No balance loss unless router_aux_loss_coef is set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.config import ConfigError, save_config
from posttrain.losses import group_advantages, mu_schedule
from posttrain.models import load_tokenizer, resolve_dtype
from posttrain.records import Problem
from posttrain.train.data import load_examples
from posttrain.train.metrics import NonFiniteError
from posttrain.train.modes import layout, set_attention
from posttrain.train.online.config import METHODS, OnlineConfig, online_config
from posttrain.train.online.policy_start import policy_model
from posttrain.train.online.problem_stream import ShuffledStream
from posttrain.train.online.reduce import gather_rollouts, sum_over_processes
from posttrain.train.online.rollout_engine import (
    AdapterSync,
    make_rollout_engine,
)
from posttrain.train.online.teacher import ServerTeacher, load_teacher
from posttrain.train.online.update import update_policy
from posttrain.train.online.async_rollouts import RolloutBatch, rollout_source
from posttrain.train.online.rollouts import (
    demonstration_batches,
    rollout_batches,
    rollout_stats,
    score_completion,
)
from posttrain.train.optim import lr_at
from posttrain.train.parallel.checkpoint import start_run
from posttrain.train.parallel.processes import Processes
from posttrain.train.skeleton import (
    RESUME_MAY_CHANGE,
    Run,
    checkpoint_due,
    pad_id,
    progress_bar,
    save_initial_adapter,
    say,
)

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

    Writes out/config.yaml, out/processes.json, out/metrics.jsonl (one line per rollout step),
    out/checkpoints/ and at the end out/adapter/. Tests pass a tiny `model`, `problems`, a stub
    `score` and may pass the rollout `engine` (an AdapterEngine when rollout.sync is adapter).
    Set-up and tear-down shared with the offline loop: train/skeleton.py.
    """
    cfg.check()
    out = Path(out)
    # this run's processes and how the model is spread over them (parallel/processes.py)
    procs = Processes(cfg.strategy)
    P, main, device = procs.num_processes, procs.is_main_process, procs.device
    if cfg.problems_per_step % P or (P > 1 and cfg.dynamic_sampling):
        raise ConfigError(
            f"problems_per_step {cfg.problems_per_step} must be a multiple of the "
            f"{P} processes, and dynamic_sampling is single-process for now"
        )
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)

    # problems, demonstrations, model, adapter
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    pad = pad_id(tokenizer)
    chord = cfg.method == "chord"
    problems, demos = _problems_and_demos(cfg, procs, tokenizer, problems)
    teacher = None
    if cfg.method == "distill":  # tokenizers checked before either model loads
        dtype = model.dtype if model is not None else resolve_dtype(cfg.dtype, device)
        teacher = load_teacher(cfg, tokenizer, device, dtype)
    policy, moe, base_copy, max_kl = policy_model(
        cfg, procs, model, tokenizer, problems, engine, progress
    )
    how = layout(cfg, device)  # shared: each group a micro-batch, its prompt run once
    if isinstance(teacher, torch.nn.Module):
        # the policy's attention kernel: equal models give equal log-probs
        set_attention(teacher, policy.config._attn_implementation, device.type, 0)
    init_adapter = save_initial_adapter(policy, cfg, out, procs)

    # wrap, AdamW over the wrapped (FSDP2: sharded) parameters, schedule, resume
    U = cfg.updates_per_batch
    run = Run.start(cfg, out, procs, policy, cfg.max_steps * U)  # optimizer steps
    trained, policy, scheduler = run.policy, run.model, run.scheduler
    state = run.resume(last if resume else None, cfg.max_steps)
    start = int(state.get("step", 0))
    stream = ShuffledStream(problems, cfg.seed, drawn=int(state.get("problems_drawn", 0)))
    demo_stream = (
        ShuffledStream(demos, cfg.seed + 1, drawn=int(state.get("demos_drawn", 0)))
        if chord
        else None
    )
    if main:
        save_config(cfg, out / "config.yaml")
    log = run.metrics_log(start)

    # the rollout engine, and how it follows the policy
    owned = engine is None  # an engine built here is closed here (vLLM workers, connections)
    engine = engine or make_rollout_engine(cfg, policy, tokenizer, base_model=base_copy)
    if moe.shape is not None and hasattr(engine, "record_routing"):
        engine.record_routing = True  # hf: routing replay and the drift metrics
    sync = _adapter_sync(cfg, procs, engine, out, init_adapter)
    stop = min(cfg.max_steps, cfg.stop_after_steps) if cfg.stop_after_steps else cfg.max_steps
    # sync: each batch sampled when the step needs it; async: by a thread, a batch ahead
    source = rollout_source(
        cfg, procs, moe, engine, tokenizer, stream, score, sync, out, start, stop
    )
    bar = progress_bar(f"train {cfg.method}", cfg.max_steps, start, progress and main)
    row: dict = {}
    try:
        if sync:  # the engine samples the first step with the policy as it is now
            source.follow(policy, start, state_dict=procs.full_state_dict(trained))
        for step in range(start, stop):
            t0 = time.perf_counter()
            # rollouts: this process's groups sampled and graded (async: sampled ahead, waited
            # for if not done); advantages over every process's
            row, info, batches, advantages, total_rows, tokens = _rollouts(
                cfg, procs, source.take(step), how, pad, moe
            )
            t1 = time.perf_counter()
            c = cfg.chord
            mu = (
                mu_schedule(step, c.mu_warmup_steps, c.mu_decay_steps, c.mu_peak, c.mu_valley)
                if chord
                else None
            )
            demo_batches = []
            if chord:
                chosen = demo_stream.take(max(1, round(c.ratio * cfg.problems_per_step)))
                demo_batches = demonstration_batches(chosen, cfg.micro_batch_size, pad, device)
            asleep = cfg.rollout.sleep  # colocated vLLM frees the GPU for the update
            if asleep:
                row["rollout/sleep_freed_gib"] = engine.sleep()
            # update: U optimizer steps on the batch (CHORD: with the demonstrations)
            updates = update_policy(
                run,
                cfg,
                batches,
                advantages,
                demo_batches,
                mu=mu,
                moe=moe,
                total_rows=total_rows,
                tokens=tokens,
                # a stale batch (async) differs from the trainer by the updates since it was
                # sampled, not only by numerics: the sync check judges fresh batches only
                max_kl=max_kl if not row.get("async/staleness_mean") else 0.0,
                step=step,
                row=row,
                teacher=teacher,
            )
            t2 = time.perf_counter()
            # the engine follows the policy; log; checkpoint
            if asleep:
                engine.wake_up()
            if sync:  # the next batch to be sampled after it samples the updated policy
                source.follow(policy, step + 1, state_dict=procs.full_state_dict(trained))
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
                    "time/step": time.perf_counter() - t0,
                }
            )
            log.write(row)
            bar.update(1)
            bar.set_postfix(
                reward=f"{row['reward/mean']:.3f}", length=f"{row['completion_length/mean']:.0f}"
            )
            if checkpoint_due(step + 1, stop, cfg.checkpoint_every):
                source.settle(step + 1)  # async: the batches a resume cannot sample are on disk
                run.checkpoint(
                    step + 1,
                    {
                        "problems_drawn": source.drawn,
                        "demos_drawn": demo_stream.drawn if demo_stream else 0,
                    },
                )
    finally:
        source.close()  # async: the thread stops (after the batch it is sampling, if any)
    bar.close()
    log.close()
    if owned and cfg.rollout.sync == "adapter":
        engine.close()
    if isinstance(teacher, ServerTeacher):
        teacher.close()
    finished = stop == cfg.max_steps
    run.finish(tokenizer, init_adapter, finished)
    return {
        "out": str(out),
        "steps": stop,
        "total_steps": cfg.max_steps,
        "finished": finished,
        "last": row,
    }


# ------------------------------------------------------------------------------ phases


def _problems_and_demos(cfg, procs, tokenizer, problems):
    """The problems (loaded from cfg.problems unless given) and CHORD's demonstrations."""
    if problems is None:
        from posttrain.tasks import load_problems

        problems = load_problems(cfg.problems, limit=cfg.limit or None)
    if cfg.method != "chord":
        return problems, None
    demos, report = load_examples(
        cfg.chord.demos, tokenizer, preference=False, max_length=cfg.chord.max_length
    )
    say(procs, f"demonstrations: {report.summary()}")
    return problems, demos


def _adapter_sync(cfg, procs, engine, out: Path, init_adapter: Path | None):
    """rollout.sync adapter: what saves the adapter after each update and has the engine load
    it (rollout_engine.AdapterSync); live: None (the engine samples the policy itself)."""
    if cfg.rollout.sync != "adapter":
        return None
    return AdapterSync(engine, out, init_adapter, procs.is_main_process, procs.wait_for_everyone)


def _rollouts(cfg, procs, batch: RolloutBatch, how: str, pad: int, moe):
    """This process's sampled and graded groups of the step, every process's rewards gathered:
    (row of rollout metrics, info, this process's micro-batches, its rows' advantages or None
    when no group was kept, rows kept over all processes, completion tokens over all)."""
    G, rank = cfg.num_generations, procs.process_index
    kept, everything, info = batch.kept, batch.everything, batch.info
    every_rank, kept_rewards = gather_rollouts(procs, everything, [r.reward for r in kept])
    row = {
        "step": batch.step + 1,
        **rollout_stats(every_rank, G),
        "groups_kept": len(kept_rewards) // G,
        **{k: v for k, v in info.items() if not k.startswith("time/")},
    }
    batches = rollout_batches(
        kept,
        cfg.micro_batch_size,
        pad,
        cfg.mask_truncated,
        procs.device,
        layout=how,
        group_size=G,
        routing=moe.routing,
    )
    advantages = None
    if kept:  # computed over every process's groups; this process keeps its rows
        everyone = group_advantages(torch.tensor(kept_rewards), G, cfg.advantage_scale)
        advantages = everyone[rank * len(kept) : (rank + 1) * len(kept)]
    tokens = sum_over_processes(
        procs, float(sum(int((b["labels"] != -100).sum()) for b, _ in batches))
    )
    return row, info, batches, advantages, len(kept_rewards), tokens
