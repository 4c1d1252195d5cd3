"""Verb `sample`: K answers per problem from a model, one JSONL row per sample, resumable.

    posttrain sample --model smollm2-135m --problems builtin:arith:8 --n 2 --out samples.jsonl

The sampling itself (prompts, rows, resuming) is posttrain/sampling.py; the engine options are
posttrain/commands/engine_args.py. A server engine whose server dies mid-run stops the command
with EngineUnavailable after the finished prompts' rows are written; it then exits non-zero
saying how many rows are done and that a rerun resumes.
"""

from __future__ import annotations

import argparse

from posttrain.commands.arg_types import int_at_least
from posttrain.commands.engine_args import add_engine_arguments, engine_config, sampling_params
from posttrain.engines import make_engine
from posttrain.records import check_output_file
from posttrain.sampling import sample_problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--problems", required=True, help="problem source, e.g. builtin:arith:8")
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None, help="use only the first N problems"
    )
    parser.add_argument("--n", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--out", required=True)


def main(args) -> int:
    from posttrain.models import check_model
    from posttrain.tasks import load_problems

    # everything a typo can break, checked before the model loads
    params = sampling_params(args)
    check_output_file(args.out)
    config = engine_config(args)
    if config.kind != "openai":  # a server names its own models
        check_model(args.model)
    problems = load_problems(args.problems, limit=args.limit)
    engine = make_engine(
        config, args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    try:
        stats = sample_problems(
            engine,
            problems,
            args.out,
            params,
            system_prompt=args.system_prompt,
            chunk_size=getattr(engine, "batch_size", 8),
        )
    finally:
        engine.close()
    print(
        f"{stats['rows']} samples in {args.out} ({stats['new_samples']} new); "
        f"{stats['new_tokens']} tokens in {stats['seconds']:.1f} s = "
        f"{stats['tokens_per_second']:.1f} tokens/s"
    )
    return 0
