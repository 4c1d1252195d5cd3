"""DPO training throughput and peak memory, side by side: posttrain vs TRL's DPOTrainer.

    .venv/bin/python bench/train_dpo.py [--pairs 64] [--tokens 200] [--steps 16] [--dtype bf16]
        [--trl-python /work/venvs/trl/bin/python] [--sides posttrain,posttrain-gc,trl]

TRL runs in its own venv (`--trl-python`: python3 -m venv; pip install torch==2.13.0; pip
install -e '.[bench]'), never in the project's. Sides: posttrain, posttrain-gc (posttrain with
gradient checkpointing), trl (TRL with gradient checkpointing off), trl-gc (TRL's default,
gradient checkpointing on), trl-eager (trl with the model switched to eager attention, the
kernel posttrain picks on CPU for short sequences: how much of the gap that alone explains).

Same pairs, same model (the embedded SmolLM2-135M), same LoRA (r 16, alpha 32, the attention
and MLP projections), same batch (4 pairs), same lr and beta. Each side runs in its own
process (peak memory = that process's max RSS, model loading included), one after the other.
TRL (the `bench` extra) runs with gradient checkpointing off (its default is on, which slows a
small model on CPU) and its default reference handling: a no-grad reference forward with the
adapter disabled inside every step; bf16 = the model loaded in bf16 plus `bf16=True` (autocast),
its default sdpa attention, each batch padded to its longest pair. posttrain runs its defaults
for a CPU (SIDES_RAN below): bf16 model + fp32 adapter under autocast, `padding: auto` = none
(each pair alone, its prompt run once, no padding), `attention: auto` = eager up to 512
tokens, the fused head keeping up to 64 MiB of logits; it computes the reference log-probs
once before training (`ref_cache=false` here, so every run pays for them: reference_seconds)
and its step runs only the policy. Both: 1 optimizer step per 4 pairs, lr 5e-5, beta 0.1,
max_length 1024, no warmup, the same `--threads`.

Pairs are synthetic: arithmetic questions ("What is 37 + 45?") with worked-answer text made of
arithmetic sentences, padded sentence by sentence to about `--tokens` tokens per sequence
(prompt + answer, chat template included), lengths spread +-20 %; chosen ends with the right
sum, rejected with a wrong one. Throughput = tokens of the pairs processed (both sequences of a
pair, prompt included, no padding) / seconds of the measured steps; the first step of each
side is a warm-up and is not measured. tokens_per_cpu_s divides by the process's CPU seconds
of those steps instead (1 thread: the time it computed), which other processes on a loaded
machine disturb less than wall time. Results: printed, and saved to
bench/results/train_dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SIDES = ("posttrain", "posttrain-gc", "trl", "trl-gc", "trl-eager")
SIDES_RAN = {
    "posttrain": "posttrain train defaults on CPU: bf16 base + fp32 LoRA under autocast, "
    "padding none (a forward per prompt and per completion, no padding), eager "
    "attention, fused head keeping <= 64 MiB of logits, reference precomputed "
    "once (reference_seconds), gradient checkpointing off",
    "posttrain-gc": "posttrain as above with gradient_checkpointing=true",
    "trl": "TRL DPOTrainer: bf16 model + bf16=True autocast, fp32 LoRA (PEFT default), batch "
    "padded to its longest pair, sdpa attention, reference forward in every step "
    "(adapter disabled), gradient_checkpointing=False",
    "trl-gc": "trl as above with gradient_checkpointing=True (TRL's default)",
    "trl-eager": "trl as above with the model's attention set to eager",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------- data


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def worked_answer(a: int, b: int, result: int, budget: int, tokenizer, rng) -> str:
    """Arithmetic sentences until the answer would exceed `budget` tokens, then the result."""
    text = f"We add {a} and {b}."
    tail = f" So {a} + {b} = {result}."
    while True:
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        sentence = f" Check a part: {x} + {y} = {x + y}, and {x} * {y} = {x * y}."
        if count(tokenizer, text + sentence + tail) > budget:
            return text + tail
        text += sentence


def make_pairs(n: int, tokens: int, tokenizer, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        budget = int(tokens * rng.uniform(0.8, 1.2)) - count(
            tokenizer,
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
        )
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append(
            {
                "prompt": prompt,
                "chosen": [
                    {
                        "role": "assistant",
                        "content": worked_answer(a, b, a + b, budget, tokenizer, rng),
                    }
                ],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": worked_answer(a, b, wrong, budget, tokenizer, rng),
                    }
                ],
                "problem_id": str(i),
            }
        )
    return rows


def pair_tokens(rows: list[dict], tokenizer) -> list[int]:
    """Tokens of prompt+chosen plus prompt+rejected per pair (what a step processes)."""
    out = []
    for r in rows:
        n = 0
        for side in ("chosen", "rejected"):
            n += count(
                tokenizer, tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False)
            )
        out.append(n)
    return out


# ------------------------------------------------------------------------------- workers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_posttrain(args) -> dict:
    from posttrain.train.config import train_config
    from posttrain.train.offline.loop import train

    out = Path(args.workdir) / f"{args.worker}-run"
    cfg = train_config(
        "dpo",
        None,
        [
            f"dtype={args.dtype}",
            "batch_size=4",
            f"max_steps={args.steps}",
            "lr=5e-5",
            "beta=0.1",
            "lora.r=16",
            "lora.alpha=32",
            "lora.targets=all-linear",
            "checkpoint_every=0",
            "ref_cache=false",
            f"num_threads={args.threads}",
            "warmup_ratio=0.0",
            f"gradient_checkpointing={args.worker == 'posttrain-gc'}",
        ],
        model="smollm2-135m",
        data=args.data,
    )
    summary = train(cfg, out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_seconds": [r["seconds"] for r in rows],
        "step_cpu_seconds": [r["cpu_seconds"] for r in rows],
        "reference_seconds": summary["reference_seconds"],
        "dtype": summary["dtype"],
        "losses": [r["loss"] for r in rows],
    }


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.records import read_jsonl

    torch.set_num_threads(args.threads)
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype=args.dtype)
    if args.worker == "trl-eager":
        model.set_attn_implementation("eager")
    steps: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(args.data)]
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl-run"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=5e-5,
        beta=0.1,
        bf16=args.dtype == "bf16",
        gradient_checkpointing=args.worker == "trl-gc",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        warmup_steps=0,
        max_length=1024,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Timer()],
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": steps, "step_cpu_seconds": cpu, "losses": losses}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_posttrain(args) if args.worker.startswith("posttrain") else run_trl(args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- main


def spawn(name: str, args, data: Path, workdir: Path) -> dict:
    python = args.trl_python if name.startswith("trl") else sys.executable
    cmd = [
        python,
        __file__,
        "--worker",
        name,
        "--data",
        str(data),
        "--workdir",
        str(workdir),
        "--steps",
        str(args.steps),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200, help="tokens per sequence, about")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per side (batch 4)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS / "train_dpo.json"))
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    p.add_argument("--sides", default="posttrain,posttrain-gc,trl")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from posttrain.models import load_tokenizer
    from posttrain.records import write_jsonl

    tok = load_tokenizer("smollm2-135m")
    rows = make_pairs(args.pairs, args.tokens, tok)
    lengths = pair_tokens(rows, tok)
    mean_pair = sum(lengths) / len(lengths)
    args.steps = min(args.steps, args.pairs // 4)
    load = os.getloadavg()
    print(
        f"{args.pairs} pairs, {mean_pair / 2:.0f} tokens per sequence on average "
        f"(min {min(lengths) / 2:.0f}, max {max(lengths) / 2:.0f}); {args.steps} steps of "
        f"4 pairs, {args.dtype}, {args.threads} threads; load average {load[0]:.2f}",
        flush=True,
    )
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_jsonl(data, rows)
        results = {}
        for name in sides:  # one after the other, back to back
            results[name] = spawn(name, args, data, Path(tmp))
            print(
                f"  {name} done in {results[name]['wall_seconds']:.0f} s; load average "
                f"{os.getloadavg()[0]:.2f}",
                flush=True,
            )

    def per_second(seconds: list[float]) -> float:
        measured = seconds[1:] or seconds  # the first step warms up
        return len(measured) * 4 * mean_pair / sum(measured)

    epoch_steps = args.pairs // 4
    for name, r in results.items():
        r["tokens_per_s"] = per_second(r["step_seconds"])
        # per CPU second of the process: the same work measured without the other processes'
        # share of the cores (1 thread: CPU seconds ~ seconds it computed)
        r["tokens_per_cpu_s"] = per_second(r["step_cpu_seconds"])
        if "reference_seconds" in r:
            # One epoch over the whole file, the reference pass included (paid once per file).
            r["tokens_per_s_epoch_with_reference"] = (
                epoch_steps
                * 4
                * mean_pair
                / (epoch_steps * 4 * mean_pair / r["tokens_per_s"] + r["reference_seconds"])
            )
    with open("/proc/cpuinfo") as f:
        flags = sorted(
            {
                w
                for line in f
                if line.startswith("flags")
                for w in line.split()
                if w.startswith(("avx512", "amx"))
            }
        )
    summary = {
        "settings": {
            "pairs": args.pairs,
            "tokens_per_sequence": mean_pair / 2,
            "steps": args.steps,
            "batch": 4,
            "dtype": args.dtype,
            "threads": args.threads,
            "lora": "r16 alpha32 q,k,v,o,gate,up,down",
            "cpu_flags": flags,
            "cpus": os.cpu_count(),
            "load_average_at_start": load,
            "load_average_at_end": os.getloadavg(),
            "sides_ran": {name: SIDES_RAN[name] for name in sides},
            "command": " ".join(["python", "bench/train_dpo.py", *sys.argv[1:]]),
        },
        **results,
        "ratios": {},
    }
    for ours in [n for n in sides if n.startswith("posttrain")]:
        for theirs in [n for n in sides if n.startswith("trl")]:
            a, b = results[ours], results[theirs]
            summary["ratios"][f"{ours}/{theirs}"] = {
                "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                "tokens_per_cpu_s": a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"],
                "tokens_per_s_epoch_with_reference": a["tokens_per_s_epoch_with_reference"]
                / b["tokens_per_s"],
                "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    for name, r in results.items():
        extra = (
            f"; {r['tokens_per_s_epoch_with_reference']:.1f} over one epoch with its "
            f"reference pass ({r['reference_seconds']:.0f} s)"
            if "reference_seconds" in r
            else ""
        )
        print(
            f"{name:13s} {r['tokens_per_s']:8.1f} tokens/s{extra}; peak RSS "
            f"{r['peak_rss_mb']:.0f} MB"
        )
    for pair, r in summary["ratios"].items():
        print(
            f"{pair}: {r['tokens_per_s']:.2f}x tokens/s per step "
            f"({r['tokens_per_cpu_s']:.2f}x per CPU second), "
            f"{r['tokens_per_s_epoch_with_reference']:.2f}x over an epoch with the reference "
            f"pass; peak RSS {r['peak_rss']:.2f}x"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
