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
    # Read (and refuse) the metadata here first: inside dcp.load an error is wrapped into a
    # CheckpointException of every rank, not the one line naming the file.
    read_metadata_file(folder / ".metadata")
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


# DCP writes its `.metadata` with pickle and reads it back with pickle.load: a checkpoint folder
# from elsewhere could make the trainer call anything (building DCP's async process class made
# it connect to an address the file chose). The file is read with an allow-list of exactly what
# DCP's metadata holds, found by reading a real fsdp2 checkpoint with pickletools
# (tests/test_holes.py): eight data classes, built empty and filled (NEWOBJ + BUILD), torch
# dtypes, and four calls, each checked for its argument types before it runs. After loading,
# every field of every object is checked against its type, so a class given wrong arguments is
# refused too.


def _args(fn, *checks):
    """`fn` called only with len(checks) arguments that pass their checks."""

    def call(*args):
        if len(args) != len(checks) or not all(ok(a) for ok, a in zip(checks, args)):
            raise pickle.UnpicklingError(
                f"{fn.__qualname__} called with {tuple(type(a).__name__ for a in args)}"
            )
        return fn(*args)

    return call


def _metadata_globals() -> dict[tuple[str, str], object]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    def ints(v):
        return isinstance(v, tuple) and all(type(x) is int for x in v)

    def text(v):
        return isinstance(v, str)

    allowed: dict[tuple[str, str], object] = {
        ("torch", "Size"): _args(torch.Size, ints),
        ("torch.serialization", "_get_layout"): _args(torch.serialization._get_layout, text),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _args(
            metadata._MEM_FORMAT_ENCODING, lambda v: type(v) is int
        ),
    }

    def posix_path(*parts):
        if not all(isinstance(x, str) for x in parts):
            raise pickle.UnpicklingError("PosixPath called with something else than strings")
        return pathlib.PosixPath(*parts)

    for module in ("pathlib", "pathlib._local"):  # PosixPath's module before / from 3.13
        allowed[(module, "PosixPath")] = posix_path
    for cls in (
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.TensorProperties,
        metadata.ChunkStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        filesystem._StorageInfo,
    ):
        allowed[(cls.__module__, cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler.allowed is None:
            _MetadataUnpickler.allowed = _metadata_globals()
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        # a dtype is data (torch.float32); `name` is one attribute, never a dotted path
        if (
            module == "torch"
            and "." not in name
            and isinstance(getattr(torch, name, 0), torch.dtype)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refers to {module}.{name}, which a torch.distributed.checkpoint metadata file "
            "never holds"
        )


def _field_checks() -> dict[type, dict[str, object]]:
    """Each allowed class -> {field: check of its value}."""
    import os as os_

    from torch.distributed.checkpoint import filesystem, metadata

    def opt(check):
        return lambda v: v is None or check(v)

    def of(*types):
        return lambda v: isinstance(v, types)

    size = lambda v: type(v) is torch.Size  # noqa: E731
    text = lambda v: isinstance(v, str)  # noqa: E731
    integer = lambda v: type(v) is int  # noqa: E731
    flag = lambda v: type(v) is bool  # noqa: E731
    return {
        metadata.Metadata: {
            "state_dict_metadata": lambda v: (
                isinstance(v, dict)
                and all(
                    isinstance(k, str)
                    and type(x) in (metadata.TensorStorageMetadata, metadata.BytesStorageMetadata)
                    for k, x in v.items()
                )
            ),
            "planner_data": _plain,
            "storage_data": opt(
                lambda v: (
                    isinstance(v, dict)
                    and all(
                        type(k) is metadata.MetadataIndex and type(x) is filesystem._StorageInfo
                        for k, x in v.items()
                    )
                )
            ),
            "storage_meta": opt(lambda v: type(v) is metadata.StorageMeta),
            "version": opt(text),
        },
        metadata.TensorStorageMetadata: {
            "properties": lambda v: type(v) is metadata.TensorProperties,
            "size": size,
            "chunks": lambda v: (
                isinstance(v, list) and all(type(c) is metadata.ChunkStorageMetadata for c in v)
            ),
        },
        metadata.TensorProperties: {
            "dtype": of(torch.dtype),
            "layout": of(torch.layout),
            "requires_grad": flag,
            "memory_format": of(torch.memory_format),
            "pin_memory": flag,
        },
        metadata.ChunkStorageMetadata: {"offsets": size, "sizes": size},
        metadata.BytesStorageMetadata: {},
        metadata.MetadataIndex: {"fqn": text, "offset": opt(size), "index": opt(integer)},
        metadata.StorageMeta: {
            "checkpoint_id": opt(of(str, os_.PathLike)),
            "save_id": opt(text),
            "load_id": opt(text),
            "modules": lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
        },
        filesystem._StorageInfo: {
            "relative_path": text,
            "offset": integer,
            "length": integer,
            "transform_descriptors": opt(
                lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
            ),
        },
    }


def _plain(value) -> bool:
    """JSON-like data only (the planner's notes): str, numbers, None, lists, tuples, dicts."""
    if value is None or type(value) in (str, int, float, bool):
        return True
    if type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


_MISSING = object()


def _check_fields(value, checks: dict, seen: set) -> None:
    """Every allowed object reachable from `value` has exactly its fields, each of its type."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if type(value) in checks:
        fields = checks[type(value)]
        present = set(vars(value)) if hasattr(value, "__dict__") else set()
        # a field left at its class default (MetadataIndex.offset None) is not in __dict__
        if present - set(fields) or not all(
            ok(getattr(value, name, _MISSING)) for name, ok in fields.items()
        ):
            got = {k: type(v).__name__ for k, v in vars(value).items()}
            raise pickle.UnpicklingError(
                f"{type(value).__name__} with fields of the wrong types: {got}"
            )
        children = list(vars(value).values())
    elif isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        return
    for child in children:
        _check_fields(child, checks, seen)


def read_metadata_file(path: str | os.PathLike):
    """DCP's `.metadata` file, read without calling anything it names beyond DCP's own data
    classes; anything else is a DataError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    from posttrain.records import DataError

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if type(metadata) is not Metadata:
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        _check_fields(metadata, _field_checks(), set())
    except OSError as e:
        raise DataError(path, None, f"cannot read checkpoint metadata: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is the file's fault
        raise DataError(
            path, None, f"refused as checkpoint metadata: {type(e).__name__}: {e}"
        ) from None
    return metadata


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        """FileSystemReader whose metadata is read by `read_metadata_file` (tensors are
        already read with torch.load(weights_only=True))."""

        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            if kwargs.get("rank") is not None:
                path = Path(self.path) / f"__{kwargs['rank']}.metadata"
            metadata = read_metadata_file(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def SafeReader(path: str | os.PathLike):  # noqa: N802 - a class made on first use
    return _safe_reader_class()(path)
