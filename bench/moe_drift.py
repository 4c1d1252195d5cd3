"""Routing drift of GRPO on the upcycled embedded model, by routing replay mode and dtype.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_drift.py [--steps 2] [--dtypes fp32 bf16]

Upcycles SmolLM2-135M-Instruct into a Mixtral of 4 experts, top-2 (`posttrain expand --method
upcycle`, noise gaussian:0.01 so the experts differ), then runs the online GRPO loop on
builtin:arith with the live hf engine (which records the experts it routes each token to),
`updates_per_batch` 2 and router + linear LoRA, once per moe.replay (none | old | rollout) and
dtype. Logged every step (train/moe/replay.py): moe/rollout_agreement, the share of (token,
layer) whose top-k set is the same in the engine's rollout and the trainer's old-policy pass;
moe/update_flips, the share that changes between the old-policy pass and the batch's last
update. Per-step values and their means land in bench/results/moe_drift.json, a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(model_dir: str, out: Path, replay: str, dtype: str, args) -> list[dict]:
    from posttrain.train.online import loop as online

    cfg = online.online_config(
        "grpo",
        overrides=[
            f"model={model_dir}",
            "problems=builtin:arith:64?split=train",
            f"max_steps={args.steps}",
            f"num_generations={args.generations}",
            f"problems_per_step={args.problems}",
            f"max_new_tokens={args.max_new_tokens}",
            "updates_per_batch=2",
            f"lr={args.lr}",
            "lora.targets=all-linear,all-router",
            "moe.stats_every=0",
            f"moe.replay={replay}",
            f"dtype={dtype}",
            "checkpoint_every=0",
            "rollout.max_mismatch_kl=0",
        ],
    )
    online.train_online(cfg, out)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--replays", nargs="+", default=["none", "old", "rollout"])
    p.add_argument("--problems", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args()

    from posttrain.expand.upcycle import upcycle

    results = {"settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(upcycle("smollm2-135m", Path(tmp) / "moe", noise="gaussian:0.01"))
        for dtype in args.dtypes:
            for replay in args.replays:
                t0 = time.perf_counter()
                rows = run(model, Path(tmp) / f"{dtype}-{replay}", replay, dtype, args)
                keys = ("moe/rollout_agreement", "moe/update_flips", "mismatch/kl")
                steps = [{k: r.get(k) for k in ("step", *keys)} for r in rows]
                mean = {
                    k: sum(s[k] for s in steps) / len(steps)
                    for k in keys
                    if all(s[k] is not None for s in steps)
                }
                entry = {"dtype": dtype, "replay": replay, "steps": steps, "mean": mean}
                entry["seconds"] = time.perf_counter() - t0
                results["runs"].append(entry)
                print(json.dumps(entry), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_drift.json").write_text(json.dumps(results, indent=1))
    print("| dtype | replay | rollout agreement | update flips | mismatch k3 KL |")
    print("|---|---|---|---|---|")
    for e in results["runs"]:
        m = e["mean"]
        print(
            f"| {e['dtype']} | {e['replay']} | {m.get('moe/rollout_agreement', float('nan')):.4f} "
            f"| {m.get('moe/update_flips', float('nan')):.4f} | {m.get('mismatch/kl', float('nan')):.2e} |"
        )


if __name__ == "__main__":
    main()
