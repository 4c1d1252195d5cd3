"""How a model is spread over the processes of a run (ddp | fsdp2 | deepspeed), so that a
training loop reads the same on 1 process or on N.

    torchrun --nproc_per_node 8 -m posttrain.cli train --method dpo ... --set strategy=fsdp2
    posttrain train --nproc 2 --method dpo ... --set strategy=fsdp2      # execs torchrun

- ddp: every process holds the whole model; torch DDP averages gradients (accelerate prepares
  it). With one process nothing is wrapped.
- fsdp2: torch's `fully_shard` on every decoder layer and at the root: each process keeps
  1/N of every parameter, gradient and optimizer state (LoRA weights included: they live inside
  the sharded layers). Gradients are reduce-scattered after every backward (no no-sync): the
  accumulated gradients then stay sharded too, which is what a model that does not fit one
  device needs. On CUDA with bf16 the parameters stay fp32 (full fine-tuning) or bf16 (frozen
  LoRA base) and MixedPrecisionPolicy computes in bf16 and reduces in fp32. Checkpoints are
  sharded (torch.distributed.checkpoint); the final weights are gathered on rank 0.
  Under torchrun, a model read from a local folder of safetensors files starts on the meta
  device and each process reads only its own shards (meta_start.py): no process ever holds
  the whole model.
- deepspeed: ZeRO-3 through accelerate; CUDA only (refused elsewhere, never a silent fallback).
  UNTESTED here: no GPU and no deepspeed package on the machine this was written on.

A loop uses one `Processes` object: `policy, optimizer = procs.prepare(model, make_optimizer)`
(the optimizer is built after wrapping, over the wrapped parameters), `procs.no_sync` /
`procs.backward` per micro-batch, `procs.clip(policy, max_norm)` (the total norm over all
shards), `procs.full_state_dict(policy)` for the final weights (sharded checkpoints:
sharded_checkpoint.py). The names follow accelerate's Accelerator (num_processes,
process_index, is_main_process, device, reduce, wait_for_everyone), so helpers written for one
take the other. `master_weights` keeps full fine-tuning's parameters in fp32 with bf16 compute
(and runs a bf16 LoRA model's forward under autocast).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from posttrain.config import ConfigError

from posttrain.train.config import STRATEGIES  # noqa: F401 (named there, torch-free)
from posttrain.train.parallel.host import die_with_launcher, return_freed_memory


def check_strategy(strategy: str) -> None:
    """ConfigError for an unknown strategy, or deepspeed where there is no CUDA."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r}; expected {' | '.join(STRATEGIES)}")
    if strategy == "deepspeed" and not torch.cuda.is_available():
        raise ConfigError(
            "strategy: 'deepspeed' needs CUDA (ZeRO-3 through accelerate) and "
            "torch.cuda.is_available() is false here; use strategy=fsdp2, which "
            "shards on CPU processes (gloo) as well as on GPUs"
        )


def precision(
    dtype: str, *, full_finetune: bool, sharded_cuda: bool
) -> tuple[str, bool, str | None]:
    """(dtype to load the model in, FSDP2 mixed precision on?, autocast dtype or None);
    `sharded_cuda`: FSDP2 will shard the model over CUDA devices.

    Full fine-tuning never runs AdamW on bf16 weights (updates of ~lr would round away:
    bf16 keeps 8 significant bits): the weights load in fp32 (the master copy the optimizer
    updates) and the forward computes in bf16, through FSDP2's MixedPrecisionPolicy on CUDA,
    else through torch.autocast. fp16 full fine-tuning (it needs loss scaling) is refused.
    LoRA keeps the frozen base in `dtype` and the adapter in fp32 (lora.apply_lora); in bf16
    the forward runs under autocast too, so the adapter's matmuls compute in bf16 on the bf16
    activations (lora.adapter_input_as_is) instead of on an fp32 copy of every adapted layer's
    input, which autograd keeps for backward (SmolLM2-135M, 8 sequences of ~190 tokens: 1.1 GB
    of the 2.4 GB saved). The step-1 loss is unchanged (B = 0); later steps differ by bf16
    rounding of the adapter's product, as in any bf16 mixed-precision run.
    """
    fsdp_mp = sharded_cuda and dtype == "bf16"
    if not full_finetune:
        return dtype, fsdp_mp, "bf16" if dtype == "bf16" and not fsdp_mp else None
    if dtype == "fp16":
        raise ConfigError(
            "dtype: 'fp16' with lora.enabled=false: full fine-tuning in fp16 "
            "needs loss scaling, which this trainer does not do; use dtype=bf16 "
            "(fp32 master weights, bf16 compute) or dtype=fp32"
        )
    if dtype == "bf16":
        return "fp32", fsdp_mp, None if fsdp_mp else "bf16"
    return dtype, False, None


def master_weights(
    model: torch.nn.Module, compute_dtype: str | None, device_type: str, *, upcast: bool = True
) -> torch.nn.Module:
    """Parameters in fp32 (the master weights AdamW updates; `upcast=False` for LoRA, whose
    frozen base stays as loaded and whose adapter is fp32 already) and `model.forward` under
    torch.autocast(compute_dtype): matmuls in bf16, reductions and the loss in fp32."""
    if compute_dtype is None:
        return model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[compute_dtype]
    if upcast:
        model.float()
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = autocast_forward  # an instance attribute: PEFT and DDP call it
    return model


def zero3_config(cfg) -> dict | None:
    """DeepSpeed ZeRO-3 settings from a TrainConfig (None unless strategy=deepspeed): our
    micro-batch, accumulation and clipping; bf16 when the run computes in bf16."""
    if cfg.strategy != "deepspeed":
        return None
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": cfg.dtype in ("bf16", "auto")},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) transformers model: the modules whose class
    is in the model's `_no_split_modules` (LlamaDecoderLayer, Qwen3MoeDecoderLayer, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"strategy: 'fsdp2' found no decoder layer in {type(base).__name__} "
            f"(_no_split_modules = {sorted(names)})"
        )
    return layers


def shard(model: torch.nn.Module, *, mixed_precision: bool = False) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head);
    one 1-D mesh over all processes. Module and parameter names do not change.

    Memory, measured on the 1.52 B dense model of bench/startup_memory.py (2 gloo processes,
    DPO LoRA; bf16 units whole: input embeddings and head 192 MiB each, a decoder layer
    86 MiB): every unshard holds its unit whole twice for a moment (the gathered buffer, then
    the parameters copied out of it), and a DPO step runs chosen and rejected as two forwards,
    hence two backward sweeps. A frozen input embedding is never gathered in backward
    (`set_unshard_in_backward(False)`; its backward reads no weight): FSDP2's implicit backward
    prefetch gathered it after layer 0 of the first sweep and kept it whole through the second,
    192 MiB at the step's peak (3093 -> 2909 MiB at step 1). On a CPU see
    gloo_gather.gloo_all_gather.
    Measured and not done: keeping the frozen head whole after its first gather, with no
    backward prefetch (2904 MiB: the peak moved to the embeddings' gather in forward).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # Untied input embeddings and head are units of their own, as the decoder layers: each is
    # whole only while it runs, not through the root's whole forward (1.52 B dense model:
    # 2 x 0.2 GB in bf16). Tied ones are one parameter and stay with the root.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embed is not None and head is not None and embed.weight is not head.weight:
        fully_shard(embed, mesh=mesh, mp_policy=policy)
        fully_shard(head, mesh=mesh, mp_policy=policy)
        if not embed.weight.requires_grad:
            # its backward needs no weight (no gradient to accumulate): never gathered then
            embed.set_unshard_in_backward(False)
    # The root's own parameters (final norm, tied embeddings) are freed after its forward
    # too: by default FSDP2 keeps the root whole from its forward to the end of backward. One
    # more all-gather of the root per backward. (Not measured on its own: it went in with the
    # two changes measured in return_freed_memory's docstring and the bench.)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if device_type == "cpu" and dist.get_backend() == "gloo":
        from posttrain.train.parallel.gloo_gather import gloo_all_gather

        gloo_all_gather(model)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the whole model's parameters (an FSDP2 DTensor counts whole), each once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique)


def local_storage(model: torch.nn.Module) -> dict[str, int]:
    """What this process itself stores of the model's parameters: {"numel", "bytes"} over the
    local shards (a DTensor's `to_local()`), each parameter once."""
    numel = nbytes = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # an FSDP2 DTensor's local shard; a ZeRO-3 parameter's partition (`ds_tensor`)
        t = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
        numel += t.numel()
        nbytes += t.numel() * t.element_size()
    return {"numel": numel, "bytes": nbytes}


class Processes:
    """This run's processes (1, or N started by torchrun) and its wrapping strategy."""

    def __init__(self, strategy: str = "ddp", *, deepspeed_config: dict | None = None):
        import torch.distributed as dist
        from accelerate import Accelerator

        check_strategy(strategy)
        self.strategy = strategy
        self.mixed_precision = False  # FSDP2's bf16 policy; set by precision()
        kwargs = {}
        if strategy == "deepspeed":
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config)
        # accelerate starts the process group (gloo on CPU, nccl on CUDA) from torchrun's
        # environment and picks the device; FSDP2 is applied by `shard`, not by its plugin
        # (which becomes DDP on CPU without a word).
        if "LOCAL_RANK" in os.environ:
            die_with_launcher()
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
        if strategy == "fsdp2" and "LOCAL_RANK" in os.environ and not dist.is_initialized():
            # accelerate leaves a 1-process torchrun on one GPU without a process group
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # FSDP2 shards whenever there is a process group (under torchrun, even of 1 process);
        # a plain `posttrain train` process holds the whole model.
        self.sharded = strategy == "fsdp2" and dist.is_available() and dist.is_initialized()
        if self.sharded and not torch.cuda.is_available():
            return_freed_memory()
        self._sync = True

    def precision(self, dtype: str, *, full_finetune: bool) -> tuple[str, str | None]:
        """(dtype to load the model in, autocast dtype for `master_weights` or None); turns
        FSDP2's bf16 MixedPrecisionPolicy on where it applies. See `precision()`."""
        load, self.mixed_precision, autocast = precision(
            dtype,
            full_finetune=full_finetune,
            sharded_cuda=self.sharded and torch.cuda.is_available(),
        )
        return load, autocast

    # the Accelerator-compatible part
    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return (
            self.accelerator.reduce(tensor, reduction=reduction)
            if self.num_processes > 1
            else tensor
        )

    # wrapping and the step
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the loop should call it (DDP wrapper, or the same module sharded)."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            if isinstance(model, FSDPModule):  # sharded already (meta_start.py)
                return model
            return shard(model, mixed_precision=self.mixed_precision)
        if self.strategy == "deepspeed":
            raise RuntimeError("deepspeed wraps model and optimizer together: use prepare()")
        if self.strategy == "ddp" and self.num_processes > 1:
            return self.accelerator.prepare_model(model)
        return model

    def prepare(
        self, model: torch.nn.Module, make_optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(wrapped model, optimizer over its parameters); `make_optimizer(module)` is called
        after wrapping (FSDP2 replaces the parameters with their shards)."""
        if self.strategy == "deepspeed":  # ZeRO-3 partitions the optimizer as it wraps
            policy, optimizer = self.accelerator.prepare(model, make_optimizer(model))
            return policy, optimizer
        policy = self.wrap(model)
        return policy, make_optimizer(self.unwrap(policy))

    def unwrap(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module holding the named parameters (DDP's `.module`; FSDP2 wraps in place)."""
        return policy if self.sharded else self.accelerator.unwrap_model(policy)

    def no_sync(self, policy: torch.nn.Module):
        """Context for a micro-batch that is not the step's last: DDP skips its all-reduce;
        FSDP2 reduce-scatters anyway (see the module docstring); DeepSpeed is told it is not
        at the accumulation boundary."""
        if self.strategy == "ddp" and self.num_processes > 1:
            return self.accelerator.no_sync(policy)
        if self.strategy == "deepspeed":
            return self._not_boundary()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _not_boundary(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy != "deepspeed":
            loss.backward()
            return
        # Our loss is already scaled to its share of the global batch: no 1/gas from DeepSpeed.
        # engine.step() at the boundary clips, steps and zeroes (optimizer.step() is a no-op).
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=self._sync)
        engine.backward(loss, scale_wrt_gas=False)
        if self._sync:
            engine.step()

    def clip(self, policy: torch.nn.Module, max_norm: float) -> float:
        """The total gradient norm before clipping to `max_norm`, over all shards."""
        if self.strategy == "deepspeed":  # clipped inside engine.step() (gradient_clipping)
            return float(self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm() or 0)
        from posttrain.train.optim import clip_gradients

        return clip_gradients(self.unwrap(policy), max_norm)

    def all_finite(self, policy: torch.nn.Module) -> bool:
        """Every process's trainable parameters (its shards) are finite."""
        ok = all(
            bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
            for p in self.unwrap(policy).parameters()
            if p.requires_grad
        )
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        return bool(self.reduce(flag, "sum").item() == self.num_processes)

    def storage_per_process(self, policy: torch.nn.Module) -> list[int]:
        """Bytes of parameters each process stores ([rank 0, rank 1, ...]): its shards under
        FSDP2, a whole replica under DDP."""
        mine = torch.zeros(self.num_processes, dtype=torch.float64, device=self.device)
        mine[self.process_index] = local_storage(self.unwrap(policy))["bytes"]
        return [int(b) for b in self.reduce(mine).tolist()]

    def full_state_dict(self, policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable weights (LoRA) or all weights (full fine-tuning), whole, on rank 0's
        CPU; None on the other ranks and for unsharded strategies (the module holds them)."""
        if self.strategy == "deepspeed":
            return self.accelerator.get_state_dict(policy)
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        lora = has_frozen(policy)
        state = get_model_state_dict(
            policy,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora
            ),
        )
        return state if self.is_main_process else None


def has_frozen(model: torch.nn.Module) -> bool:
    """A LoRA model (frozen base): its checkpoints and final weights hold the trainable part."""
    return any(not p.requires_grad for p in model.parameters())
