"""How the model runs while it trains: dropout on or off, and gradient checkpointing.

    python -c "from posttrain.train.modes import train_mode; help(train_mode)"

Preference methods compare the policy's log-probs with the reference's, which are computed
once in eval mode (no dropout). The policy must run in the same mode, or at step 1 its
log-ratios are dropout noise instead of 0 (the tests' tiny Llama with attention dropout 0.5:
step-1 DPO loss 0.696977 instead of ln 2 = 0.693147): `train_mode(model, dropout=False)` puts every
module in eval mode (dropout, LoRA dropout, attention dropout and router jitter off) but keeps
the decoder layers' own `training` flag on, which is all transformers' gradient checkpointing
looks at, so checkpointing still works.

`set_attention(model, setting, device_type, longest)` picks the attention kernel: on CPU, for
sequences up to EAGER_MAX_TOKENS, transformers' eager attention (matmuls + softmax) instead of
torch's CPU flash attention, whose backward is slow at these lengths (bf16, 1 thread, 9 heads of
64: T 190, forward + backward 3.5 ms a layer eager vs 7.9 ms sdpa; T 512, 29 vs 30; T 1024,
105 vs 70). The reference pass runs after the choice, so both passes use the same kernel.

`enable_gradient_checkpointing(model)` is the one switch both trainers call (the online one
through the shared config base): non-reentrant torch.utils.checkpoint per decoder layer, which
needs no `requires_grad` trick on the inputs and works with frozen base weights under LoRA.

`disable_dropout(model)` sets every dropout probability to 0; `checkpoint_without_dropout` is
the online loop's checkpointing (its updates run in train mode with dropout zeroed).
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.config import ConfigError

EAGER_MAX_TOKENS = 512  # auto: eager attention on CPU up to this sequence length


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Saves most activation memory (one layer's worth is kept instead of all) for about one
    more forward pass of compute. Works on a plain transformers model or a PEFT model.
    """
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); "
            "gradient_checkpointing needs a transformers model"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not _checkpointing_layers(model):
        raise ValueError(
            f"{type(model).__name__}: no decoder layer supports gradient checkpointing"
        )


def train_mode(model: nn.Module, *, dropout: bool) -> None:
    """model.train(); with dropout=False every dropout stays off (see the module docstring)."""
    if dropout:
        model.train()
        return
    model.eval()
    for layer in _checkpointing_layers(model):
        layer.training = True  # only the flag: its children (attention, MLP) stay in eval


def disable_dropout(model) -> None:
    """Dropout probability 0 in every nn.Dropout and every `*dropout` float of the config (the
    attention dropout of transformers models is read from there)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key, value in vars(config).items() if config is not None else ():
        if key.endswith("dropout") and isinstance(value, float):
            setattr(config, key, 0.0)


def checkpoint_without_dropout(model) -> None:
    """Gradient checkpointing for the online loop, whose policy stays in eval mode (dropout off).

    transformers checkpoints only in train mode: dropout is zeroed instead of using eval mode
    for the updates, and the model is back in eval mode for sampling (KV cache).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    disable_dropout(model)


def set_attention(model: nn.Module, setting: str, device_type: str, longest: int) -> str:
    """Set the model's attention implementation per `setting` (auto | eager | sdpa; auto: eager
    on CPU when the longest sequence is at most EAGER_MAX_TOKENS, else the model's own); returns
    the implementation in use."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    want = setting
    if setting == "auto":
        want = "eager" if device_type == "cpu" and longest <= EAGER_MAX_TOKENS else current
    if want == current or want is None:
        return current
    if not hasattr(model, "set_attn_implementation"):
        if setting == "auto":
            return current
        raise ConfigError(
            f"attention: {setting!r}; {type(model).__name__} cannot switch its "
            "attention implementation (no set_attn_implementation)"
        )
    model.set_attn_implementation(want)
    return model.config._attn_implementation


def layout(cfg, device) -> str:
    """How sequences run (cfg.padding; auto: none on CPU): longest (left-padded micro-batches),
    shared (each pair or group alone, its prompt once; with gradient checkpointing too, its
    prompt cache read-only: forward.prefix_cache) or none (each sequence alone: with gradient
    checkpointing on a transformers that drops every cache under it)."""
    from posttrain.train.forward import cache_survives_checkpointing

    kind = torch.device(device).type  # a torch.device or a string such as "cpu"
    if cfg.padding == "longest" or (cfg.padding == "auto" and kind != "cpu"):
        return "longest"
    if cfg.gradient_checkpointing and not cache_survives_checkpointing():
        return "none"
    return "shared"
