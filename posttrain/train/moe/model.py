"""Where a mixture-of-experts model keeps its routers and experts (transformers 5 classes).

    python -c "from posttrain.train.moe.model import moe_shape; help(moe_shape)"

Routers are the modules transformers itself records as `router_logits` (the model class's
`_can_record_outputs`, e.g. MixtralTopKRouter / Qwen3MoeTopKRouter, output 0: raw logits before
the softmax); experts are the fused 3-D parameters of each `experts` module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posttrain.config import ConfigError


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def router_spec(model: nn.Module):
    """transformers' OutputRecorder for `router_logits` of this model class, or None."""
    recorders = getattr(type(transformers_model(model)), "_can_record_outputs", None) or {}
    return recorders.get("router_logits")


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: router module} in the model's own naming (PEFT wrappers' `base_layer` dropped)."""
    spec = router_spec(model)
    if spec is None:
        return {}
    base = transformers_model(model)
    found = {}
    for name, module in base.named_modules():
        if isinstance(module, spec.target_class) and (
            spec.layer_name is None or name.endswith(spec.layer_name)
        ):
            found[name.replace(".base_layer", "")] = module
    return found


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int
    default_coef: float  # the model config's router_aux_loss_coef (0 when it has none)


def moe_shape(model: nn.Module) -> MoeShape | None:
    """Experts, top-k and the config's aux coefficient of an MoE model; None for a dense one."""
    if not router_modules(model):
        return None
    config = transformers_model(model).config
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        raise ConfigError(
            f"{type(config).__name__}: routers found but no num_experts / "
            "num_experts_per_tok in the model config"
        )
    return MoeShape(
        int(experts), int(top_k), float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    )


def router_weights(model: nn.Module) -> list[str]:
    """Full names of the routers' weight parameters (what `all-router` adapts)."""
    return sorted(
        f"{name}.weight"
        for name, m in router_modules(model).items()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    )


def expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the routed experts' fused 3-D parameters (`*.experts.gate_up_proj`, ...)."""
    out = []
    for name, module in transformers_model(model).named_modules():
        if name.split(".")[-1] != "experts":
            continue
        out += [f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
    return sorted(out)


def shared_expert_linears(model: nn.Module) -> list[str]:
    """nn.Linear modules inside a shared expert (Qwen2-MoE `shared_expert`, DeepSeek
    `shared_experts`); the scalar `shared_expert_gate` is not one of them."""
    return sorted(
        name
        for name, m in transformers_model(model).named_modules()
        if isinstance(m, nn.Linear)
        and any(p in ("shared_expert", "shared_experts") for p in name.split("."))
    )
