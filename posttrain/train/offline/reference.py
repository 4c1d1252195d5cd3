"""The reference log-probs of a DPO-family run: read from the cache beside the data, or
computed once before any adapter exists, each process taking every P-th pair.

    python -c "from posttrain.train.offline.reference import reference_table; help(reference_table)"

The cache file and its key: posttrain/train/offline/refcache.py. Called by train/offline/loop.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.models import resolve_model
from posttrain.train.config import TrainConfig
from posttrain.train.data import Example
from posttrain.train.forward import reference_logps
from posttrain.train.offline.refcache import cache_key, cache_path, read_cache, write_cache
from posttrain.train.modes import layout


def reference_table(
    model,
    examples: list[Example],
    cfg: TrainConfig,
    accelerator,
    *,
    pad_id: int,
    dtype: str,
    out: Path,
    adapter: str | None = None,
) -> torch.Tensor:
    """(N, 2) reference log-probs, read from the cache beside the data or computed once.

    Called before the adapter exists, so the model is exactly the reference (for PiSSA / OLoRA
    too, whose initialisation changes the base weights); or, with `adapter` (the init_adapter
    folder, loaded into `model`), on the policy as training starts, the adapter's files then
    part of the cache key. Each process computes every P-th pair and the parts are gathered.
    """
    how = layout(cfg, accelerator.device)
    key = (
        cache_key(
            resolve_model(cfg.model),
            dtype,
            examples,
            accelerator.device.type,
            layout=how,
            attention=getattr(model.config, "_attn_implementation", None),
            adapter=adapter,
        )
        if cfg.ref_cache
        else None
    )
    if cfg.ref_cache and key is None:
        _say(
            accelerator,
            f"reference log-probs: not cached ({cfg.model}: no local weight files to fingerprint)",
        )
    use_cache = key is not None
    path = cache_path(cfg.data, key, fallback_dir=out) if use_cache else None
    cached = read_cache(path, key, len(examples)) if use_cache else None
    if cached is not None:
        _say(accelerator, f"reference log-probs: read from cache {path}")
        return cached
    start = time.perf_counter()
    P, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(examples), P))
    # A sharded model's forward is collective: every process runs as many as the busiest one,
    # repeating its first pair, and drops the repeats' results.
    runs = mine
    if getattr(accelerator, "sharded", False) and mine:
        runs = mine + mine[:1] * (-(-len(examples) // P) - len(mine))
    part = reference_logps(
        model,
        [examples[i] for i in runs],
        batch_size=cfg.ref_batch_size,
        pad_id=pad_id,
        device=accelerator.device,
        layout=how,
    )
    part = part[: len(mine)]
    table = torch.zeros(len(examples), 2)
    if P > 1:
        from accelerate.utils import gather_object

        for r, (idx, values) in enumerate(gather_object([(mine, part)])):
            table[idx] = values
    else:
        table[mine] = part
    if use_cache and accelerator.is_main_process:
        write_cache(path, key, table)
    _say(
        accelerator,
        f"reference log-probs: computed for {len(examples)} pairs in "
        f"{time.perf_counter() - start:.1f} s" + (f"; saved to {path}" if use_cache else ""),
    )
    return table


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)
