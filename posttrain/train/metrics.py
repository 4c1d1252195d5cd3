"""Per-step metrics as JSONL, and the guard that stops a run on a non-finite loss or gradient.

    tail -n 3 runs/dpo/metrics.jsonl

One line per optimizer step (`step` counts from 1). On resume, lines after the checkpoint's
step (written by the killed run after its last checkpoint) are dropped first, so the file ends
up exactly as an uninterrupted run's. Shared by the offline and online trainers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the run stopped before applying the update."""


TRACKERS = ("tensorboard", "wandb")


class MetricsLog:
    """metrics.jsonl, and optionally the same numbers to experiment trackers through
    accelerate's trackers: `tensorboard` (event files in OUT/tensorboard; needs tensorboard or
    tensorboardX) and `wandb` (offline mode unless WANDB_MODE says otherwise; needs wandb).
    The JSONL file stays the record; trackers are for looking."""

    def __init__(
        self,
        path: str | os.PathLike,
        resume_step: int = 0,
        enabled: bool = True,
        trackers: tuple[str, ...] | list[str] = (),
        config: dict | None = None,
    ):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = []
        if not enabled:
            return
        self.trackers = start_trackers(trackers, self.path.parent, config or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for text in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if isinstance(row, dict) and int(row.get("step", 0)) <= resume_step:
                    kept.append(text + "\n")
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        numbers = {k: float(v) for k, v in row.items() if k != "step" and _number(v)}
        for tracker in self.trackers:
            tracker.log(numbers, step=int(row.get("step", 0)))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def start_trackers(names, folder: Path, config: dict) -> list:
    """accelerate tracker objects for `names`, started; an unknown name or a missing package
    is an error that says what to install (a tracker asked for is never silently skipped)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    from posttrain.config import ConfigError

    trackers = []
    for name in names:
        if name == "tensorboard":
            if not is_tensorboard_available():
                raise ConfigError(
                    "trackers: tensorboard needs `pip install tensorboard` (or tensorboardX)"
                )
            tracker = TensorBoardTracker(folder.name, folder / "tensorboard")
        elif name == "wandb":
            if not is_wandb_available():
                raise ConfigError("trackers: wandb needs `pip install wandb`")
            os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine
            os.environ.setdefault("WANDB_DIR", str(folder))
            tracker = WandBTracker(folder.name)
        else:
            raise ConfigError(f"trackers: unknown {name!r}; expected {' | '.join(TRACKERS)}")
        tracker.start()
        hparams = {k: v for k, v in _flat(config).items() if isinstance(v, (int, float, str, bool))}
        tracker.store_init_configuration(hparams)
        trackers.append(tracker)
    return trackers


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(row: dict) -> dict:
    # JSON has no NaN / inf: write them as strings so the line stays valid JSON.
    return {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def check_finite(step: int, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
    """Raise NonFiniteError with what went wrong, where, and what is kept."""
    bad = [
        f"{name} = {value}"
        for name, value in (("loss", loss), ("grad norm", grad_norm))
        if not math.isfinite(value)
    ]
    if bad:
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written before it"
        )
        raise NonFiniteError(
            f"step {step}: non-finite {' and '.join(bad)}; stopped before "
            f"updating the weights ({kept}). Lower lr, check the data, or "
            "use fp32 (dtype=fp32)."
        )
