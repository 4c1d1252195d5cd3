"""Online RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, BNPO, GSPO and CHORD, in one loop.

    posttrain train --method grpo --problems "builtin:arith:512?split=train" --out runs/grpo \
        --set max_steps=40 --set num_generations=4 [--set chord.demos=demos.jsonl] [--resume]

Each step: draw `problems_per_step` problems, sample `num_generations` (G) completions of each
from the live LoRA policy (the transformers engine), grade them with the project's graders
(`sample_row` + `verify_row`: exactly what `posttrain sample` + `posttrain verify` would say),
turn rewards into group-normalised advantages, then take `updates_per_batch` optimizer steps on
that batch with the old log-probs kept. CHORD adds expert demonstrations to every step:
(1 - mu) * policy loss + mu * SFT, mu from a schedule; `chord.variant: mu` trains the plain SFT
term, `phi` the p(1 - p)-weighted one. Losses are in posttrain/losses.py; LoRA, optimizer,
schedule, checkpoints, metrics log and non-finite guard are the offline trainer's.

Choices worth knowing:
- Dropout stays off for the whole run (the policy stays in eval mode; gradients still flow), so
  a batch's first update sees ratio exactly 1 and sampling sees the policy that is trained.
- Old log-probs are recomputed in a no-grad pass through the training forward path, not taken
  from the engine: those come from cached incremental decoding, whose numerics differ slightly,
  and the ratio should measure the policy's change, not that difference. With
  `updates_per_batch: 1` there is no extra pass: old = current, detached (ratio 1).
- The KL reference is the same model with the adapter disabled; computed only when kl_beta > 0.
- Reported rewards are over every completion sampled in a step, before dynamic sampling drops
  groups, so the reward curve is not inflated by the filter.
- One process: generation and training share the model (multi-GPU online RL is not done here).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, save_config
from ..engines.base import Completion, SamplingParams
from ..engines.hf import HFEngine
from ..losses import (AGGREGATIONS, chord_loss, group_advantages, metrics_to_floats, mu_schedule,
                      policy_loss, sft, sft_phi, token_logps)
from ..models import load_model, load_tokenizer, resolve_dtype
from ..reasoning import prompt_opens_think
from ..records import Problem
from ..sample import prompt_messages, sample_row
from ..verify import verify_row
from .batches import collate
from .checkpoint import (latest_checkpoint, load_checkpoint, parameters_finite, save_checkpoint,
                         save_final, start_run)
from .config import SCHEDULES, LoraConfig, MoeConfig, check_aux_coef, method_config
from .data import Example, load_examples
from .logps import completion_logps
from .lora import apply_lora, format_parameter_report, parameter_report
from .metrics import MetricsLog, NonFiniteError, check_finite
from .moe import MoeRun, probe_prompt
from .optim import clip_gradients, lr_at, make_optimizer, make_scheduler

# Method name -> the settings it implies (under the user's YAML and --set overrides).
METHODS: dict[str, dict] = {
    "grpo": {"aggregation": "grpo", "advantage_scale": "group"},
    # Dr. GRPO (Liu et al. 2025): no std division; token sum / (B * max_new_tokens).
    "dr-grpo": {"aggregation": "dr_grpo", "advantage_scale": "none"},
    # DAPO (Yu et al. 2025): clip-higher 0.28, token-level loss over the whole batch, dynamic
    # sampling, soft overlong punishment (paper: a 4096-token buffer of 20480 = 20 %), no KL.
    "dapo": {"aggregation": "dapo", "clip_low": 0.2, "clip_high": 0.28, "dynamic_sampling": True,
             "overlong_buffer": 0.2, "kl_beta": 0.0},
    "bnpo": {"aggregation": "bnpo"},
    # GSPO (Zheng et al. 2025, v2 sec. 5.1): sequence-level ratio, clip ranges 3e-4 / 4e-4, no
    # KL. The clip only acts off-policy, i.e. with updates_per_batch > 1.
    "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "kl_beta": 0.0},
    "chord": {"aggregation": "grpo", "advantage_scale": "group"},
}

# Settings that may change between a run and its resume (they do not change the result).
RESUME_MAY_CHANGE = {"stop_after_steps", "num_threads", "checkpoint_every", "keep_checkpoints"}


# ------------------------------------------------------------------------------- config


@dataclass
class ChordConfig:
    variant: str = "mu"  # mu: plain SFT term; phi: SFT weighted by p(1 - p) per token
    demos: str = ""  # demonstrations (messages / prompt + completion) or scored rows (correct)
    ratio: float = 0.5  # demonstrations per step = max(1, round(ratio * problems_per_step))
    max_length: int = 1024  # longer demonstrations are dropped (and counted)
    # mu = losses.mu_schedule(step, ...); for a constant mu set mu_peak == mu_valley.
    mu_peak: float = 0.9
    mu_valley: float = 0.05
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 100


@dataclass
class OnlineConfig:
    method: str = "grpo"  # grpo | dr-grpo | dapo | bnpo | gspo | chord (presets: METHODS)
    model: str = "smollm2-135m"
    problems: str = "builtin:arith:512?split=train"
    limit: int = 0  # > 0: only the first N problems
    dtype: str = "auto"  # auto | bf16 | fp32 | fp16 (auto: models.resolve_dtype)
    system_prompt: str | None = None
    # rollouts
    num_generations: int = 4  # G: completions per problem
    problems_per_step: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 16  # sequences per generate call
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, draw again
    max_sampling_rounds: int = 3  # generate calls per step at most, with dynamic sampling
    # reward = grader reward + format_reward * format_ok - overlong penalty
    format_reward: float = 0.0
    overlong_buffer: float = 0.0  # share of max_new_tokens in DAPO's soft-penalty zone; 0: off
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens
    mask_truncated: bool = False  # truncated completions keep their reward but get no loss
    # loss (posttrain.losses.policy_loss)
    aggregation: str = "grpo"  # grpo | bnpo | dapo | dr_grpo
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    ratio_level: str = "token"  # token | sequence (GSPO)
    clip_low: float = 0.2
    clip_high: float | None = None  # None: clip_low; DAPO's clip-higher: 0.28
    kl_beta: float = 0.0  # k3 KL to the base model (adapter disabled)
    updates_per_batch: int = 1  # optimizer steps on each sampled batch (PPO epochs)
    micro_batch_size: int = 8  # sequences per forward / backward (gradients accumulate)
    # optimisation (posttrain/train/optim.py)
    lr: float = 2e-5
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | linear, after warmup
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    max_steps: int = 40  # rollout steps (optimizer steps = max_steps * updates_per_batch)
    stop_after_steps: int = 0  # > 0: stop cleanly after this step (schedule unchanged); --resume
    seed: int = 0
    checkpoint_every: int = 10  # rollout steps; the last step always writes one
    keep_checkpoints: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    lora: LoraConfig = field(default_factory=LoraConfig)
    chord: ChordConfig = field(default_factory=ChordConfig)
    router_aux_loss_coef: float | None = None  # MoE only; as in TrainConfig (train/moe.py)
    moe: MoeConfig = field(default_factory=MoeConfig)

    def check(self) -> None:
        def bad(name, value, expected):
            raise ConfigError(f"{name}: {value!r}; expected {expected}")

        if self.method not in METHODS:
            bad("method", self.method, " | ".join(METHODS))
        if self.num_generations < 2:
            bad("num_generations", self.num_generations, ">= 2 (advantages need a group)")
        for name in ("problems_per_step", "max_new_tokens", "updates_per_batch", "max_steps",
                     "micro_batch_size", "generation_batch_size", "max_sampling_rounds",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), ">= 1")
        for name in ("limit", "stop_after_steps", "checkpoint_every", "num_threads"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), ">= 0")
        if self.dtype not in ("auto", "bf16", "fp32", "fp16"):
            bad("dtype", self.dtype, "auto | bf16 | fp32 | fp16")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", self.aggregation, " | ".join(AGGREGATIONS))
        if self.advantage_scale not in ("group", "batch", "none"):
            bad("advantage_scale", self.advantage_scale, "group | batch | none")
        if self.ratio_level not in ("token", "sequence"):
            bad("ratio_level", self.ratio_level, "token | sequence")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, " | ".join(SCHEDULES))
        if not 0.0 <= self.overlong_buffer <= 1.0:
            bad("overlong_buffer", self.overlong_buffer, "a share of max_new_tokens in [0, 1]")
        if not self.lr > 0:
            bad("lr", self.lr, "> 0")
        if self.kl_beta > 0 and not self.lora.enabled:
            bad("kl_beta", self.kl_beta, "0 with lora.enabled false (the KL reference is the "
                "model with its adapter disabled)")
        if self.method == "chord":
            c = self.chord
            if c.variant not in ("mu", "phi"):
                bad("chord.variant", c.variant, "mu | phi")
            if not c.demos:
                bad("chord.demos", c.demos, "a JSONL file of demonstrations")
            if not (0.0 <= c.mu_valley <= 1.0 and 0.0 <= c.mu_peak <= 1.0):
                bad("chord.mu_peak/mu_valley", (c.mu_peak, c.mu_valley), "values in [0, 1]")
            if c.ratio <= 0:
                bad("chord.ratio", c.ratio, "> 0")
        self.lora.check()
        self.moe.check()
        check_aux_coef(self.router_aux_loss_coef)


def online_config(method: str, path: str | None = None, overrides: list[str] | None = None,
                  **flags) -> OnlineConfig:
    """Defaults <- method preset <- YAML file <- --set <- `flags` (not None); validated."""
    return method_config(OnlineConfig, method, METHODS, path, overrides, flags)


# ------------------------------------------------------------------------------ rewards


def overlong_penalty(num_tokens: int, max_new_tokens: int, buffer_fraction: float,
                     factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, as a positive penalty.

    With L = max_new_tokens and a buffer of c = round(buffer_fraction * L) tokens: 0 up to
    L - c tokens, rising linearly to `factor` at L. L 100, buffer 0.2: 80 -> 0, 90 -> 0.5, 100 -> 1.
    """
    cache = round(buffer_fraction * max_new_tokens)
    if cache <= 0:
        return 0.0
    excess = num_tokens - (max_new_tokens - cache)
    return factor * min(1.0, max(0.0, excess / cache))


def score_completion(problem: Problem, index: int, messages: list[dict], completion: Completion,
                     *, think_open: bool, engine, cfg: OnlineConfig) -> dict:
    """Grade one completion as `posttrain sample` + `posttrain verify` would, then add the RL
    terms: reward = grader reward + format_reward * format_ok - overlong penalty.

    format_ok: the answer was finished (not truncated) and the grader could read an answer.
    """
    row = verify_row(sample_row(problem, index, messages, completion, think_open=think_open,
                                engine=engine))
    truncated = row["verdict"] == "truncated"
    format_ok = not truncated and row.get("extracted") is not None
    overlong = overlong_penalty(completion.num_tokens, cfg.max_new_tokens, cfg.overlong_buffer,
                                cfg.overlong_penalty)
    reward = float(row["reward"]) + cfg.format_reward * float(format_ok) - overlong
    return {"verdict": row["verdict"], "correct_reward": float(row["reward"]),
            "format_ok": format_ok, "overlong": overlong, "reward": reward,
            "truncated": truncated}


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: groups whose rewards are all equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)  # (groups, G)
    return grouped.amax(-1) == grouped.amin(-1)


# ----------------------------------------------------------------------------- rollouts


class ShuffledStream:
    """An endless, reproducible order over items (problems, demonstrations): a shuffle per pass.

    `drawn` counts the items handed out so far; it is saved in checkpoints, so a resumed run
    continues with exactly the items the uninterrupted run would have drawn.
    """

    def __init__(self, items: list, seed: int, drawn: int = 0):
        if not items:
            raise ValueError("ShuffledStream: no items")
        self.items, self.seed, self.drawn = items, seed, drawn

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list:
        out = []
        for i in range(self.drawn, self.drawn + n):
            epoch, pos = divmod(i, len(self.items))
            out.append(self.items[self._order(epoch)[pos]])
        self.drawn += n
        return out


@dataclass
class Rollout:
    """One sampled completion of a problem, graded."""

    problem: Problem
    prompt_ids: list[int]
    completion: Completion
    verdict: str
    correct_reward: float  # the grader's reward
    format_ok: bool
    overlong: float  # penalty subtracted from the reward (>= 0)
    reward: float
    truncated: bool  # stopped at the token limit, or a think block never closed


def collect_rollouts(engine, tokenizer, stream: ShuffledStream, cfg: OnlineConfig, step: int,
                     score=score_completion) -> tuple[list[Rollout], list[Rollout], dict]:
    """Sample and grade groups until `problems_per_step` groups are kept.

    Without dynamic sampling every group is kept (one generate call). With it, a group whose
    rewards are all equal has zero advantage everywhere and is dropped; the missing groups are
    drawn again, up to `max_sampling_rounds` calls (DAPO), and the step trains on what it has.
    Returns (kept rollouts, group by group; every rollout sampled; timings and round count).
    """
    G = cfg.num_generations
    kept: list[list[Rollout]] = []
    everything: list[Rollout] = []
    info = {"sampling_rounds": 0, "time/generate": 0.0, "time/grade": 0.0}
    rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    while len(kept) < cfg.problems_per_step and info["sampling_rounds"] < rounds:
        problems = stream.take(cfg.problems_per_step - len(kept))
        prompts = [prompt_messages(p, cfg.system_prompt) for p in problems]
        # A seed per (step, round): a resumed run samples what the uninterrupted one did.
        params = SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed * 1_000_003 + step * 1_009 + info["sampling_rounds"])
        t0 = time.perf_counter()
        results = engine.generate(prompts, params)
        t1 = time.perf_counter()
        info["sampling_rounds"] += 1
        for problem, messages, completions in zip(problems, prompts, results):
            text = engine.render_prompt(messages)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            think_open = prompt_opens_think(text)
            group = [Rollout(problem=problem, prompt_ids=prompt_ids, completion=c,
                             **score(problem, i, messages, c, think_open=think_open,
                                     engine=engine, cfg=cfg))
                     for i, c in enumerate(completions)]
            everything.extend(group)
            flat = len({r.reward for r in group}) == 1
            if not (cfg.dynamic_sampling and flat):
                kept.append(group)
        info["time/generate"] += t1 - t0
        info["time/grade"] += time.perf_counter() - t1
    return [r for group in kept for r in group], everything, info


def rollout_stats(everything: list[Rollout], G: int) -> dict[str, float]:
    """Reward, length and truncation statistics over every completion sampled in a step."""
    n = len(everything)
    rewards = torch.tensor([r.reward for r in everything])  # (N,)
    lengths = torch.tensor([float(r.completion.num_tokens) for r in everything])  # (N,)
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if n > 1 else 0.0,
        "reward/correct": sum(r.correct_reward for r in everything) / n,
        "reward/format": sum(r.format_ok for r in everything) / n,
        "reward/overlong_penalty": sum(r.overlong for r in everything) / n,
        "zero_variance_groups": zero_variance_groups(rewards, G).float().mean().item(),
        "completion_length/mean": lengths.mean().item(),
        "completion_length/max": lengths.max().item(),
        "truncated_fraction": sum(r.truncated for r in everything) / n,
    }


# ------------------------------------------------------------------------------ batches


def rollout_batches(rollouts: list[Rollout], size: int, pad_id: int, mask_truncated: bool,
                    device="cpu") -> list[tuple[dict, slice]]:
    """Collated micro-batches (batches.collate layout) of at most `size` completions, with the
    rows of the step they hold. A truncated completion with mask_truncated on gets no labels,
    hence no loss."""
    out = []
    for start in range(0, len(rollouts), size):
        part = rollouts[start:start + size]
        batch = collate([Example(tuple(r.prompt_ids), (tuple(r.completion.token_ids),), 0)
                         for r in part], pad_id)
        if mask_truncated:
            cut = torch.tensor([r.truncated for r in part])  # (b,)
            batch["labels"] = batch["labels"].masked_fill(cut[:, None], -100)
        out.append(({k: v.to(device) for k, v in batch.items()},
                    slice(start, start + len(part))))
    return out


def demonstration_batches(examples: list[Example], size: int, pad_id: int,
                          device="cpu") -> list[dict]:
    """Collated micro-batches of CHORD's demonstrations (prompt tokens carry no labels)."""
    return [{k: v.to(device) for k, v in collate(examples[s:s + size], pad_id).items()}
            for s in range(0, len(examples), size)]


def logps_and_entropy(model, batch: dict[str, torch.Tensor]):
    """logps.completion_logps's forward, also returning the policy's entropy per completion
    token (no grad), which needs the logits that function does not return. (b, K) each."""
    K = batch["labels"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=K + 1,
                   use_cache=False).logits[:, :-1]  # (b, K, V): position t predicts token t
    with torch.no_grad():
        entropy = torch.stack([_entropy(row) for row in logits])  # (b, K), one row at a time
    return token_logps(logits, batch["labels"]), entropy


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis in float32: (K, V) -> (K,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------ updates


def micro_batch_weight(aggregation: str, rows: int, total_rows: int, n_micro: int) -> float:
    """The factor that makes the summed micro-batch losses the loss of the whole batch.

    grpo and dr_grpo are means over a micro-batch's sequences: weight rows / total rows.
    dapo is given the whole batch's token count (`num_items_in_batch`): weight 1. bnpo
    normalises by each micro-batch's own tokens (TRL's local-batch meaning): their mean.
    """
    if aggregation in ("grpo", "dr_grpo"):
        return rows / total_rows
    if aggregation == "dapo":
        return 1.0
    return 1.0 / n_micro


@torch.no_grad()
def frozen_logps(model, batches: list[tuple[dict, slice]], *, reference: bool) -> list:
    """Completion log-probs per micro-batch, without gradients: of the policy as it is now (the
    old log-probs) or of the base model with the adapter disabled (the KL reference)."""
    if reference:
        with model.disable_adapter():
            return [completion_logps(model, b) for b, _ in batches]
    return [completion_logps(model, b) for b, _ in batches]


def policy_backward(model, batches, advantages: torch.Tensor, old: list | None, ref: list | None,
                    cfg: OnlineConfig, *, mu: float | None, moe: MoeRun = MoeRun()
                    ) -> dict[str, float]:
    """Backward over the rollout micro-batches; returns the policy loss and token-mean metrics.

    For CHORD each micro-batch's loss goes through losses.chord_loss with a zero SFT part,
    i.e. it is scaled by (1 - mu); the scaling is linear, so the sum over micro-batches is
    chord_loss of the whole batch's policy loss.
    """
    total_rows = int(advantages.numel())
    total_tokens = float(sum(int((b["labels"] != -100).sum()) for b, _ in batches))
    sums: dict[str, float] = {"loss/policy": 0.0}
    tokens = 0.0
    for i, (batch, rows) in enumerate(batches):
        mask = batch["labels"] != -100  # (b, K)
        with moe.record(model) as routing:
            logps, entropy = logps_and_entropy(model, batch)  # (b, K) each
        loss, metrics = policy_loss(
            logps, None if old is None else old[i], advantages[rows].to(logps.device), mask,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, ratio_level=cfg.ratio_level,
            aggregation=cfg.aggregation, ref_logps=None if ref is None else ref[i],
            kl_beta=cfg.kl_beta, max_completion_length=cfg.max_new_tokens,
            num_items_in_batch=max(total_tokens, 1.0) if cfg.aggregation == "dapo" else None)
        loss = loss * micro_batch_weight(cfg.aggregation, rows.stop - rows.start, total_rows,
                                         len(batches))
        # MoE: + coef x balance loss, token-weighted like the logged metrics
        total = moe.add_aux(loss, metrics, routing, float(mask.sum()) / max(total_tokens, 1.0))
        (total if mu is None else chord_loss(total, torch.zeros_like(loss), mu)).backward()
        values = metrics_to_floats(metrics)
        n = float(mask.sum())
        values["entropy"] = float(entropy[mask].mean()) if n else 0.0
        for k, v in values.items():  # token-weighted: the step's values are token means
            sums[k] = sums.get(k, 0.0) + v * n
        sums["loss/policy"] += float(loss.detach())
        tokens += n
    return {k: v if k == "loss/policy" else v / max(tokens, 1.0) for k, v in sums.items()}


def sft_backward(model, batches: list[dict], cfg: OnlineConfig, mu: float,
                 moe: MoeRun = MoeRun()) -> dict[str, float]:
    """CHORD's SFT part: mu * (plain or phi-weighted) NLL, a token mean over every
    demonstration token of the step; backward per micro-batch."""
    loss_fn = sft_phi if cfg.chord.variant == "phi" else sft
    total = float(sum(int((b["labels"] != -100).sum()) for b in batches))
    sums: dict[str, float] = {"loss/sft": 0.0}
    for batch in batches:
        mask = batch["labels"] != -100  # (b, K)
        with moe.record(model) as routing:
            logps = completion_logps(model, batch)
        loss, metrics = loss_fn(logps, mask, num_items_in_batch=max(total, 1.0))
        share = float(mask.sum()) / max(total, 1.0)
        chord_loss(torch.zeros_like(loss), moe.add_aux(loss, metrics, routing, share), mu).backward()
        for k, v in metrics_to_floats(metrics).items():
            if k != "tokens":
                sums[f"sft/{k}"] = sums.get(f"sft/{k}", 0.0) + v * share
        sums["loss/sft"] += float(loss.detach())
    sums["sft/tokens"] = total
    return sums


# --------------------------------------------------------------------------------- loop


def train_online(cfg: OnlineConfig, out: str | Path, *, resume: bool = False, model=None,
                 tokenizer=None, problems: list[Problem] | None = None,
                 score=score_completion, progress: bool = False) -> dict:
    """Run (or resume) online RL into `out`; returns a summary dict.

    Writes out/config.yaml, out/metrics.jsonl (one line per rollout step), out/checkpoints/ and
    at the end out/adapter/. Tests pass a tiny `model`, `problems` and a stub `score`.
    """
    from tqdm.auto import tqdm

    cfg.check()
    out = Path(out)
    last = start_run(cfg, out, resume=resume, may_change=RESUME_MAY_CHANGE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = tokenizer or load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    if problems is None:
        from ..tasks import load_problems

        problems = load_problems(cfg.problems, limit=cfg.limit or None)
    chord = cfg.method == "chord"
    demos = None
    if chord:
        demos, report = load_examples(cfg.chord.demos, tokenizer, preference=False,
                                      max_length=cfg.chord.max_length)
        print(f"demonstrations: {report.summary()}", flush=True)
    dtype = resolve_dtype(cfg.dtype, device)
    if model is None:
        model = load_model(cfg.model, dtype=dtype)
    model.to(device)
    moe = MoeRun.setup(model, cfg.router_aux_loss_coef, cfg.moe, problems,
                       lambda p: probe_prompt(tokenizer, p, cfg.system_prompt), seed=cfg.seed,
                       pad_id=pad_id)
    policy = apply_lora(model, cfg.lora)
    policy.eval()  # dropout off for the whole run (module docstring); gradients still flow
    if progress:
        print(format_parameter_report(parameter_report(policy)), flush=True)

    total = cfg.max_steps * cfg.updates_per_batch  # optimizer steps
    optimizer = make_optimizer(policy, cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps=total,
                               warmup_steps=round(cfg.warmup_ratio * total),
                               schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    state: dict = {}
    if resume and last is not None:
        state = load_checkpoint(last, policy, optimizer, scheduler)
        print(f"resumed from {last} (step {state['step']} of {cfg.max_steps})", flush=True)
    start = int(state.get("step", 0))
    stream = ShuffledStream(problems, cfg.seed, drawn=int(state.get("problems_drawn", 0)))
    demo_stream = ShuffledStream(demos, cfg.seed + 1, drawn=int(state.get("demos_drawn", 0))) \
        if chord else None
    save_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start)
    engine = HFEngine(policy, tokenizer, model_id=cfg.model, batch_size=cfg.generation_batch_size)
    G, U = cfg.num_generations, cfg.updates_per_batch
    stop = min(cfg.max_steps, cfg.stop_after_steps) if cfg.stop_after_steps else cfg.max_steps

    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {cfg.method}", unit="step",
               disable=not progress)
    row: dict = {}
    for step in range(start, stop):
        t0 = time.perf_counter()
        kept, everything, info = collect_rollouts(engine, tokenizer, stream, cfg, step, score)
        t1 = time.perf_counter()
        row = {"step": step + 1, **rollout_stats(everything, G), "groups_kept": len(kept) // G,
               **{k: v for k, v in info.items() if not k.startswith("time/")}}
        mu = mu_schedule(step, cfg.chord.mu_warmup_steps, cfg.chord.mu_decay_steps,
                         cfg.chord.mu_peak, cfg.chord.mu_valley) if chord else None
        demo_batches = []
        if chord:
            chosen = demo_stream.take(max(1, round(cfg.chord.ratio * cfg.problems_per_step)))
            demo_batches = demonstration_batches(chosen, cfg.micro_batch_size, pad_id, device)
        batches = rollout_batches(kept, cfg.micro_batch_size, pad_id, cfg.mask_truncated, device)
        advantages = group_advantages(torch.tensor([r.reward for r in kept]), G,
                                      cfg.advantage_scale) if kept else None
        # Old log-probs matter only once the policy has moved within the batch.
        old = frozen_logps(policy, batches, reference=False) if kept and U > 1 else None
        ref = frozen_logps(policy, batches, reference=True) if kept and cfg.kl_beta > 0 else None
        updates = 0
        for update in range(U if (kept or chord) else 0):
            metrics = policy_backward(policy, batches, advantages, old, ref, cfg, mu=mu,
                                      moe=moe) if kept else {}
            if chord:
                metrics.update(sft_backward(policy, demo_batches, cfg, mu, moe=moe))
            loss = metrics.get("loss/policy", 0.0) if not chord else \
                float(chord_loss(torch.tensor(metrics.get("loss/policy", 0.0)),
                                 torch.tensor(metrics["loss/sft"]), mu))
            loss += moe.aux_term(metrics, mu)
            grad_norm = clip_gradients(policy, cfg.max_grad_norm)
            check_finite(step + 1, loss, grad_norm, latest_checkpoint(out))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            metrics.update(loss=loss, grad_norm=grad_norm)
            if update == 0:
                # Loss, entropy and KL of the sampling policy (the first update) ...
                row.update(metrics)
            # ... clipping of the last: it only happens once the policy has moved.
            row.update({k: v for k, v in metrics.items() if k.startswith("clip_ratio/")})
        row.setdefault("kl", None)  # computed only when kl_beta > 0
        row.update(moe.stats(policy, step + 1, last=step + 1 == stop))
        t2 = time.perf_counter()
        row.update({"mu": mu, "updates": updates, "lr": lr_at(scheduler, step * U),
                    "time/generate": info["time/generate"], "time/grade": info["time/grade"],
                    "time/train": t2 - t1,
                    "generation_share": info["time/generate"] / max(t2 - t0, 1e-9)})
        log.write(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}",
                        length=f"{row['completion_length/mean']:.0f}")
        done = step + 1
        if done == stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            if not parameters_finite(policy):
                raise NonFiniteError(f"step {done}: the weights hold NaN or inf after the update "
                                     f"(lr {cfg.lr}); not checkpointed. The last good checkpoint "
                                     f"is {latest_checkpoint(out)}.")
            save_checkpoint(out, done, policy, optimizer, scheduler,
                            {"problems_drawn": stream.drawn,
                             "demos_drawn": demo_stream.drawn if demo_stream else 0},
                            keep=cfg.keep_checkpoints)
    bar.close()
    finished = stop == cfg.max_steps
    if finished:
        save_final(policy, out, tokenizer)
    return {"out": str(out), "steps": stop, "total_steps": cfg.max_steps, "finished": finished,
            "last": row}


def run(args) -> int:
    """`posttrain train --method grpo|dr-grpo|dapo|bnpo|gspo|chord` (see train/cli.py)."""
    cfg = online_config(args.method, args.config, args.set, model=args.model,
                        problems=getattr(args, "problems", None))
    summary = train_online(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    last = summary["last"]
    if last:
        print(f"{'finished' if summary['finished'] else 'stopped'} at step {summary['steps']} of "
              f"{summary['total_steps']}; last reward {last['reward/mean']:.3f}; "
              f"metrics in {Path(args.out) / 'metrics.jsonl'}", flush=True)
    return 0
