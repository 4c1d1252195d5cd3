"""Rollouts of the online trainer: sample groups, grade them, shape rewards, batch them.

    python -c "from posttrain.train.online.rollouts import overlong_penalty; print(overlong_penalty(90, 100, 0.2))"

Each step draws `problems_per_step` problems (this process's share of them under torchrun),
samples G completions of each through the rollout engine, grades them with the project's
graders (`sample_row` + `verify_row`: exactly what `posttrain sample` + `posttrain verify` would
say) and adds the RL terms (format bonus, DAPO's soft overlong penalty).

What the loss optimises is the distribution sampled from: softmax(logits / temperature), which
the trainer recomputes (policy_update.py). Top-p is not modelled: with top_p < 1 the engine
samples from the nucleus renormalised to mass 1, so a sampled token's probability under the
sampler is p / (nucleus mass) >= p, tokens outside the nucleus are never sampled, and the
policy gradient is that of a different (truncated) distribution; keep top_p 1 for RL unless
you accept that bias (TRL and verl default to 1 as well).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from posttrain.engines.base import Completion, SamplingParams
from posttrain.reasoning import prompt_opens_think
from posttrain.records import Problem
from posttrain.sampling import prompt_messages, sample_row
from posttrain.verify import verify_row
from posttrain.train.batches import collate
from posttrain.train.data import Example
from posttrain.train.online.problem_stream import ShuffledStream

# ------------------------------------------------------------------------------ rewards


def overlong_penalty(
    num_tokens: int, max_new_tokens: int, buffer_fraction: float, factor: float = 1.0
) -> float:
    """DAPO's soft overlong punishment, as a positive penalty.

    With L = max_new_tokens and a buffer of c = round(buffer_fraction * L) tokens: 0 up to
    L - c tokens, rising linearly to `factor` at L. L 100, buffer 0.2: 80 -> 0, 90 -> 0.5, 100 -> 1.
    """
    cache = round(buffer_fraction * max_new_tokens)
    if cache <= 0:
        return 0.0
    excess = num_tokens - (max_new_tokens - cache)
    return factor * min(1.0, max(0.0, excess / cache))


def score_completion(
    problem: Problem,
    index: int,
    messages: list[dict],
    completion: Completion,
    *,
    think_open: bool,
    engine,
    cfg,
) -> dict:
    """Grade one completion as `posttrain sample` + `posttrain verify` would, then add the RL
    terms: reward = grader reward + format_reward * format_ok - overlong penalty.

    format_ok: the answer was finished (not truncated) and the grader could read an answer.
    """
    row = verify_row(
        sample_row(problem, index, messages, completion, think_open=think_open, engine=engine)
    )
    truncated = row["verdict"] == "truncated"
    format_ok = not truncated and row.get("extracted") is not None
    overlong = overlong_penalty(
        completion.num_tokens, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
    )
    reward = float(row["reward"]) + cfg.format_reward * float(format_ok) - overlong
    return {
        "verdict": row["verdict"],
        "correct_reward": float(row["reward"]),
        "format_ok": format_ok,
        "overlong": overlong,
        "reward": reward,
        "truncated": truncated,
    }


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: groups whose rewards are all equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)  # (groups, G)
    return grouped.amax(-1) == grouped.amin(-1)


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


def uniform_accuracy(group: list[Rollout]) -> bool:
    """DAPO's dynamic-sampling filter: every completion right, or every one wrong. Judged on the
    verdict, not the shaped reward: a group all wrong whose rewards differ only by the format
    bonus or the overlong penalty is still dropped."""
    return len({r.verdict == "correct" for r in group}) == 1


# ----------------------------------------------------------------------------- sampling


def collect_rollouts(
    engine,
    tokenizer,
    stream: ShuffledStream,
    cfg,
    step: int,
    score=score_completion,
    *,
    rank: int = 0,
    processes: int = 1,
) -> tuple[list[Rollout], list[Rollout], dict]:
    """Sample and grade groups until this process holds its share of `problems_per_step`.

    Every process draws the same problems from its copy of the stream and keeps the slice
    [rank * k, (rank + 1) * k), k = problems_per_step / processes: a group is never split.
    The sampling seed counts completions over all processes, so with one problem per generate
    batch 1 and N processes sample the same completions.
    Without dynamic sampling every group is kept (one generate call). With it, a group all
    right or all wrong has zero advantage everywhere and is dropped; the missing groups are
    drawn again, up to `max_sampling_rounds` calls (DAPO), and the step trains on what it has.
    Returns (kept rollouts, group by group; every rollout sampled; timings and round count).
    """
    G = cfg.num_generations
    share = cfg.problems_per_step // processes
    kept: list[list[Rollout]] = []
    everything: list[Rollout] = []
    info = {"sampling_rounds": 0, "time/generate": 0.0, "time/grade": 0.0}
    rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    while len(kept) < share and info["sampling_rounds"] < rounds:
        missing = share - len(kept)
        problems = stream.take(missing * processes)[rank * missing : (rank + 1) * missing]
        prompts = [prompt_messages(p, cfg.system_prompt) for p in problems]
        # A seed per (step, round, first completion): a resumed run samples what the
        # uninterrupted one did, and a process samples what a single process would have.
        params = SamplingParams(
            n=G,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 1_000_003 + step * 1_009 + info["sampling_rounds"] + rank * missing * G,
        )
        t0 = time.perf_counter()
        results = engine.generate(prompts, params)
        t1 = time.perf_counter()
        info["sampling_rounds"] += 1
        for problem, messages, completions in zip(problems, prompts, results):
            text = engine.render_prompt(messages)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            think_open = prompt_opens_think(text)
            group = [
                Rollout(
                    problem=problem,
                    prompt_ids=prompt_ids,
                    completion=c,
                    **score(problem, i, messages, c, think_open=think_open, engine=engine, cfg=cfg),
                )
                for i, c in enumerate(completions)
            ]
            everything.extend(group)
            if not (cfg.dynamic_sampling and uniform_accuracy(group)):
                kept.append(group)
        info["time/generate"] += t1 - t0
        info["time/grade"] += time.perf_counter() - t1
    return [r for group in kept for r in group], everything, info


def rollout_stats(everything: list[Rollout], G: int) -> dict[str, float]:
    """Reward, length and truncation statistics over every completion sampled in a step
    (before dynamic sampling drops groups, so the reward curve is not inflated by the filter)."""
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


def rollout_batches(
    rollouts: list[Rollout],
    size: int,
    pad_id: int,
    mask_truncated: bool,
    device="cpu",
    *,
    layout: str = "longest",
    group_size: int = 0,
    routing: tuple[int, int] | None = None,
) -> list[tuple[dict, slice]]:
    """Micro-batches of the step's rollouts with the rows of the step they hold.

        layout longest: collated (batches.collate: left-padded, completions right-aligned) batches
        of at most `size` completions, one forward each. shared / none: each group of `group_size`
        completions of one prompt is a micro-batch (`size` is not used), run by logps.group_logits:
        shared, the prompt once (two forwards a group); none, every sequence whole and alone. Every
        batch has `labels` (b, K) in the collate layout; a truncated completion with mask_truncated
        on gets no labels, hence no loss. When the engine gave per-token log-probs, `rollout_logps` (b, K)
        holds them where the labels are, 0 elsewhere. With `routing` (MoE layers, top-k) every batch
    gets `routes`: one moe.replay.Plan per forward of the batch, carrying the engine's routing
    records when every completion came with one (checked against its sequence)."""
    grouped = layout != "longest"
    if grouped and (group_size < 1 or len(rollouts) % group_size):
        raise ValueError(f"{len(rollouts)} rollouts do not split into groups of {group_size}")
    step = group_size if grouped else size
    out = []
    for start in range(0, len(rollouts), step):
        part = rollouts[start : start + step]
        batch = collate(
            [Example(tuple(r.prompt_ids), (tuple(r.completion.token_ids),), 0) for r in part],
            pad_id,
        )
        if grouped:
            if any(r.prompt_ids != part[0].prompt_ids for r in part):
                raise ValueError("a group's rollouts have different prompts")
            batch = {
                "labels": batch["labels"],
                "prompt_ids": torch.tensor([part[0].prompt_ids], dtype=torch.long),  # (1, P)
                "completion_ids": [
                    torch.tensor([r.completion.token_ids], dtype=torch.long) for r in part
                ],  # (1, m) each
                "share_prompt": layout == "shared",
            }
        if all(r.completion.token_logprobs is not None for r in part):
            K = batch["labels"].shape[1]
            rollout_logps = torch.zeros(len(part), K)  # (b, K)
            for i, r in enumerate(part):
                n = len(r.completion.token_logprobs)
                if n:
                    rollout_logps[i, K - n :] = torch.tensor(r.completion.token_logprobs)
            batch["rollout_logps"] = rollout_logps
        if routing is not None:
            batch["routes"] = _routes(part, routing, layout)
        if mask_truncated:
            cut = torch.tensor([r.truncated for r in part])  # (b,)
            batch["labels"] = batch["labels"].masked_fill(cut[:, None], -100)
        moved = {k: v if k == "routes" else _to(v, device) for k, v in batch.items()}
        out.append((moved, slice(start, start + len(part))))
    return out


def _routes(part: list[Rollout], routing: tuple[int, int], layout: str) -> list:
    """The moe.replay plans of one micro-batch's forwards (forward.group_logits' for a group,
    one left-padded forward for `longest`)."""
    from posttrain.train.moe.replay import group_plans, padded_plans, sequence_records

    records = sequence_records(part, *routing)
    lens = [len(r.completion.token_ids) for r in part]
    if layout == "longest":
        return padded_plans([len(r.prompt_ids) for r in part], lens, records)
    return group_plans(len(part[0].prompt_ids), lens, records, layout == "shared")


def _to(value, device):
    """A batch entry on `device`: tensors and lists of tensors moved, anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [v.to(device) for v in value]
    return value


def demonstration_batches(
    examples: list[Example], size: int, pad_id: int, device="cpu"
) -> list[dict]:
    """Collated micro-batches of CHORD's demonstrations (prompt tokens carry no labels)."""
    return [
        {k: v.to(device) for k, v in collate(examples[s : s + size], pad_id).items()}
        for s in range(0, len(examples), size)
    ]
