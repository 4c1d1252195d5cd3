"""Where the online trainer's batches come from: sampled in line (rollout.mode sync) or by the
engine beside the trainer, a batch ahead, with bounded staleness (rollout.mode async).

    posttrain train --method grpo --out runs/ga --set rollout.sync=adapter \
        --set rollout.mode=async --set rollout.max_staleness=1 \
        --set rollout.engine.kind=openai --set "rollout.engine.base_urls=[http://127.0.0.1:8000/v1]"

Versions: version v is the policy after v updates; the trainer's step t trains on batch t with
version t and then publishes version t + 1 (its adapter saved, rollout_engine.AdapterSync.save).
The staleness of batch t is t minus the version that sampled it.

async: one thread (`AsyncRollouts`) owns the engine and the problem stream. Batch t is sampled
by version t - S (S = rollout.max_staleness; version 0, or the resumed one, for the first
batches): the thread waits until the trainer has published it (logged as async/engine_idle_s),
has the engine load it (the only thread that touches the engine), samples and grades the batch
(rollouts.collect_rollouts, the same seeds as sync) and writes it to OUT/rollouts/step-N.json
(atomic: whole or absent) before handing it over. So while the trainer updates on batch t, the
engine samples batch t + 1 with the adapter of the last sync (S = 1), and S = 0 is the sync run
exactly. A fixed lag rather than the newest adapter: which policy sampled a batch does not depend
on timing, so a run is reproducible and a resumed run equals the uninterrupted one.
Every batch is within S by construction, so nothing sampled while the process runs is dropped;
what can be dropped (async/dropped, completions) is a batch found on disk at a resume that the
resumed run cannot use: sampled with a version the checkpoint has not reached (a future lost
with the kill) or over S stale. The engine's log-probs of the sampled tokens feed the rollout
correction (rollout.correction tis | mis, losses/offpolicy.py) as for any mismatch; the sync
check (rollout.max_mismatch_kl) only judges batches of staleness 0, since a stale batch differs
from the trainer by the updates since (loop.py).

Kill -9 and resume: before a checkpoint at step t the trainer waits until every batch sampled
by a version < t (batches t .. t + S - 1) is on disk (`settle`); the resumed run (weights of
version t) takes those from disk and samples the rest as the uninterrupted run did: a batch is
either read whole from disk or sampled again, never half used. Files of steps before the
last checkpoint written are removed.

The hf engine in a thread shares the trainer's process: the two run their torch ops in parallel
(torch releases the GIL in them) but take turns in the Python between; the thread runs torch on
one OpenMP thread (`_produce`). It shows the design working and is what the tests use. For speed, a server in its own process
(rollout.engine.kind openai, e.g. vLLM on other cores or other GPUs).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from posttrain.config import ConfigError
from posttrain.engines.base import Completion
from posttrain.records import Problem, write_json
from posttrain.train.online.rollouts import Rollout, collect_rollouts


@dataclass
class RolloutBatch:
    """The rollouts of one step: (kept, everything, info) of collect_rollouts, the version that
    sampled them, and the problem stream's position before and after drawing them."""

    step: int
    version: int
    kept: list[Rollout]
    everything: list[Rollout]
    info: dict
    drawn_before: int
    drawn: int


def rollout_source(
    cfg, procs, moe, engine, tokenizer, stream, score, sync, out: Path, start: int, stop: int
):
    """The source rollout.mode names, for a run (or resumption) from step `start` to `stop`."""
    if cfg.rollout.mode == "sync":
        return InlineRollouts(cfg, procs, engine, tokenizer, stream, score, sync)
    if procs.num_processes > 1 or moe.shape is not None:
        raise ConfigError(
            "rollout.mode: 'async' runs in one process on a dense model for now "
            f"({procs.num_processes} processes; mixture-of-experts: {moe.shape is not None}); "
            "set rollout.mode sync"
        )
    return AsyncRollouts(cfg, engine, tokenizer, stream, score, sync, out, start, stop)


class InlineRollouts:
    """rollout.mode sync: batch t sampled when the trainer asks for it, by the policy of
    version t (the engine was given it by `follow` after the last update)."""

    def __init__(self, cfg, procs, engine, tokenizer, stream, score, sync):
        self.cfg, self.procs, self.engine, self.tokenizer = cfg, procs, engine, tokenizer
        self.stream, self.score, self.sync = stream, score, sync
        self.drawn = stream.drawn  # problems drawn up to the last batch taken (checkpointed)

    def follow(self, policy, version: int, state_dict=None) -> None:
        self.sync(policy, version, state_dict=state_dict)

    def take(self, step: int) -> RolloutBatch:
        before = self.stream.drawn
        kept, everything, info = collect_rollouts(
            self.engine,
            self.tokenizer,
            self.stream,
            self.cfg,
            step,
            self.score,
            rank=self.procs.process_index,
            processes=self.procs.num_processes,
        )
        self.drawn = self.stream.drawn
        return RolloutBatch(step, step, kept, everything, info, before, self.drawn)

    def settle(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Closing(Exception):
    pass


class AsyncRollouts:
    """rollout.mode async (module docstring): a thread samples ahead of the trainer."""

    def __init__(self, cfg, engine, tokenizer, stream, score, sync, out: Path, start, stop):
        self.cfg, self.engine, self.tokenizer, self.stream, self.score = (
            cfg,
            engine,
            tokenizer,
            stream,
            score,
        )
        self.sync, self.S, self.start = sync, cfg.rollout.max_staleness, start
        self.root = Path(out) / "rollouts"
        if start == 0:  # a fresh run: files a run killed before its first checkpoint left
            for path in self.root.glob("step-*.json"):
                path.unlink()
        self.drawn = stream.drawn
        # the batches a later resume needs (settle) are sampled past a stop_after_steps
        self.stop = min(stop + self.S, cfg.max_steps)
        self.cond = threading.Condition()
        self.published: dict[int, Path] = {}  # version -> its adapter folder
        self.loaded: int | None = None  # the version the engine serves
        self.produced = start  # batches before this one are done (on disk)
        self.ready: dict[int, RolloutBatch] = {}
        self.error: BaseException | None = None
        self.closing = False
        self.waited = 0.0  # trainer time in `settle`, reported with the next batch
        self.settled = start  # the version of the last checkpoint known to be written
        self.thread = threading.Thread(
            target=self._produce,
            args=(start, self.stop),
            name="async-rollouts",
            daemon=True,
        )
        self.thread.start()

    # ------------------------------------------------------------------ the trainer's side

    def follow(self, policy, version: int, state_dict=None) -> None:
        """Publish the policy of `version`: its adapter saved; the engine loads it when it
        starts its next batch."""
        path = self.sync.save(policy, version, state_dict)
        with self.cond:
            self.published[version] = path
            self.cond.notify_all()

    def take(self, step: int) -> RolloutBatch:
        """Batch `step`, waiting for it if need be; its async/* metrics in its info."""
        t0 = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: step in self.ready or self.error is not None)
            if step not in self.ready:
                raise self.error
            batch = self.ready.pop(step)
        waited, self.waited = time.perf_counter() - t0 + self.waited, 0.0
        staleness = step - batch.version
        if not 0 <= staleness <= self.S:  # the gate in _sample makes this impossible
            raise RuntimeError(f"batch {step} sampled by version {batch.version} (S {self.S})")
        batch.info.update(
            {
                "async/staleness_mean": float(staleness),  # one version per batch
                "async/wait_s": waited,
            }
        )
        self.drawn = batch.drawn
        return batch

    def settle(self, version: int) -> None:
        """Before the checkpoint of `version`: wait until the batches sampled by older
        versions (steps < version + S) are on disk (a resumed run could not sample them
        again), then remove the files of the steps trained before the previous checkpoint
        (written by now; the one of `version`, about to be written, may yet be cut by a kill)."""
        t0 = time.perf_counter()
        with self.cond:
            need = min(version + self.S, self.stop)
            self.cond.wait_for(lambda: self.error is not None or self.produced >= need)
        self.waited += time.perf_counter() - t0
        for path in self.root.glob("step-*.json"):
            if int(path.stem.split("-")[1]) < self.settled:
                path.unlink(missing_ok=True)
        self.settled = version

    def close(self) -> None:
        """Stop the thread (after the batch it is sampling, if any)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()

    # ------------------------------------------------------------------ the engine's side

    def _produce(self, start: int, stop: int) -> None:
        # One OpenMP thread here: a second team of threads created from this thread left the
        # trainer's next parallel op hanging once this thread had ended (libgomp, measured:
        # hf engine, 2 threads each). The hf engine thus samples on one core beside the trainer.
        torch.set_num_threads(1)
        try:
            for step in range(start, stop):
                batch = self._from_disk(step) or self._sample(step)
                with self.cond:
                    self.ready[step] = batch
                    self.produced = step + 1
                    self.cond.notify_all()
        except _Closing:
            pass
        except BaseException as e:  # handed to the trainer by take / settle
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _sample(self, step: int, dropped: int = 0) -> RolloutBatch:
        version = max(step - self.S, self.start)  # S behind, never before the resumed weights
        t0 = time.perf_counter()
        with self.cond:  # the engine idles until the trainer has published that version
            self.cond.wait_for(lambda: self.closing or version in self.published)
            if self.closing:
                raise _Closing
            path = self.published[version]
        idle = time.perf_counter() - t0
        if self.loaded != version:
            self.sync.load(path, version)
            self.loaded = version
        before = self.stream.drawn
        kept, everything, info = collect_rollouts(
            self.engine, self.tokenizer, self.stream, self.cfg, step, self.score
        )
        info.update({"async/engine_idle_s": idle, "async/dropped": dropped})
        batch = RolloutBatch(step, version, kept, everything, info, before, self.stream.drawn)
        write_json(self.root / f"step-{step:08d}.json", _batch_row(batch))
        return batch

    def _from_disk(self, step: int) -> RolloutBatch | None:
        """Batch `step` as written before a kill, when this run can use it: sampled by a
        version the resumed weights have reached, within S, drawn where the stream stands.
        Otherwise None, and a file that was there is dropped (counted) and sampled again."""
        path = self.root / f"step-{step:08d}.json"
        if not path.exists():
            return None
        batch = _read_batch(json.loads(path.read_text()))
        if batch.version <= self.start and step - batch.version <= self.S:
            if batch.drawn_before == self.stream.drawn and batch.step == step:
                self.stream.drawn = batch.drawn
                batch.info.update({"async/engine_idle_s": 0.0, "async/dropped": 0})
                return batch
        path.unlink()
        return self._sample(step, dropped=len(batch.everything))


# ------------------------------------------------------------------------- the files


def _batch_row(batch: RolloutBatch) -> dict:
    kept = {id(r) for r in batch.kept}
    rollouts = []
    for r in batch.everything:
        row = asdict(r)  # the problem and completion as dicts too
        row["problem"] = r.problem.to_dict()
        row["completion"].pop("routed_experts")  # None: async refuses MoE models
        row["kept"] = id(r) in kept
        rollouts.append(row)
    head = ("step", "version", "info", "drawn_before", "drawn")
    return {**{k: getattr(batch, k) for k in head}, "rollouts": rollouts}


def _read_batch(row: dict) -> RolloutBatch:
    everything, kept = [], []
    for r in row["rollouts"]:
        rollout = Rollout(
            **{
                **{k: v for k, v in r.items() if k != "kept"},
                "problem": Problem.from_dict(r["problem"]),
                "completion": Completion(**r["completion"]),
            }
        )
        everything.append(rollout)
        if r["kept"]:
            kept.append(rollout)
    head = {k: v for k, v in row.items() if k != "rollouts"}
    return RolloutBatch(**head, kept=kept, everything=everything)
