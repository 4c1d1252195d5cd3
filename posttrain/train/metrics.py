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


class MetricsLog:
    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
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


def _jsonable(row: dict) -> dict:
    # JSON has no NaN / inf: write them as strings so the line stays valid JSON.
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def check_finite(step: int, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
    """Raise NonFiniteError with what went wrong, where, and what is kept."""
    bad = [f"{name} = {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
           if not math.isfinite(value)]
    if bad:
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint was written before it")
        raise NonFiniteError(f"step {step}: non-finite {' and '.join(bad)}; stopped before "
                             f"updating the weights ({kept}). Lower lr, check the data, or "
                             "use fp32 (dtype=fp32).")
