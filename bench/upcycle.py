"""Size and greedy decoding speed of the embedded model and its sparse upcycle, side by side.

    PYTHONPATH=. .venv/bin/python bench/upcycle.py [--experts 4 --top-k 2] \
        [--moe-dir runs/smol-moe-4x2] [--out bench/results/upcycle.json]

Upcycles SmolLM2-135M (posttrain/expand/upcycle.py, random router, no noise), then for the dense
and the upcycled model: parameters (total; per token for the MoE), weights on disk, load time,
and greedy decoding of the same 50 held-out arith prompts (64 new tokens, one `generate` call,
hf engine, fp32 on the CPU): tokens/s is generated tokens over generation time. The share of
completions that are identical is written too (no noise: expected all). The machine's CPU flags
and load average go into the results: on a shared CPU the ratio means more than the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for word in f.read().split():
            if word in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):
                flags.add(word)
    import torch

    return {
        "cpu_flags": sorted(flags),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def folder_bytes(folder: str) -> dict:
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {"weights_bytes": weights, "folder_bytes": sum(p.stat().st_size for p in files)}


def run(name: str, folder: str, prompts, params) -> tuple[dict, list[str]]:
    from posttrain.engines.hf import HFEngine

    t0 = time.monotonic()
    engine = HFEngine.from_name(folder, dtype="fp32", batch_size=len(prompts), device="cpu")
    load_s = time.monotonic() - t0
    n_params = engine.model.num_parameters()
    t0 = time.monotonic()
    outs = engine.generate(prompts, params)
    gen_s = time.monotonic() - t0
    engine.close()
    tokens = sum(len(c[0].token_ids) for c in outs)
    row = {
        "model": name,
        "folder": folder,
        "parameters": n_params,
        **folder_bytes(folder),
        "load_s": round(load_s, 2),
        "generated_tokens": tokens,
        "generate_s": round(gen_s, 2),
        "tokens_per_second": round(tokens / gen_s, 1),
    }
    print(json.dumps(row), flush=True)
    return row, [c[0].text for c in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-dir", default=str(ROOT / "runs" / "smol-moe-4x2"))
    parser.add_argument("--prompts", default="builtin:arith:50?split=test")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "upcycle.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core CPU two OpenMP threads per process "
        "collapse when other processes run)",
    )
    parser.add_argument(
        "--skip-upcycle", action="store_true", help="reuse the folder --moe-dir already holds"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from posttrain.engines import SamplingParams
    from posttrain.expand.upcycle import read_metadata, upcycle
    from posttrain.models import resolve_model
    from posttrain.sampling import prompt_messages
    from posttrain.tasks import load_problems

    before = machine()
    t0 = time.monotonic()
    if not args.skip_upcycle:
        upcycle("smollm2-135m", args.moe_dir, experts=args.experts, top_k=args.top_k)
    upcycle_s = None if args.skip_upcycle else round(time.monotonic() - t0, 1)
    meta = read_metadata(args.moe_dir)
    prompts = [prompt_messages(p) for p in load_problems(args.prompts)]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    dense, dense_text = run("smollm2-135m", resolve_model("smollm2-135m"), prompts, params)
    moe, moe_text = run(f"upcycled {args.experts}x top-{args.top_k}", args.moe_dir, prompts, params)
    moe["parameters_active_per_token"] = meta["parameters"]["active_per_token"]
    result = {
        "what": "sparse upcycle of SmolLM2-135M vs the dense model: size, greedy decode speed",
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "engine": f"hf, fp32, cpu, {args.threads} torch thread(s), all prompts in one batch",
        "upcycle_s": upcycle_s,
        "upcycle": {k: meta[k] for k in ("experts", "top_k", "router_init", "symmetry_breaker")},
        "dense": dense,
        "upcycled": moe,
        "speed_ratio_upcycled_over_dense": round(
            moe["tokens_per_second"] / dense["tokens_per_second"], 3
        ),
        "identical_completions": sum(a == b for a, b in zip(dense_text, moe_text)),
        "n_prompts": len(prompts),
        "machine_before": before,
        "machine_after": machine(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
