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
`checkpoint_every` steps.

How the loss is averaged, whatever the split into processes and accumulation steps: the loss
is a mean over the *global* batch of the step, pairs for the DPO family and completion tokens
for SFT's token_mean. Each micro-batch's loss is scaled by its share of the global batch
(times the number of processes, because DDP and FSDP2 average gradients over processes), so the summed
gradients equal those of the whole batch in one piece. Every process knows the whole global
batch (the order is a function of seed and epoch), so the shares need no communication.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import losses
from ..config import ConfigError, save_config
from ..models import load_model, load_tokenizer, resolve_dtype, resolve_model
from ..records import write_json
from .batches import collate, epoch_batches, micro_batches
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    save_final,
    start_run,
)
from .config import TrainConfig
from .data import Example, load_examples
from .distributed import Processes, local_storage, master_weights, zero3_config
from .logps import completion_logps, reference_logps, split_pairs, unpadded_logps
from .lora import adapter_input_as_is, apply_lora, format_parameter_report, parameter_report
from .metrics import MetricsLog, NonFiniteError, check_finite
from .moe import MoeRun
from .modes import enable_gradient_checkpointing, set_attention, train_mode
from .optim import lr_at, make_optimizer, make_scheduler
from .refcache import cache_key, cache_path, read_cache, write_cache

SFT_LOSSES = {"sft": losses.sft, "dft": losses.dft, "chord-phi": losses.sft_phi}
DPO_LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "robust-dpo": "robust", "bdpo": "bdpo",
                  "rpo": "sigmoid"}
# Settings that may change between a run and its resume (they do not change the result).
RESUME_MAY_CHANGE = {"stop_after_steps", "num_threads", "checkpoint_every", "keep_checkpoints",
                     "trackers", "ref_batch_size", "ref_cache", "tokenize_workers"}


# ------------------------------------------------------------------------ loss of a batch


def global_units(examples: list[Example], cfg: TrainConfig) -> int:
    """What the step's loss averages over: completion tokens (SFT token_mean) or rows."""
    if not cfg.preference and cfg.sft_aggregation == "token_mean":
        return sum(len(e.completions[0]) for e in examples)
    return len(examples)


def micro_batch_loss(model, examples: list[Example], ref: torch.Tensor | None, cfg: TrainConfig,
                     *, pad_id: int, device, units: int, processes: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, int]:
    """(loss scaled to its share of the global batch, metrics, share, tokens processed).

    `units` is global_units() of the whole step; `ref` is (B, 2) reference log-probs.
    """
    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    how = layout(cfg, device)
    logps = completion_logps(model, batch) if how == "longest" else unpadded_logps(
        model, examples, device, share_prompt=how == "shared")  # (R, K) float32
    tokens = int(batch["attention_mask"].sum())
    if cfg.preference:
        policy_chosen, policy_rejected = split_pairs(logps.sum(-1))  # (B,), (B,)
        chosen_len, rejected_len = split_pairs(batch["completion_lengths"])
        ref = ref.to(device)
        chosen_nll = -policy_chosen / chosen_len.clamp(min=1) if cfg.nll_weight else None
        loss, metrics = losses.dpo(policy_chosen, policy_rejected, ref[:, 0], ref[:, 1], cfg.beta,
                                   loss_type=DPO_LOSS_TYPES[cfg.method],
                                   label_smoothing=cfg.label_smoothing,
                                   chosen_lengths=chosen_len, rejected_lengths=rejected_len,
                                   bdpo_lambda=cfg.bdpo_lambda, nll_weight=cfg.nll_weight,
                                   chosen_nll=chosen_nll)
        share = len(examples) / units
        return loss * (share * processes), metrics, share, tokens
    mask = batch["labels"] != -100  # (R, K)
    fn = SFT_LOSSES[cfg.method]
    if cfg.sft_aggregation == "token_mean":
        loss, metrics = fn(logps, mask, aggregation="token_mean",
                           num_items_in_batch=units / processes)
        share = float(mask.sum()) / units
    else:
        loss, metrics = fn(logps, mask, aggregation=cfg.sft_aggregation)
        share = len(examples) / units
        loss = loss * (share * processes if cfg.sft_aggregation == "sequence_mean" else processes)
    metrics.pop("tokens", None)  # a count, not a mean: reported as `tokens` by the loop
    return loss, metrics, share, tokens


def step_gradients(policy, examples: list[Example], batch: list[int], ref: torch.Tensor | None,
                   cfg: TrainConfig, accelerator, *, lengths: list[int], pad_id: int,
                   moe: MoeRun = MoeRun()) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
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
                    policy, [examples[j] for j in rows], ref[rows] if ref is not None else None,
                    cfg, pad_id=pad_id, device=accelerator.device, units=units, processes=P)
            loss = moe.add_aux(loss, metrics, routing, share * P)
            accelerator.backward(loss if i < real else loss * 0.0)
        if i >= real:
            continue
        loss_sum += loss.detach().float()
        tokens += n_tokens
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float() * share
    return loss_sum, metric_sums, tokens


def layout(cfg: TrainConfig, device) -> str:
    """How sequences run (cfg.padding; auto: none on CPU): longest (left-padded micro-batches),
    shared (each pair alone, its prompt once) or none (each sequence alone: with gradient
    checkpointing, which drops the keys and values the shared prompt needs)."""
    if cfg.padding == "longest" or (cfg.padding == "auto" and device.type != "cpu"):
        return "longest"
    return "none" if cfg.gradient_checkpointing else "shared"


# ---------------------------------------------------------------------------- reference


def reference_table(model, examples: list[Example], cfg: TrainConfig, accelerator, *,
                    pad_id: int, dtype: str, out: Path) -> torch.Tensor:
    """(N, 2) reference log-probs, read from the cache beside the data or computed once.

    Called before the adapter exists, so the model is exactly the reference (for PiSSA / OLoRA
    too, whose initialisation changes the base weights). Each process computes every P-th pair
    and the parts are gathered.
    """
    how = layout(cfg, accelerator.device)
    key = cache_key(resolve_model(cfg.model), dtype, examples, accelerator.device.type,
                    layout=how, attention=getattr(model.config, "_attn_implementation", None)) \
        if cfg.ref_cache else None
    if cfg.ref_cache and key is None:
        _say(accelerator, f"reference log-probs: not cached ({cfg.model}: no local weight "
                          "files to fingerprint)")
    use_cache = key is not None
    path = cache_path(cfg.data, key, fallback_dir=out) if use_cache else None
    cached = read_cache(path, key, len(examples)) if use_cache else None
    if cached is not None:
        _say(accelerator, f"reference log-probs: read from cache {path}")
        return cached
    start = time.perf_counter()
    P, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(examples), P))
    part = reference_logps(model, [examples[i] for i in mine], batch_size=cfg.ref_batch_size,
                           pad_id=pad_id, device=accelerator.device, layout=how)
    table = torch.zeros(len(examples), 2)
    if P > 1:
        from accelerate.utils import gather_object

        for r, (idx, values) in enumerate(gather_object([(mine, part)])):
            table[idx] = values
    else:
        table[mine] = part
    if use_cache and accelerator.is_main_process:
        write_cache(path, key, table)
    _say(accelerator, f"reference log-probs: computed for {len(examples)} pairs in "
                      f"{time.perf_counter() - start:.1f} s" +
                      (f"; saved to {path}" if use_cache else ""))
    return table


# --------------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, model=None, tokenizer=None,
          progress: bool = True) -> dict:
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
    P, rank, main = accelerator.num_processes, accelerator.process_index, \
        accelerator.is_main_process
    device = accelerator.device
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)

    # data
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    examples, report = load_examples(cfg.data, tokenizer, preference=cfg.preference,
                                     max_length=cfg.max_length, length_policy=cfg.length_policy,
                                     workers=cfg.tokenize_workers)
    _say(accelerator, f"data: {report.summary()}")
    lengths = [e.length for e in examples]
    global_batch = cfg.batch_size * cfg.grad_accum * P
    steps_per_epoch = len(epoch_batches(lengths, global_batch, cfg.seed, 0, cfg.group_by_length,
                                        min_rows=P))
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    t_ref = time.perf_counter()
    ref = reference_table(model, examples, cfg, accelerator, pad_id=pad_id, dtype=dtype,
                          out=out) if cfg.preference else None
    reference_seconds = time.perf_counter() - t_ref
    moe = MoeRun.setup(model, cfg.router_aux_loss_coef, cfg.moe, examples, lambda e: e.prompt,
                       seed=cfg.seed, pad_id=pad_id)
    model = apply_lora(model, cfg.lora)
    if autocast and cfg.lora.enabled:
        adapter_input_as_is(model)  # bf16 activations into the fp32 adapter, under autocast
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _say(accelerator, format_parameter_report(parameter_report(model)))
    _say(accelerator, f"{cfg.method}: {cfg.model} in {dtype}, {attention} attention, "
                      f"sequences {layout(cfg, device)}; global batch {global_batch} = "
                      f"{cfg.batch_size} rows x {cfg.grad_accum} accumulation x {P} process(es); "
                      f"{total} steps ({steps_per_epoch} per epoch)")
    init_adapter = out / "adapter-init"
    if cfg.lora.enabled and cfg.lora.init != "default" and main and not init_adapter.exists():
        # PiSSA / OLoRA move part of the base weights into the adapter; the initial adapter
        # lets the final one be converted into a plain LoRA for the untouched base model.
        save_atomic(lambda d: model.save_pretrained(d), init_adapter)

    # Wrap first, then the optimizer over the wrapped (for FSDP2: sharded) parameters.
    whole = local_storage(model)["bytes"]
    policy, optimizer = accelerator.prepare(model, lambda m: make_optimizer(
        m, cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps))
    model = accelerator.unwrap(policy)  # the module holding the parameters (sharded or whole)
    stored = accelerator.storage_per_process(policy)
    _say(accelerator, f"{cfg.strategy}: each process stores {_mib(max(stored))} of the "
                      f"{_mib(whole)} of parameters ({P} process(es))")
    scheduler = make_scheduler(optimizer, total_steps=total,
                               warmup_steps=round(cfg.warmup_ratio * total),
                               schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    start = 0
    if resume and last is not None:
        start = int(load_checkpoint(last, model, optimizer, scheduler, rank=rank)["step"])
        _say(accelerator, f"resumed from {last} (step {start} of {total})")
    if main:
        save_config(cfg, out / "config.yaml")
        write_json(out / "data_report.json", report.to_dict())
        write_json(out / "processes.json", {"strategy": cfg.strategy, "processes": P,
                                            "sharded": accelerator.sharded,
                                            "parameter_bytes": whole,
                                            "parameter_bytes_per_process": stored})
    log = MetricsLog(out / "metrics.jsonl", resume_step=start, enabled=main,
                     trackers=cfg.trackers, config=asdict(cfg))
    # The DPO family runs the policy without dropout, as the reference pass did.
    train_mode(policy, dropout=not cfg.preference)

    bar = tqdm(total=total, initial=start, desc=f"train {cfg.method}", unit="step",
               disable=not (progress and main))
    batches, batches_epoch = None, -1
    row: dict = {}
    for step in range(start, stop):
        t0, cpu0 = time.perf_counter(), time.process_time()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(lengths, global_batch, cfg.seed, epoch, cfg.group_by_length,
                                    min_rows=P)
            batches_epoch = epoch
        batch = batches[position]
        loss_sum, metric_sums, tokens = step_gradients(policy, examples, batch, ref, cfg,
                                                       accelerator, lengths=lengths,
                                                       pad_id=pad_id, moe=moe)
        grad_norm = accelerator.clip(policy, cfg.max_grad_norm)  # over all shards
        names = list(metric_sums)
        summed = torch.stack([loss_sum, torch.tensor(float(tokens), device=device),
                              *[metric_sums[k] for k in names]])
        values = accelerator.reduce(summed, reduction="sum").tolist()
        loss_value = values[0] / P  # every process holds loss shares scaled by P
        check_finite(step + 1, loss_value, grad_norm, latest_checkpoint(out))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - t0
        row = {"step": step + 1, "epoch": epoch + (position + 1) / steps_per_epoch,
               "loss": loss_value, **dict(zip(names, values[2:])),
               "lr": lr_at(scheduler, step), "grad_norm": grad_norm, "rows": len(batch),
               "tokens": int(values[1]), "tokens_per_s": values[1] / seconds,
               "seconds": seconds, "cpu_seconds": time.process_time() - cpu0}
        row.update(moe.stats(policy, step + 1, last=step + 1 == stop))
        log.write(row)
        bar.update(1)
        bar.set_postfix(_postfix(row))
        done = step + 1
        if done == stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            if not accelerator.all_finite(policy):
                raise NonFiniteError(f"step {done}: the weights hold NaN or inf after the update "
                                     f"(lr {cfg.lr}); not checkpointed. The last good checkpoint "
                                     f"is {latest_checkpoint(out)}.")
            save_checkpoint(out, done, model, optimizer, scheduler,
                            {"epoch": epoch, "position": position + 1, "total": total},
                            keep=cfg.keep_checkpoints, rank=rank, is_main=main,
                            barrier=accelerator.wait_for_everyone,
                            sharded=accelerator.sharded)
    bar.close()
    log.close()

    finished = stop == total
    # sharded: every process takes part in gathering the whole weights onto rank 0
    whole = accelerator.full_state_dict(policy) if finished else None
    if finished and main:
        save_final(model, out, tokenizer, init_adapter if init_adapter.exists() else None,
                   state_dict=whole)
    accelerator.wait_for_everyone()
    summary = {"out": str(out), "steps": stop, "total_steps": total, "finished": finished,
               "data": report.to_dict(), "last": row, "dtype": dtype,
               "reference_seconds": reference_seconds}
    if main:
        where = out / ("adapter" if cfg.lora.enabled else "model")
        _say(accelerator, f"{'finished' if finished else 'stopped'} at step {stop} of {total}" +
             (f"; weights in {where}" if finished else "; continue with --resume"))
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

