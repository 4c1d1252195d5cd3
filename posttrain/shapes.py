"""Parameter counts of decoder-only models from their config.json alone (no weights, no torch):
total, active a token (MoE: top-k experts), and LoRA's trainable count for train/lora.py's
target names.

    python -c "from posttrain.shapes import parameters, shape_of, read_config; \
        print(parameters(shape_of(read_config('tests/data/qwen3-30b-a3b'))))"

Exact for the families in MODEL_TYPES (tests/test_plan.py checks them against transformers and
PEFT on tiny configs, and the Qwen3-30B-A3B / 235B-A22B totals). The memory plan built on them
is posttrain/plan.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError, InputError

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
LORA_TARGETS = ("all-linear", "attention", "mlp", "all-router", "experts", "shared-expert")


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only config that memory depends on."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (Mixtral: the expert width)
    tie: bool
    qkv_bias: bool
    qk_norm: bool
    experts: int = 0  # routed experts per MoE layer (0: dense)
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE shared expert (with a 1-output gate)
    moe_layers: tuple[int, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def read_config(source) -> dict:
    """A config dict from a dict, a model folder (its config.json) or a config.json path."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(f"{source}: no config.json (expected a model folder or a config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None


def shape_of(config: dict) -> Shape:
    """Shape from a transformers config dict; ConfigError naming a missing field or a family
    the planner does not count."""
    config = config.get("text_config", config)
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"model_type: {kind!r}; the planner counts {', '.join(MODEL_TYPES)}")

    def need(name):
        if name not in config:
            raise ConfigError(f"config.json: {name!r} missing (model_type {kind})")
        return int(config[name])

    hidden, heads, layers = (
        need("hidden_size"),
        need("num_attention_heads"),
        need("num_hidden_layers"),
    )
    head_dim = config.get("head_dim") or hidden // heads
    moe = {}
    if kind == "mixtral":
        moe = dict(experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                   expert_intermediate=need("intermediate_size"), moe_layers=tuple(range(layers)))  # fmt: skip
    elif kind in ("qwen3_moe", "qwen2_moe"):
        experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers") or ())
        sparse = tuple(
            i for i in range(layers) if i not in dense and experts and (i + 1) % step == 0
        )
        moe = dict(experts=experts, top_k=need("num_experts_per_tok"),
                   expert_intermediate=need("moe_intermediate_size"), moe_layers=sparse,
                   shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0))  # fmt: skip
    return Shape(
        model_type=kind,
        vocab=need("vocab_size"),
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate=int(config.get("intermediate_size") or 0),
        tie=bool(config.get("tie_word_embeddings", kind not in ("llama", "mistral", "mixtral"))),
        qkv_bias=kind in ("qwen2", "qwen2_moe") or bool(config.get("attention_bias", False)),
        qk_norm=kind in ("qwen3", "qwen3_moe"),
        **moe,
    )


def layer_parameters(s: Shape, i: int) -> dict[str, int]:
    """Parameters of decoder layer i by group: attention, mlp (dense or shared expert), router,
    experts (all routed experts), experts_active (the top_k a token uses), norms."""
    H, q, kv = s.hidden, s.q_dim, s.kv_dim
    attention = H * q + 2 * H * kv + q * H
    if s.qkv_bias:
        attention += q + 2 * kv
    if s.qk_norm:
        attention += 2 * s.head_dim
    out = {"attention": attention, "norms": 2 * H, "mlp": 0, "router": 0}
    out["experts"] = out["experts_active"] = 0
    if i in s.moe_layers:
        per_expert = 3 * H * s.expert_intermediate
        out["router"] = s.experts * H
        out["experts"] = s.experts * per_expert
        out["experts_active"] = s.top_k * per_expert
        if s.shared_intermediate:
            out["mlp"] = 3 * H * s.shared_intermediate + H  # + the shared expert's gate
    else:
        out["mlp"] = 3 * H * s.intermediate
    return out


def parameters(s: Shape) -> dict[str, int]:
    """{"total", "active" (a token's: top_k experts of each MoE layer), "embeddings", "head",
    "largest_layer"} parameter counts."""
    embed = s.vocab * s.hidden
    head = 0 if s.tie else s.vocab * s.hidden
    total = active = embed + head + s.hidden  # + the final norm
    largest = 0
    for i in range(s.layers):
        p = layer_parameters(s, i)
        shared = p["attention"] + p["norms"] + p["mlp"] + p["router"]
        total += shared + p["experts"]
        active += shared + p["experts_active"]
        largest = max(largest, shared + p["experts"])
    return {"total": total, "active": active, "embeddings": embed, "head": head,
            "largest_layer": largest}  # fmt: skip


def lora_parameters(s: Shape, targets: str, r: int) -> int:
    """Trainable LoRA parameters of train/lora.py's target names (comma-separated): r (in + out)
    per adapted linear; a routed-expert parameter (E, out, in) gets r E (in + out)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(
            f"lora targets: {targets!r}; the planner counts {', '.join(LORA_TARGETS)}"
        )
    H, q, kv = s.hidden, s.q_dim, s.kv_dim
    n = 0
    for i in range(s.layers):
        moe = i in s.moe_layers
        if "all-linear" in names or "attention" in names:
            n += r * ((H + q) + 2 * (H + kv) + (q + H))
        mlp_width = s.shared_intermediate if moe else s.intermediate
        if ("all-linear" in names or "mlp" in names) and mlp_width:
            n += 3 * r * (H + mlp_width)  # dense MLP or the shared expert (never routed experts)
        elif "shared-expert" in names and moe and s.shared_intermediate:
            n += 3 * r * (H + s.shared_intermediate)
        if moe and "all-router" in names:
            n += r * (H + s.experts)
        if moe and "experts" in names:
            n += r * s.experts * ((H + 2 * s.expert_intermediate) + (s.expert_intermediate + H))
    if ("all-router" in names or "experts" in names) and not s.moe_layers:
        raise ConfigError(f"lora targets: {targets!r}: a {s.model_type} model has no experts")
    return n
