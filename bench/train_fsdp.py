"""Issue 11's "done when" on CPU: the default recipe's training stage, 1 process against 2 FSDP2
processes (torchrun, gloo): same loss curve, exact resume after kill -9, real sharding.

    .venv/bin/python bench/train_fsdp.py --pairs runs/fsdp-bench/pairs.jsonl \
        [--recipe recipes/default.yaml] [--out runs/fsdp-bench] [--json bench/results/train_fsdp.json]

Make the pairs first as the recipe does, at the size you can afford, e.g.
    posttrain sample --problems 'builtin:arith:48?split=train&difficulty=1' --n 4 \
        --temperature 0.7 --max-new-tokens 64 --batch-size 32 --out samples.jsonl
    posttrain verify --samples samples.jsonl --out scored.jsonl
    posttrain pairs --scored scored.jsonl --out pairs.jsonl --strategy confident-wrong \
        --max-pairs-per-problem 2

Four runs of `posttrain train` with the recipe's train.config (every process 1 thread):
p1 (1 process, batch 4), p2 (`--nproc 2`, strategy=fsdp2, batch 2 per process = the same global
batch of 4), p2-killed (as p2 with a checkpoint every steps/3, SIGKILL to the torchrun launcher
one step after the first checkpoint, then --resume; it must end bitwise equal to p2).
Writes the per-step losses, their largest difference, the adapters' largest difference, whether
the resumed adapter is bitwise the straight one, each process's parameter bytes (processes.json),
wall times, and the machine's load and CPU flags; a plot of the two loss curves beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(args: list[str], out: Path, *, kill_after: int = 0) -> float:
    """Run `posttrain train ARGS --out OUT`; with kill_after, SIGKILL the torchrun launcher (its
    workers die with it) once metrics.jsonl has that many steps. Returns wall seconds."""
    command = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "train",
        *args,
        "--out",
        str(out),
        "--no-progress",
    ]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=ENV, stdout=log, stderr=log, start_new_session=True
        )
        if kill_after:
            metrics = out / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after):
                if proc.poll() is not None:
                    raise SystemExit(f"{out}: ended before step {kill_after}; see {log.name}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # `--nproc` exec'd torchrun: the launcher
            proc.wait()
            time.sleep(2)  # the workers' SIGKILL (host.die_with_launcher)
        elif proc.wait() != 0:
            raise SystemExit(f"{out}: posttrain train failed; see {log.name}")
    return time.perf_counter() - start


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--out", default="runs/fsdp-bench")
    ap.add_argument("--json", default="bench/results/train_fsdp.json")
    ap.add_argument("--set", action="append", default=[], help="extra train.config overrides")
    args = ap.parse_args()

    from posttrain.models import resolve_dtype

    recipe = yaml.safe_load((REPO / args.recipe).read_text())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train.yaml"
    config.write_text(yaml.safe_dump(recipe["train"]["config"]))
    batch = int(recipe["train"]["config"].get("batch_size", 4))
    if batch % 2:
        raise SystemExit(
            f"{args.recipe}: train.config.batch_size {batch} is odd; 2 processes "
            "cannot split it evenly"
        )
    common = [
        "--method",
        recipe["train"]["method"],
        "--model",
        recipe["model"],
        "--data",
        str(Path(args.pairs).resolve()),
        "--config",
        str(config),
    ]
    for item in args.set:
        common += ["--set", item]
    two = [*common, "--nproc", "2", "--set", "strategy=fsdp2", "--set", f"batch_size={batch // 2}"]
    runs = {name: out / name for name in ("p1", "p2", "p2-killed")}
    for folder in runs.values():
        if folder.exists():
            raise SystemExit(f"{folder} exists: choose another --out")

    load_start = os.getloadavg()
    seconds = {"p1": train(common, runs["p1"]), "p2": train(two, runs["p2"])}
    steps = len(losses(runs["p1"]))
    every = max(1, steps // 3)
    kill_after = every + 1  # one step past the first checkpoint: resume redoes a step
    two_ckpt = [*two, "--set", f"checkpoint_every={every}"]
    seconds["p2-killed"] = train(two_ckpt, runs["p2-killed"], kill_after=kill_after)
    steps_at_kill = len(losses(runs["p2-killed"]))
    # checkpoint_every does not change the result: p2 is the uninterrupted run to match
    seconds["p2-resumed"] = train([*two_ckpt, "--resume"], runs["p2-killed"])

    l1, l2 = losses(runs["p1"]), losses(runs["p2"])
    a1, a2 = adapter(runs["p1"]), adapter(runs["p2"])
    ak = adapter(runs["p2-killed"])
    processes = json.loads((runs["p2"] / "processes.json").read_text())
    result = {
        "recipe": args.recipe,
        "pairs": sum(1 for _ in open(args.pairs)),
        "steps": steps,
        "overrides": args.set,
        "dtype": resolve_dtype(
            yaml.safe_load((runs["p1"] / "config.yaml").read_text())["dtype"], "cpu"
        ),
        "loss_1_process": l1,
        "loss_2_processes_fsdp2": l2,
        "max_loss_difference": max(abs(a - b) for a, b in zip(l1, l2)),
        "adapter_max_abs_difference": max(float((a1[k] - a2[k]).abs().max()) for k in a1),
        "adapter_max_abs_value": max(float(a1[k].abs().max()) for k in a1),
        "killed_after_step": steps_at_kill,
        "resumed_adapter_bitwise_equal": a1.keys() == ak.keys()
        and all(bool((ak[k] == a2[k]).all()) for k in ak),
        "resumed_losses_equal": losses(runs["p2-killed"]) == l2,
        "parameter_bytes": processes["parameter_bytes"],
        "parameter_bytes_per_process": processes["parameter_bytes_per_process"],
        "wall_seconds": seconds,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "cpu_flags": sorted(
            {
                f
                for f in open("/proc/cpuinfo").read().split()
                if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
            }
        ),
        "cpus": os.cpu_count(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(l1) + 1), l1, "o-", label="1 process")
    ax.plot(range(1, len(l2) + 1), l2, "x--", label="2 processes, fsdp2")
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss")
    ax.set_title(f"default recipe's train stage, {result['pairs']} pairs, {result['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.json).with_suffix(".png"), dpi=100)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("loss_")}, indent=1))


if __name__ == "__main__":
    main()
