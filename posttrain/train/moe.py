"""Mixture-of-experts support for the trainers: where routers and experts are, the
load-balancing loss, and routing statistics on a fixed probe batch.

    posttrain train --method dpo --model QWEN3_MOE_FOLDER --data pairs.jsonl --out runs/moe \
        --set lora.targets=all-linear,all-router --set router_aux_loss_coef=0.001

The trainers call three hooks, all no-ops on a dense model (`MoeRun.dense()`):
`record(policy)` around a micro-batch's forward, `add_aux(loss, metrics, routing, weight)` before
its backward, and `stats(policy, step)` once per optimizer step (logged every `stats_every`).

Router logits are taken with forward hooks on the modules transformers itself records as
`router_logits` (the model class's `_can_record_outputs`, e.g. Qwen3MoeTopKRouter, output 0:
raw logits before the softmax). The forward never gets `labels` nor `output_router_logits`, so
transformers adds nothing to any loss here: the balance loss is added once, by `add_aux`.

The balance loss is transformers' `load_balancing_loss_func` of Qwen2/3-MoE and Mixtral (the
Switch Transformer loss for top-k routing), written out: over every router call l of the
forward (the sparse layers) and every token t with attention mask 1 (N = L * T_unmasked rows),
    f_e = #{(l, t): e in topk(p_lt)} / N        (sums to k over the experts)
    P_e = sum_(l, t) p_lt[e] / N                (p_lt = softmax(logits_lt), sums to 1)
    aux = E * sum_e f_e * P_e
Layers are pooled, not averaged as per-layer losses: f and P are means over (layer, token) rows.
f counts every top-k slot (not divided by k); the mask weights both f and P and the divisor N.
A perfectly balanced router gives aux = k; all tokens on the same k experts give up to E.
Checked against transformers 5.19's function and the model's own `aux_loss` in tests/test_moe.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from posttrain.config import ConfigError

# ------------------------------------------------------------------------ model structure


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


# ---------------------------------------------------------------------------- the losses


def balance_loss(
    router_logits: list[torch.Tensor],
    num_experts: int,
    top_k: int,
    mask: torch.Tensor | list | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss pooled over router calls (module docstring), float32.

    `router_logits`: one (B * T, E) tensor per router call; `mask`: the (B, T) attention mask of
    every call, or one flat (B * T,) mask (or None: every row counts) per call, or None.
    """
    rows = torch.cat([x.float() for x in router_logits])  # (L * B * T, E)
    probs = torch.softmax(rows, dim=-1)  # (N, E)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # (N, E)
    if mask is None:
        weight = torch.ones(rows.shape[0], device=rows.device)
    elif isinstance(mask, list):  # one per call (RouterRecorder.row_masks)
        weight = torch.cat(
            [
                torch.ones(x.shape[0]) if m is None else m.reshape(-1).float().cpu()
                for x, m in zip(router_logits, mask)
            ]
        ).to(rows.device)  # (N,)
    else:
        weight = mask.reshape(-1).float().to(rows.device).repeat(len(router_logits))  # (N,)
    n = weight.sum().clamp(min=1.0)
    f = (chosen * weight[:, None]).sum(0) / n  # (E,) share of rows routed to e
    p = (probs * weight[:, None]).sum(0) / n  # (E,) mean router probability of e
    return num_experts * (f * p).sum()


def routing_stats(
    router_logits: list[torch.Tensor],
    top_k: int,
    mask: torch.Tensor | None,
    base_topk: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Routing of one forward: tokens per expert (max over layers and experts, and the mean),
    mean router entropy (nats; log E when uniform), and with `base_topk` (one (B * T, k)
    tensor per layer) the share of (layer, token) whose top-k set differs from it."""
    keep = (
        torch.ones(router_logits[0].shape[0], dtype=torch.bool)
        if mask is None
        else mask.reshape(-1).bool().cpu()
    )  # (B * T,)
    counts, entropies, changed = [], [], []
    for layer, logits in enumerate(router_logits):
        logp = torch.log_softmax(logits.detach().float().cpu()[keep], dim=-1)  # (n, E)
        entropies.append(-(logp.exp() * logp).sum(-1))  # (n,)
        top = topk_sets(logits, top_k)[keep]  # (n, k)
        counts.append(torch.bincount(top.reshape(-1), minlength=logp.shape[-1]).float())
        if base_topk is not None:
            changed.append((top != base_topk[layer][keep]).any(-1).float())  # (n,)
    counts = torch.stack(counts)  # (L, E)
    out = {
        "moe/tokens_per_expert_max": counts.max().item(),
        "moe/tokens_per_expert_mean": counts.mean().item(),
        "moe/router_entropy": torch.cat(entropies).mean().item(),
    }
    if changed:
        out["moe/topk_changed"] = torch.cat(changed).mean().item()
    return out


def topk_sets(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N, k) sorted expert indices of each row's top-k: (N, E) -> (N, k)."""
    return logits.detach().float().cpu().topk(top_k, dim=-1).indices.sort(-1).values


# ---------------------------------------------------------------------- recording routers


class RouterRecorder:
    """Within `with`: collects each router call's logits (N, E), the attention mask of the
    model's (last) forward, and per router call the flat mask of its rows (`row_masks`: None
    where the forward had no mask), so that forwards of different shapes (a prompt's, then its
    completions' with a key-value cache) pool correctly. Empty (no hooks) when disabled."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.logits: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.row_masks: list[torch.Tensor | None] = []
        self._handles = []

    def masks(self):
        """What balance_loss takes: the per-call row masks when a forward had a mask, else None."""
        return self.row_masks if any(m is not None for m in self.row_masks) else None

    def __enter__(self):
        if not self.enabled:
            return self
        index = router_spec(self.model).index

        def on_router(module, args, output):
            logits = output[index] if isinstance(output, (tuple, list)) else output
            self.logits.append(logits)
            m = self.mask  # (B, past + T) with a cache: the rows here are the last T columns
            self.row_masks.append(
                None if m is None else m[:, m.shape[1] - logits.shape[0] // m.shape[0] :]
            )

        def on_model(module, args, kwargs):
            self.mask = kwargs.get("attention_mask")

        for module in router_modules(self.model).values():
            self._handles.append(module.register_forward_hook(on_router))
        self._handles.append(
            transformers_model(self.model).register_forward_pre_hook(on_model, with_kwargs=True)
        )
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


# ---------------------------------------------------------------------- the trainers' hooks


def resolve_aux_coef(model: nn.Module, coef: float | None) -> float:
    """The coefficient a run uses: `coef`, or the model config's own when None (0 for a dense
    model). ConfigError for a non-zero `coef` on a dense model (it would silently do nothing)."""
    shape = moe_shape(model)
    if shape is None:
        if coef:
            kind = type(transformers_model(model)).__name__
            raise ConfigError(
                f"router_aux_loss_coef: {coef} but {kind} has no router (not a "
                "mixture of experts); set it to 0 or leave it unset"
            )
        return 0.0
    return shape.default_coef if coef is None else float(coef)


def probe_batch(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and position_ids, (B, T) each."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def probe_prompt(tokenizer, problem, system_prompt: str | None = None) -> list[int]:
    """Token ids of a problem's prompt as the online trainer's engine renders it."""
    from posttrain.sampling import prompt_messages

    text = tokenizer.apply_chat_template(
        prompt_messages(problem, system_prompt), tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pick_probe(n_items: int, size: int, seed: int) -> list[int]:
    """Indices of the probe rows: `size` of `n_items`, chosen once from the seed."""
    return sorted(random.Random(seed).sample(range(n_items), min(size, n_items)))


@dataclass
class MoeRun:
    """What a training run does for an MoE model; `MoeRun.dense()` does nothing."""

    shape: MoeShape | None = None
    coef: float = 0.0
    stats_every: int = 0
    probe: dict[str, torch.Tensor] | None = None
    base_topk: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def dense(cls) -> MoeRun:
        return cls()

    @classmethod
    def setup(
        cls,
        model: nn.Module,
        coef: float | None,
        cfg,
        items: list,
        prompt_of,
        *,
        seed: int,
        pad_id: int,
    ) -> MoeRun:
        """Call on the base model before the adapter is added or a checkpoint loaded: the
        probe's base routing is taken from it. `cfg` is a config.MoeConfig; the probe is
        `cfg.probe_size` of `items` picked by `seed`, `prompt_of(item)` their token ids.
        ConfigError as in resolve_aux_coef."""
        coef = resolve_aux_coef(model, coef)
        shape = moe_shape(model)
        if shape is None:
            return cls.dense()
        run = cls(shape, coef, cfg.stats_every)
        if cfg.stats_every and cfg.probe_size and items:
            prompts = [
                list(prompt_of(items[i])) for i in pick_probe(len(items), cfg.probe_size, seed)
            ]
            run.probe = probe_batch(prompts, pad_id)
            logits, _ = run._probe_forward(model)
            run.base_topk = [topk_sets(x, shape.top_k) for x in logits]
        return run

    def record(self, policy: nn.Module) -> RouterRecorder:
        """Context around a micro-batch's forward; records routers only when coef > 0."""
        return RouterRecorder(policy, enabled=bool(self.coef and self.shape))

    def add_aux(
        self, loss: torch.Tensor, metrics: dict, routing: RouterRecorder, weight: float
    ) -> torch.Tensor:
        """loss + coef * aux * weight; puts the unweighted aux into metrics["loss/aux"].
        `weight`: the micro-batch's share of the step (the same share its method loss has)."""
        if not routing.logits:
            return loss
        aux = balance_loss(
            routing.logits, self.shape.num_experts, self.shape.top_k, routing.masks()
        )
        metrics["loss/aux"] = aux.detach()
        return loss + (self.coef * weight) * aux.to(loss.dtype)

    def aux_term(self, metrics: dict[str, float], mu: float | None = None) -> float:
        """coef x the step's logged balance loss, as added to the loss (online trainer; with
        CHORD's mu, mixed like its two parts)."""
        if mu is None:
            return self.coef * metrics.get("loss/aux", 0.0)
        return self.coef * (
            (1 - mu) * metrics.get("loss/aux", 0.0) + mu * metrics.get("sft/loss/aux", 0.0)
        )

    def stats(self, policy: nn.Module, step: int, last: bool = False) -> dict[str, float]:
        """Routing statistics on the probe batch every `stats_every` steps (and the last)."""
        if self.probe is None or not (step % self.stats_every == 0 or last):
            return {}
        logits, mask = self._probe_forward(policy)
        return routing_stats(logits, self.shape.top_k, mask, self.base_topk)

    @torch.no_grad()
    def _probe_forward(self, model: nn.Module):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.probe.items()}
        was_training = model.training
        model.eval()
        try:
            with RouterRecorder(model) as rec:
                model(**batch, logits_to_keep=1, use_cache=False)
        finally:
            model.train(was_training)
        return rec.logits, batch["attention_mask"]
