"""Cache of the reference model's log-probs for a pairs file, kept beside the data.

    ls runs/demo/pairs/pairs.jsonl.ref-*.pt

DPO needs log pi_ref(chosen) and log pi_ref(rejected) for every pair. They depend only on the
base model and the exact token ids, so they are computed once (no grad, no adapter) and reused
by every run on the same file: a sweep over lr or beta pays for them once. The key hashes every
token id of every pair (which covers the data, the chat template, max_length and the length
policy), the dtype, the device type, the transformers and torch versions, and the model:
- every .json file of its folder (config, tokenizer, index) by content (SHA-256);
- every weight file (.safetensors, .bin, .pt, .gguf) by identity, without reading it:
  a file in the Hugging Face hub cache is a link to a blob named by its content hash, which is
  used as is; any other file by (size, mtime_ns, ctime_ns, inode). Writing a file's bytes
  always sets its ctime, which, unlike mtime, user space cannot set back, so a rewritten
  weight file never matches (a copied folder, a `touch` or a chmod only cost a recompute);
- a hub id is resolved to its local snapshot folder; a model that cannot be identified this
  way is not cached at all (said in the log).
So a stale cache is never read: any change gives another file name, and the file also holds
the whole key.

bf16 and padding: a sequence's log-prob depends slightly on the shape of the batch it was
computed in (bf16 rounding after GEMMs blocked by shape). With `padding: none` (the default on
CPU) every sequence runs alone, in the reference pass as in training, so at step 1 policy and
reference agree exactly (DPO loss ln 2). With `padding: longest` the reference pass batches rows
differently from training and they differ by that noise (SmolLM2, CPU bf16, 4 pairs of ~186-token
sequences: step-1 DPO loss 0.6872 in one run and 0.7195 in another instead of ln 2 = 0.6931;
a sequence's summed log-prob moves by up to 0.5 nats between batches); the key records which
of the two computed the cache. In fp32 they agree to ~1e-6.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _model_folder(model_path: str) -> Path | None:
    """The local folder (or single file) holding the model, or None when there is none."""
    path = Path(model_path)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: nothing to fingerprint
        return None


def _weight_identity(f: Path) -> list | str:
    target = Path(os.path.realpath(f))
    if f.is_symlink() and target.parent.name == "blobs":
        return f"blob:{target.name}"  # the hub cache names blobs by their content hash
    st = target.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def model_fingerprint(model_path: str) -> dict | None:
    """Identity of a model's weights and configuration for cache keys; None if unknown."""
    import transformers

    folder = _model_folder(model_path)
    if folder is None:
        return None
    files: dict = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if f.suffix == ".json" and f.is_file():
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.suffix in WEIGHT_SUFFIXES and f.is_file():
            files[f.name] = _weight_identity(f)
    if not any(Path(name).suffix in WEIGHT_SUFFIXES for name in files):
        return None
    return {
        "model": str(model_path),
        "files": files,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def adapter_fingerprint(folder: str | os.PathLike) -> dict:
    """SHA-256 of every file of an adapter folder, by name."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(Path(folder).iterdir())
        if f.is_file()
    }


def cache_key(
    model_path: str,
    dtype: str,
    examples,
    device_type: str = "cpu",
    *,
    layout: str = "longest",
    attention: str | None = None,
    adapter: str | None = None,
) -> str | None:
    """SHA-256 over the model's fingerprint, dtype, device type, how sequences were batched
    (offline.layout) and the attention kernel (bf16 values depend on both), the content of
    every file of `adapter` (a LoRA folder the reference includes; small, so read whole), and
    every token id; None when the model cannot be fingerprinted (then nothing is cached)."""
    fingerprint = model_fingerprint(model_path)
    if fingerprint is None:
        return None
    if adapter is not None:
        fingerprint = {**fingerprint, "adapter": adapter_fingerprint(adapter)}
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "version": VERSION,
                "dtype": dtype,
                "device": device_type,
                "layout": layout,
                "attention": attention,
                **fingerprint,
            },
            sort_keys=True,
        ).encode()
    )
    for e in examples:
        for ids in (e.prompt, *e.completions):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(np.asarray(ids, dtype="<i4").tobytes())
    return h.hexdigest()


def cache_path(
    data: str | os.PathLike, key: str, fallback_dir: str | os.PathLike | None = None
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
    if (
        saved.get("key") != key
        or not isinstance(logps, torch.Tensor)
        or tuple(logps.shape) != (n, 2)
        or not torch.isfinite(logps).all()
    ):
        return None
    return logps


def write_cache(path: Path, key: str, logps: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"key": key, "logps": logps.cpu()}, tmp)
    os.replace(tmp, path)
