"""Depth up-scaling: insert new decoder layers that start as the identity.

    posttrain expand --model smollm2-135m --method opt-deus --new-layers 6 --out runs/expanded
    posttrain train --method dpo --model runs/expanded --data pairs.jsonl --out runs/dpo-new \
        --set lora.targets=new-layers            # LoRA on the new layers only
        # or --set lora.enabled=false --set lora.targets=new-layers: full fine-tuning of them

Methods (each new layer gets o_proj and down_proj = 0, biases too; for MoE every routed
expert's down projection and the shared expert's; so its attention and MLP add nothing to the
residual stream and the expanded model computes exactly what the base did):
- llama-pro (Wu et al. 2024): a copy of base layer i, inserted right after it.
- opt-deus (Cao, Wang, Aletras 2025, arXiv 2508.08011): built from adjacent base layers A = i
  (below) and B = i + 1 (above): A is aligned into B's head and neuron order by optimal transport
  (posttrain/expand/align.py, which says exactly what is matched), then every parameter is the mean of
  A's aligned and B's (norms and the MoE router included). Where A's MLP is of another kind
  than B's (a dense layer below a sparse one), the new layer takes B's MLP unchanged.

Placement (`insertion_points`): `top` puts the N new layers in the last N slots (opt-deus: one
between each adjacent pair of the top N + 1 layers, the paper's best, its default; llama-pro:
after each of the last N layers); `interleave` spreads them evenly over the depth (llama-pro's
default: after every (L / N)-th layer, as in its paper).

The output folder holds the weights, the tokenizer, config.json (num_hidden_layers, layer_types,
mlp_only_layers updated) and posttrain_expand.json (which layer indices are new and how they
were made), which the LoRA target and full-fine-tune selection `new-layers` read. The verb is
posttrain/commands/expand.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from posttrain.expand.align import align_layer, is_moe
from posttrain.config import ConfigError

METHODS = ("llama-pro", "opt-deus")
PLACEMENTS = ("top", "interleave")
DEFAULT_PLACEMENT = {"llama-pro": "interleave", "opt-deus": "top"}
METADATA = "posttrain_expand.json"
ZEROED = ("o_proj", "down_proj")  # the projections that write into the residual stream
# config lists with one entry per layer; a new layer takes the entry of the layer it came from
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def insertion_points(method: str, placement: str, n_layers: int, n_new: int) -> list[int]:
    """Base layer indices after which a new layer is inserted (sorted, distinct).

    opt-deus needs a base layer above each new one, so its slots are 0 ... L-2; llama-pro's are
    0 ... L-1. Worked example, L = 30, N = 6: opt-deus top -> 23..28 (new layers between
    (23, 24) ... (28, 29)); llama-pro interleave -> floor(k * 30 / 6 + 0.5) - 1 = 4, 9, ..., 29;
    opt-deus interleave -> floor(k * 30 / 7 + 0.5) - 1 = 3, 8, 12, 16, 20, 25.
    """
    if method not in METHODS:
        raise ConfigError(f"method: {method!r}; expected {' | '.join(METHODS)}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement: {placement!r}; expected {' | '.join(PLACEMENTS)}")
    slots = n_layers if method == "llama-pro" else n_layers - 1
    if not 1 <= n_new <= slots:
        raise ConfigError(
            f"new_layers: {n_new}; expected 1 ... {slots} for {method} on a {n_layers}-layer model"
        )
    if placement == "top":
        return list(range(slots - n_new, slots))
    parts = n_new if method == "llama-pro" else n_new + 1
    # floor(x + 0.5), not round(): Python rounds halves to even, which can repeat a slot
    return [math.floor(k * n_layers / parts + 0.5) - 1 for k in range(1, n_new + 1)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"expand: {type(model).__name__} has no model.layers (a decoder-only "
            f"causal LM such as Llama, Qwen2/3, Qwen3-MoE, Mistral is expected)"
        )
    return layers


def zero_outputs(layer: nn.Module) -> list[str]:
    """Zero every parameter of o_proj / down_proj (weights, biases, fused expert tensors)."""
    zeroed = [name for name, p in layer.named_parameters() if set(name.split(".")) & set(ZEROED)]
    if not any(n.startswith("self_attn.o_proj") for n in zeroed) or not any(
        "down_proj" in n for n in zeroed
    ):
        raise ConfigError(
            f"expand: {type(layer).__name__} has no self_attn.o_proj and "
            f"mlp down_proj to zero; cannot make an identity layer"
        )
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in zeroed:
                p.zero_()
    return zeroed


def fuse_layers(a: nn.Module, b: nn.Module, config) -> tuple[nn.Module, dict]:
    """OpT-DeUS: A aligned into B's order, then the mean of every parameter (o / down not zeroed)."""
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    new, aligned = copy.deepcopy(b), copy.deepcopy(a)
    mlp_from = "fused"
    if is_moe(a.mlp) != is_moe(b.mlp):
        aligned.mlp, mlp_from = copy.deepcopy(b.mlp), "B (A's MLP is of another kind)"
    maps = align_layer(aligned, new, n_q, n_kv, head_dim)
    mine, theirs = dict(new.named_parameters()), dict(aligned.named_parameters())
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ConfigError(
            f"expand: layers of {type(b).__name__} differ in parameters; cannot average them"
        )
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_((p + theirs[name]) / 2)
    return new, {**maps, "mlp": mlp_from}


def renumber(layers: nn.ModuleList) -> None:
    """Set every `layer_idx` (the KV cache slot) to the layer's new position."""
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def update_config(config, layers: nn.ModuleList, origin: list[int]) -> None:
    """num_hidden_layers, per-layer lists (entry of the layer each came from), mlp_only_layers."""
    n_base = config.num_hidden_layers
    for key, value in vars(config).items():
        if (
            "layer" in key
            and isinstance(value, list)
            and len(value) == n_base
            and key not in PER_LAYER_LISTS
            and key != "mlp_only_layers"
        ):
            raise ConfigError(
                f"expand: config.{key} looks like a per-layer list that expand "
                f"does not know how to extend (known: {', '.join(PER_LAYER_LISTS)})"
            )
    for key in PER_LAYER_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, [value[o] for o in origin])
    if getattr(config, "mlp_only_layers", None) is not None:
        # written out layer by layer (and decoder_sparse_step 1), so that the sparse / dense
        # kind of every layer survives the renumbering whatever the base's sparse step was
        config.mlp_only_layers = [i for i, layer in enumerate(layers) if not is_moe(layer.mlp)]
        if hasattr(config, "decoder_sparse_step"):
            config.decoder_sparse_step = 1
    config.num_hidden_layers = len(layers)


def expand_model(model: nn.Module, method: str, n_new: int, placement: str | None = None) -> dict:
    """Insert `n_new` identity-initialised layers into `model` in place; returns the metadata."""
    placement = placement or DEFAULT_PLACEMENT.get(method, "top")
    base = decoder_layers(model)
    points = set(insertion_points(method, placement, len(base), n_new))
    layers, origin, new_info = [], [], []
    for i, layer in enumerate(base):
        layers.append(layer)
        origin.append(i)
        if i not in points:
            continue
        if method == "llama-pro":
            new, info, source = copy.deepcopy(layer), {"copy_of": i}, i
        else:
            new, maps = fuse_layers(base[i], base[i + 1], model.config)
            info, source = {"fused_from": [i, i + 1], "alignment": maps}, i + 1
        zero_outputs(new)
        layers.append(new)
        origin.append(source)
        new_info.append({"index": len(layers) - 1, **info})
    new_layers = nn.ModuleList(layers)
    update_config(model.config, new_layers, origin)
    model.model.layers = new_layers
    renumber(new_layers)
    return {
        "method": method,
        "placement": placement,
        "base_layers": len(base),
        "layers": len(layers),
        "new_layers": [n["index"] for n in new_info],
        "zeroed": list(ZEROED),
        "new": new_info,
    }


def expand(
    model_name: str,
    method: str,
    n_new: int,
    out: str | os.PathLike,
    *,
    placement: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> Path:
    """Load `model_name` in fp32, expand it, save weights + tokenizer + metadata to `out`."""
    from posttrain.models import check_model_out, load_model, load_tokenizer, parse_dtype

    check_model_out(out)
    if n_new < 1:  # before the load: a typo costs no minutes
        raise ConfigError(f"new layers: {n_new}; expected 1 or more")
    model = load_model(model_name, dtype="fp32", trust_remote_code=trust_remote_code)
    meta = expand_model(model, method, n_new, placement)
    meta["base_model"] = model_name
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(parse_dtype(dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / METADATA).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------- reading what is new


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA
    if not path.exists():
        raise ConfigError(
            f"{path}: not found; the target / selection 'new-layers' needs a "
            f"model folder written by `posttrain expand`"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta.get("new_layers"), list):
        raise ConfigError(f"{path}: field 'new_layers': missing or not a list")
    return meta


def new_layer_indices(model: nn.Module) -> set[int]:
    """The new layers of a model loaded from an expanded folder (a PeftModel too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(read_metadata(base.name_or_path)["new_layers"])


def in_new_layers(model: nn.Module, names: list[str]) -> list[str]:
    """The module / parameter names in `names` that lie inside a new layer (error when none)."""
    new = new_layer_indices(model)
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    chosen = [n for n in names if (m := pattern.search(n)) and int(m.group(1)) in new]
    if not chosen:
        raise ConfigError(f"new-layers: nothing selected in layers {sorted(new)}")
    return chosen


def select_new_layers_for_full_finetuning(model: nn.Module) -> list[str]:
    """requires_grad on the new layers' parameters only; returns their names."""
    names = [n for n, _ in model.named_parameters()]
    keep = set(in_new_layers(model, names))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sorted(keep)
