"""How far a rollout engine's log-probs are from the trainer's: in sync, and one update stale.

    .venv/bin/python bench/rollout_mismatch.py [--steps 3] [--dtypes auto fp32] [--lr 1e-4]

Runs the online GRPO loop on the embedded model (SmolLM2-135M-Instruct) three ways for
`--steps` steps each, with the sync check off (rollout.max_mismatch_kl 0) so every value is
recorded: `live` (the hf engine samples the training model), `adapter` (a detached hf engine
that loads the saved adapter after every update) and `stale` (the same, but the adapter load
after step 1 is skipped, so step 2 samples the policy of one update earlier). The per-step
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


def run(mode: str, dtype: str, steps: int, lr: float) -> list[dict]:
    from posttrain.models import load_model, load_tokenizer, resolve_dtype
    from posttrain.train.online import online_config, train_online
    from posttrain.train.rollout_engine import DetachedHFEngine

    cfg = online_config("grpo", overrides=[
        "num_generations=4", "problems_per_step=4", "max_new_tokens=48", "temperature=1.0",
        f"lr={lr}", "lora.r=16", f"dtype={dtype}", f"max_steps={steps}", "checkpoint_every=0",
        "micro_batch_size=16", "generation_batch_size=16", "num_threads=1",
        "rollout.max_mismatch_kl=0", f"rollout.sync={'live' if mode == 'live' else 'adapter'}"],
        problems="builtin:arith:200?split=train")
    engine = None
    if mode == "stale":
        class SkipSecondLoad(DetachedHFEngine):
            loads = 0

            def load_adapter(self, path, name):
                SkipSecondLoad.loads += 1
                if SkipSecondLoad.loads != 2:  # load 1: initial; load 2: after step 1
                    super().load_adapter(path, name)

        resolved = resolve_dtype(dtype)
        engine = SkipSecondLoad(load_model(cfg.model, dtype=resolved), load_tokenizer(cfg.model),
                                batch_size=16)
    with tempfile.TemporaryDirectory() as out:
        train_online(cfg, out, engine=engine)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    keep = ("step", "mismatch/kl", "mismatch/abs_logp_max", "mismatch/ratio_outside",
            "time/generate", "time/train", "time/sync", "reward/mean")
    return [{k: r.get(k) for k in keep} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtypes", nargs="+", default=["auto", "fp32"])
    args = ap.parse_args()
    from posttrain.models import resolve_dtype

    results = {"cpu_flags_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
               "lr": args.lr, "steps": args.steps, "runs": {}}
    for dtype in args.dtypes:
        for mode in ("live", "adapter", "stale"):
            start = time.time()
            rows = run(mode, dtype, args.steps, args.lr)
            key = f"{mode}/{resolve_dtype(dtype)}"
            results["runs"][key] = {"rows": rows, "seconds": time.time() - start,
                                    "load_average": os.getloadavg()[0]}
            print(key, json.dumps(rows), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout_mismatch.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
