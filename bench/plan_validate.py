"""`posttrain plan` against measured memory: real `posttrain train` DPO LoRA runs on CPU (gloo),
each process's peak RSS sampled from outside, compared with the plan's per-process peak.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/plan_validate.py \
        [--out runs/plan-validate] [--json bench/results/plan_validate.json] [--quick]

Models are built from configs with random weights (bf16 safetensors) and the embedded model's
tokenizer: a dense Llama and a Qwen3-MoE. Every run is DPO, LoRA r 16 all-linear, bf16,
gradient checkpointing, attention sdpa (the CPU flash kernel, as the plan's `flash`), 1 pair a
process and step, 4 steps, for 1 process (ddp) and 2 processes (fsdp2), at two lengths.

What is compared: the peak RSS of each process during steps 2 and 3 (after step 1's line in
metrics.jsonl, before step 3's: AdamW state exists, no checkpoint is written), minus the same
window of the same run with a minuscule model (hidden 64, 2 layers, same vocabulary and data):
the Python, torch and data overhead cancels, and so does the plan's own estimate of the
minuscule model (subtracted too). The start-up peak (today every process loads the whole
model before sharding; issue 18 part 2) and the reference pass are reported beside it, not
compared. Goal: plan within +-25 % of the measured delta.

Result (bench/results/plan_validate.json, 8 runs): dense within the goal in all 4 (plan /
measured 0.81-0.97); MoE outside in all 4 (0.20-0.25: the MoE runs hold 4-5x what the plan
counts; what is known of why is in the JSON's notes). `--replan` recomputes the plan column of
a results file with the current posttrain/plan.py, measurements unchanged.
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

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

WORDS = ("the answer is found by adding each digit then carrying one to the next place so we "
         "check every step again before we write it down").split()  # fmt: skip

DENSE = dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
MOE = dict(model_type="qwen3_moe", hidden_size=384, intermediate_size=1024,
           moe_intermediate_size=384, num_hidden_layers=6, num_attention_heads=6,
           num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
           tie_word_embeddings=False)  # fmt: skip
MINUSCULE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


def build_model(config: dict, out: Path, tokenizer) -> Path:
    """A random-weight bf16 model folder from a config dict, with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = AutoConfig.for_model(
        config["model_type"],
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_pairs(path: Path, n: int, tokens: int, tokenizer) -> int:
    """n pairs whose chosen and rejected sequences (chat template included) are `tokens` long
    within a few tokens; returns the longest sequence."""
    prompt = [{"role": "user", "content": "What is 12 + 34?"}]
    longest, rows = 0, []
    for i in range(n):
        seqs = []
        for k in range(2):
            words = [WORDS[(i * 7 + k * 3 + j) % len(WORDS)] for j in range(tokens)]
            lo, hi = 1, tokens
            while lo < hi:  # most words whose conversation stays within `tokens`
                mid = (lo + hi + 1) // 2
                msgs = prompt + [{"role": "assistant", "content": " ".join(words[:mid])}]
                if len(tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"]) <= tokens:
                    lo = mid
                else:
                    hi = mid - 1
            text = " ".join(words[:lo])
            msgs = prompt + [{"role": "assistant", "content": text}]
            longest = max(longest, len(tokenizer.apply_chat_template(msgs)["input_ids"]))
            seqs.append([{"role": "assistant", "content": text}])
        rows.append(
            {"prompt": prompt, "chosen": seqs[0], "rejected": seqs[1], "problem_id": str(i)}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return longest


def run(model: Path, pairs: Path, out: Path, nproc: int, max_length: int) -> dict:
    """One `posttrain train` run; every process's RSS sampled each 20 ms, split into phases by
    metrics.jsonl's line count. Returns peaks in bytes (max over processes)."""
    strategy = "fsdp2" if nproc > 1 else "ddp"
    command = [sys.executable, "-m", "posttrain.cli", "train", "--method", "dpo",
               "--model", str(model), "--data", str(pairs), "--out", str(out), "--no-progress",
               "--set", f"strategy={strategy}", "--set", "batch_size=1", "--set", "max_steps=4",
               "--set", f"max_length={max_length + 8}", "--set", "gradient_checkpointing=true",
               "--set", "attention=sdpa", "--set", "dtype=bf16", "--set", "ref_cache=false",
               "--set", "checkpoint_every=100", "--set", "num_threads=1"]  # fmt: skip
    if nproc > 1:
        command[4:4] = ["--nproc", str(nproc)]
    peaks = {"startup+reference": 0, "steps 2-3": 0, "whole run": 0}
    metrics = out / "metrics.jsonl"
    log = open(out.parent / f"{out.name}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=log)
    root = psutil.Process(proc.pid)

    def steps_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
            rss = []
            for p in family:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        done = steps_done()
        phase = "startup+reference" if done == 0 else "steps 2-3" if done < 3 else None
        # the trainer process itself, or each torchrun worker (not the launcher: small)
        workers = sorted(rss)[-nproc:] if rss else [0]
        top = max(workers)
        peaks["whole run"] = max(peaks["whole run"], top)
        if phase:
            peaks[phase] = max(peaks[phase], top)
        time.sleep(0.02)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{out}: posttrain train failed; see {log.name}")
    peaks["seconds"] = round(time.perf_counter() - start, 1)
    return peaks


def planned(config: dict, nproc: int, length: int) -> float:
    from posttrain.plan import PlanConfig, estimate
    from posttrain.shapes import shape_of

    cfg = PlanConfig(method="dpo", lora_r=16, max_length=length, micro_batch=1,
                     strategy="fsdp2" if nproc > 1 else "ddp", gradient_checkpointing=True,
                     gpus_per_node=nproc, nodes=1, padding="none")  # fmt: skip
    est = estimate(shape_of({**config, "vocab_size": 49152}), cfg)
    return sum(est["parts"].values())


def plan_delta(name: str, nproc: int, length: int) -> float:
    """The plan of a run less the plan of the minuscule run it is measured against."""
    model = {"dense": DENSE, "moe": MOE}[name]
    return planned(model, nproc, length) - planned(MINUSCULE, nproc, length)


def replan(path: Path) -> None:
    """The measured figures of `path` against the plan as posttrain/plan.py computes it now."""
    result = json.loads(path.read_text())
    for row in result["runs"]:
        plan = plan_delta(row["model"], row["processes"], row["tokens_per_sequence"])
        row["planned_mib"] = round(plan / 2**20, 1)
        row["plan_over_measured"] = round(plan / (row["measured_mib"] * 2**20), 3)
        row["within_25pct"] = abs(row["plan_over_measured"] - 1) <= 0.25
        print(json.dumps({k: row[k] for k in list(row)[:8]}))
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/plan-validate")
    ap.add_argument("--json", default="bench/results/plan_validate.json")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--quick", action="store_true", help="dense only, 1 process, first length")
    ap.add_argument(
        "--replan",
        action="store_true",
        help="recompute only the plan column of --json's runs with the current posttrain/plan.py",
    )
    args = ap.parse_args()
    if args.replan:
        return replan(Path(args.json))
    load_before = os.getloadavg()
    from transformers import AutoTokenizer

    from posttrain.models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    assert len(tok) == 49152
    models = {name: build_model(cfg, out / name, tok) for name, cfg in
              (("dense", DENSE), ("moe", MOE), ("minuscule", MINUSCULE))}  # fmt: skip
    lengths = [int(x) for x in args.lengths.split(",")]
    procs = [int(x) for x in args.procs.split(",")]
    cases = [(m, n, t) for m in args.models.split(",") for n in procs for t in lengths]
    if args.quick:
        cases = cases[:1]
    rows, baselines = [], {}
    for name, nproc, length in cases:
        pairs = out / f"pairs-{length}-{nproc}.jsonl"
        longest = make_pairs(pairs, 4 * nproc, length, tok)
        if (nproc, length) not in baselines:
            tag = f"minuscule-p{nproc}-t{length}"
            baselines[(nproc, length)] = run(models["minuscule"], pairs, out / tag, nproc, longest)
            print(tag, baselines[(nproc, length)], flush=True)
        tag = f"{name}-p{nproc}-t{length}"
        peaks = run(models[name], pairs, out / tag, nproc, longest)
        base = baselines[(nproc, length)]
        measured = peaks["steps 2-3"] - base["steps 2-3"]
        plan = plan_delta(name, nproc, longest)
        row = {
            "model": name,
            "processes": nproc,
            "strategy": "fsdp2" if nproc > 1 else "ddp",
            "tokens_per_sequence": longest,
            "measured_mib": round(measured / 2**20, 1),
            "planned_mib": round(plan / 2**20, 1),
            "plan_over_measured": round(plan / measured, 3),
            "within_25pct": abs(plan / measured - 1) <= 0.25,
            "peaks_mib": {
                k: round(v / 2**20, 1) if k != "seconds" else v for k, v in peaks.items()
            },
            "minuscule_peaks_mib": {
                k: round(v / 2**20, 1) if k != "seconds" else v for k, v in base.items()
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    from posttrain.shapes import parameters, shape_of

    result = {
        "what": "plan vs measured per-process RSS delta over a minuscule model, DPO LoRA r16, "
        "steps 2-3 (bench/plan_validate.py)",
        "models": {
            name: {**cfg, "parameters": parameters(shape_of({**cfg, "vocab_size": 49152}))["total"]}
            for name, cfg in (("dense", DENSE), ("moe", MOE))
        },
        "runs": rows,
        "machine": {
            "cpu_flags": sorted(
                f
                for f in ("avx2", "avx512_bf16", "amx_bf16")
                if f in Path("/proc/cpuinfo").read_text().split()
            ),
            "cores": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "python": platform.python_version(),
            "note": "2 cores shared with other jobs; memory is what is measured, not time",
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
