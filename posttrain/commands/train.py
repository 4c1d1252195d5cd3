"""Stage `train`: one verb for every method; dispatches on --method to the loop that trains it.

    posttrain train --method dpo --model smollm2-135m --data pairs.jsonl --out runs/dpo \
        [--config train.yaml] [--set lr=5e-5 --set lora.r=8] [--resume]
    posttrain train --nproc 2 --method dpo ... --set strategy=fsdp2   # = torchrun --standalone
    torchrun --nproc_per_node 8 -m posttrain.cli train --method dpo ... --set strategy=fsdp2

Offline methods (a fixed file): sft, dft, chord-phi (demonstrations or scored samples) and
dpo, ipo, robust-dpo, bdpo, rpo (pairs), in posttrain/train/offline/loop.py. Online methods
(rollouts of --problems each step): grpo, dr-grpo, dapo, grpo-token-mean, gspo, cispo, chord, in
posttrain/train/online/loop.py. Config keys: posttrain/train/config.py (BaseTrainConfig,
TrainConfig, LoraConfig) and posttrain/train/online/config.py (OnlineConfig).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from posttrain.config import ConfigError
from posttrain.train.config import OFFLINE_METHODS
from posttrain.train.metrics import NonFiniteError

# method -> "module:function" with `function(args) -> int`. A new loop is one line here, e.g.
# RUNNERS.update(dict.fromkeys(("grpo", "dr-grpo", ...), "posttrain.commands.train:run_online"))
RUNNERS: dict[str, str] = dict.fromkeys(OFFLINE_METHODS, "posttrain.commands.train:run")
# "bnpo" stays routed so that its rename is explained (online_config raises).
RUNNERS.update(
    dict.fromkeys(
        ("grpo", "dr-grpo", "dapo", "grpo-token-mean", "gspo", "cispo", "chord", "bnpo"),
        "posttrain.commands.train:run_online",
    )
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=list(RUNNERS))
    parser.add_argument(
        "--model", default=None, help="model folder, .gguf file or hub id (default: smollm2-135m)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="JSONL: pairs (DPO family), demonstrations or scored samples (SFT)",
    )
    parser.add_argument(
        "--problems",
        default=None,
        help="online methods: problem source, e.g. 'builtin:arith:512?split=train'",
    )
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lr=1e-5 --set lora.r=8",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="start N processes on this machine (execs torchrun --standalone); "
        "pair with --set strategy=fsdp2 or ddp",
    )


def run(args) -> int:
    """The offline methods."""
    from posttrain.train.config import train_config
    from posttrain.train.offline.loop import train

    if args.problems:
        raise ConfigError(
            f"--problems is not used by the offline method {args.method!r}: it "
            "trains on the file given with --data"
        )
    cfg = train_config(args.method, args.config, args.set, model=args.model, data=args.data)
    train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def run_online(args) -> int:
    """The online methods: grpo, dr-grpo, dapo, grpo-token-mean, gspo, cispo, chord."""
    from posttrain.train.online.loop import train_online
    from posttrain.train.online.config import online_config

    if getattr(args, "data", None):
        raise ConfigError(
            f"--data is not used by the online method {args.method!r}: it samples "
            "its own completions of --problems (CHORD's demonstrations: "
            "--set chord.demos=FILE)"
        )
    cfg = online_config(
        args.method,
        args.config,
        args.set,
        model=args.model,
        problems=getattr(args, "problems", None),
    )
    summary = train_online(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    last = summary["last"]
    if last:
        print(
            f"{'finished' if summary['finished'] else 'stopped'} at step {summary['steps']} of "
            f"{summary['total_steps']}; last reward {last['reward/mean']:.3f}; "
            f"metrics in {Path(args.out) / 'metrics.jsonl'}",
            flush=True,
        )
    return 0


def torchrun_command(args) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m posttrain.cli train`
    with the same arguments, less --nproc."""
    argv = ["train", "--method", args.method, "--out", args.out]
    for flag in ("model", "data", "problems", "config"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    for item in args.set:
        argv += ["--set", item]
    argv += ["--resume"] * args.resume + ["--no-progress"] * args.no_progress
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "posttrain.cli",
        *argv,
    ]


def main(args) -> int:
    if args.nproc is not None:
        from posttrain.config import ConfigError

        if args.nproc < 1:
            raise ConfigError(f"--nproc: {args.nproc}; expected >= 1")
        if "LOCAL_RANK" in os.environ:  # already one of torchrun's processes
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world != args.nproc:
                raise ConfigError(
                    f"--nproc {args.nproc} inside torchrun with {world} processes; "
                    "drop --nproc when launching with torchrun"
                )
        else:
            command = torchrun_command(args)
            sys.stdout.flush()
            os.execv(command[0], command)  # this process becomes the torchrun launcher
    module, _, function = RUNNERS[args.method].partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(args) or 0)
    except NonFiniteError as e:
        print(f"posttrain train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
