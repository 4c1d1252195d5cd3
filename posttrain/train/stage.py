"""The training stage as one function: a resolved train config -> a trained adapter in `out`.

    python -c "from posttrain.train.stage import train_stage; help(train_stage)"

Called by `posttrain run` and `posttrain sweep` with the config the recipe resolved at load
(pipeline/recipe.py: train_config). With `nproc > 1` it saves that config as OUT/launch.yaml and
runs train/launch.py's one command (`torchrun ... -m posttrain.train.launch OUT/launch.yaml`),
checking its exit code; the sharding itself is the trainers' business. An `out` that already
holds checkpoints is resumed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from posttrain.train.launch import launch_command, train_resolved, write_launch


def train_stage(cfg, out: str | Path, *, nproc: int = 1, progress: bool = True) -> None:
    """Train `cfg` (a checked TrainConfig or OnlineConfig) into `out` on `nproc` processes."""
    out = Path(out)
    resume = (out / "checkpoints").exists()
    if nproc <= 1:
        train_resolved(cfg, out, resume=resume, progress=progress)
        return
    command = launch_command(write_launch(cfg, out), nproc, resume=resume)
    print("  " + " ".join(command[1:]), flush=True)
    rc = subprocess.run(command).returncode
    if rc != 0:
        raise RuntimeError(
            f"training under torchrun ({nproc} processes) failed with exit "
            f"code {rc}; its log is above, its files in {out}"
        )
