"""The load-balancing loss of mixture-of-experts models and routing statistics of a forward.

    python -c "from posttrain.train.moe import balance_loss; help(balance_loss)"

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

import torch
from torch import nn

from posttrain.config import ConfigError
from posttrain.train.moe.model import moe_shape, router_modules, router_spec, transformers_model


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
