"""Verb `expand`: grow a model before training. Depth up-scaling adds identity-initialised
layers (posttrain/expand/depth.py); sparse upcycling turns every dense MLP into E experts that
start as copies of it, in a Mixtral folder (posttrain/expand/upcycle.py).

    posttrain expand --model smollm2-135m --method opt-deus --new-layers 6 --out runs/expanded
    posttrain expand --model smollm2-135m --method upcycle --experts 4 --top-k 2 --out runs/smol-moe
"""

from __future__ import annotations

import argparse
import json

from posttrain.commands.arg_types import int_at_least
from posttrain.config import ConfigError
from posttrain.expand.depth import METHODS, PLACEMENTS, expand, read_metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="model folder, .gguf file or hub id (default: smollm2-135m)",
    )
    parser.add_argument("--method", required=True, choices=(*METHODS, "upcycle"))
    parser.add_argument(
        "--new-layers",
        type=int_at_least(1),
        default=None,
        help="llama-pro, opt-deus: how many layers to add",
    )
    parser.add_argument("--experts", type=int, default=4, help="upcycle: experts per layer")
    parser.add_argument("--top-k", type=int, default=2, help="upcycle: experts per token")
    parser.add_argument(
        "--router-init",
        choices=("normal", "zeros"),
        default="normal",
        help="upcycle: the new router's weights (normal: N(0, std^2); zeros: every token takes "
        "the same k experts, bit-exact but only those train)",
    )
    parser.add_argument(
        "--router-std",
        type=float,
        default=None,
        help="upcycle: std of the normal router (default: the model's initializer_range)",
    )
    parser.add_argument(
        "--noise",
        default="none",
        help="upcycle: symmetry breaker none | gaussian:S (noise of S x each matrix's std) | "
        "drop:R (Drop-Upcycling: re-initialise a share R of each expert's neurons)",
    )
    parser.add_argument("--seed", type=int, default=0, help="upcycle: router and noise draws")
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default=None,
        help="top | interleave (default: top for opt-deus, interleave for llama-pro)",
    )
    parser.add_argument("--out", required=True, help="folder for the expanded model")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the saved weights (the expansion runs in fp32)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")


def main(args) -> int:
    from posttrain.models import check_model

    check_model(args.model)
    if args.method == "upcycle":
        return upcycle_main(args)
    upcycle_only = {"--experts": 4, "--top-k": 2, "--router-init": "normal"}
    upcycle_only.update({"--router-std": None, "--noise": "none", "--seed": 0})
    for flag, default in upcycle_only.items():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise ConfigError(f"{flag}: only with --method upcycle")
    if args.new_layers is None:
        raise ConfigError(f"--new-layers: required with --method {args.method}")
    out = expand(
        args.model,
        args.method,
        args.new_layers,
        args.out,
        placement=args.placement,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    meta = read_metadata(out)
    print(
        f"{meta['base_layers']} -> {meta['layers']} layers ({args.method}, "
        f"{meta['placement']}); new layers {meta['new_layers']}; model in {out}"
    )
    return 0


def upcycle_main(args) -> int:
    from posttrain.expand.upcycle import read_metadata as upcycle_metadata
    from posttrain.expand.upcycle import upcycle

    if args.new_layers is not None or args.placement is not None:
        raise ConfigError("--new-layers / --placement: not used by --method upcycle")
    out = upcycle(
        args.model,
        args.out,
        experts=args.experts,
        top_k=args.top_k,
        router_init=args.router_init,
        router_std=args.router_std,
        noise=args.noise,
        seed=args.seed,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"upcycled: {json.dumps(upcycle_metadata(out))}; model in {out}")
    return 0
