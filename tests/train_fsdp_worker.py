"""FSDP2 under torchrun, for tests/test_train_fsdp.py: step-1 loss and LoRA gradients, and what each
process stores of a full fine-tune under FSDP2 and under DDP.

    torchrun --standalone --nproc_per_node 2 tests/train_fsdp_worker.py MODEL PAIRS OUT

Writes OUT/step.pt (rank 0: {"loss", "grad_norm", "grads"}: the gathered whole gradients; and
OUT/step3.pt for the 3 pairs of PAIRS' folder's pairs3.jsonl: a short, uneven global batch) and
OUT/storage-RANK.json (this process's parameter / gradient / optimizer-state elements and bytes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def fsdp2_step(cfg, procs) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(global loss, total gradient norm, {name: whole gradient}) of step 1 under FSDP2."""
    from train_dist_worker import perturbed_lora

    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import epoch_batches
    from posttrain.train.data import load_examples
    from posttrain.train.forward import reference_logps
    from posttrain.train.offline.loop import step_gradients

    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data, tok, preference=True, max_length=cfg.max_length)
    model = load_model(cfg.model, dtype="fp32")
    ref = reference_logps(model, examples, batch_size=8, pad_id=tok.pad_token_id, device="cpu")
    policy = procs.wrap(perturbed_lora(model))
    assert procs.sharded and type(policy).__name__.startswith("FSDP"), type(policy)
    P = procs.num_processes
    lengths = [e.length for e in examples]
    batch = epoch_batches(lengths, cfg.batch_size * cfg.grad_accum * P, cfg.seed, 0)[0]
    loss_sum, _, _ = step_gradients(
        policy, examples, batch, ref, cfg, procs, lengths=lengths, pad_id=tok.pad_token_id
    )
    loss = float(procs.reduce(loss_sum)) / P
    grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.requires_grad}
    norm = procs.clip(policy, 0.0)  # 0: measure only
    return loss, norm, grads


def storage(model_dir: str, strategy: str, procs, batch: dict) -> dict[str, int]:
    """Elements and bytes this process holds of a full fine-tune after one AdamW step:
    parameters, gradients and optimizer state (local shards for FSDP2)."""
    from posttrain.models import load_model
    from posttrain.train.config import LoraConfig
    from posttrain.train.parallel.processes import local_storage, shard
    from posttrain.train.lora import apply_lora
    from posttrain.train.optim import make_optimizer

    model = apply_lora(load_model(model_dir, dtype="fp32"), LoraConfig(enabled=False))
    if strategy == "fsdp2":
        policy = module = shard(model)
    else:
        policy = torch.nn.parallel.DistributedDataParallel(model)
        module = policy.module
    optimizer = make_optimizer(module, 1e-4)
    policy(**batch).logits.float().mean().backward()
    optimizer.step()

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = local_storage(module)
    grads = [local(p.grad) for p in module.parameters() if p.grad is not None]
    states = [
        local(v)
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]
    return {
        "param_numel": params["numel"],
        "param_bytes": params["bytes"],
        "grad_bytes": sum(g.numel() * g.element_size() for g in grads),
        "optim_bytes": sum(s.numel() * s.element_size() for s in states),
    }


def main() -> None:
    from posttrain.train.config import train_config
    from posttrain.train.parallel.processes import Processes

    model_dir, data, out = sys.argv[1:4]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    procs = Processes("fsdp2")
    # 2 processes x 1 row x 2 accumulation steps = the single process's batch of 4.
    cfg = train_config(
        "dpo",
        None,
        [
            "dtype=fp32",
            "batch_size=1",
            "grad_accum=2",
            "lora.r=4",
            "lora.alpha=8",
            "strategy=fsdp2",
        ],
        model=model_dir,
        data=data,
    )
    loss, norm, grads = fsdp2_step(cfg, procs)
    if procs.is_main_process:
        torch.save({"loss": loss, "grad_norm": norm, "grads": grads}, out / "step.pt")
    # 3 pairs: process 0 gets 2 micro-batches, process 1 one (it repeats it with zero weight)
    cfg.data = str(Path(data).with_name("pairs3.jsonl"))
    loss, norm, grads = fsdp2_step(cfg, procs)
    if procs.is_main_process:
        torch.save({"loss": loss, "grad_norm": norm, "grads": grads}, out / "step3.pt")

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    found = {s: storage(model_dir, s, procs, batch) for s in ("fsdp2", "ddp")}
    (out / f"storage-{procs.process_index}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
