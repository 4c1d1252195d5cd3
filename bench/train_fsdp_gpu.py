"""LoRA-DPO steps with FSDP2 on one GPU, on a model built from a small Qwen3 config (random
weights, nothing downloaded): tokens/s and MFU. UNTESTED: written on a machine without a GPU.

    python bench/train_fsdp_gpu.py [--layers 8 --hidden 1024 --pairs 8 --prompt 256
        --completion 256 --steps 5] [--peak-tflops 989] [--json bench/results/train_fsdp_gpu.json]
    torchrun --nproc_per_node 8 bench/train_fsdp_gpu.py ...     # the same, sharded over 8 GPUs

Without torchrun it starts itself under `torchrun --standalone --nproc_per_node 1`. The model
goes through the trainer's own path (distributed.Processes with strategy=fsdp2: fully_shard per
decoder layer and at the root, bf16 compute / fp32 reduction, LoRA inside the sharded layers,
AdamW built after wrapping, clipping over the shards). One untimed warm-up step, then `--steps`
timed steps of `--pairs` pairs per process (prompt + completion tokens each).

MFU = 6 * N * tokens/s / peak, N = the base model's parameters without the input embedding
(all active: a dense model), peak = the GPU's dense bf16 FLOP/s (table below, or --peak-tflops).
6N counts the weight gradients that LoRA does not compute (its real cost is nearer 4N), so this
is the MFU a full fine-tune at the same speed would have: comparable across runs, not a
hardware-efficiency claim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 6000 Ada": 364e12,
}


def peak_flops(name: str, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # the most specific name first
        if key in name:
            return PEAK_BF16[key]
    raise SystemExit(f"no peak bf16 FLOP/s known for {name!r}; pass --peak-tflops")


def build_model(args):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128 * 2,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).to(torch.bfloat16)


def batch_of_pairs(args, device, rank: int) -> dict:
    """Random token pairs laid out as batches.collate lays them out: chosen rows, then rejected
    rows, completions at the end (no padding needed: all the same length)."""
    import torch

    g = torch.Generator().manual_seed(rank)
    R, T, K = 2 * args.pairs, args.prompt + args.completion, args.completion
    ids = torch.randint(0, args.vocab, (R, T), generator=g)
    ids[args.pairs :, : args.prompt] = ids[: args.pairs, : args.prompt]  # one prompt per pair
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(T).expand(R, T).contiguous(),
        "labels": ids[:, T - K :].clone(),
        "completion_lengths": torch.full((R,), K),
    }
    return {k: v.to(device) for k, v in batch.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)  # Qwen3's
    ap.add_argument("--pairs", type=int, default=8, help="pairs per process and step")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default="bench/results/train_fsdp_gpu.json")
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:  # become a 1-process torchrun job
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                *sys.argv,
            ],
        )
    import torch

    from posttrain import losses
    from posttrain.train.config import LoraConfig
    from posttrain.train.parallel.processes import Processes
    from posttrain.train.forward import completion_logps, split_pairs
    from posttrain.train.lora import apply_lora
    from posttrain.train.optim import make_optimizer

    if not torch.cuda.is_available():
        raise SystemExit("bench/train_fsdp_gpu.py needs CUDA; bench/train_fsdp.py is the CPU one")
    procs = Processes("fsdp2")
    device, P = procs.device, procs.num_processes
    model = build_model(args).to(device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    batch = batch_of_pairs(args, device, procs.process_index)
    with torch.no_grad():  # reference log-probs: the base model before the adapter
        ref = completion_logps(model.eval(), batch).sum(-1)  # (2B,)
    ref_chosen, ref_rejected = split_pairs(ref)
    procs.precision("bf16", full_finetune=False)  # FSDP2 bf16 params / fp32 reduce on CUDA
    model = apply_lora(model, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r))
    policy, optimizer = procs.prepare(model, lambda m: make_optimizer(m, 1e-5))
    policy.train()
    stored = procs.storage_per_process(policy)

    def step() -> tuple[float, float]:
        chosen, rejected = split_pairs(completion_logps(policy, batch).sum(-1))
        loss, _ = losses.dpo(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        procs.backward(loss)
        norm = procs.clip(policy, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), norm

    torch.cuda.reset_peak_memory_stats()
    first_loss, first_norm = step()  # warm-up (also compiles kernels, allocates)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        last_loss, _ = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = P * 2 * args.pairs * (args.prompt + args.completion) / seconds
    name = torch.cuda.get_device_name(device)
    mfu = 6 * n_params * tokens_per_s / (P * peak_flops(name, args.peak_tflops))
    result = {
        "device": name,
        "processes": P,
        "params_without_embedding": n_params,
        "sharded": procs.sharded,
        "mixed_precision": procs.mixed_precision,
        "parameter_bytes_per_process": stored,
        "first_step_loss": first_loss,
        "first_step_grad_norm": first_norm,
        "last_loss": last_loss,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "settings": vars(args),
    }
    if procs.is_main_process:
        print(json.dumps(result, indent=1))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    assert math.isfinite(last_loss)


if __name__ == "__main__":
    main()
