"""Sampling throughput of the transformers engine on the embedded model.

    .venv/bin/python bench/sample_throughput.py [--prompts 16] [--n 4] [--max-new-tokens 128] \
        [--batch-size 8] [--dtype auto] [--out bench/results/sample_throughput.json]

Prints tokens/s for sampling (temperature 1, batch of `--batch-size` sequences) and for greedy
decoding, with the machine's load average, since a busy CPU lowers both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from posttrain.engines import SamplingParams, make_engine
from posttrain.sampling import prompt_messages
from posttrain.tasks import load_problems


def measure(engine, prompts, params) -> dict:
    start = time.time()
    results = engine.generate(prompts, params)
    seconds = time.time() - start
    tokens = sum(c.num_tokens for cs in results for c in cs)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="also write the result to this JSON file")
    args = ap.parse_args()
    engine = make_engine("hf", args.model, dtype=args.dtype, batch_size=args.batch_size)
    problems = load_problems(f"builtin:arith:{args.prompts}")
    prompts = [prompt_messages(p) for p in problems]
    engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=8))  # warm-up
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg()[0],
        "sampling": measure(
            engine,
            prompts,
            SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens),
        ),
        "greedy": measure(
            engine,
            prompts,
            SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens),
        ),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
