"""Atomic training checkpoints: weights, optimizer, scheduler, RNG and position, and resume.

    ls runs/dpo/checkpoints/          # step-00000050/ step-00000100/

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete, so a run killed at any moment leaves either the previous checkpoints or a complete
new one, never a half-written one that resume would trust. The data position needs no saving
beyond the step: the data order is a function of (seed, epoch) (see batches.py).

Weights: a PEFT model saves its adapter (`adapter/`, standard PEFT format); full fine-tuning
saves `model.safetensors`. A sharded run (strategy=fsdp2) saves `sharded/` instead: every
process writes its shards of the trainable weights and the optimizer state with
torch.distributed.checkpoint (distributed.save_sharded). Each process saves its own RNG state
(`rng-RANK.pt`, plain lists and tensors: it loads with torch.load(weights_only=True), so a
checkpoint folder from elsewhere cannot run code); with several machines the output folder
must be on a shared file system.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

PREFIX = "step-"


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def checkpoint_dirs(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.name.startswith(PREFIX) and (d / "state.json").exists()]
    return sorted(found, key=lambda d: int(d.name[len(PREFIX) :]))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (weights_only-loadable)."""
    version, words, gauss = random.getstate()  # (int, 625 ints < 2**32, float | None)
    state = {
        "python_version": version,
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_gauss": gauss,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "python" in state:  # written before the tensor form: (version, tuple of ints, gauss)
        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
    else:
        random.setstate(
            (state["python_version"], tuple(state["python_words"].tolist()), state["python_gauss"])
        )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model, folder: Path) -> None:
    if is_peft(model):
        model.save_pretrained(folder / "adapter")
    else:
        from safetensors.torch import save_model

        save_model(model, str(folder / "model.safetensors"))  # handles tied weights


def load_weights(model, folder: Path) -> None:
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from posttrain.train.lora import peft_targets_as_named

        with peft_targets_as_named():
            result = set_peft_model_state_dict(
                model, load_file(str(folder / "adapter" / "adapter_model.safetensors"))
            )
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"{folder}: adapter does not fit the model (missing {missing[:3]})")
    else:
        from safetensors.torch import load_model

        load_model(model, str(folder / "model.safetensors"))


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    *,
    keep: int = 2,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    sharded: bool = False,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep`; returns its folder.

    `model` is the unwrapped model (not the DDP wrapper), or with `sharded` the FSDP2-sharded
    one. Every process calls this (each saves its RNG, and its shards); `barrier` is the
    processes' barrier (accelerator.wait_for_everyone).
    """
    root = Path(out) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if sharded:
        from posttrain.train.parallel.sharded_checkpoint import save_sharded

        save_sharded(model, optimizer, tmp / "sharded")
        barrier()
    if is_main:
        if not sharded:
            save_weights(model, tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    folder: str | os.PathLike, model, optimizer, scheduler, *, rank: int = 0
) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns state.json.
    A sharded checkpoint (`sharded/`) loads into the sharded model and its optimizer."""
    folder = Path(folder)
    if (folder / "sharded").is_dir():
        from posttrain.train.parallel.sharded_checkpoint import load_sharded

        load_sharded(model, optimizer, folder / "sharded")
    else:
        load_weights(model, folder)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_file = folder / f"rng-{rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(
            f"{folder}: no RNG state for process {rank}; resume with the same "
            "number of processes as the run that wrote it"
        )
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((folder / "state.json").read_text())


def check_resumable(cfg, out: str | os.PathLike, may_change: set[str] = frozenset()) -> None:
    """ConfigError when `cfg` differs from the run's saved OUT/config.yaml in a key that
    changes the result (`may_change` lists the keys that do not)."""
    from posttrain.config import ConfigError, load_yaml, to_dict

    saved_path = Path(out) / "config.yaml"
    if not saved_path.exists():
        return
    saved, now = load_yaml(saved_path), to_dict(cfg)
    # a key the saved file lacks was added to posttrain after that run started: the run used
    # what the key's default does, so only a value other than the default is a change
    if _constructible(type(cfg)):
        _fill_missing(saved, to_dict(type(cfg)()))
    changed = sorted(
        k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{out}: cannot resume with different settings ({details}); use the "
            "same config or another --out"
        )


def _fill_missing(saved: dict, defaults: dict) -> None:
    """Give `saved` the default of every key (nested ones too) it lacks."""
    for k, default in defaults.items():
        if k not in saved:
            saved[k] = default
        elif isinstance(saved[k], dict) and isinstance(default, dict):
            _fill_missing(saved[k], default)


def _constructible(cls) -> bool:
    """Whether the config class can be built from its defaults alone."""
    import dataclasses

    return dataclasses.is_dataclass(cls) and all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def start_run(
    cfg, out: str | os.PathLike, *, resume: bool, may_change: set[str] = frozenset()
) -> Path | None:
    """What every trainer does before loading anything: set the thread count, refuse to write
    over an earlier run unless resuming (and then only with result-equal settings), seed the
    RNGs. Returns the latest checkpoint to resume from, or None."""
    from posttrain.config import ConfigError

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    last = latest_checkpoint(out)
    if last is not None and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints ({last.name}): pass --resume to "
            "continue that run, or choose another --out"
        )
    if resume and last is not None:
        check_resumable(cfg, out, may_change)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return last


def save_atomic(write: Callable[[Path], None], target: Path) -> None:
    """`write(folder)` into a temporary folder, then rename it to `target`."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def save_final(
    model,
    out: str | os.PathLike,
    tokenizer,
    init_adapter: Path | None = None,
    state_dict: dict | None = None,
) -> None:
    """OUT/adapter (PEFT format; PiSSA / OLoRA converted to a plain LoRA of the untouched base,
    given the adapter saved at initialisation) or OUT/model (full fine-tuning, with tokenizer).
    `state_dict`: the whole weights gathered from a sharded model (distributed.Processes.
    full_state_dict), written instead of the module's own (which are shards)."""
    out = Path(out)
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    if is_peft(model):
        if init_adapter:
            kwargs["path_initial_model_for_weight_conversion"] = str(init_adapter)
        save_atomic(lambda d: model.save_pretrained(d, **kwargs), out / "adapter")
    else:

        def write(d):
            model.save_pretrained(d, **kwargs)
            tokenizer.save_pretrained(d)
            # an expanded model keeps saying which layers are new (lora.targets: new-layers)
            expand_meta = Path(getattr(model, "name_or_path", "") or ".") / "posttrain_expand.json"
            if expand_meta.is_file():
                shutil.copy2(expand_meta, Path(d) / expand_meta.name)

        save_atomic(write, out / "model")
