"""Verb `expand`: depth up-scaling, a model folder with identity-initialised new layers.

    posttrain expand --model smollm2-135m --method opt-deus --new-layers 6 --out runs/expanded

The methods and placements are described in posttrain/expand/depth.py, which does the work.
"""

from __future__ import annotations

import argparse

from posttrain.expand.depth import METHODS, PLACEMENTS, expand, read_metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="model folder, .gguf file or hub id (default: smollm2-135m)",
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--new-layers", type=int, required=True, help="how many layers to add")
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
