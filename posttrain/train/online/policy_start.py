"""How the online loop gets its policy: the model, its attention kernel and MoE set-up, LoRA,
and a copy of the base weights for a detached hf engine.

    policy, moe, base_copy, max_kl = policy_model(cfg, procs, None, tokenizer, problems, None, True)

Two start paths, as in the offline loop (train/offline/loop.py):
- whole: every process loads the whole model, adds LoRA, and Run.start shards it (fsdp2) or
  wraps it (ddp);
- meta (fsdp2 under torchrun, parallel/meta_start.py): the model is built on the `meta` device,
  LoRA and the sharding added, then each process reads only its own rows of the checkpoint;
  the MoE probe's base routing is taken on the sharded model with the adapter disabled. Used
  unless something needs the whole model in the process, and then the run says why: the
  reasons of the offline loop (meta_start_refusal), or a detached hf rollout engine built
  here (it holds its own whole copy of the base; a vllm or openai engine does not).

On both paths LoRA's A is drawn from the run's seed (meta_start.init_lora), so the two give the
same policy, whatever the number of processes.
"""

from __future__ import annotations

import time

import torch

from posttrain.models import load_model, parse_dtype, resolve_dtype, resolve_model
from posttrain.train.lora import apply_lora, format_parameter_report, parameter_report
from posttrain.train.modes import checkpoint_without_dropout, layout, set_attention
from posttrain.train.moe import MoeRun, probe_prompt
from posttrain.train.online.rollout_engine import detached_base, mismatch_threshold
from posttrain.train.parallel.meta_start import (
    adapter_disabled,
    build_on_meta,
    init_lora,
    meta_start_refusal,
    shard_and_fill,
)
from posttrain.train.skeleton import pad_id, say

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def meta_refusal(cfg, procs, model, engine) -> str | None:
    """Why this online run cannot start on the meta device (None: it can)."""
    why = meta_start_refusal(cfg, procs, model_given=model is not None)
    if why is None and engine is None and cfg.rollout.engine.kind == "hf":
        why = "the detached hf rollout engine holds a whole copy of the base in every process"
    return why


def policy_model(cfg, procs, model, tokenizer, problems, engine, progress: bool):
    """The policy with LoRA, its MoE set-up, a copy of the base weights for a detached hf
    engine (None otherwise) and the sync check's threshold:
    (policy, moe, base copy or None, mismatch threshold)."""
    device = procs.device
    dtype = resolve_dtype(cfg.dtype, device)
    # FSDP2's bf16 policy where it applies (sharded, CUDA); the online loop runs no autocast
    procs.precision(dtype, full_finetune=False)
    prompts = (probe_prompt(tokenizer, p, cfg.system_prompt) for p in problems[:256])  # a sample
    longest = max(map(len, prompts), default=0) + cfg.max_new_tokens
    why = meta_refusal(cfg, procs, model, engine)
    if why is None:
        policy, moe, attention, model_dtype = _meta_start(
            cfg, procs, tokenizer, problems, dtype, longest
        )
        base_copy = None
    else:
        if procs.sharded:
            say(procs, f"start-up: every process loads the whole model ({why})")
        policy, moe, attention, base_copy, model_dtype = _whole_start(
            cfg, procs, model, tokenizer, problems, engine, dtype, longest
        )
    # the dtype the model really has (a model passed in may differ from cfg.dtype)
    max_kl = mismatch_threshold(cfg.rollout.max_mismatch_kl, DTYPE_NAMES.get(model_dtype, "bf16"))
    policy.eval()  # dropout off for the whole run (loop docstring); gradients still flow
    if progress:
        say(procs, format_parameter_report(parameter_report(policy)))
        how = layout(cfg, device)
        say(procs, f"{cfg.method}: {cfg.model} in {dtype}, {attention} attention, {how} layout")
    return policy, moe, base_copy, max_kl


def _moe(model, cfg, tokenizer, problems) -> MoeRun:
    return MoeRun.setup(
        model,
        # online: no balance loss unless asked for (users found the models' own 0.001
        # degrades RL); an explicit value applies
        0.0 if cfg.router_aux_loss_coef is None else cfg.router_aux_loss_coef,
        cfg.moe,
        problems,
        lambda p: probe_prompt(tokenizer, p, cfg.system_prompt),
        seed=cfg.seed,
        pad_id=pad_id(tokenizer),
    )


def _whole_start(cfg, procs, model, tokenizer, problems, engine, dtype, longest):
    """The model loaded whole (unless given), MoE probe on the base, base copy, then LoRA:
    (policy, moe, attention, base copy or None, the base model's dtype)."""
    if model is None:
        model = load_model(cfg.model, dtype=dtype)
    model.to(procs.device)
    attention = set_attention(model, cfg.attention, procs.device.type, longest)
    moe = _moe(model, cfg, tokenizer, problems)
    detached = cfg.rollout.sync == "adapter" and engine is None and cfg.rollout.engine.kind == "hf"
    base_copy = detached_base(model) if detached else None  # the engine's own weights
    model_dtype = model.dtype
    policy = apply_lora(model, cfg.lora)
    if cfg.lora.enabled and cfg.lora.init == "default":
        init_lora(policy, cfg.seed)  # as the meta start-up does: the same A from the seed
    if cfg.gradient_checkpointing:
        checkpoint_without_dropout(policy)  # updates in train mode, dropout zeroed
    return policy, moe, attention, base_copy, model_dtype


def _meta_start(cfg, procs, tokenizer, problems, dtype, longest):
    """Built on meta, LoRA, sharded, then each process reads its own rows; the MoE probe on the
    sharded model with the adapter disabled: (policy, moe, attention, the base model's dtype)."""
    t0 = time.perf_counter()
    folder = resolve_model(cfg.model)
    model = build_on_meta(folder, parse_dtype(dtype))
    model_dtype = model.dtype
    attention = set_attention(model, cfg.attention, procs.device.type, longest)
    policy = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        checkpoint_without_dropout(policy)
    policy = shard_and_fill(policy, folder, procs, seed=cfg.seed, t0=t0)
    with adapter_disabled(policy):
        moe = _moe(policy, cfg, tokenizer, problems)
    return policy, moe, attention, model_dtype
