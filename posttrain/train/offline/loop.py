"""Offline training on a fixed file: SFT, DFT, CHORD-phi on demonstrations; DPO family on pairs.

    posttrain train --method dpo --data pairs.jsonl --out runs/dpo --set lr=5e-5
    torchrun --nproc_per_node 2 -m posttrain.cli train --method sft --data demos.jsonl --out runs/sft
    posttrain train --nproc 2 --method dpo ... --set strategy=fsdp2     # sharded (FSDP2)

The loop, top to bottom: read and tokenise the data; load the model; for the DPO family compute
the reference log-probs once (no grad, before any adapter exists; cached beside the data); add
LoRA (or train everything); wrap it for the processes (distributed.py: ddp | fsdp2 | deepspeed)
and build the optimizer over the wrapped parameters; then for each optimizer step take its global batch, run this
process's micro-batches (padding longest: one left-padded forward per micro-batch, chosen and
rejected together; padding none, the default on CPU: each row its own micro-batch, each
sequence its own unpadded forward), clip, check for NaN / inf, step, log, and checkpoint every
`checkpoint_every` steps. One step's gradients: train/offline/step.py; the reference log-probs:
train/offline/reference.py.

How the loss is averaged, whatever the split into processes and accumulation steps: the loss
is a mean over the *global* batch of the step, pairs for the DPO family and completion tokens
for SFT's token_mean. Each micro-batch's loss is scaled by its share of the global batch
(times the number of processes, because DDP and FSDP2 average gradients over processes), so the summed
gradients equal those of the whole batch in one piece. Every process knows the whole global
batch (the order is a function of seed and epoch), so the shares need no communication.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from posttrain.config import ConfigError, save_config
from posttrain.models import load_model, load_tokenizer, resolve_dtype
from posttrain.records import write_json
from posttrain.train.batches import epoch_batches
from posttrain.train.parallel.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    save_final,
    start_run,
)
from posttrain.train.config import TrainConfig
from posttrain.train.data import load_examples
from posttrain.train.parallel.processes import (
    Processes,
    local_storage,
    master_weights,
    zero3_config,
)
from posttrain.train.lora import (
    adapter_input_as_is,
    apply_lora,
    format_parameter_report,
    parameter_report,
)
from posttrain.train.metrics import MetricsLog, NonFiniteError, check_finite
from posttrain.train.moe import MoeRun
from posttrain.train.modes import enable_gradient_checkpointing, layout, set_attention, train_mode
from posttrain.train.optim import lr_at, make_optimizer, make_scheduler
from posttrain.train.offline.step import DPO_LOSS_TYPES as DPO_LOSS_TYPES  # re-exported
from posttrain.train.offline.step import SFT_LOSSES as SFT_LOSSES  # re-exported
from posttrain.train.offline.step import global_units as global_units  # re-exported
from posttrain.train.offline.step import micro_batch_loss as micro_batch_loss  # re-exported
from posttrain.train.offline.step import step_gradients
from posttrain.train.offline.reference import reference_table

# Settings that may change between a run and its resume (they do not change the result).
RESUME_MAY_CHANGE = {
    "stop_after_steps",
    "num_threads",
    "checkpoint_every",
    "keep_checkpoints",
    "trackers",
    "ref_batch_size",
    "ref_cache",
    "tokenize_workers",
}


# --------------------------------------------------------------------------------- loop


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Run (or resume) offline training into `out`; returns a summary dict.

    Writes out/config.yaml, out/data_report.json, out/metrics.jsonl, out/checkpoints/, and at
    the end out/adapter/ (LoRA, PEFT format) or out/model/ (full fine-tuning).
    """
    from tqdm.auto import tqdm

    cfg.check()
    out = Path(out)
    # `accelerator`: this run's processes and how the model is spread over them
    # (distributed.Processes; the names follow accelerate's Accelerator, which it holds).
    accelerator = Processes(cfg.strategy, deepspeed_config=zero3_config(cfg))
    P, rank, main = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    device = accelerator.device
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)

    # data
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    examples, report = load_examples(
        cfg.data,
        tokenizer,
        preference=cfg.preference,
        max_length=cfg.max_length,
        length_policy=cfg.length_policy,
        workers=cfg.tokenize_workers,
    )
    _say(accelerator, f"data: {report.summary()}")
    lengths = [e.length for e in examples]
    global_batch = cfg.batch_size * cfg.grad_accum * P
    steps_per_epoch = len(
        epoch_batches(lengths, global_batch, cfg.seed, 0, cfg.group_by_length, min_rows=P)
    )
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(examples)} rows cannot give each of {P} processes one row")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    stop = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total

    # model, reference, adapter
    dtype = resolve_dtype(cfg.dtype, device)
    # full fine-tuning in bf16: fp32 master weights, bf16 compute (distributed.precision)
    load_dtype, autocast = accelerator.precision(dtype, full_finetune=not cfg.lora.enabled)
    if model is None:
        model = load_model(cfg.model, dtype=load_dtype)
    model = master_weights(model, autocast, device.type, upcast=not cfg.lora.enabled)
    attention = set_attention(model, cfg.attention, device.type, max(lengths, default=0))
    model.to(device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    t_ref = time.perf_counter()
    ref = (
        reference_table(model, examples, cfg, accelerator, pad_id=pad_id, dtype=dtype, out=out)
        if cfg.preference
        else None
    )
    reference_seconds = time.perf_counter() - t_ref
    moe = MoeRun.setup(
        model,
        cfg.router_aux_loss_coef,
        cfg.moe,
        examples,
        lambda e: e.prompt,
        seed=cfg.seed,
        pad_id=pad_id,
    )
    model = apply_lora(model, cfg.lora)
    if autocast and cfg.lora.enabled:
        adapter_input_as_is(model)  # bf16 activations into the fp32 adapter, under autocast
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _say(accelerator, format_parameter_report(parameter_report(model)))
    _say(
        accelerator,
        f"{cfg.method}: {cfg.model} in {dtype}, {attention} attention, "
        f"sequences {layout(cfg, device)}; global batch {global_batch} = "
        f"{cfg.batch_size} rows x {cfg.grad_accum} accumulation x {P} process(es); "
        f"{total} steps ({steps_per_epoch} per epoch)",
    )
    init_adapter = out / "adapter-init"
    if cfg.lora.enabled and cfg.lora.init != "default" and main and not init_adapter.exists():
        # PiSSA / OLoRA move part of the base weights into the adapter; the initial adapter
        # lets the final one be converted into a plain LoRA for the untouched base model.
        save_atomic(lambda d: model.save_pretrained(d), init_adapter)

    # Wrap first, then the optimizer over the wrapped (for FSDP2: sharded) parameters.
    whole = local_storage(model)["bytes"]
    policy, optimizer = accelerator.prepare(
        model,
        lambda m: make_optimizer(
            m,
            cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        ),
    )
    model = accelerator.unwrap(policy)  # the module holding the parameters (sharded or whole)
    stored = accelerator.storage_per_process(policy)
    _say(
        accelerator,
        f"{cfg.strategy}: each process stores {_mib(max(stored))} of the "
        f"{_mib(whole)} of parameters ({P} process(es))",
    )
    scheduler = make_scheduler(
        optimizer,
        total_steps=total,
        warmup_steps=round(cfg.warmup_ratio * total),
        schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    start = 0
    if resume and last is not None:
        start = int(load_checkpoint(last, model, optimizer, scheduler, rank=rank)["step"])
        _say(accelerator, f"resumed from {last} (step {start} of {total})")
    if main:
        save_config(cfg, out / "config.yaml")
        write_json(out / "data_report.json", report.to_dict())
        write_json(
            out / "processes.json",
            {
                "strategy": cfg.strategy,
                "processes": P,
                "sharded": accelerator.sharded,
                "parameter_bytes": whole,
                "parameter_bytes_per_process": stored,
            },
        )
    log = MetricsLog(
        out / "metrics.jsonl",
        resume_step=start,
        enabled=main,
        trackers=cfg.trackers,
        config=asdict(cfg),
    )
    # The DPO family runs the policy without dropout, as the reference pass did.
    train_mode(policy, dropout=not cfg.preference)

    bar = tqdm(
        total=total,
        initial=start,
        desc=f"train {cfg.method}",
        unit="step",
        disable=not (progress and main),
    )
    batches, batches_epoch = None, -1
    row: dict = {}
    for step in range(start, stop):
        t0, cpu0 = time.perf_counter(), time.process_time()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(
                lengths, global_batch, cfg.seed, epoch, cfg.group_by_length, min_rows=P
            )
            batches_epoch = epoch
        batch = batches[position]
        loss_sum, metric_sums, tokens = step_gradients(
            policy, examples, batch, ref, cfg, accelerator, lengths=lengths, pad_id=pad_id, moe=moe
        )
        grad_norm = accelerator.clip(policy, cfg.max_grad_norm)  # over all shards
        names = list(metric_sums)
        summed = torch.stack(
            [loss_sum, torch.tensor(float(tokens), device=device), *[metric_sums[k] for k in names]]
        )
        values = accelerator.reduce(summed, reduction="sum").tolist()
        loss_value = values[0] / P  # every process holds loss shares scaled by P
        check_finite(step + 1, loss_value, grad_norm, latest_checkpoint(out))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "epoch": epoch + (position + 1) / steps_per_epoch,
            "loss": loss_value,
            **dict(zip(names, values[2:])),
            "lr": lr_at(scheduler, step),
            "grad_norm": grad_norm,
            "rows": len(batch),
            "tokens": int(values[1]),
            "tokens_per_s": values[1] / seconds,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu0,
        }
        row.update(moe.stats(policy, step + 1, last=step + 1 == stop))
        log.write(row)
        bar.update(1)
        bar.set_postfix(_postfix(row))
        done = step + 1
        if done == stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            if not accelerator.all_finite(policy):
                raise NonFiniteError(
                    f"step {done}: the weights hold NaN or inf after the update "
                    f"(lr {cfg.lr}); not checkpointed. The last good checkpoint "
                    f"is {latest_checkpoint(out)}."
                )
            save_checkpoint(
                out,
                done,
                model,
                optimizer,
                scheduler,
                {"epoch": epoch, "position": position + 1, "total": total},
                keep=cfg.keep_checkpoints,
                rank=rank,
                is_main=main,
                barrier=accelerator.wait_for_everyone,
                sharded=accelerator.sharded,
            )
    bar.close()
    log.close()

    finished = stop == total
    # sharded: every process takes part in gathering the whole weights onto rank 0
    whole = accelerator.full_state_dict(policy) if finished else None
    if finished and main:
        save_final(
            model, out, tokenizer, init_adapter if init_adapter.exists() else None, state_dict=whole
        )
    accelerator.wait_for_everyone()
    summary = {
        "out": str(out),
        "steps": stop,
        "total_steps": total,
        "finished": finished,
        "data": report.to_dict(),
        "last": row,
        "dtype": dtype,
        "reference_seconds": reference_seconds,
    }
    if main:
        where = out / ("adapter" if cfg.lora.enabled else "model")
        _say(
            accelerator,
            f"{'finished' if finished else 'stopped'} at step {stop} of {total}"
            + (f"; weights in {where}" if finished else "; continue with --resume"),
        )
    return summary


# ------------------------------------------------------------------------------ helpers


def _postfix(row: dict) -> dict:
    shown = {"loss": f"{row['loss']:.4f}"}
    if "rewards/margins" in row:
        shown["margin"] = f"{row['rewards/margins']:.3f}"
        shown["acc"] = f"{row['rewards/accuracies']:.2f}"
    shown["tok/s"] = f"{row['tokens_per_s']:.0f}"
    return shown


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)
