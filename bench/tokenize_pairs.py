"""Tokenising a pairs file: time and memory of train.data.load_examples, before vs now.

    .venv/bin/python bench/tokenize_pairs.py [--pairs 100000] [--workers 2] [--before 99fc929]
    TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 nice -n 19 .venv/bin/python \
        bench/tokenize_pairs.py --variants now --out bench/results/tokenize_pairs_100k.json

Synthetic pairs with realistic lengths for reasoning data: a system prompt of 10-40 words and
a question of 30-200, chosen and rejected answers of 150-700 words each, drawn from a word
list with numbers (about 1.5 tokens a word: 1518 tokens a pair on average, prompt counted
once); the embedded model's tokenizer (SmolLM2, ChatML).
Each variant runs in its own process:
- before: data.py as of commit `--before` (the prompt rendered and tokenised once for the
  chosen and again for the rejected answer, 3 tokenizer calls per answer, ids kept as tuples
  of Python ints);
- now: the prompt rendered once per pair, one batched tokenizer call per chunk of rows, ids as
  int32 arrays; and the same with `--workers` processes.
Reported per variant: seconds, peak RSS of the process (ru_maxrss), the RSS still held once
the examples are built (current RSS after minus before loading, examples alive) and that per
token. Results: printed and saved to bench/results/tokenize_pairs.json.

100k pairs, `now` only (bench/results/tokenize_pairs_100k.json; one thread, nice 19, load 2-8,
AMD EPYC with avx512_bf16): 1197 s (84 pairs/s), peak RSS 1047 MB, 662 MB held for 151.5M
tokens = 4.58 B a token: the int32 ids plus ~880 B a pair of objects (Example, its tuple, three
array headers), linear in the pairs (20k: 4.38 B a token). About half the tokenizer time goes
to tokenising each completion alone, which only feeds DataReport.retokenised (the joint ids are
what is trained).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# recorded with the result: the tokenizer's batch call uses a thread pool unless told otherwise
THREAD_ENV = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "OMP_NUM_THREADS")
RESULTS = ROOT / "bench" / "results"
WORDS = (
    "the of and to in is that for it as with was on be by this are or from at which an "
    "have not but all were can one has their there been if more when will would who so no "
    "number sum product each value step check answer result equal add multiply divide "
    "therefore because first second next then finally consider let we get find"
).split()


def text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS) if rng.random() < 0.85 else str(rng.randint(0, 999)))
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """n pairs of random words and numbers (SmolLM2 splits numbers into digits)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = [
                {"role": "system", "content": text(rng, rng.randint(10, 40))},
                {"role": "user", "content": text(rng, rng.randint(30, 200))},
            ]
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": text(rng, rng.randint(150, 700))}],
                "rejected": [{"role": "assistant", "content": text(rng, rng.randint(150, 700))}],
                "problem_id": str(i),
            }
            f.write(json.dumps(row) + "\n")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def old_module(commit: str):
    """posttrain/train/data.py as of `commit`, imported as a module of posttrain.train."""
    source = subprocess.run(
        ["git", "show", f"{commit}:posttrain/train/data.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("posttrain.train._data_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "posttrain.train"
    sys.modules[spec.name] = module
    exec(compile(source, f"{commit}:posttrain/train/data.py", "exec"), module.__dict__)
    return module


def worker(args) -> None:
    from posttrain.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    if args.variant == "before":
        load, kwargs = old_module(args.before).load_examples, {}
    else:
        from posttrain.train.data import load_examples as load

        kwargs = {"workers": args.workers if args.variant == "workers" else 1}
    tok("warm up", add_special_tokens=False)
    before = rss_mb()
    start = time.perf_counter()
    examples, report = load(args.data, tok, preference=True, max_length=4096, **kwargs)
    seconds = time.perf_counter() - start
    held = rss_mb() - before
    tokens = sum(len(e.prompt) + sum(len(c) for c in e.completions) for e in examples)
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "pairs": len(examples),
                "tokens_kept": tokens,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_held_mb": held,
                "bytes_held_per_token": held * 2**20 / tokens,
                # beyond the int32 ids (4 B a token): Example, its tuple, 3 array headers
                "overhead_bytes_per_pair": (held * 2**20 - 4 * tokens) / len(examples),
                "pairs_per_s": len(examples) / seconds,
                "retokenised": report.retokenised,
                "workers": kwargs.get("workers", 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--before", default="99fc929", help="commit of the old data.py")
    p.add_argument("--variants", default="before,now,workers")
    p.add_argument("--out", default=str(RESULTS / "tokenize_pairs.json"))
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        worker(args)
        return
    load_start = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        t = time.perf_counter()
        write_pairs(data, args.pairs)
        print(
            f"{args.pairs} pairs written ({data.stat().st_size / 2**20:.0f} MB) in "
            f"{time.perf_counter() - t:.0f} s; load average {load_start[0]:.2f}",
            flush=True,
        )
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--data",
                str(data),
                "--workers",
                str(args.workers),
                "--before",
                args.before,
            ]
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[variant] = json.loads(line[len("RESULT ") :])
            r = results[variant]
            print(
                f"  {variant:8s} {r['seconds']:7.1f} s  {r['pairs_per_s']:7.0f} pairs/s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  held {r['rss_held_mb']:6.0f} MB "
                f"({r['bytes_held_per_token']:.1f} B/token)",
                flush=True,
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
        "pairs": args.pairs,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "nice": os.nice(0),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        **results,
    }
    if "before" in results and "now" in results:
        b, n = results["before"], results["now"]
        summary["speedup"] = b["seconds"] / n["seconds"]
        summary["held_ratio"] = n["rss_held_mb"] / b["rss_held_mb"]
        summary["peak_ratio"] = n["peak_rss_mb"] / b["peak_rss_mb"]
        print(
            f"now vs before: {summary['speedup']:.2f}x faster, {summary['held_ratio']:.2f}x "
            f"the memory held, {summary['peak_ratio']:.2f}x the peak"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
