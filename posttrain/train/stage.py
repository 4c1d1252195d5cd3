"""The training stage as one function: a recipe's `train:` block -> a trained adapter in `out`.

    python -c "from posttrain.train.stage import train_stage; help(train_stage)"

Called by `posttrain run` and `posttrain sweep` (no argv round trip). Offline methods train on
`data` (pairs, scored samples or demonstrations), online methods on `problems`. With
`nproc > 1` the same stage runs as `torchrun --nproc_per_node NPROC -m posttrain.cli train ...`
(the sharding itself is the trainers' business) and its exit code is checked. An `out` that
already holds checkpoints is resumed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from posttrain.config import save_config
from posttrain.pipeline.recipe import TrainStage
from posttrain.train.config import OFFLINE_METHODS, METHOD_PRESETS, method_config
from posttrain.train.config import TrainConfig


def resolve_config(
    method: str, settings: dict, *, model: str, data: str | None = None, problems: str | None = None
):
    """The validated TrainConfig (offline) or OnlineConfig for `method`: defaults <- preset <-
    `settings` (a recipe's train.config) <- model / data / problems."""
    from posttrain.config import merge

    if method in OFFLINE_METHODS:
        presets = {m: METHOD_PRESETS.get(m, {}) for m in OFFLINE_METHODS}
        presets[method] = merge(presets[method], settings)
        return method_config(
            TrainConfig, method, presets, None, None, {"model": model, "data": data}
        )
    from posttrain.train.online.loop import METHODS, OnlineConfig

    presets = dict(METHODS)
    if method in presets:
        presets[method] = merge(presets[method], settings)
    return method_config(
        OnlineConfig, method, presets, None, None, {"model": model, "problems": problems}
    )


def train_stage(
    stage: TrainStage,
    out: str | Path,
    *,
    model: str,
    seed: int = 0,
    data: str | None = None,
    problems: str | None = None,
    progress: bool = True,
) -> None:
    """Train as a recipe's `train:` block says (method, config, nproc) into `out`."""
    method, nproc, settings = stage.method, stage.nproc, {"seed": seed, **stage.config}
    out = Path(out)
    cfg = resolve_config(method, settings, model=model, data=data, problems=problems)
    resume = (out / "checkpoints").exists()
    if nproc > 1:
        save_config(settings, out / "recipe-train.yaml")
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "posttrain.cli",
            "train",
            "--method",
            method,
            "--model",
            model,
            "--out",
            str(out),
            "--config",
            str(out / "recipe-train.yaml"),
            "--no-progress",
        ]
        argv += ["--data", str(data)] if data else ["--problems", str(problems)]
        argv += ["--resume"] if resume else []
        print("  " + " ".join(argv[1:]), flush=True)
        rc = subprocess.run(argv).returncode
        if rc != 0:
            raise RuntimeError(
                f"training under torchrun ({nproc} processes) failed with exit "
                f"code {rc}; its log is above, its files in {out}"
            )
        return
    if method in OFFLINE_METHODS:
        from posttrain.train.offline.loop import train

        train(cfg, out, resume=resume, progress=progress)
    else:
        from posttrain.train.online.loop import train_online

        train_online(cfg, out, resume=resume, progress=progress)
