"""Verb `export`: merge a LoRA adapter into its base model and write a plain transformers folder.

    posttrain export --adapter runs/dpo/adapter --out runs/dpo/merged [--model smollm2-135m]

The merge is posttrain/export.py (`export_merged`): fp32, written under a temporary name.
"""

from __future__ import annotations

import argparse

from posttrain.export import export_merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (RUN/adapter)")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument(
        "--model", default=None, help="base model (default: the one in adapter_config.json)"
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--trust-remote-code", action="store_true")


def main(args) -> int:
    out = export_merged(
        args.adapter,
        args.out,
        model=args.model,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"merged model in {out}")
    return 0
