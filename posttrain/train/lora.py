"""LoRA through PEFT with explicit target presets, full fine-tuning, and a trainable-parameter report.

    python -c "from posttrain.train.lora import target_modules; help(target_modules)"

Presets resolve to an explicit list of module names, never PEFT's "all-linear" string: on
transformers 5 MoE models (Qwen3-MoE) the experts are fused 3-D parameters and the router holds a
bare weight, and PEFT's "all-linear" then also reaches them through `target_parameters` without
a word. Ours targets only `nn.Linear` modules named like attention projections or dense MLP
projections, and never a module inside `experts` or a router.

PEFT 0.21 on transformers 5 also rewrites the targets of Qwen2/3-MoE and Mixtral adapters from
transformers-4 names: any target called gate_proj / up_proj / down_proj, including the dense
MLP of a non-MoE layer or a shared expert, is moved onto the fused expert parameters, at
creation and again at loading (measured: a reloaded adapter changed the logits by 0.5).
Our targets are already transformers-5 module names, so `peft_targets_as_named()` switches
that rewrite off; create and load adapters inside it.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from ..config import ConfigError
from .config import LoraConfig

# Module names across Llama, Qwen2/3 (dense and MoE), Mistral, Gemma, Phi-3, Olmo.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PRESETS = {"all-linear": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}
NEW_LAYERS = "new-layers"  # expand.py
GROUPS = ("attention", "mlp", "router", "experts", "embeddings", "norms", "other")


def _parts(name: str) -> list[str]:
    return name.split(".")


def is_expert_or_router(name: str) -> bool:
    """Module / parameter names inside routed experts or a router (`mlp.gate` in Qwen3-MoE)."""
    parts = _parts(name)
    if "experts" in parts or "router" in parts:  # shared_expert(s) is a dense MLP: allowed
        return True
    return any(parts[i] == "mlp" and parts[i + 1] == "gate" for i in range(len(parts) - 1))


def target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the nn.Linear modules a LoRA spec selects (sorted; error when none).

    `targets`: a preset name (all-linear, attention, mlp; new-layers: all-linear inside the
    layers an expanded model's posttrain_expand.json names); a list of names, each matching a
    module whose last name part equals it; or any other string, a regex that must match the
    whole module name (e.g. r"model\\.layers\\.[0-3]\\..*_proj").
    """
    if targets == NEW_LAYERS:  # the all-linear modules of the layers `posttrain expand` added
        from ..expand import in_new_layers

        return sorted(in_new_layers(model, target_modules(model, "all-linear")))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, str) and targets in PRESETS:
        wanted = set(PRESETS[targets])
        chosen = [n for n in linears if _parts(n)[-1] in wanted and not is_expert_or_router(n)]
    elif isinstance(targets, (list, tuple)):
        wanted = set(targets)
        chosen = [n for n in linears if _parts(n)[-1] in wanted or n in wanted]
    else:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"lora.targets: {targets!r} is neither a preset "
                              f"({', '.join(PRESETS)}) nor a valid regex: {e}") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    if not chosen:
        raise ConfigError(f"lora.targets: {targets!r} selects no nn.Linear module of "
                          f"{type(model).__name__}")
    return sorted(chosen)


@contextlib.contextmanager
def peft_targets_as_named():
    """Within: PEFT uses LoRA target names as given (no transformers-4 -> 5 MoE remapping)."""
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:  # an older PEFT without the rewrite
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The model with a LoRA adapter (a PeftModel), or the model itself for full fine-tuning.

    LoRA weights are kept in fp32 even on a bf16 model (PEFT's autocast_adapter_dtype): AdamW
    steps of ~lr * 1 on bf16 weights would round away.
    """
    cfg.check()
    if not cfg.enabled and cfg.targets == NEW_LAYERS:  # full fine-tuning of the new layers
        from ..expand import select_new_layers_for_full_finetuning

        select_new_layers_for_full_finetuning(model)
        return model
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    init = True if cfg.init == "default" else cfg.init
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              use_rslora=cfg.rslora, init_lora_weights=init,
                              target_modules=target_modules(model, cfg.targets),
                              task_type="CAUSAL_LM")
    with peft_targets_as_named():
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)


def parameter_group(name: str) -> str:
    """attention | mlp | router | experts | embeddings | norms | other, from a parameter name."""
    parts = _parts(name)
    if "experts" in parts:
        return "experts"
    if is_expert_or_router(name):
        return "router"
    if any(p in ("embed_tokens", "lm_head", "wte", "wpe", "embeddings") for p in parts):
        return "embeddings"
    if any(p in ATTENTION or p in ("self_attn", "attn", "attention") for p in parts):
        return "attention"
    if any(p in MLP or p in ("mlp", "feed_forward", "shared_expert") for p in parts):
        return "mlp"
    if any("norm" in p for p in parts):
        return "norms"
    return "other"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} over unique parameters (tied weights count once)."""
    report = {g: {"trainable": 0, "total": 0} for g in GROUPS}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = report[parameter_group(name)]
        group["total"] += p.numel()
        if p.requires_grad:
            group["trainable"] += p.numel()
    return report


def format_parameter_report(report: dict[str, dict[str, int]]) -> str:
    trainable = sum(g["trainable"] for g in report.values())
    total = sum(g["total"] for g in report.values())
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)"]
    for name, g in report.items():
        if g["total"] or g["trainable"]:
            lines.append(f"  {name:<11} {g['trainable']:>13,} trainable of {g['total']:>14,}")
    return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
