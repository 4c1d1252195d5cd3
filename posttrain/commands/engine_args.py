"""The engine options `sample` and `eval` share: --model, --engine, --base-url, --engine-config,
--engine-set, --dtype, --batch-size, --trust-remote-code, and the EngineConfig they make.

    posttrain sample --engine vllm --engine-set gpu_memory_utilization=0.9 --problems ... --out ...
    posttrain eval --engine openai --base-url http://node1:8000/v1 --problems ... --out ...

Argparse in, a checked EngineConfig out; the engines themselves are in posttrain/engines/.
"""

from __future__ import annotations

import argparse

from posttrain.commands.arg_types import int_at_least
from posttrain.config import ConfigError, from_dict, load_yaml, merge, parse_overrides
from posttrain.engines import ENGINES, EngineConfig
from posttrain.models import EMBEDDED


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=EMBEDDED,
        help=f"model folder, .gguf file or hub id (default: {EMBEDDED})",
    )
    parser.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="hf (default; transformers), vllm (in-process vllm.LLM) or openai "
        "(any OpenAI-compatible server, with --base-url)",
    )
    parser.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="URL",
        help="openai engine: a server's base URL, e.g. http://node1:8000/v1 "
        "(repeat for several servers, served round-robin)",
    )
    parser.add_argument(
        "--engine-config",
        default=None,
        metavar="FILE.yaml",
        help="engine settings (EngineConfig keys, e.g. tensor_parallel_size)",
    )
    parser.add_argument(
        "--engine-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one engine setting, e.g. --engine-set gpu_memory_utilization=0.9",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32", "fp16"],
        help="auto: bf16 where the hardware computes it natively, else fp32",
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="sequences per generate call (default: hf 8, vllm 256)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off by default)",
    )


def engine_config(args) -> EngineConfig:
    """EngineConfig from --engine-config FILE, then --engine, --base-url, --engine-set (later
    wins) and --batch-size; an unknown key is an error naming it and listing the known ones."""
    data = load_yaml(args.engine_config) if args.engine_config else {}
    if args.engine:
        data["kind"] = args.engine
    if args.base_url:
        data["base_urls"] = list(args.base_url)
    overrides = parse_overrides(args.engine_set)
    data = merge(data, overrides)
    if args.batch_size is not None:
        if data.get("batch_size", args.batch_size) != args.batch_size:
            raise ConfigError(
                f"--batch-size {args.batch_size} and the engine's batch_size "
                f"{data['batch_size']} are both set; keep one"
            )
        data["batch_size"] = args.batch_size
    nested = [
        k for k, v in overrides.items() if isinstance(v, dict) and k != "chat_template_kwargs"
    ]
    if nested:
        raise ConfigError(
            f"--engine-set {nested[0]}.*: engine keys are not nested, except "
            "chat_template_kwargs.NAME"
        )
    where = f"engine (from {args.engine_config})" if args.engine_config else "engine"
    config = from_dict(EngineConfig, data, where)
    config.check()  # before any problem is read or model loaded
    return config


def sampling_params(args):
    """The checked SamplingParams of `sample`'s and `eval`'s flags (--n, --temperature, --top-p,
    --max-new-tokens, --seed): a value out of range is a UsageError naming the flag."""
    from posttrain.engines import SamplingParams

    return SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    ).check()
