"""Sharded checkpoints of an FSDP2 run with torch.distributed.checkpoint (DCP), and a DCP reader
that does not run code from a checkpoint folder.

    ls runs/dpo/checkpoints/step-00000050/sharded/    # .metadata __0_0.distcp __1_0.distcp

Every process writes its own shards of the trainable weights and of the AdamW state; the frozen
base of a LoRA run is not saved (it is the model folder). A checkpoint loads into any number of
processes as far as DCP goes (it reshards), but the trainer resumes with the number of
processes that wrote it (the data split and the RNG files depend on it). checkpoint.py calls
these for a run whose model is sharded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from posttrain.train.parallel.processes import has_frozen


def save_sharded(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of the trainable weights and of the optimizer state
    (torch.distributed.checkpoint); the frozen base is not saved (it is the model folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=has_frozen(policy))
    model_state, optim_state = get_state_dict(policy, optimizer, options=options)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what `save_sharded` wrote into the (already wrapped) model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    # strict=False: the frozen base is not in the checkpoint; the trainable keys are checked.
    options = StateDictOptions(ignore_frozen_params=has_frozen(policy), strict=False)
    model_state, optim_state = get_state_dict(policy, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=SafeReader(str(folder)))
    result = set_state_dict(
        policy,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{folder}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )


# DCP writes its `.metadata` with pickle and reads it back with pickle.load: a checkpoint from
# elsewhere could run code. Its metadata needs only these globals, and classes (dataclasses,
# enums) of torch.distributed.checkpoint itself; a dotted name (a path to any attribute, e.g.
# `os.system` through a module that imports os) is never allowed.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),  # torch's own allow-list has it
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in _METADATA_GLOBALS:
                return super().find_class(module, name)
            found = (
                super().find_class(module, name)
                if module.startswith(("torch.distributed.checkpoint.", "torch"))
                else None
            )
            if isinstance(found, torch.dtype) or (
                isinstance(found, type)
                and module.startswith("torch.distributed.checkpoint.")
                and found.__module__ == module
            ):
                return found
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a "
            "torch.distributed.checkpoint metadata file never holds"
        )


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        """FileSystemReader whose metadata is unpickled with an allow-list (tensors are
        already read with torch.load(weights_only=True))."""

        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            if kwargs.get("rank") is not None:
                path = Path(self.path) / f"__{kwargs['rank']}.metadata"
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def SafeReader(path: str | os.PathLike):  # noqa: N802 - a class made on first use
    return _safe_reader_class()(path)
