"""Cache of the reference model's log-probs for a pairs file, kept beside the data.

    ls runs/demo/pairs/pairs.jsonl.ref-*.pt

DPO needs log pi_ref(chosen) and log pi_ref(rejected) for every pair. They depend only on the
base model and the exact token ids, so they are computed once (no grad, no adapter) and reused
by every run on the same file: a sweep over lr or beta pays for them once. The key hashes the
model (its id, dtype and, for a local folder, its weight files' sizes and times) and every token
id of every pair (which covers the data, the chat template, max_length and the length policy),
so a stale cache is never read: any change gives another file name.

Known limit in bf16: a sequence's log-prob depends slightly on the shape of the batch it was
computed in (bf16 rounding after GEMMs blocked by shape), and the reference pass batches rows
differently from training, so at step 1 policy and reference differ by that noise (measured on
SmolLM2, CPU bf16: step-1 DPO loss 0.6872 instead of ln 2 = 0.6931). In fp32 they agree to
~1e-6 (the tests check ln 2 exactly to 1e-5).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from array import array
from pathlib import Path

import torch

VERSION = 1


def model_fingerprint(model_path: str) -> dict:
    """Identity of a model for cache keys: a local folder's weight files, or the hub id."""
    path = Path(model_path)
    files = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                files[f.name] = [st.st_size, int(st.st_mtime)]
    return {"model": str(model_path), "files": files}


def cache_key(model_path: str, dtype: str, examples) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": VERSION, "dtype": dtype, **model_fingerprint(model_path)},
                        sort_keys=True).encode())
    for e in examples:
        for ids in (e.prompt, *e.completions):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


def cache_path(data: str | os.PathLike, key: str, fallback_dir: str | os.PathLike | None = None
               ) -> Path:
    """DATA.ref-KEY16.pt beside the data; in `fallback_dir` when the data's folder is read-only."""
    data = Path(data)
    name = f"{data.name}.ref-{key[:16]}.pt"
    if fallback_dir is not None and not os.access(data.resolve().parent, os.W_OK):
        return Path(fallback_dir) / name
    return data.with_name(name)


def read_cache(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached (n, 2) tensor, or None when missing, unreadable or for another key."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None  # a torn or foreign file is recomputed, never trusted
    if not isinstance(saved, dict):
        return None
    logps = saved.get("logps")
    if saved.get("key") != key or not isinstance(logps, torch.Tensor) \
            or tuple(logps.shape) != (n, 2) or not torch.isfinite(logps).all():
        return None
    return logps


def write_cache(path: Path, key: str, logps: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"key": key, "logps": logps.cpu()}, tmp)
    os.replace(tmp, path)
