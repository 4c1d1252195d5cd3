"""Stage `expand --method upcycle`: sparse upcycling of a dense Llama-family model into a Mixtral.

    python -c "from posttrain.expand.upcycle import upcycle; \
        upcycle('smollm2-135m', 'runs/smol-moe', experts=4, top_k=2)"

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every dense MLP becomes E experts
that start as copies of it, behind a new router. Mixtral's architecture fits a Llama-family model
exactly (same attention, RMSNorm, RoPE and SwiGLU MLP), and its router renormalises the top-k
softmax weights to sum to 1, so with identical experts the MoE layer computes
sum_k w_k * mlp(x) = mlp(x): the upcycled model computes what the dense one did, up to rounding
(see tests/test_upcycle.py for the measured bound).

Router initialisation (`router_init`): `normal` draws the new (E, hidden) router weight from
N(0, std^2) (std defaults to the dense config's initializer_range), so tokens spread over the
experts from the start; `zeros` makes every logit equal, so every token takes the same k
experts with weights exactly 1/k (bit-exact for k a power of 2, but experts beyond the first k
get no gradient until the router moves: useful as a reference, not for training).

Symmetry breaker (`noise`, default "none": the experts are exact copies, as in Komatsuzaki et al.):
- "gaussian:S": every expert's w1 / w2 / w3 gets independent Gaussian noise of standard
  deviation S * std(W), the dense matrix's own standard deviation (relative scale S).
- "drop:R": Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): in each expert a random
  share R of the intermediate neurons (a different draw per expert) is re-initialised: their
  rows of w1 (gate) and w3 (up) and their columns of w2 (down) are drawn from
  N(mean(W), std(W)^2) of the dense matrix they came from. The paper's setting is R = 0.5.

Checkpoint format: the classic Mixtral keys, which vLLM's Mixtral loader reads natively and
transformers 5 converts on load into its fused 3-D parameters:
    model.layers.{i}.block_sparse_moe.gate.weight               (E, hidden)  the router
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight     (inter, hidden)  = gate_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight     (inter, hidden)  = up_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight     (hidden, inter)  = down_proj
Everything else keeps its dense key. Weights are written layer by layer into safetensors shards
of at most 2 GiB (one file for small models), so memory holds the dense model plus one shard.
The folder also holds config.json (MixtralConfig), the tokenizer, the generation config and
posttrain_upcycle.json (what it was made from and how).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from posttrain.config import ConfigError

ROUTER_INITS = ("normal", "zeros")
BREAKERS = ("none", "gaussian", "drop")
METADATA = "posttrain_upcycle.json"
SOURCE_TYPES = ("llama", "mistral")  # decoder layers that a Mixtral layer reproduces exactly
MAX_SHARD_BYTES = 2 * 1024**3
EXPERT_KEYS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# dense config fields a Mixtral config takes over unchanged
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
    "rope_parameters",
    "sliding_window",
)


@dataclass(frozen=True)
class SymmetryBreaker:
    """How the copies are made to differ: none | gaussian (relative noise S) | drop (share R)."""

    method: str = "none"
    amount: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> SymmetryBreaker:
        """'none' | 'gaussian:S' (S > 0) | 'drop:R' (0 < R <= 1)."""
        method, _, amount = spec.partition(":")
        if method not in BREAKERS:
            raise ConfigError(f"noise: {spec!r}; expected none | gaussian:S | drop:R")
        if method == "none":
            if amount:
                raise ConfigError(f"noise: {spec!r}; 'none' takes no amount")
            return cls()
        try:
            value = float(amount)
        except ValueError:
            raise ConfigError(f"noise: {spec!r}; expected a number after '{method}:'") from None
        high = 1.0 if method == "drop" else float("inf")
        if not 0 < value <= high:
            raise ConfigError(
                f"noise: {spec!r}; the amount must be in (0, {high:g}]"
                + (" (a share of the intermediate neurons)" if method == "drop" else "")
            )
        return cls(method, value)


def check_source(config) -> None:
    """Refuse a dense config whose layers a Mixtral layer would not compute exactly."""
    kind = getattr(config, "model_type", None)
    if kind not in SOURCE_TYPES:
        raise ConfigError(
            f"upcycle: model_type {kind!r}; expected a Llama-family dense model "
            f"({' | '.join(SOURCE_TYPES)}), whose layers Mixtral's reproduce"
        )
    for field, wanted in (("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1)):
        value = getattr(config, field, wanted)
        if value != wanted:
            raise ConfigError(
                f"upcycle: config.{field} = {value!r}; Mixtral supports only {wanted!r}"
            )
    # vLLM's fused MoE kernel applies SiLU-and-multiply whatever the config says
    if config.hidden_act != "silu":
        raise ConfigError(f"upcycle: config.hidden_act = {config.hidden_act!r}; expected 'silu'")


def check_routing(experts: int, top_k: int) -> None:
    if experts < 2:
        raise ConfigError(f"experts: {experts}; expected 2 or more")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"top_k: {top_k}; expected 1 ... {experts} (the number of experts)")


def mixtral_config(dense, experts: int, top_k: int, dtype: torch.dtype):
    """A MixtralConfig with the dense model's shapes, `experts` experts and top-`top_k` routing."""
    from transformers import MixtralConfig

    check_source(dense)
    check_routing(experts, top_k)
    fields = {f: getattr(dense, f) for f in SHARED_FIELDS if getattr(dense, f, None) is not None}
    config = MixtralConfig(
        **fields,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = dtype
    return config


def new_router(
    experts: int, hidden: int, init: str, std: float, gen: torch.Generator
) -> torch.Tensor:
    """The router weight (experts, hidden) in fp32."""
    if init == "zeros":
        return torch.zeros(experts, hidden)
    if init == "normal":
        return torch.randn(experts, hidden, generator=gen) * std
    raise ConfigError(f"router_init: {init!r}; expected {' | '.join(ROUTER_INITS)}")


def make_expert(
    weights: dict[str, torch.Tensor], breaker: SymmetryBreaker, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """One expert from the dense MLP's {gate_proj, up_proj, down_proj} weights (fp32, copies)."""
    expert = {name: w.clone() for name, w in weights.items()}
    if breaker.method == "gaussian":
        for name, w in expert.items():
            w.add_(torch.randn(w.shape, generator=gen) * (breaker.amount * weights[name].std()))
    elif breaker.method == "drop":
        inter = weights["gate_proj"].shape[0]
        n_drop = round(breaker.amount * inter)
        rows = torch.randperm(inter, generator=gen)[:n_drop]  # this expert's neurons
        for name, w in expert.items():
            dense = weights[name]
            part = w[:, rows] if name == "down_proj" else w[rows]  # (hidden, n) | (n, hidden)
            fresh = torch.randn(part.shape, generator=gen) * dense.std() + dense.mean()
            if name == "down_proj":
                w[:, rows] = fresh
            else:
                w[rows] = fresh
    return expert


def upcycled_tensors(
    state: dict[str, torch.Tensor],
    n_layers: int,
    experts: int,
    router_init: str,
    router_std: float,
    breaker: SymmetryBreaker,
    seed: int,
):
    """Yield (key, fp32 tensor) of the Mixtral checkpoint, layer by layer, from a dense state."""
    gen = torch.Generator().manual_seed(seed)
    mlp_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.(\w+)\.weight$")
    mlps: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if ".mlp." not in key:
            yield key, tensor
            continue
        m = mlp_key.match(key)
        if not m or m.group(2) not in EXPERT_KEYS:
            raise ConfigError(f"upcycle: unexpected MLP parameter {key!r} in the dense model")
        layer = mlps.setdefault(int(m.group(1)), {})
        layer[m.group(2)] = tensor
        if len(layer) < len(EXPERT_KEYS):
            continue
        i = int(m.group(1))
        prefix = f"model.layers.{i}.block_sparse_moe"
        hidden = layer["gate_proj"].shape[1]
        yield f"{prefix}.gate.weight", new_router(experts, hidden, router_init, router_std, gen)
        for e in range(experts):
            for name, w in make_expert(layer, breaker, gen).items():
                yield f"{prefix}.experts.{e}.{EXPERT_KEYS[name]}.weight", w
        del mlps[i]
    if mlps or n_layers == 0:
        raise ConfigError(f"upcycle: layers {sorted(mlps)} lack one of {sorted(EXPERT_KEYS)}")


def write_shards(tensors, folder: Path, dtype: torch.dtype) -> int:
    """Save (key, tensor) pairs as safetensors shards (+ index when more than one); returns bytes."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    names: list[Path] = []
    weight_map: dict[str, int] = {}

    def flush():
        path = folder / f".shard-{len(names)}.safetensors"
        save_file(shards[-1], path, metadata={"format": "pt"})
        names.append(path)

    for key, tensor in tensors:
        t = tensor.detach().to(dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > MAX_SHARD_BYTES:
            flush()
            shards.append({})
            size = 0
        shards[-1][key] = t
        weight_map[key] = len(shards) - 1
        size += nbytes
        total += nbytes
    flush()
    if len(names) == 1:
        os.replace(names[0], folder / "model.safetensors")
        return total
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    for path, name in zip(names, final):
        os.replace(path, folder / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: final[i] for k, i in sorted(weight_map.items())},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return total


def upcycle(
    model: str,
    out: str | os.PathLike,
    *,
    experts: int = 4,
    top_k: int = 2,
    router_init: str = "normal",
    router_std: float | None = None,
    noise: str = "none",
    seed: int = 0,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> Path:
    """Upcycle the dense model `model` (folder, hub id, .gguf or `smollm2-135m`) into a Mixtral
    folder `out` (written to a temporary folder, then renamed into place); returns `out`."""
    from posttrain.models import (
        check_model_out,
        load_model,
        load_tokenizer,
        parse_dtype,
        resolve_model,
    )

    check_model_out(out)
    breaker = SymmetryBreaker.parse(noise)
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"router_init: {router_init!r}; expected {' | '.join(ROUTER_INITS)}")
    if router_init == "zeros" and router_std is not None:
        raise ConfigError("router_std: set, but router_init 'zeros' draws nothing")
    check_routing(experts, top_k)  # before the load: a typo costs no minutes
    dense = load_model(model, dtype="fp32", trust_remote_code=trust_remote_code)
    std = dense.config.initializer_range if router_std is None else router_std
    if router_init == "normal" and not std > 0:
        raise ConfigError(f"router_std: {std}; expected > 0")
    out_dtype = parse_dtype(dtype)
    config = mixtral_config(dense.config, experts, top_k, out_dtype)
    state = dense.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor with embed_tokens; stored once
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = upcycled_tensors(
        state, config.num_hidden_layers, experts, router_init, std, breaker, seed
    )
    nbytes = write_shards(tensors, tmp, out_dtype)
    config.save_pretrained(tmp)
    dense.generation_config.save_pretrained(tmp)
    load_tokenizer(model, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    n_dense = sum(t.numel() for t in state.values())
    mlp = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    router = experts * config.hidden_size * config.num_hidden_layers
    meta = {
        "method": "upcycle",
        "reference": "Komatsuzaki et al. 2022, sparse upcycling (arXiv 2212.05055)",
        "base_model": model,
        "base_folder": resolve_model(model),
        "base_architecture": (dense.config.architectures or [type(dense).__name__])[0],
        "architecture": "MixtralForCausalLM",
        "experts": experts,
        "top_k": top_k,
        "router_init": {"method": router_init, "std": std if router_init == "normal" else None},
        "symmetry_breaker": asdict(breaker),
        "seed": seed,
        "dtype": dtype,
        "parameters": {
            "dense": n_dense,
            "total": n_dense + (experts - 1) * mlp + router,
            "active_per_token": n_dense + (top_k - 1) * mlp + router,
        },
        "weights_bytes": nbytes,
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA
    if not path.exists():
        raise ConfigError(f"{path}: not found; expected a folder written by upcycle()")
    return json.loads(path.read_text(encoding="utf-8"))
