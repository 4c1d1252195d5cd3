"""A sharded start-up in which no process ever holds the whole model (strategy=fsdp2 under
torchrun, a local folder of safetensors files).

    python -c "from posttrain.train.parallel.meta_start import meta_start; help(meta_start)"

Every process builds the model on the `meta` device (shapes, no storage), adds LoRA, shards it
with FSDP2 (`fully_shard`: each parameter becomes a DTensor whose dim 0 is split over the
processes), gives the shards storage (`to_empty`), then fills only its own shards:

- Base weights: each process reads just the rows it owns, `safe_open(file).get_slice(name)
  [start:stop]`, the row range taken from its DTensor's local shape and global offset. A
  routed-expert tensor of transformers 5 (fused 3-D `experts.gate_up_proj`, `down_proj`) is
  sharded over experts, so a process reads only its experts' `experts.E.gate_proj / up_proj /
  down_proj` (Mixtral: `w1 / w3 / w2`) as the checkpoint stores them. A file is opened for the
  tensors of one parameter and closed again, and only the rows asked for are copied out, in
  pieces of at most READ_BYTES, so the process never maps a whole file into its resident
  memory and holds at most one piece besides its shards.
- Buffers the checkpoint does not hold (rotary `inv_freq`, `original_inv_freq`) are computed
  again as the module's constructor computes them (its `rope_init_fn` from the config); a
  buffer of any other kind is an error naming it, never left as uninitialised memory.
- LoRA: B = 0 and A kaiming-uniform(a = sqrt 5), as PEFT initialises them, drawn from a
  generator seeded with the run's seed over each whole A (in parameter order) and then cut to
  the process's rows: the same adapter on every process, whatever the number of processes.
  The whole-model path initialises its adapter with the same `init_lora`, so both start-ups
  train the same adapter from the same seed (tests/test_meta_start.py compares them).
- Tied embeddings (lm_head = embed_tokens) stay one parameter: checked, read once.

Why every process reads its own slices rather than one process reading a layer at a time and
broadcasting it: the bytes each process reads are exactly the bytes it keeps (1/N of the
model), so no process ever holds a layer it does not own, the reads of the N processes run in
parallel from a shared file system instead of funnelling through rank 0's disk and network,
and no collective runs during start-up (nothing to hang on, nothing sized to the largest
layer: Qwen3-235B's embedding alone is 1.2 GB in bf16). The cost is that every process opens
every file (a header read each); safetensors' slices make a row range a contiguous read.

Where this start-up does not apply (one process, DDP, DeepSpeed, a hub id or a GGUF file, PiSSA
or OLoRA which need the whole base weights to build the adapter), `meta_start_refusal` says why
and the loop loads the whole model in every process as before.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from posttrain.config import ConfigError

# transformers 5 fuses each layer's routed experts into 3-D parameters; checkpoints (and its
# own save_pretrained) keep one 2-D weight per expert. {fused name: [per-expert sources]}, the
# sources concatenated along dim 0 of each expert's slice (gate then up), as transformers'
# conversion mapping does (MergeModulelist(dim=0), Concatenate(dim=1)).
EXPERT_SOURCES = {
    "gate_up_proj": (["gate_proj", "up_proj"], ["w1", "w3"]),
    "down_proj": (["down_proj"], ["w2"]),
}


READ_BYTES = 64 * 2**20  # the largest piece of a tensor read at once


def meta_start_refusal(cfg, procs, model_given: bool) -> str | None:
    """Why this run cannot start on the meta device (None: it can). `model_given`: the caller
    passed a model object (tests, demos)."""
    from posttrain.models import resolve_model

    if not procs.sharded:
        return "not sharded (strategy fsdp2 under torchrun shards)"
    if model_given:
        return "the model was given as an object"
    if cfg.lora.enabled and cfg.lora.init != "default":
        return f"lora.init={cfg.lora.init} builds the adapter from the whole base weights"
    if getattr(cfg, "init_adapter", ""):
        return "init_adapter (a later round) is loaded on the whole model"
    folder = Path(resolve_model(cfg.model))
    if not folder.is_dir() or not list(folder.glob("*.safetensors")):
        return f"{cfg.model} is not a local folder of safetensors files"
    return None


def adapter_disabled(model: nn.Module):
    """Context in which a PEFT model runs as its base model (a plain model: as is)."""
    import contextlib

    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


def build_on_meta(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `folder`'s config.json on the meta device, in `dtype` (no storage)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def checkpoint_name(name: str) -> str:
    """The checkpoint key of a (PEFT-wrapped) model's parameter or buffer name:
    base_model.model.X.q_proj.base_layer.weight -> X.q_proj.weight."""
    name = name.removeprefix("base_model.model.")
    return ".".join(p for p in name.split(".") if p != "base_layer")


class Checkpoint:
    """The safetensors files of a model folder: which file holds which key, and row ranges
    read without mapping a whole file (each read opens and closes its file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        else:
            from safetensors import safe_open

            weight_map = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(f, "pt") as s:
                    weight_map.update(dict.fromkeys(s.keys(), f.name))
        self.where = dict(weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (dim 0), copied out of the file."""
        from safetensors import safe_open

        with safe_open(self.folder / self.where[key], "pt") as s:
            return s.get_slice(key)[start:stop].clone()

    def whole(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.where[key], "pt") as s:
            return s.get_slice(key)[:].clone()


def owned_rows(param: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of dim 0 this process holds of `param` (an FSDP2 DTensor sharded on dim
    0, or a plain tensor: all rows)."""
    if not hasattr(param, "to_local"):
        return 0, param.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Shard) and p.dim != 0 for p in param.placements):
        raise RuntimeError(f"meta start-up reads dim-0 shards only; got {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    start = offset[0] if shape[0] else 0
    return start, start + shape[0]


def local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def read_rows(ckpt: Checkpoint, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the model tensor `key`: stored as is, or a fused expert tensor
    assembled from the checkpoint's per-expert weights of experts start..stop-1."""
    # Mixtral's checkpoints name the MoE block `block_sparse_moe` (transformers 5: `mlp`)
    for stored in dict.fromkeys([key, key.replace(".mlp.", ".block_sparse_moe.")]):
        if stored in ckpt:
            return ckpt.rows(stored, start, stop)
        prefix, _, last = stored.rpartition(".")
        if not (prefix.endswith(".experts") and last in EXPERT_SOURCES):
            continue
        for names in EXPERT_SOURCES[last]:
            if all(f"{prefix}.0.{n}.weight" in ckpt for n in names):
                experts = [
                    torch.cat([ckpt.whole(f"{prefix}.{e}.{n}.weight") for n in names])
                    for e in range(start, stop)
                ]
                return torch.stack(experts)  # (experts, rows, columns)
    raise ConfigError(
        f"model checkpoint {ckpt.folder}: no tensor {key!r} (nor its per-expert weights) "
        "in its safetensors files"
    )


def shard_and_fill(model: nn.Module, folder: str | Path, procs, *, seed: int, t0: float):
    """Shard the meta-device `model` for `procs` (fully_shard, still on meta), then fill this
    process's shards from `folder` and say what was read (process 0) since `t0`
    (time.perf_counter() when the start-up began). Returns the sharded model."""
    model = procs.wrap(model)
    read = fill_from_checkpoint(model, folder, seed=seed, device=procs.device)
    if procs.is_main_process:
        print(
            f"start-up on the meta device: each process read only its own shards "
            f"({read['bytes_read'] / 2**20:.1f} MiB on process 0) in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return model


@torch.no_grad()
def fill_from_checkpoint(
    model: nn.Module, folder: str | Path, *, seed: int, device: str | torch.device = "cpu"
) -> dict:
    """Give the sharded meta model storage on `device` and fill this process's shards (see the
    module docstring). Returns {"bytes_read": n, "tensors": n} (this process's base weights)."""
    ckpt = Checkpoint(folder)
    model.to_empty(device=device)
    tied = _tied_pairs(model)
    bytes_read = count = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or ".lora_" in name:
            continue
        seen.add(id(param))
        start, stop = owned_rows(param)
        mine = local(param)
        key = checkpoint_name(name)
        if key not in ckpt and key in tied:
            key = tied[key]
        # in pieces of at most READ_BYTES: one piece at a time is in memory besides the shard
        step = max(1, READ_BYTES // max(1, mine[:1].numel() * mine.element_size()))
        for a in range(start, stop, step):
            b = min(stop, a + step)
            rows = read_rows(ckpt, key, a, b)
            if tuple(rows.shape) != (b - a, *mine.shape[1:]):
                raise ConfigError(
                    f"model checkpoint {ckpt.folder}: {key} rows {a}:{b} have shape "
                    f"{tuple(rows.shape)}; the model's shard has rows of {tuple(mine.shape[1:])}"
                )
            mine[a - start : b - start].copy_(rows)
            bytes_read += rows.numel() * rows.element_size()
        count += 1
    _init_buffers(model, ckpt)
    init_lora(model, seed)
    return {"bytes_read": bytes_read, "tensors": count}


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> int:
    """Initialise every LoRA weight as PEFT's default does (A kaiming-uniform with a = sqrt 5,
    B zeros), A drawn whole, in parameter order, from a generator seeded with `seed`, then cut
    to this process's rows: the same adapter whatever the number of processes or the global
    RNG state. Sharded or not. Returns the number of adapter weights; any other `lora_`
    weight (DoRA's magnitude, ...) is an error."""
    generator = torch.Generator().manual_seed(seed)
    n = 0
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            continue
        start, stop = owned_rows(param)
        mine = local(param)
        if ".lora_A." in name:
            whole = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=generator)
            mine.copy_(whole[start:stop])
        elif ".lora_B." in name:
            mine.zero_()
        else:
            raise ConfigError(f"LoRA start-up: no initialisation known for {name}")
        n += 1
    return n


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """{checkpoint name: checkpoint name of the parameter it shares storage with}."""
    first: dict[int, str] = {}
    pairs = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = checkpoint_name(name)
        if id(param) in first:
            pairs[key] = first[id(param)]
            pairs[first[id(param)]] = key
        else:
            first[id(param)] = key
    return pairs


def _init_buffers(model: nn.Module, ckpt: Checkpoint) -> None:
    """Buffers from the checkpoint when it holds them; rotary frequencies computed as the
    module's constructor does; any other buffer an error naming it."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            key = checkpoint_name(full)
            if key in ckpt:
                buf.copy_(ckpt.whole(key))
            elif name in ("inv_freq", "original_inv_freq") and hasattr(module, "rope_type"):
                buf.copy_(rotary_inv_freq(module))
            else:
                raise ConfigError(
                    f"meta start-up: buffer {key} is not in the checkpoint and posttrain "
                    "does not know how to compute it"
                )


def rotary_inv_freq(module: nn.Module) -> torch.Tensor:
    """A transformers 5 rotary embedding's inverse frequencies, computed as its __init__ does
    (compute_default_rope_parameters, or ROPE_INIT_FUNCTIONS[rope_type])."""
    if module.rope_type == "default":
        init = module.compute_default_rope_parameters
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[module.rope_type]
    with torch.device("cpu"):
        inv_freq, _ = init(module.config)
    return inv_freq
