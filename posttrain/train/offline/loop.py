"""Offline training on a fixed file: SFT, DFT, CHORD-phi on demonstrations; DPO family on pairs.

    posttrain train --method dpo --data pairs.jsonl --out runs/dpo --set lr=5e-5
    torchrun --nproc_per_node 2 -m posttrain.cli train --method sft --data demos.jsonl --out runs/sft
    posttrain train --nproc 2 --method dpo ... --set strategy=fsdp2     # sharded (FSDP2)

The loop, top to bottom: read and tokenise the data; load the model; for the DPO family compute
the reference log-probs once (no grad, before any adapter exists; cached beside the data); add
LoRA (or train everything; or continue `init_adapter`, whose policy is then the reference
unless `reference: base`); wrap it for the processes (parallel/processes.py: ddp | fsdp2 |
deepspeed) and build the optimizer over the wrapped parameters (set-up and tear-down shared with
the online loop: train/skeleton.py); then for each optimizer step take its global batch, run this
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
from pathlib import Path

import torch

from posttrain.config import ConfigError, save_config
from posttrain.models import load_model, load_tokenizer, parse_dtype, resolve_dtype, resolve_model
from posttrain.records import write_json
from posttrain.train.batches import epoch_batches
from posttrain.train.config import TrainConfig
from posttrain.train.data import load_examples
from posttrain.train.lora import (
    adapter_input_as_is,
    apply_lora,
    format_parameter_report,
    parameter_report,
)
from posttrain.train.metrics import check_finite
from posttrain.train.modes import enable_gradient_checkpointing, layout, set_attention, train_mode
from posttrain.train.moe import MoeRun
from posttrain.train.offline.reference import reference_table
from posttrain.train.offline.step import SFT_LOSSES as SFT_LOSSES  # re-exported
from posttrain.train.offline.step import global_units as global_units  # re-exported
from posttrain.train.offline.step import micro_batch_loss as micro_batch_loss  # re-exported
from posttrain.train.offline.step import step_gradients
from posttrain.train.optim import lr_at
from posttrain.train.parallel.checkpoint import latest_checkpoint, start_run
from posttrain.train.parallel.meta_start import (
    adapter_disabled,
    build_on_meta,
    init_lora,
    meta_start_refusal,
    shard_and_fill,
)
from posttrain.train.parallel.processes import Processes, master_weights, zero3_config
from posttrain.train.skeleton import (
    RESUME_MAY_CHANGE,
    Run,
    checkpoint_due,
    pad_id,
    progress_bar,
    save_initial_adapter,
    say,
)

# re-exported for the tests and workers that import them from here
__all__ = [
    "RESUME_MAY_CHANGE",
    "SFT_LOSSES",
    "global_units",
    "micro_batch_loss",
    "step_gradients",
    "train",
]


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

    Writes out/config.yaml, out/data_report.json, out/processes.json, out/metrics.jsonl,
    out/checkpoints/, and at the end out/adapter/ (LoRA, PEFT format) or out/model/ (full
    fine-tuning). Set-up and tear-down shared with the online loop: train/skeleton.py.
    """
    cfg.check()
    out = Path(out)
    # this run's processes and how the model is spread over them (parallel/processes.py)
    procs = Processes(cfg.strategy, deepspeed_config=zero3_config(cfg))
    P, main, device = procs.num_processes, procs.is_main_process, procs.device
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)

    # data: the rows, their lengths, the steps
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    examples, report = load_examples(
        cfg.data,
        tokenizer,
        preference=cfg.preference,
        max_length=cfg.max_length,
        length_policy=cfg.length_policy,
        workers=cfg.tokenize_workers,
    )
    say(procs, f"data: {report.summary()}")
    lengths = [e.length for e in examples]
    global_batch = cfg.batch_size * cfg.grad_accum * P
    steps_per_epoch = len(
        epoch_batches(lengths, global_batch, cfg.seed, 0, cfg.group_by_length, min_rows=P)
    )
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(examples)} rows cannot give each of {P} processes one row")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    stop = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total

    # model, reference log-probs (DPO family), adapter
    pad = pad_id(tokenizer)
    model, ref, moe, dtype, attention, reference_seconds = _model_and_reference(
        cfg, procs, model, examples, pad, out
    )
    say(
        procs,
        f"{cfg.method}: {cfg.model} in {dtype}, {attention} attention, "
        f"sequences {layout(cfg, device)}; global batch {global_batch} = "
        f"{cfg.batch_size} rows x {cfg.grad_accum} accumulation x {P} process(es); "
        f"{total} steps ({steps_per_epoch} per epoch)",
    )
    init_adapter = save_initial_adapter(model, cfg, out, procs)

    # wrap, AdamW over the wrapped (FSDP2: sharded) parameters, schedule, resume
    run = Run.start(cfg, out, procs, model, total)
    policy, optimizer, scheduler = run.policy, run.optimizer, run.scheduler
    start = int(run.resume(last if resume else None, total).get("step", 0))
    if main:
        save_config(cfg, out / "config.yaml")
        write_json(out / "data_report.json", report.to_dict())
    log = run.metrics_log(start)
    # The DPO family runs the policy without dropout, as the reference pass did.
    train_mode(policy, dropout=not cfg.preference)

    bar = progress_bar(f"train {cfg.method}", total, start, progress and main)
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
            policy, examples, batch, ref, cfg, procs, lengths=lengths, pad_id=pad, moe=moe
        )
        grad_norm = procs.clip(policy, cfg.max_grad_norm)  # over all shards
        names = list(metric_sums)
        summed = torch.stack(
            [loss_sum, torch.tensor(float(tokens), device=device), *[metric_sums[k] for k in names]]
        )
        values = procs.reduce(summed, reduction="sum").tolist()
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
        if checkpoint_due(step + 1, stop, cfg.checkpoint_every):
            run.checkpoint(step + 1, {"epoch": epoch, "position": position + 1, "total": total})
    bar.close()
    log.close()

    finished = stop == total
    run.finish(tokenizer, init_adapter, finished)
    if main:
        where = out / ("adapter" if cfg.lora.enabled else "model")
        say(
            procs,
            f"{'finished' if finished else 'stopped'} at step {stop} of {total}"
            + (f"; weights in {where}" if finished else "; continue with --resume"),
        )
    return {
        "out": str(out),
        "steps": stop,
        "total_steps": total,
        "finished": finished,
        "data": report.to_dict(),
        "last": row,
        "dtype": dtype,
        "reference_seconds": reference_seconds,
    }


# ------------------------------------------------------------------------------ helpers


def _model_and_reference(cfg, procs, model, examples, pad: int, out: Path):
    """The model (loaded unless given; full fine-tuning in bf16: fp32 master weights, bf16
    compute, processes.precision), the DPO family's reference log-probs (no grad, before any
    adapter exists, or with init_adapter as the reference; cached beside the data), MoE set-up,
    then LoRA (fresh, or from init_adapter; or all weights trainable):
    (model, reference table or None, moe, dtype, attention, seconds of the reference pass)."""
    device = procs.device
    dtype = resolve_dtype(cfg.dtype, device)
    load_dtype, autocast = procs.precision(dtype, full_finetune=not cfg.lora.enabled)
    refusal = meta_start_refusal(cfg, procs, model_given=model is not None)
    if refusal is None:
        return _meta_model_and_reference(
            cfg, procs, examples, pad, out, dtype, load_dtype, autocast
        )
    if procs.sharded:
        say(procs, f"start-up: every process loads the whole model ({refusal})")
    if model is None:
        model = load_model(cfg.model, dtype=load_dtype)
    model = master_weights(model, autocast, device.type, upcast=not cfg.lora.enabled)
    longest = max((e.length for e in examples), default=0)
    attention = set_attention(model, cfg.attention, device.type, longest)
    model.to(device)
    # the reference: the base model, before any adapter exists; or, from init_adapter with
    # reference init, the policy as training starts (base + that adapter, once it is loaded)
    reference_first = not (cfg.init_adapter and cfg.reference == "init")
    ref, reference_seconds = None, 0.0

    def reference(m):
        t_ref = time.perf_counter()
        adapter = cfg.init_adapter if not reference_first else None
        table = reference_table(
            m, examples, cfg, procs, pad_id=pad, dtype=dtype, out=out, adapter=adapter
        )
        return table, time.perf_counter() - t_ref

    if cfg.preference and reference_first:
        ref, reference_seconds = reference(model)
    moe = moe_run(model, cfg, examples, pad)
    model = apply_lora(model, cfg.lora, init_adapter=cfg.init_adapter or None)
    if cfg.lora.enabled and cfg.lora.init == "default" and not cfg.init_adapter:
        init_lora(model, cfg.seed)  # as the meta start-up does: the same A from the seed
    if autocast and cfg.lora.enabled:
        adapter_input_as_is(model)  # bf16 activations into the fp32 adapter, under autocast
    if cfg.preference and not reference_first:
        ref, reference_seconds = reference(model)  # exactly the policy's step-1 forward
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    say(procs, format_parameter_report(parameter_report(model)))
    return model, ref, moe, dtype, attention, reference_seconds


def moe_run(model, cfg, examples, pad: int) -> MoeRun:
    """The balance loss and routing probe of an MoE model (inactive on a dense one)."""
    return MoeRun.setup(
        model,
        cfg.router_aux_loss_coef,
        cfg.moe,
        examples,
        lambda e: e.prompt,
        seed=cfg.seed,
        pad_id=pad,
    )


def _meta_model_and_reference(
    cfg, procs, examples, pad: int, out: Path, dtype: str, load_dtype: str, autocast
):
    """_model_and_reference for a sharded run that starts on the meta device
    (parallel/meta_start.py): build, adapter, shard, then each process reads its own shards;
    the reference pass and the MoE probe run on the sharded model with the adapter disabled."""
    t0 = time.perf_counter()
    folder = resolve_model(cfg.model)
    model = build_on_meta(folder, parse_dtype(load_dtype))
    model = master_weights(model, autocast, procs.device.type, upcast=not cfg.lora.enabled)
    longest = max((e.length for e in examples), default=0)
    attention = set_attention(model, cfg.attention, procs.device.type, longest)
    model = apply_lora(model, cfg.lora)
    if autocast and cfg.lora.enabled:
        adapter_input_as_is(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = shard_and_fill(model, folder, procs, seed=cfg.seed, t0=t0)
    with adapter_disabled(model):
        t_ref = time.perf_counter()
        ref = (
            reference_table(model, examples, cfg, procs, pad_id=pad, dtype=dtype, out=out)
            if cfg.preference
            else None
        )
        reference_seconds = time.perf_counter() - t_ref
        moe = moe_run(model, cfg, examples, pad)
    say(procs, format_parameter_report(parameter_report(model)))
    return model, ref, moe, dtype, attention, reference_seconds


def _postfix(row: dict) -> dict:
    shown = {"loss": f"{row['loss']:.4f}"}
    if "rewards/margins" in row:
        shown["margin"] = f"{row['rewards/margins']:.3f}"
        shown["acc"] = f"{row['rewards/accuracies']:.2f}"
    shown["tok/s"] = f"{row['tokens_per_s']:.0f}"
    return shown
