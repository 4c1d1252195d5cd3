"""Verb `eval`: evaluate a model (or base + adapter) on a problem set and print its summary.

    posttrain eval --problems builtin:arith:300?split=test --out runs/eval-base
    posttrain eval --adapter runs/train/adapter --problems hle:hle.jsonl --protocol hle --out ...

What is written and how it is graded (protocols, judge) is posttrain/evaluation/evaluate.py;
the engine options are posttrain/commands/engine_args.py.
"""

from __future__ import annotations

import argparse

from posttrain.commands.arg_types import int_at_least
from posttrain.commands.engine_args import add_engine_arguments, engine_config, sampling_params
from posttrain.errors import UsageError
from posttrain.engines import make_engine
from posttrain.evaluation.evaluate import PROTOCOLS, evaluate
from posttrain.evaluation.summary import format_summary


JUDGE_KEY_ENV, JUDGE_CONCURRENCY = "POSTTRAIN_JUDGE_API_KEY", 8  # the judge flags' defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--adapter",
        default=None,
        help="LoRA adapter folder (hf: merged on the device; vllm: a LoRA request)",
    )
    parser.add_argument("--problems", required=True)
    parser.add_argument("--limit", type=int_at_least(1), default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=1, help="samples per item (avg@K when > 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="auto", choices=PROTOCOLS)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--system-prompt-file", default=None)
    parser.add_argument("--judge", default=None, help="OpenAI-compatible base URL of a judge")
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--judge-template", default=None, help="file replacing the judge prompt")
    parser.add_argument(
        "--judge-key-env",
        default=JUDGE_KEY_ENV,
        help="environment variable holding the judge's API key",
    )
    parser.add_argument(
        "--judge-concurrency",
        type=int_at_least(1),
        default=JUDGE_CONCURRENCY,
        help="judgements in flight at once (threads)",
    )


def main(args) -> int:
    from posttrain.models import check_adapter, check_model
    from posttrain.records import check_output_folder, read_text_file
    from posttrain.tasks import load_problems

    # everything a typo can break, checked before the model loads
    params = sampling_params(args)
    if args.temperature <= 0 and args.n > 1:
        raise UsageError(f"--n {args.n} needs --temperature > 0 (greedy repeats itself)")
    check_output_folder(args.out)
    if args.system_prompt is not None and args.system_prompt_file:
        raise UsageError("--system-prompt and --system-prompt-file: give one")
    system_prompt = args.system_prompt
    if args.system_prompt_file:
        system_prompt = read_text_file(args.system_prompt_file, "--system-prompt-file")
    judge_only = {
        "--judge-model": args.judge_model is not None,
        "--judge-template": args.judge_template is not None,
        "--judge-key-env": args.judge_key_env != JUDGE_KEY_ENV,
        "--judge-concurrency": args.judge_concurrency != JUDGE_CONCURRENCY,
    }
    given = [flag for flag, is_set in judge_only.items() if is_set]
    if given and not args.judge:
        raise UsageError(f"{given[0]} is used only with --judge URL (the judge's server)")
    judge = None
    if args.judge:
        from posttrain.evaluation.judge import Judge

        if not args.judge_model:
            raise UsageError("--judge needs --judge-model (the judge server's model name)")
        judge = Judge(
            args.judge,
            args.judge_model,
            api_key_env=args.judge_key_env,
            template_path=args.judge_template,
        )
    config = engine_config(args)
    if config.kind != "openai":  # a server names its own models and reads its own folders
        if args.adapter is not None:
            check_adapter(args.adapter)
        check_model(args.model)
    problems = load_problems(args.problems, limit=args.limit)
    engine = make_engine(
        config,
        args.model,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
    )
    try:
        summary = evaluate(
            engine,
            problems,
            args.out,
            params,
            protocol=args.protocol,
            system_prompt=system_prompt,
            judge=judge,
            judge_concurrency=args.judge_concurrency,
        )
    finally:
        engine.close()
    print(format_summary(summary, title=f"{engine.model_id} on {args.problems}: "))
    return 0
