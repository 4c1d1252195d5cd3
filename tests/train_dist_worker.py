"""One optimizer step's loss and gradients (and a 2-step run) under torchrun, for the invariance tests.

    torchrun --standalone --nproc_per_node 2 tests/train_dist_worker.py MODEL DATA METHOD OUT

Process 0 saves OUT/grads.pt ({"loss", "grads"}); the run writes OUT/run/. The single-process
side of the comparison calls `one_step` from tests/test_train_invariance.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def perturbed_lora(model, seed: int = 1):
    """LoRA on `model` with B drawn at random (B = 0 at init would leave A without gradient)."""
    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora

    torch.manual_seed(seed)
    policy = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return policy


def one_step(cfg, accelerator):
    """(global loss, {name: gradient}) of the first optimizer step of epoch 0 under `cfg`."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import epoch_batches
    from posttrain.train.data import load_examples
    from posttrain.train.forward import reference_logps
    from posttrain.train.offline.loop import step_gradients

    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data, tok, preference=cfg.preference, max_length=cfg.max_length)
    model = load_model(cfg.model, dtype="fp32")
    ref = (
        reference_logps(model, examples, batch_size=8, pad_id=tok.pad_token_id, device="cpu")
        if cfg.preference
        else None
    )
    model = perturbed_lora(model)
    P = accelerator.num_processes
    policy = accelerator.prepare_model(model) if P > 1 else model
    lengths = [e.length for e in examples]
    batch = epoch_batches(lengths, cfg.batch_size * cfg.grad_accum * P, cfg.seed, 0)[0]
    loss_sum, _, _ = step_gradients(
        policy, examples, batch, ref, cfg, accelerator, lengths=lengths, pad_id=tok.pad_token_id
    )
    if P > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum) / P, grads


def main() -> None:
    from accelerate import Accelerator

    from posttrain.train.config import train_config
    from posttrain.train.offline.loop import train

    model_dir, data, method, out = sys.argv[1:5]
    out = Path(out)
    accelerator = Accelerator(cpu=True)
    # 2 processes x 1 row x 2 accumulation steps = the single process's batch of 4.
    settings = ["dtype=fp32", "batch_size=1", "grad_accum=2", "lora.r=4", "lora.alpha=8"]
    cfg = train_config(method, None, settings, model=model_dir, data=data)
    loss, grads = one_step(cfg, accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"loss": loss, "grads": grads}, out / "grads.pt")
    run = train_config(
        method, None, settings + ["max_steps=2", "lr=1e-3"], model=model_dir, data=data
    )
    train(run, out / "run", progress=False)


if __name__ == "__main__":
    main()
