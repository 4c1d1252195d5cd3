"""Verb `plan`: will this training run fit? Memory per GPU from a model's config.json alone.

    posttrain plan --model tests/data/qwen3-235b-a22b --method dpo --lora-r 16 \
        --max-length 8192 --strategy fsdp2 --gpus-per-node 8 --nodes 4 [--json]

The arithmetic and what each row means: posttrain/plan.py.
"""

from __future__ import annotations

import argparse
import json

from posttrain.plan import PlanConfig, format_plan, plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PlanConfig()
    parser.add_argument("--model", required=True, help="model folder or config.json (no weights)")
    parser.add_argument("--method", default=d.method, help="sft, dpo, grpo, ... (default dpo)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument(
        "--lora-targets",
        default=d.lora_targets,
        help="comma-separated: all-linear, attention, mlp, all-router, experts, shared-expert",
    )
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens a sequence")
    parser.add_argument(
        "--micro-batch", type=int, default=d.micro_batch, help="examples (pairs) a forward pass"
    )
    parser.add_argument("--strategy", default=d.strategy, choices=["ddp", "fsdp2"])
    parser.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false"
    )
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    parser.add_argument("--nodes", type=int, default=d.nodes)
    parser.add_argument(
        "--vllm-share",
        type=float,
        default=d.vllm_share,
        help="a colocated vLLM's gpu_memory_utilization (0: none)",
    )
    parser.add_argument("--dtype", default=d.dtype, choices=["bf16", "fp32"])
    parser.add_argument("--attention", default=d.attention, choices=["flash", "eager"])
    parser.add_argument(
        "--padding",
        default=d.padding,
        choices=["longest", "none"],
        help="longest: one forward a micro-batch (GPU); none: one a sequence (CPU default)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args) -> int:
    cfg = PlanConfig(
        method=args.method,
        lora=not args.full,
        lora_r=args.lora_r,
        lora_targets=args.lora_targets,
        max_length=args.max_length,
        micro_batch=args.micro_batch,
        strategy=args.strategy,
        gradient_checkpointing=args.gradient_checkpointing,
        gpus_per_node=args.gpus_per_node,
        nodes=args.nodes,
        vllm_share=args.vllm_share,
        dtype=args.dtype,
        attention=args.attention,
        padding=args.padding,
    )
    result = plan(args.model, cfg)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0
