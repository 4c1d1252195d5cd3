"""How far a rollout engine's log-probs are from the trainer's: in sync, and one update stale.

    .venv/bin/python bench/rollout_mismatch.py [--steps 3] [--dtypes auto fp32] [--lr 5e-5]

Runs the online GRPO loop on the embedded model (SmolLM2-135M-Instruct) for `--steps` steps
with the sync check off (rollout.max_mismatch_kl 0) so every value is recorded, per dtype:
`stale` (a detached hf engine that loads the saved adapter after every update, except the load
after step `--skip-after`, so the next step samples the policy of one update earlier; every
other step is in sync) and optionally `live` (the hf engine samples the training model; with
the same seeds it samples exactly what the in-sync detached engine samples). The per-step
mismatch/kl, mismatch/abs_logp_max and mismatch/ratio_outside land in
bench/results/rollout_mismatch.json; the default threshold of rollout.max_mismatch_kl is
chosen between the in-sync and the stale values.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(mode: str, dtype: str, steps: int, lr: float, skip_after: int = 2) -> list[dict]:
    from posttrain.models import load_model, load_tokenizer, resolve_dtype
    from posttrain.train.online import online_config, train_online
    from posttrain.train.rollout_engine import DetachedHFEngine

    cfg = online_config(
        "grpo",
        overrides=[
            "num_generations=4",
            "problems_per_step=4",
            "max_new_tokens=48",
            "temperature=1.0",
            f"lr={lr}",
            "lora.r=16",
            f"dtype={dtype}",
            f"max_steps={steps}",
            "checkpoint_every=0",
            "micro_batch_size=16",
            "generation_batch_size=16",
            "num_threads=1",
            "rollout.max_mismatch_kl=0",
            f"rollout.sync={'live' if mode == 'live' else 'adapter'}",
        ],
        problems="builtin:arith:200?split=train",
    )
    engine = None
    if mode == "stale":

        class SkipSecondLoad(DetachedHFEngine):
            loads = 0

            def load_adapter(self, path, name):
                SkipSecondLoad.loads += 1
                # load 1: the initial adapter; load k + 1: the one after step k
                if SkipSecondLoad.loads != skip_after + 1:
                    super().load_adapter(path, name)

        resolved = resolve_dtype(dtype)
        engine = SkipSecondLoad(
            load_model(cfg.model, dtype=resolved), load_tokenizer(cfg.model), batch_size=16
        )
    with tempfile.TemporaryDirectory() as out:
        train_online(cfg, out, engine=engine)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    keep = (
        "step",
        "mismatch/kl",
        "mismatch/abs_logp_max",
        "mismatch/ratio_outside",
        "time/generate",
        "time/train",
        "time/sync",
        "reward/mean",
        "grad_norm",
    )
    return [{k: r.get(k) for k in keep} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--dtypes", nargs="+", default=["auto", "fp32"])
    ap.add_argument("--modes", nargs="+", default=["stale"], choices=["live", "adapter", "stale"])
    ap.add_argument(
        "--skip-after",
        type=int,
        default=2,
        help="skip the adapter load after this step (stale mode)",
    )
    args = ap.parse_args()
    from posttrain.models import resolve_dtype

    results = {
        "cpu_flags_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
        "lr": args.lr,
        "steps": args.steps,
        "skip_after": args.skip_after,
        "runs": {},
    }
    for dtype in args.dtypes:
        for mode in args.modes:
            start = time.time()
            rows = run(mode, dtype, args.steps, args.lr, args.skip_after)
            key = f"{mode}/{resolve_dtype(dtype)}"
            results["runs"][key] = {
                "rows": rows,
                "seconds": time.time() - start,
                "load_average": os.getloadavg()[0],
            }
            print(key, json.dumps(rows), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout_mismatch.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
