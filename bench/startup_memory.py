"""Issue 18 part 2: each process's peak memory through a sharded start-up on the meta device
(posttrain/train/parallel/meta_start.py), the DPO reference pass and 2 DPO LoRA steps, on 1, 2
(and 4) gloo processes, for a dense and a Qwen3-MoE-shaped model of >= 1.5 B parameters.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/startup_memory.py \
        [--kinds dense,moe] [--procs 1,2] [--models /tmp/posttrain-startup-bench] \
        [--whole] [--malloc-arena-max 2] [--set KEY=VALUE ...] \
        [--json bench/results/startup_memory.json]

The models are written once under --models from a config with random bf16 weights (several
safetensors files, the SmolLM2 tokenizer so the pairs tokenise) and reused afterwards. Each run
is `posttrain train --method dpo` under torchrun (strategy=fsdp2, bf16, LoRA r16 all-linear,
batch 1 per process, 2 steps, 8 short pairs); every worker records its own /proc/self/status
VmHWM (peak resident set) and VmRSS at four points: after imports, after the start-up (the
shards filled), after the reference pass, after the 2 steps. The points are marked by wrapping
the loop's own functions in the worker (shard_and_fill, reference_table); VmHWM is the
kernel's exact peak, so "peak through the reference pass" includes the start-up. --whole runs
the old path too (every process loads the whole model, then shards) for comparison.
Goal (issue 18): per-process peak <= weights / N + 1.0 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

# ~1.52 B parameters each (bf16: ~3.0 GB); vocabulary of the SmolLM2 tokenizer
DENSE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
MOE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=768,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    tie_word_embeddings=False,
)


# ------------------------------------------------------------------------------ models


def write_model(kind: str, folder: Path) -> dict:
    """The random bf16 model of `kind` in `folder` (written once); its parameter count and
    bytes on disk."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, Qwen3MoeConfig

    from posttrain.models import resolve_model

    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ids = dict(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        max_position_embeddings=4096,
    )
    config = LlamaConfig(**DENSE, **ids) if kind == "dense" else Qwen3MoeConfig(**MOE, **ids)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():  # random weights, quicker than the model's own initialisation
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rotary = model.model.rotary_emb
    from posttrain.train.parallel.meta_start import rotary_inv_freq

    rotary.inv_freq.copy_(rotary_inv_freq(rotary))
    rotary.original_inv_freq.copy_(rotary.inv_freq)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="700MB")
    tok.save_pretrained(folder)
    del model
    files = list(folder.glob("*.safetensors"))
    info = {
        "kind": kind,
        "params": params,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "config": DENSE if kind == "dense" else MOE,
    }
    done.write_text(json.dumps(info))
    return info


def write_pairs(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        a, b = 12 + 7 * i, 30 + 3 * i
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}? Think it through."}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. " * 4}],
                "rejected": [{"role": "assistant", "content": f"It is {a + b + 1}. " * 4}],
                "problem_id": str(i),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ worker


def status() -> dict:
    """This process's VmHWM (peak resident set) and VmRSS in GB, from /proc/self/status."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) * 1024 / GB
    return {"peak_gb": round(found["VmHWM"], 3), "rss_gb": round(found["VmRSS"], 3)}


def worker(model: str, pairs: str, out: str, whole: bool, extra: list[str]) -> None:
    """One torchrun process: the offline loop with the four memory points."""
    import torch

    torch.set_num_threads(1)
    from posttrain.train.config import train_config
    from posttrain.train.offline import loop

    rank = int(os.environ.get("RANK", "0"))
    t0 = time.perf_counter()
    points = {"imports": {**status(), "s": 0.0}}

    def mark(name):
        points[name] = {**status(), "s": round(time.perf_counter() - t0, 2)}

    fill = loop.shard_and_fill

    def marked_fill(*args, **kwargs):
        found = fill(*args, **kwargs)
        mark("start-up")
        return found

    reference = loop.reference_table

    def marked_reference(*args, **kwargs):
        if "start-up" not in points:  # the whole-model path: loaded and on its device
            mark("start-up")
        table = reference(*args, **kwargs)
        mark("reference pass")
        return table

    steps = loop.step_gradients

    def marked_steps(*args, **kwargs):
        found = steps(*args, **kwargs)
        mark(f"step {sum(k.startswith('step ') for k in points) + 1} gradients")
        return found

    finish = loop.Run.finish

    def marked_finish(self, *args, **kwargs):
        mark("2 DPO steps")
        finish(self, *args, **kwargs)
        mark("final adapter")

    loop.shard_and_fill = marked_fill
    loop.reference_table = marked_reference
    loop.step_gradients = marked_steps
    loop.Run.finish = marked_finish
    cfg = train_config(
        "dpo",
        None,
        [
            "dtype=bf16",
            "strategy=fsdp2",
            "batch_size=1",
            "grad_accum=1",
            "lora.r=16",
            "lora.alpha=32",
            "max_steps=2",
            "ref_cache=false",
            "checkpoint_every=0",
            *extra,
        ],
        model=model,
        data=pairs,
    )
    given = None
    if whole:
        from posttrain.models import load_model

        given = load_model(model, dtype="bf16")
    loop.train(cfg, Path(out) / "run", model=given, progress=False)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(points))


# ------------------------------------------------------------------------------ driver


def run(
    model: Path, pairs: Path, out: Path, procs: int, whole: bool, env: dict, extra: list[str]
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        str(Path(__file__).resolve()),
        "--worker",
        str(model),
        str(pairs),
        str(out),
        "--whole" if whole else "--meta",
        *extra,
    ]
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(command, env=env, stdout=log, stderr=log, cwd=REPO).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        return {"error": f"exit code {rc}; see {out / 'log.txt'}", "wall_s": round(wall, 1)}
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(procs)]
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "ranks": ranks,
        "peak_gb_max": max(r["2 DPO steps"]["peak_gb"] for r in ranks),
        "peak_gb_with_final_adapter": max(r["final adapter"]["peak_gb"] for r in ranks),
        "startup_s": max(r["start-up"]["s"] for r in ranks),
        "losses": [m["loss"] for m in metrics],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="dense,moe")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--models", default="/tmp/posttrain-startup-bench")
    ap.add_argument("--out", default="/tmp/posttrain-startup-bench/runs")
    ap.add_argument("--whole", action="store_true", help="also the whole-model start-up")
    ap.add_argument("--malloc-arena-max", default="", help="MALLOC_ARENA_MAX for the workers")
    ap.add_argument("--pairs", type=int, default=8, help="pairs in the reference pass")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more training setting (e.g. gradient_checkpointing=true); repeatable",
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = args.malloc_arena_max
    root = Path(args.models)
    root.mkdir(exist_ok=True)
    pairs = write_pairs(root / f"pairs{args.pairs}.jsonl", args.pairs)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "flags": sorted(
                {"avx2", "avx512_bf16"} & set(Path("/proc/cpuinfo").read_text().split())
            ),
            "load_before": os.getloadavg(),
        },
        "malloc_arena_max": args.malloc_arena_max or None,
        "settings": args.set,
        "models": {},
        "runs": [],
    }
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        info = write_model(kind, root / kind)
        print(
            f"{kind}: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GB:.2f} GB "
            f"in {info['files']} files ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        result["models"][kind] = info
        for n in [int(x) for x in args.procs.split(",")]:
            for whole in [False, True] if args.whole else [False]:
                how = "whole" if whole else "meta"
                found = run(
                    root / kind,
                    pairs,
                    Path(args.out) / f"{kind}-{how}-{n}",
                    n,
                    whole,
                    env,
                    args.set,
                )
                found.update(
                    kind=kind,
                    start=how,
                    processes=n,
                    goal_gb=round(info["bytes"] / n / GB + 1.0, 3),
                    load_after=os.getloadavg(),
                )
                result["runs"].append(found)
                print(json.dumps({k: v for k, v in found.items() if k != "ranks"}), flush=True)
                for r, points in enumerate(found.get("ranks", [])):
                    print(
                        f"  rank {r}: "
                        + ", ".join(
                            f"{p} peak {v['peak_gb']:.2f} rss {v['rss_gb']:.2f} GB"
                            for p, v in points.items()
                        ),
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "--whole", sys.argv[6:])
    else:
        main()
