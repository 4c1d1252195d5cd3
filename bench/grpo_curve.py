"""A short GRPO run on builtin:arith with the embedded model: the reward curve and its numbers.

    .venv/bin/python bench/grpo_curve.py [--out runs/grpo-curve] [--steps 40] [--set key=value]

Trains with `posttrain.train.online.loop` (the same code as `posttrain train --method grpo`), then
writes bench/results/grpo_curve.png (reward per step, a 5-step moving mean, completion length)
and bench/results/grpo_curve.json: the settings, the mean reward of the first and last
`--window` steps with a 95 % interval for their difference (Welch, normal approximation: each
step's reward is the mean of its own completions, independent across steps), and timings.
Rerunning with the same --out resumes a killed run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [
    "num_generations=4",
    "problems_per_step=4",
    "max_new_tokens=48",
    "temperature=0.8",
    "lr=5e-5",
    "lora.r=16",
    "checkpoint_every=5",
    "num_threads=1",
    "micro_batch_size=8",
]


def window_stats(first: list[float], last: list[float]) -> dict:
    diff = statistics.mean(last) - statistics.mean(first)
    se = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(last) / len(last))
    return {
        "first_mean": statistics.mean(first),
        "last_mean": statistics.mean(last),
        "difference": diff,
        "difference_95ci": [diff - 1.96 * se, diff + 1.96 * se],
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    reward = [r["reward/mean"] for r in rows]
    smooth = [statistics.mean(reward[max(0, i - 4) : i + 1]) for i in range(len(reward))]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax.plot(steps, reward, "o", ms=3, alpha=0.5, label="mean reward of the step's completions")
    ax.plot(steps, smooth, "-", lw=2, label="5-step moving mean")
    ax.set_ylabel("reward (fraction correct)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    ax2.plot(steps, [r["completion_length/mean"] for r in rows], label="completion length (mean)")
    ax2.plot(steps, [100 * r["truncated_fraction"] for r in rows], label="truncated (%)")
    ax2.set_xlabel("step")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/grpo-curve")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--problems", default="builtin:arith:1000?split=train")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from posttrain.train.parallel.checkpoint import latest_checkpoint
    from posttrain.train.online.loop import online_config, train_online

    cfg = online_config(
        "grpo", overrides=SETTINGS + [f"max_steps={args.steps}"] + args.set, problems=args.problems
    )
    start = time.time()
    train_online(cfg, args.out, resume=latest_checkpoint(args.out) is not None, progress=True)
    rows = [json.loads(line) for line in open(Path(args.out) / "metrics.jsonl") if line.strip()]
    reward = [r["reward/mean"] for r in rows]
    w = args.window
    RESULTS.mkdir(exist_ok=True)
    title = (
        f"GRPO on builtin:arith, SmolLM2-135M + LoRA r{cfg.lora.r}\n"
        f"G={cfg.num_generations}, {cfg.problems_per_step} problems/step, "
        f"{cfg.max_new_tokens} new tokens, T={cfg.temperature:g}, lr {cfg.lr:g}"
    )
    plot(rows, RESULTS / "grpo_curve.png", title)
    gen = sum(r["time/generate"] for r in rows)
    train = sum(r["time/train"] for r in rows)
    summary = {
        "settings": {k: v for k, v in (s.split("=", 1) for s in SETTINGS + args.set)},
        "problems": args.problems,
        "steps": len(rows),
        "window": w,
        "reward": window_stats(reward[:w], reward[-w:]),
        "correct_first_vs_last": window_stats(
            [r["reward/correct"] for r in rows[:w]], [r["reward/correct"] for r in rows[-w:]]
        ),
        "completion_length_first_last": [
            statistics.mean(r["completion_length/mean"] for r in rows[:w]),
            statistics.mean(r["completion_length/mean"] for r in rows[-w:]),
        ],
        "seconds_per_step": (gen + train + sum(r["time/grade"] for r in rows)) / len(rows),
        "generation_share": gen / (gen + train),
        "wall_seconds_this_invocation": time.time() - start,
        "load_average": os.getloadavg()[0],
        "per_step_reward": reward,
    }
    (RESULTS / "grpo_curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_step_reward"}, indent=2))


if __name__ == "__main__":
    main()
