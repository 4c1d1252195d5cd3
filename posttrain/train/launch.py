"""The one entry point for training on several processes: one torchrun worker trains from a
resolved config file.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m posttrain.train.launch OUT/launch.yaml [--resume] [--no-progress]

`posttrain train --nproc N` and a recipe's train stage with `train.nproc: N` write OUT/launch.yaml
(the resolved TrainConfig or OnlineConfig: every key, method included) and start exactly this
command (`launch_command`). Several nodes: run the same module under your own torchrun on every
node, on a launch.yaml you wrote with `posttrain train ... --nproc N` or `save_config(cfg, ...)`:

    torchrun --nnodes 2 --node_rank $NODE_RANK --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --nproc_per_node 8 -m posttrain.train.launch /shared/runs/dpo/launch.yaml

The run goes to the folder holding the file. The file is read as is (no preset, no --set: it
was resolved before it was written) and checked once; the worker then calls the offline
`train` or the online `train_online`. A folder that already holds checkpoints needs --resume
(the trainers compare the settings with the run's own OUT/config.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.config import ConfigError, from_dict, load_yaml, save_config
from posttrain.errors import UserError

LAUNCH_FILE = "launch.yaml"


def write_launch(cfg, out: str | Path) -> Path:
    """Save the resolved `cfg` as OUT/launch.yaml, the file launch_command runs."""
    path = Path(out) / LAUNCH_FILE
    save_config(cfg, path)
    return path


def launch_command(
    config_path: str | Path, nproc: int, *, resume: bool = False, progress: bool = False
) -> list[str]:
    """The torchrun command line that trains `config_path` on `nproc` local processes; built
    here only."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "posttrain.train.launch",
        str(config_path),
        *(["--resume"] if resume else []),
        *([] if progress else ["--no-progress"]),
    ]


def load_launch(path: str | Path):
    """The TrainConfig / OnlineConfig saved in `path`, checked."""
    from posttrain.train.config import check_config, config_class

    data = load_yaml(path)
    method = data.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"{path}: method: missing; expected a resolved train config")
    cfg = from_dict(config_class(method), data, str(path))
    check_config(cfg, str(path))
    return cfg


def check_inputs(cfg) -> None:
    """What the run reads, checked before anything is written or loaded: the model's path, the
    data file's rows (offline; CHORD's demonstrations) or the problem source (online, its first
    row). A typo costs a second, not a model load."""
    from posttrain.models import check_model
    from posttrain.train.config import TrainConfig
    from posttrain.train.data import check_rows

    check_model(cfg.model)
    if isinstance(cfg, TrainConfig):
        check_rows(cfg.data, cfg.preference)
        return
    from posttrain.tasks import load_problems

    load_problems(cfg.problems, limit=1)
    if cfg.method == "chord" and cfg.chord.demos:
        check_rows(cfg.chord.demos, preference=False)
    cfg.check_teacher_files()  # method distill


def train_resolved(cfg, out: str | Path, *, resume: bool, progress: bool):
    """Train `cfg` into `out` in this process (its inputs checked first): the offline loop for a
    TrainConfig (returns None), the online one for an OnlineConfig (returns its summary)."""
    from posttrain.train.config import TrainConfig

    check_inputs(cfg)
    if isinstance(cfg, TrainConfig):
        from posttrain.train.offline.loop import train

        train(cfg, out, resume=resume, progress=progress)
        return None
    from posttrain.train.online.loop import train_online

    return train_online(cfg, out, resume=resume, progress=progress)


def main(argv: list[str] | None = None) -> int:
    from posttrain.train.metrics import NonFiniteError

    parser = argparse.ArgumentParser(
        prog="posttrain.train.launch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="a resolved train config, e.g. OUT/launch.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = load_launch(args.config)
        train_resolved(
            cfg, Path(args.config).parent, resume=args.resume, progress=not args.no_progress
        )
    except UserError as e:  # a bad config, a refused checkpoint file ...: one line, no traceback
        print(f"posttrain train: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except NonFiniteError as e:
        print(f"posttrain train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
