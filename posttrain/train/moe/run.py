"""What a training run does for a mixture-of-experts model (MoeRun): the balance loss it adds
and the routing statistics it logs on a fixed probe batch; `MoeRun.dense()` does nothing.

    python -c "from posttrain.train.moe import MoeRun; help(MoeRun)"
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from posttrain.train.moe.balance import (
    RouterRecorder,
    balance_loss,
    resolve_aux_coef,
    routing_stats,
    topk_sets,
)
from posttrain.train.moe.model import MoeShape, moe_shape, router_modules
from posttrain.train.moe.replay import check_replay_support


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
    replay: str = "none"  # moe.replay (online): none | old | rollout (replay.py)
    layers: int = 0  # routers (MoE layers) in one forward

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
            if cfg.replay != "none":
                check_replay_support(model)  # a ConfigError naming moe.replay
            return cls.dense()
        run = cls(shape, coef, cfg.stats_every)
        run.replay, run.layers = cfg.replay, len(router_modules(model))
        if run.replay != "none":
            check_replay_support(model)
        if cfg.stats_every and cfg.probe_size and items:
            prompts = [
                list(prompt_of(items[i])) for i in pick_probe(len(items), cfg.probe_size, seed)
            ]
            run.probe = probe_batch(prompts, pad_id)
            logits, _ = run._probe_forward(model)
            run.base_topk = [topk_sets(x, shape.top_k) for x in logits]
        return run

    @property
    def routing(self) -> tuple[int, int] | None:
        """(MoE layers, top-k) for the rollout batches' routing plans; None on a dense model."""
        return None if self.shape is None else (self.layers, self.shape.top_k)

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
