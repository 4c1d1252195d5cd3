"""DPO LoRA steps on long synthetic answers: peak RSS and seconds per step by length, with and
without gradient checkpointing, on the embedded model (smollm2-135m), bf16, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/long_traces.py \\
        --lengths 512 2048 4096 --out bench/results/long_traces.json

Each (length, checkpointing) runs in its own process (peak RSS is per process): one pair whose
chosen and rejected answers are random common words cut to `length` + 40 - prompt tokens
(length_policy truncate_completion; the templated prompt ~30 tokens),
the real trainer (posttrain.train.offline.loop.train, padding auto = none on CPU: the prompt
runs once, attention auto), ref_cache off, `--steps` steps of that pair. RSS is sampled every
20 ms from /proc/self/statm and split by stage (model + reference pass, training steps);
`train_peak_mib - loaded_mib` is what the steps add over the loaded model. Whether memory is
linear in length: the increments per token between consecutive lengths are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a cat dog sun moon tree house river stone red blue green small big old new one two "
    "three four five six seven eight nine ten we you they it is was and or but so then"
).split()


def answer(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def child(length: int, checkpointing: bool, steps: int, attention: str) -> dict:
    """One run in this process; returns its figures."""
    import builtins
    import threading

    import torch

    torch.set_num_threads(1)
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    state = {"stage": "start", "peaks": {}}

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def sampler():
        while True:
            r = rss()
            s = state["stage"]
            state["peaks"][s] = max(state["peaks"].get(s, 0.0), r)
            time.sleep(0.02)

    threading.Thread(target=sampler, daemon=True).start()
    from posttrain.train.config import train_config
    from posttrain.train.offline import loop as offline

    lines = []
    _print = builtins.print

    def marking_print(*a, **k):
        text = " ".join(str(x) for x in a)
        lines.append(text)
        if text.startswith("trainable parameters"):
            state["stage"] = "adapter"
        _print(*a, **k)

    builtins.print = marking_print
    real_step = offline.step_gradients
    loaded = {}

    def step(*a, **k):
        if state["stage"] != "steps":
            loaded["mib"] = rss()
            state["stage"] = "steps"
        return real_step(*a, **k)

    offline.step_gradients = step
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        # about one token a word (a space + a common word) for SmolLM2's tokenizer
        row = {
            "prompt": "Think step by step for a long time, then answer.",
            "chosen": answer(length, 1),
            "rejected": answer(length, 2),
        }
        data.write_text(json.dumps(row) + "\n")
        cfg = train_config(
            "dpo",
            None,
            [
                "dtype=bf16",
                "batch_size=1",
                f"max_steps={steps}",
                "lora.r=16",
                "lora.alpha=32",
                "checkpoint_every=0",
                "ref_cache=false",
                "num_threads=1",
                f"attention={attention}",
                # the words give ~1.2 tokens each: cut both answers to about `length` tokens
                f"max_length={length + 40}",
                "length_policy=truncate_completion",
                f"gradient_checkpointing={str(checkpointing).lower()}",
            ],
            model="smollm2-135m",
            data=str(data),
        )
        summary = offline.train(cfg, Path(tmp) / "run", progress=False)
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    time.sleep(0.1)
    import resource

    lengths = summary["data"]["lengths"]
    used = next((x for x in lines if " attention, " in x), "")
    return {
        "length": length,
        "checkpointing": checkpointing,
        "sequence_tokens": lengths["max"],
        "attention": used.split(" attention,")[0].split(", ")[-1] if used else None,
        "loaded_mib": round(loaded.get("mib", 0.0)),
        "load_and_reference_peak_mib": round(
            max(v for k, v in state["peaks"].items() if k in ("start", "adapter"))
        ),
        "train_peak_mib": round(state["peaks"].get("steps", 0.0)),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds_per_step": [round(r["seconds"], 2) for r in rows],
        "tokens_per_s": [round(r["tokens_per_s"], 1) for r in rows],
        "loss": [r["loss"] for r in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--attention", default="auto")
    p.add_argument("--out", default="")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--child", nargs=2, metavar=("LENGTH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(int(args.child[0]), args.child[1] == "on", args.steps, args.attention)
        print("RESULT " + json.dumps(result), flush=True)
        return
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    results = []
    for length in args.lengths:
        for on in modes:
            cmd = [sys.executable, __file__, "--child", str(length), "on" if on else "off"]
            cmd += ["--steps", str(args.steps), "--attention", args.attention]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=args.timeout
            )
            found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not found:
                result = {"length": length, "checkpointing": on, "error": proc.stderr[-2000:]}
            else:
                result = json.loads(found[-1][len("RESULT ") :])
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                write(args.out, results)
    for on in modes:
        done = [r for r in results if r["checkpointing"] == on and "error" not in r]
        for a, b in zip(done, done[1:]):
            grow_a = a["train_peak_mib"] - a["loaded_mib"]
            grow_b = b["train_peak_mib"] - b["loaded_mib"]
            print(
                f"checkpointing {'on' if on else 'off'}: {a['length']} -> {b['length']} tokens: "
                f"peak {a['train_peak_mib']} -> {b['train_peak_mib']} MiB "
                f"(x{b['train_peak_mib'] / a['train_peak_mib']:.2f}); over the loaded model "
                f"{grow_a} -> {grow_b} MiB (x{grow_b / max(grow_a, 1):.2f} for "
                f"x{b['length'] / a['length']:.2f} tokens)"
            )


def write(path: str, results: list) -> None:
    out = {
        "what": "DPO LoRA r16 steps on one synthetic pair (chosen and rejected of LENGTH tokens), "
        "smollm2-135m bf16, 1 thread, padding auto (none on CPU), ref_cache off",
        "machine": machine(),
        "results": results,
    }
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def machine() -> dict:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "avx2": " avx2 " in flags,
        "avx512_bf16": " avx512_bf16 " in flags,
        "load_avg": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
