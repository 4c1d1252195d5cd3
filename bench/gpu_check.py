"""The GPU check: every training and sampling path of posttrain once on one CUDA device, in at
most 8 minutes, printed as ONE JSON object on stdout (all logs go to stderr).

    make gpu-check                                 # = python bench/gpu_check.py --json ...
    python bench/gpu_check.py --device cpu --tiny  # the same code paths on tiny models (CI)

Prepared for one H200 with only Python 3.12, torch 2.11, transformers 5.17, peft, accelerate
and no network: `make gpu-wheels` downloads here the pure-Python wheels posttrain needs that
such a machine lacks, and the embedded model's tokenizer (models are built from configs with
random weights, so no weights travel); `make gpu-check` installs the wheels with --no-deps into
a venv that sees the system's packages, then runs this script.

Parts, each in this process through the library the CLI calls (resolve_train_config +
train_resolved, make_engine), each timed, an error recorded in its entry without stopping the
others:
- matmul: the measured bf16 matmul peak (8192^3 GEMMs on CUDA), the MFU denominator;
- sample: the hf engine, 8 prompts x 4 answers at temperature 1;
- dpo: DPO LoRA r16 (all-linear) bf16 on a ~1.5 B dense Qwen3 config, pairs of 2k-token
  sequences: tokens/s over the steps after the first; MFU = 6 N tokens/s / peak with N the
  parameters without the input embedding (the usual model-FLOPs convention, which counts
  weight gradients LoRA does not compute) and `hfu_lora` = (4 N + attention) tokens/s / peak,
  the FLOPs this step really does;
- grpo: GRPO LoRA steps with hf-engine rollouts on builtin:arith;
- moe: DPO LoRA on router + experts + attention with the balance (aux) loss, small Qwen3-MoE;
- fsdp2: one DPO LoRA step with strategy=fsdp2 in a 1-process process group (last: it
  initialises torch.distributed in this process);
- meta_startup: whether the fsdp2 part started on the meta device (issue 18 part 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUDGET_S = 480  # the whole check: 8 minutes
WORDS = ("so we add the tens then the units and carry one when the sum passes nine then we "
         "check the result against the question before we answer").split()  # fmt: skip


def sizes(tiny: bool) -> dict:
    """Model configs and run lengths: the real check, or the tiny CPU one."""
    if tiny:
        dense = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
        moe = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, num_experts=8, num_experts_per_tok=2)  # fmt: skip
        return dict(dense=dense, small=dense, moe=moe, tokens=64, pairs=2, steps=2,
                    new_tokens=8, gemm=256, grpo_steps=1, prompts=4, G=2)  # fmt: skip
    # ~1.5 B parameters (Qwen2.5-1.5B's shape with Qwen3's q/k norms)
    dense = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)  # fmt: skip
    small = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=64)  # fmt: skip
    moe = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512,
               num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
               num_experts=32, num_experts_per_tok=4)  # fmt: skip
    return dict(dense=dense, small=small, moe=moe, tokens=2048, pairs=4, steps=8,
                new_tokens=128, gemm=8192, grpo_steps=3, prompts=8, G=4)  # fmt: skip


def build_model(kind: str, fields: dict, tokenizer, out: Path) -> str:
    """A random-weight bf16 model folder (config + safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_pairs(path: Path, n: int, tokens: int, tokenizer) -> int:
    """n preference pairs of sequences close to `tokens` long; returns the longest."""
    prompt = [{"role": "user", "content": "What is 27 + 58? Show the working."}]
    rows, longest = [], 0
    per_word = max(1, len(tokenizer(" ".join(WORDS))["input_ids"]) // len(WORDS))
    for i in range(n):
        answers = []
        for k in range(2):
            count = (tokens - 32) // per_word
            words = [WORDS[(i * 5 + k * 11 + j) % len(WORDS)] for j in range(count)]
            answers.append([{"role": "assistant", "content": " ".join(words)}])
            ids = tokenizer.apply_chat_template(prompt + answers[-1])["input_ids"]
            longest = max(longest, len(ids))
        rows.append({"prompt": prompt, "chosen": answers[0], "rejected": answers[1],
                     "problem_id": str(i)})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return longest


def train(method: str, model: str, out: Path, sets: dict, **flags) -> list[dict]:
    """Run the trainer as `posttrain train` does; returns its metrics rows."""
    from posttrain.train.config import resolve_train_config
    from posttrain.train.launch import train_resolved

    overrides = [f"{k}={v}" for k, v in sets.items()]
    cfg = resolve_train_config(method, overrides=overrides, model=model, **flags)
    train_resolved(cfg, out, resume=False, progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def matmul_peak(device, n: int) -> dict:
    """Best bf16 n x n x n GEMM rate over a few timed rounds (after a warm-up)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 20 if device.type == "cuda" else 3

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = float("inf")
    for _ in range(4):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return {"n": n, "tflops": 2 * n**3 / best / 1e12}


def dense_flops(fields: dict, vocab: int, tokens: int) -> tuple[int, float]:
    """(N: parameters without the input embedding, attention FLOPs a token of a T-token causal
    sequence, forward + input-gradient backward: 2 x (2 x 2 x q_dim x T / 2) a layer)."""
    from posttrain.shapes import parameters, shape_of

    s = shape_of({"model_type": "qwen3", "vocab_size": vocab, **fields})
    n = parameters(s)["total"] - s.vocab * s.hidden
    attention = s.layers * 2 * (2 * s.q_dim * tokens)
    return n, attention


def part_sample(ctx) -> dict:
    from posttrain.engines import make_engine
    from posttrain.engines.base import SamplingParams

    engine = make_engine("hf", ctx["small"], dtype="bf16")
    s = ctx["s"]
    prompts = [
        [{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(s["prompts"])
    ]
    params = SamplingParams(n=s["G"], temperature=1.0, max_new_tokens=s["new_tokens"], seed=0)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - t
    tokens = sum(c.num_tokens for group in out for c in group)
    engine.close()
    return {"completions": sum(map(len, out)), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def steady(rows: list[dict]) -> dict:
    """tokens/s over the steps after the first (warm-up: allocation, kernel choice)."""
    rest = rows[1:] or rows
    tokens, seconds = sum(r["tokens"] for r in rest), sum(r["seconds"] for r in rest)
    return {"steps": len(rows), "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
            "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / len(rest)}  # fmt: skip


def dpo_sets(ctx, **extra) -> dict:
    s = ctx["s"]
    return {"max_steps": s["steps"], "batch_size": s["pairs"], "max_length": ctx["longest"] + 8,
            "dtype": "bf16", "ref_cache": "false", "checkpoint_every": 1000,
            "lora.r": 16, "lora.alpha": 32, **extra}  # fmt: skip


def part_dpo(ctx) -> dict:
    rows = train("dpo", ctx["dense"], ctx["tmp"] / "dpo", dpo_sets(ctx), data=ctx["pairs"])
    result = steady(rows)
    n, attention = dense_flops(ctx["s"]["dense"], ctx["vocab"], ctx["longest"])
    peak = ctx["peak_tflops"] * 1e12
    result.update(params_without_embedding=n, sequence_tokens=ctx["longest"],
                  mfu=6 * n * result["tokens_per_s"] / peak,
                  hfu_lora=(4 * n + attention) * result["tokens_per_s"] / peak)  # fmt: skip
    return result


def part_grpo(ctx) -> dict:
    s = ctx["s"]
    sets = {"max_steps": s["grpo_steps"], "num_generations": s["G"], "problems_per_step": 4,
            "max_new_tokens": s["new_tokens"], "micro_batch_size": 8, "dtype": "bf16",
            "rollout.engine.kind": "hf", "checkpoint_every": 1000}  # fmt: skip
    rows = train("grpo", ctx["small"], ctx["tmp"] / "grpo", sets, problems="builtin:arith:32")
    keep = (
        "loss",
        "reward/mean",
        "entropy",
        "completion_length/mean",
        "time/generate",
        "time/train",
        "generation_share",
    )
    return {"steps": len(rows), "last": {k: rows[-1].get(k) for k in keep}}


def part_moe(ctx) -> dict:
    sets = dpo_sets(ctx, **{"lora.targets": "all-linear,all-router,experts",
                            "router_aux_loss_coef": 0.01, "moe.stats_every": 1})  # fmt: skip
    rows = train("dpo", ctx["moe"], ctx["tmp"] / "moe", sets, data=ctx["pairs"])
    result = steady(rows)
    result["first_aux"] = rows[0].get("loss/aux")
    result["moe_metrics"] = {
        k: v for k, v in rows[-1].items() if k.startswith("moe/") or k == "loss/aux"
    }
    if "loss/aux" not in rows[-1]:
        raise RuntimeError("no loss/aux in the MoE run's metrics: the balance loss was not added")
    return result


def part_fsdp2(ctx) -> dict:
    """One process group of one process, then the trainer's fsdp2 path."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    sets = dpo_sets(ctx, strategy="fsdp2", max_steps=2)
    rows = train("dpo", ctx["dense"], ctx["tmp"] / "fsdp2", sets, data=ctx["pairs"])
    stored = json.loads((ctx["tmp"] / "fsdp2" / "processes.json").read_text())
    return {**steady(rows), "processes": stored}


def part_meta_startup(ctx) -> dict:
    """Whether the fsdp2 part above started on the meta device (issue 18 part 2)."""
    from types import SimpleNamespace

    from posttrain.train.config import resolve_train_config
    from posttrain.train.parallel.meta_start import meta_start_refusal

    sets = dpo_sets(ctx, strategy="fsdp2", max_steps=2)
    cfg = resolve_train_config(
        "dpo", overrides=[f"{k}={v}" for k, v in sets.items()], model=ctx["dense"],
        data=ctx["pairs"],
    )  # fmt: skip
    refusal = meta_start_refusal(cfg, SimpleNamespace(sharded=True), model_given=False)
    return {"fsdp2_part_started_on_meta": refusal is None, "why_not": refusal}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny models, short runs (CI, CPU)")
    ap.add_argument("--tokenizer", default=None, help="default: gpu-wheels/tokenizer, else the "
                    "embedded model's")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--only", default=None, help="comma-separated parts to run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary models and runs")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer and engines pick CUDA when seen
    start = time.perf_counter()
    result: dict = {"device": args.device, "tiny": args.tiny, "versions": versions(), "parts": {}}
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the one JSON
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print(json.dumps({**result, "error": "CUDA is not available; use --device cpu"}))
            return 2
        device = torch.device(args.device)
        result["device_name"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        )
        if device.type == "cpu":
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        try:
            run_parts(args, device, result, start, tmp)
        except Exception as e:  # set-up failed (imports, tokenizer, models): still one JSON
            traceback.print_exc()
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    result["imported_distributions"] = imported_distributions()
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    failed = "error" in result or any("error" in p for p in result["parts"].values())
    return 1 if failed else 0


def run_parts(args, device, result: dict, start: float, tmp: Path) -> None:
    from transformers import AutoTokenizer

    s = sizes(args.tiny)
    tok_dir = args.tokenizer or (REPO / "gpu-wheels" / "tokenizer")
    if not Path(tok_dir).is_dir():
        from posttrain.models import resolve_model

        tok_dir = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ctx = {"s": s, "tmp": tmp, "vocab": len(tokenizer)}
    ctx["pairs"] = str(tmp / "pairs.jsonl")
    ctx["longest"] = make_pairs(tmp / "pairs.jsonl", 4 * s["pairs"], s["tokens"], tokenizer)
    t = time.perf_counter()
    ctx["dense"] = build_model("qwen3", s["dense"], tokenizer, tmp / "dense")
    ctx["small"] = build_model("qwen3", s["small"], tokenizer, tmp / "small")
    ctx["moe"] = build_model("qwen3_moe", s["moe"], tokenizer, tmp / "moe")
    result["build_seconds"] = time.perf_counter() - t
    peak = matmul_peak(device, s["gemm"])
    result["parts"]["matmul"] = peak
    ctx["peak_tflops"] = peak["tflops"]
    parts = {"sample": part_sample, "dpo": part_dpo, "grpo": part_grpo, "moe": part_moe,
             "meta_startup": part_meta_startup, "fsdp2": part_fsdp2}  # fmt: skip
    only = set(args.only.split(",")) if args.only else set(parts)
    for name, fn in parts.items():
        if name not in only:
            continue
        if time.perf_counter() - start > BUDGET_S:
            result["parts"][name] = {"error": f"skipped: the {BUDGET_S} s budget was spent"}
            continue
        t = time.perf_counter()
        try:
            entry = fn(ctx)
        except Exception as e:  # recorded, and the other parts still run
            traceback.print_exc()
            entry = {"error": f"{type(e).__name__}: {e}"}
        entry["wall_s"] = time.perf_counter() - t
        if device.type == "cuda":
            entry["max_memory_gib"] = torch_max_memory()
        result["parts"][name] = entry


def imported_distributions() -> list[str]:
    """The installed distributions whose modules this run imported (what the GPU box needs)."""
    import importlib.metadata as md

    owners = md.packages_distributions()
    top = {m.split(".")[0] for m in list(sys.modules)}
    return sorted({d for t in top for d in owners.get(t, ())})


def torch_max_memory() -> float:
    import torch

    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return gib


if __name__ == "__main__":
    sys.exit(main())
