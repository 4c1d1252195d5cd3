"""The set-up and tear-down both training loops share (offline/loop.py, online/loop.py).

    python -c "from posttrain.train.skeleton import Run; help(Run)"

What is written once here, in the order a loop uses it: the settings a resume may change
(RESUME_MAY_CHANGE), the pad id, the initial adapter of PiSSA / OLoRA (adapter-init), wrapping
the model for the processes and building AdamW and its schedule over the wrapped parameters
(`Run.start`), resuming from a checkpoint, the metrics log and the progress bar, and at the
end of a step the finite guard and the checkpoint (`Run.checkpoint`), then the final weights
(`Run.finish`). The loops' bodies (what a step does) stay in their own modules, top to bottom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from posttrain.records import write_json
from posttrain.train.metrics import MetricsLog, NonFiniteError
from posttrain.train.optim import make_optimizer, make_scheduler
from posttrain.train.parallel.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    save_final,
)
from posttrain.train.parallel.processes import Processes, parameter_bytes

# Settings that may change between a run and its resume (they do not change the result);
# keys a trainer's config does not have are simply never compared.
RESUME_MAY_CHANGE = frozenset(
    {
        "stop_after_steps",
        "num_threads",
        "checkpoint_every",
        "keep_checkpoints",
        "trackers",
        "ref_batch_size",  # offline: the reference pass's batching
        "ref_cache",
        "tokenize_workers",
    }
)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def say(procs, text: str) -> None:
    if procs.is_main_process:
        print(text, flush=True)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def save_initial_adapter(model, cfg, out: Path, procs) -> Path | None:
    """OUT/adapter-init for PiSSA / OLoRA (None otherwise): they move part of the base weights
    into the adapter, and the initial adapter converts the synced and final adapters into plain
    LoRAs of the untouched base model. Written once (kept on resume), before any sharding."""
    if not cfg.lora.enabled or cfg.lora.init == "default":
        return None
    target = out / "adapter-init"
    if procs.is_main_process and not target.exists():
        save_atomic(lambda d: model.save_pretrained(d), target)
    procs.wait_for_everyone()
    return target


def progress_bar(desc: str, total: int, start: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=not show)


def checkpoint_due(done: int, stop: int, every: int) -> bool:
    """The last step always writes a checkpoint; otherwise every `every` steps (0: never)."""
    return done == stop or bool(every and done % every == 0)


@dataclass
class Run:
    """What a loop holds between set-up and tear-down: its processes, the wrapped model it
    calls (`policy`: DDP wrapper, or the module itself sharded), the module holding the named
    parameters (`model`), AdamW and its schedule. Built by `Run.start`."""

    cfg: object
    out: Path
    procs: Processes
    policy: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object

    @classmethod
    def start(cls, cfg, out: Path, procs: Processes, model, total_steps: int) -> Run:
        """Wrap `model` for the processes, then AdamW over the wrapped (for FSDP2: sharded)
        parameters and the schedule over `total_steps` optimizer steps. Says, and writes to
        OUT/processes.json, what each process stores of the parameters."""
        whole = parameter_bytes(model)  # the model may come sharded already (meta start-up)
        policy, optimizer = procs.prepare(
            model,
            lambda m: make_optimizer(
                m, cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas, eps=cfg.adam_eps
            ),
        )
        scheduler = make_scheduler(
            optimizer,
            total_steps=total_steps,
            warmup_steps=round(cfg.warmup_ratio * total_steps),
            schedule=cfg.schedule,
            min_ratio=cfg.min_lr_ratio,
        )
        run = cls(cfg, out, procs, policy, procs.unwrap(policy), optimizer, scheduler)
        stored = procs.storage_per_process(policy)
        P = procs.num_processes
        say(
            procs,
            f"{cfg.strategy}: each process stores {mib(max(stored))} of the "
            f"{mib(whole)} of parameters ({P} process(es))",
        )
        if procs.is_main_process:
            write_json(
                out / "processes.json",
                {
                    "strategy": cfg.strategy,
                    "processes": P,
                    "sharded": procs.sharded,
                    "parameter_bytes": whole,
                    "parameter_bytes_per_process": stored,
                },
            )
        return run

    def resume(self, last: Path | None, of: int) -> dict:
        """Restore weights, AdamW, schedule and RNG from checkpoint `last` (None: a fresh
        run, {}); returns its state.json. `of`: the run's length, for the message."""
        if last is None:
            return {}
        state = load_checkpoint(
            last, self.model, self.optimizer, self.scheduler, rank=self.procs.process_index
        )
        say(self.procs, f"resumed from {last} (step {state['step']} of {of})")
        return state

    def metrics_log(self, start: int) -> MetricsLog:
        return MetricsLog(
            self.out / "metrics.jsonl",
            resume_step=start,
            enabled=self.procs.is_main_process,
            trackers=self.cfg.trackers,
            config=asdict(self.cfg),
        )

    def checkpoint(self, done: int, state: dict) -> None:
        """Checkpoint step `done` (every process calls this), after checking that no
        process's weights hold NaN or inf: a bad update is never checkpointed."""
        if not self.procs.all_finite(self.policy):
            raise NonFiniteError(
                f"step {done}: the weights hold NaN or inf after the update "
                f"(lr {self.cfg.lr}); not checkpointed. The last good checkpoint "
                f"is {latest_checkpoint(self.out)}."
            )
        save_checkpoint(
            self.out,
            done,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            keep=self.cfg.keep_checkpoints,
            rank=self.procs.process_index,
            is_main=self.procs.is_main_process,
            barrier=self.procs.wait_for_everyone,
            sharded=self.procs.sharded,
        )

    def finish(self, tokenizer, init_adapter: Path | None, finished: bool) -> None:
        """OUT/adapter or OUT/model when the run reached its last step (checkpoint.save_final);
        sharded: every process takes part in gathering the whole weights onto rank 0."""
        whole = self.procs.full_state_dict(self.policy) if finished else None
        if finished and self.procs.is_main_process:
            save_final(self.model, self.out, tokenizer, init_adapter, state_dict=whole)
        self.procs.wait_for_everyone()
