"""Stage `train`: one verb for every method; dispatches on --method to the loop that trains it.

    posttrain train --method dpo --model smollm2-135m --data pairs.jsonl --out runs/dpo \
        [--config train.yaml] [--set lr=5e-5 --set lora.r=8] [--resume]

Offline methods (a fixed file): sft, dft, chord-phi (demonstrations or scored samples) and
dpo, ipo, robust-dpo, bdpo, rpo (pairs), in posttrain/train/offline.py. Online methods
(rollouts of --problems each step): grpo, dr-grpo, dapo, grpo-token-mean, gspo, cispo, chord, in
posttrain/train/online.py. Config keys: posttrain/train/config.py (BaseTrainConfig,
TrainConfig, LoraConfig) and posttrain/train/online_config.py (OnlineConfig).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..config import ConfigError
from .config import OFFLINE_METHODS
from .metrics import NonFiniteError

# method -> module with `run(args) -> int`. A new loop is one line here, e.g.
# RUNNERS.update(dict.fromkeys(("grpo", "dr-grpo", ...), "posttrain.train.online"))
RUNNERS: dict[str, str] = dict.fromkeys(OFFLINE_METHODS, "posttrain.train.cli")
# "bnpo" stays routed so that its rename is explained (online_config raises).
RUNNERS.update(dict.fromkeys(("grpo", "dr-grpo", "dapo", "grpo-token-mean", "gspo", "cispo",
                              "chord", "bnpo"), "posttrain.train.online"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=list(RUNNERS))
    parser.add_argument("--model", default=None,
                        help="model folder, .gguf file or hub id (default: smollm2-135m)")
    parser.add_argument("--data", default=None,
                        help="JSONL: pairs (DPO family), demonstrations or scored samples (SFT)")
    parser.add_argument("--problems", default=None,
                        help="online methods: problem source, e.g. 'builtin:arith:512?split=train'")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=1e-5 --set lora.r=8")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """The offline methods."""
    from .config import train_config
    from .offline import train

    if args.problems:
        raise ConfigError(f"--problems is not used by the offline method {args.method!r}: it "
                          "trains on the file given with --data")
    cfg = train_config(args.method, args.config, args.set, model=args.model, data=args.data)
    train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def main(args) -> int:
    module = importlib.import_module(RUNNERS[args.method])
    try:
        return int(module.run(args) or 0)
    except NonFiniteError as e:
        print(f"posttrain train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
