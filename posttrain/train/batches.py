"""Which rows go into which optimizer step and micro-batch, and how a micro-batch is padded.

    python -c "from posttrain.train.batches import epoch_batches; print(epoch_batches([5]*8, 4, 0, 0))"

The order is a pure function of (seed, epoch): a resumed run recomputes it and skips to its
position, nothing about the data order needs saving. A *global batch* is the set of rows of one
optimizer step over all processes and accumulation steps; it is fixed before it is split, so
`batch_size x grad_accum x processes` can be rearranged without changing what a step sees.

Length grouping: rows are shuffled, cut into windows of `GROUP_WINDOW` global batches, sorted by
length inside each window, cut into global batches, and the batches are shuffled again, so a
batch holds rows of similar length (little padding) while the order stays random.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from posttrain.train.data import Example

GROUP_WINDOW = 16  # global batches per length-sorting window


def epoch_batches(
    lengths: list[int],
    global_batch: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    min_rows: int = 1,
) -> list[list[int]]:
    """Row indices of each optimizer step of one epoch.

    The last batch may be smaller; it is dropped only when it has fewer than `min_rows` rows
    (each process needs one row). 10 rows, global batch 4 -> batches of 4, 4, 2.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = global_batch * GROUP_WINDOW
        grouped = []
        for s in range(0, len(order), window):
            # sorted() is stable, so equal lengths keep their shuffled order.
            grouped += sorted(order[s : s + window], key=lambda i: -lengths[i])
        order = grouped
    batches = [order[s : s + global_batch] for s in range(0, len(order), global_batch)]
    if group_by_length:
        # Only the last window can end with a short batch; keep it last so every other step
        # has the full batch size.
        full = [b for b in batches if len(b) == global_batch]
        rest = [b for b in batches if len(b) != global_batch]
        rng.shuffle(full)
        batches = full + rest
    return [b for b in batches if len(b) >= min_rows]


def micro_batches(
    batch: list[int], lengths: list[int], processes: int, rank: int, grad_accum: int
) -> list[list[int]]:
    """This process's micro-batches of one global batch (at most `grad_accum`, none empty).

    The batch is sorted by length and cut into processes x grad_accum nearly equal runs;
    run a * processes + r goes to process r, so at each accumulation step the processes hold
    rows of similar length (and wait little for each other).
    """
    rows = sorted(batch, key=lambda i: -lengths[i])
    pieces = processes * grad_accum
    base, extra = divmod(len(rows), pieces)
    runs, start = [], 0
    for k in range(pieces):
        size = base + (k < extra)
        runs.append(rows[start : start + size])
        start += size
    mine = [runs[a * processes + rank] for a in range(grad_accum)]
    return [m for m in mine if m]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded tensors for the sequences prompt + completion of every example.

    For pairs the rows are all chosen sequences, then all rejected (R = 2B), so one forward
    pass serves both. Left padding puts every completion at the end, so the logits of only the
    last K + 1 positions are needed (K = the longest completion). Returns
      input_ids, attention_mask, position_ids: (R, T);
      labels: (R, K), the last K tokens, -100 outside the completion;
      completion_lengths: (R,).
    position_ids count real tokens only, so padding does not shift positions.
    """
    n_comp = len(examples[0].completions)
    seqs = [(e.prompt, e.completions[k]) for k in range(n_comp) for e in examples]
    T = max(len(p) + len(c) for p, c in seqs)
    K = max(len(c) for _, c in seqs)
    R = len(seqs)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((R, T), dtype=np.int64)
    labels = np.full((R, K), -100, dtype=np.int64)
    for i, (p, c) in enumerate(seqs):
        n, m = len(p) + len(c), len(c)
        input_ids[i, T - n : T - m] = p
        input_ids[i, T - m :] = c
        attention_mask[i, T - n :] = 1
        labels[i, K - m :] = c
    attention_mask = torch.from_numpy(attention_mask)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (R, T)
    lengths = torch.tensor([len(c) for _, c in seqs], dtype=torch.long)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": torch.from_numpy(labels),
        "completion_lengths": lengths,
    }
