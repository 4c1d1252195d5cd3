"""Where an MoE training step's CPU memory goes: the process's RSS against torch's own tensors.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/moe_memory.py moe 256,640 \
        [--impl grouped_mm|eager] [--dir runs/moe-memory]

Builds bench/plan_validate.py's model (moe or dense) from its config with random bf16 weights,
saves it once, then in a fresh process: loads it with transformers (RSS, anonymous and
file-backed, against the parameters' bytes), adds LoRA r16 all-linear with gradient
checkpointing, and for each length runs one DPO-shaped step (a pair sharing a 20-token prompt,
unpadded, bf16 autocast; posttrain's forward and fused head) while torch.profiler records every
tensor allocation. Printed per length: the step's RSS high-water mark above its start (VmHWM
reset through /proc/self/clear_refs) and the peak of live tensor bytes from the profiler's
memory events, next to posttrain plan's activations + logits + gradients (padding none).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MIB = 2**20


def status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024  # MiB
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.plan_validate import DENSE, MOE
    from posttrain.plan import PlanConfig, estimate
    from posttrain.shapes import shape_of
    from posttrain.train.config import LoraConfig
    from posttrain.train.data import Example
    from posttrain.train.forward import unpadded_logps
    from posttrain.train.lora import apply_lora
    from posttrain.train.modes import enable_gradient_checkpointing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["moe", "dense"])
    ap.add_argument("lengths", help="tokens a sequence, comma-separated")
    ap.add_argument("--impl", default="grouped_mm", help="transformers experts_implementation")
    ap.add_argument("--dir", default="runs/moe-memory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = {"moe": MOE, "dense": DENSE}[args.model]
    folder = Path(args.dir) / args.model
    if not (folder / "config.json").exists():  # written once; measure in a later process
        fields = {k: v for k, v in config.items() if k != "model_type"}
        hf = AutoConfig.for_model(
            config["model_type"], vocab_size=49152, max_position_embeddings=8192, **fields
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(hf).to(torch.bfloat16).save_pretrained(folder)
        print(f"wrote {folder}; run again to measure (a fresh process)")
        return
    kw = {"experts_implementation": args.impl} if args.model == "moe" else {}
    before = status()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa", **kw
    )
    gc.collect()
    loaded = status()
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    print(json.dumps({"model": args.model, "impl": kw.get("experts_implementation"),
                      "param_mib": round(param_mib, 1),
                      "load_mib": {k: round(loaded[k] - before[k], 1)
                                   for k in ("VmRSS", "RssAnon", "RssFile")}}), flush=True)  # fmt: skip
    model = apply_lora(model, LoraConfig(r=16, targets="all-linear"))
    enable_gradient_checkpointing(model)
    model.train()

    def step(T: int, profile: bool) -> dict:
        P = 20
        rng = np.random.default_rng(0)
        pair = Example(rng.integers(0, 49000, P),
                       (rng.integers(0, 49000, T - P), rng.integers(0, 49000, T - P)), 1)  # fmt: skip
        gc.collect()
        start = status()["VmRSS"]
        reset_peak()
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        if profile:
            prof.__enter__()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = unpadded_logps(model, [pair], "cpu")
        logps.sum().backward()
        if profile:
            prof.__exit__(None, None, None)
        rss = status()["VmHWM"] - start
        for p in model.parameters():
            p.grad = None
        if not profile:
            return {}
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
            key=lambda e: e.start_ns(),
        )
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        parts = estimate(
            shape_of({**config, "vocab_size": 49152}),
            PlanConfig(
                method="dpo", max_length=T, strategy="ddp", gpus_per_node=1, padding="none"
            ),  # fmt: skip
        )["parts"]
        planned = parts["activations"] + parts["logits"] + parts["trainable gradients"]
        return {"tokens_per_sequence": T, "rss_peak_mib": round(rss, 1),
                "tensor_peak_mib": round(peak / MIB, 1),
                "plan_mib": round(planned / MIB, 1)}  # fmt: skip

    step(64, profile=False)  # warm-up: first-call allocations are not the step's
    for T in (int(x) for x in args.lengths.split(",")):
        print(json.dumps(step(T, profile=True)), flush=True)


if __name__ == "__main__":
    main()
