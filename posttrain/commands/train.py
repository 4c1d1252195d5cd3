"""Stage `train`: one verb for every method; dispatches on --method to the loop that trains it.

    posttrain train --method dpo --model smollm2-135m --data pairs.jsonl --out runs/dpo \
        [--config train.yaml] [--set lr=5e-5 --set lora.r=8] [--resume]
    posttrain train --nproc 2 --method dpo ... --set strategy=fsdp2
    torchrun --nproc_per_node 8 -m posttrain.cli train --method dpo ... --set strategy=fsdp2

The config resolves once here (train/config.py: resolve_train_config): defaults <- the method's
preset <- --config <- --set <- --model / --data / --problems. With --nproc N it is saved as
OUT/launch.yaml and this process becomes `torchrun --standalone --nproc_per_node N -m
posttrain.train.launch OUT/launch.yaml` (train/launch.py, also the multi-node entry point).

Offline methods (a fixed file): sft, dft, chord-phi (demonstrations or scored samples) and
dpo, ipo, robust-dpo, bdpo, rpo (pairs), in posttrain/train/offline/loop.py. Online methods
(rollouts of --problems each step): grpo, dr-grpo, dapo, grpo-token-mean, gspo, cispo, chord,
distill (--set distill.teacher=FOLDER: on-policy distillation), in posttrain/train/online/loop.py. Config keys: posttrain/train/config.py (BaseTrainConfig,
TrainConfig, LoraConfig) and posttrain/train/online/config.py (OnlineConfig).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posttrain.config import ConfigError, load_yaml, parse_overrides
from posttrain.errors import UsageError
from posttrain.train.config import OFFLINE_METHODS, all_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # "bnpo" is accepted so that its rename is explained (config_class raises)
    parser.add_argument("--method", required=True, choices=[*all_methods(), "bnpo"])
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


def resolve(args):
    """The checked config of this command line, offline or online by --method."""
    from posttrain.train.config import resolve_train_config

    if args.method in OFFLINE_METHODS:
        if args.problems:
            raise ConfigError(
                f"--problems is not used by the offline method {args.method!r}: it "
                "trains on the file given with --data"
            )
        flags = {"data": args.data}
    else:
        if args.data:
            raise ConfigError(
                f"--data is not used by the online method {args.method!r}: it samples "
                "its own completions of --problems (CHORD's demonstrations: "
                "--set chord.demos=FILE)"
            )
        flags = {"problems": args.problems}
        named = "problems" in parse_overrides(args.set)
        if not (args.problems or named or (args.config and "problems" in load_yaml(args.config))):
            # the default source would train on arithmetic without saying so
            raise UsageError(
                f"--problems: required by the online method {args.method!r} (the prompts it "
                "samples and is rewarded on), e.g. --problems 'builtin:arith:512?split=train'"
            )
    return resolve_train_config(
        args.method, path=args.config, overrides=args.set, model=args.model, **flags
    )


def main(args) -> int:
    from posttrain.records import check_output_folder
    from posttrain.train.launch import check_inputs, launch_command, train_resolved, write_launch
    from posttrain.train.metrics import NonFiniteError

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc: {args.nproc}; expected >= 1")
    check_output_folder(args.out)
    cfg = resolve(args)
    if args.nproc is not None:
        if "LOCAL_RANK" in os.environ:  # already one of torchrun's processes
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world != args.nproc:
                raise ConfigError(
                    f"--nproc {args.nproc} inside torchrun with {world} processes; "
                    "drop --nproc when launching with torchrun"
                )
        else:
            check_inputs(cfg)  # before torchrun starts: one line here, not one per process
            path = write_launch(cfg, args.out)
            command = launch_command(
                path, args.nproc, resume=args.resume, progress=not args.no_progress
            )
            sys.stdout.flush()
            os.execv(command[0], command)  # this process becomes the torchrun launcher
    try:
        summary = train_resolved(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteError as e:
        print(f"posttrain train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    if summary and summary["last"]:
        last = summary["last"]
        print(
            f"{'finished' if summary['finished'] else 'stopped'} at step {summary['steps']} of "
            f"{summary['total_steps']}; last reward {last['reward/mean']:.3f}; "
            f"metrics in {Path(args.out) / 'metrics.jsonl'}",
            flush=True,
        )
    return 0
