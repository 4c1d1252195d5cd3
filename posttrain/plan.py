"""Will this training run fit? Memory per GPU from a model config alone (no weights, no torch).

    posttrain plan --model tests/data/qwen3-235b-a22b --method dpo --max-length 8192 \
        --strategy fsdp2 --gpus-per-node 8 --nodes 4
    python -c "from posttrain.plan import plan; help(plan)"

What one training process holds at its peak, in the trainer's own precision rules
(train/parallel/processes.py `precision`):
- weights: LoRA keeps the frozen base in the compute dtype (bf16: 2 bytes a parameter); full
  fine-tuning keeps fp32 master weights (4 bytes). fsdp2 divides them by the number of
  processes, and then holds the unsharded copy of the layers it is computing (the current and
  the prefetched next decoder layer) plus the root module (embeddings, final norm, head), which
  FSDP2 keeps gathered from forward to backward, plus the output buffer of one all-gather
  (the largest of those groups) until it is copied into the unsharded parameters. ddp holds every weight in every process (and
  full fine-tuning in bf16 there adds autocast's bf16 copy of the fp32 weights).
- trainable gradients: 4 bytes a trainable parameter (LoRA adapters and full fine-tuning
  master weights are fp32); sharded by fsdp2; ddp adds its gradient buckets (a second copy).
- AdamW state: exp_avg and exp_avg_sq, 8 bytes a trainable parameter; sharded by fsdp2.
- activations: what autograd keeps for backward, per token and decoder layer (below), for the
  sequences of one micro-batch (a DPO-family micro-batch of m pairs is 2m sequences: chosen and
  rejected are both alive until the loss). With gradient checkpointing, each layer keeps its
  input (H values a token) and one layer's activations exist again while it is recomputed.
- logits: the trainer's fused head (train/forward.py FUSED_HEAD_MODELS, losses/logprobs.py)
  never makes the (tokens, vocab) logits: it keeps the final hidden states of labelled tokens,
  at most KEEP_BYTES (64 MiB) of logits for backward per forward call (one call per
  micro-batch with padding longest; one per sequence with padding none, a CPU's default, so a
  DPO pair keeps up to twice that), and works on float32 chunks of
  CHUNK_ELEMENTS (32 MiB; two at a time in backward). Other model types hold the whole
  (tokens, vocab) logits in the compute dtype plus one float32 chunk.
- reference pass: the DPO family's reference log-probs are computed once before training with
  no gradient (offline/reference.py): its peak is the weights plus one layer's forward
  activations of one sequence, reported as its own phase, never added to the training peak.
A colocated vLLM takes its share (gpu_memory_utilization) of each GPU; a CUDA process adds its
context and allocator slack (CUDA_OVERHEAD_GIB + ALLOCATOR_SLACK of the rest).

Activation bytes a token and layer (a = 2 for bf16 compute, 4 for fp32), for the frozen-base
LoRA or full step alike, with flash / memory-efficient attention (no T x T term) unless
`attention="eager"` (then heads x T x T x (4 + a) a layer and sequence: fp32 softmax + its copy):
  two RMSNorms, each an fp32 copy of its input (4H) and its output (aH) -> 2(4 + a)H
  attention: q, k, v after rope, the output and the o_proj input -> a(3q + 2kv); q/k norms
  (Qwen3) add fp32 copies 4(q + kv)
  dense SwiGLU MLP: gate, up, silu(gate), silu(gate) * up -> 4aI
  MoE MLP (per routed token, k experts): the gathered input and weighted output (2aH), the same
  four I-sized tensors -> k(2aH + 4aI), plus the router's fp32 logits and softmax (8E)
Parameter counts: posttrain/shapes.py.

Measured (bench/plan_validate.py, CPU, per-process RSS of real DPO LoRA runs against a minuscule
model's): dense Llama within -19 % .. -3 % of the plan in 4 runs (1 and 2 fsdp2 processes, 512
and 2048 tokens). A small Qwen3-MoE measured 4-5x its plan in all 4 runs. What is known
(bench/moe_memory.py, bench/results/plan_validate.json notes): the plan's tensors are right
for it (profiler peak of live tensors in one step 109.6 / 209.2 MiB at 256 / 640 tokens a
sequence, plan 129.4 / 226.6; checkpointing keeps nothing of the grouped-mm experts past their
layer), but the process holds more than its tensors: 120-140 MiB of RSS beyond the live
tensors during the step, and at load the experts twice (transformers 5 fuses the per-expert
checkpoint tensors into new ones while the mapped file's pages stay resident: 399 MiB RSS for
239 MiB of parameters). Those and about 480 MiB more of the trainer's run are not tensors the
plan forgot; it is not known yet which of them a GPU process has. So an MoE plan is a lower
bound, and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from posttrain.errors import ConfigError
from posttrain.train.config import OFFLINE_METHODS, PREFERENCE_METHODS
from posttrain.train.online.config import METHODS as ONLINE_METHODS
from posttrain.shapes import (
    Shape,
    lora_parameters,
    parameters,
    read_config,
    shape_of,
)

GIB = 1 << 30
MIB = 1 << 20
# losses/logprobs.py's chunking (duplicated here so the planner needs no torch; a test checks)
CHUNK_ELEMENTS = 1 << 23
KEEP_BYTES = 64 << 20
# train/forward.py FUSED_HEAD_MODELS of the families counted here
FUSED_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"})
# GPU memory sizes people plan for, in GiB (as the device reports it)
GPU_SIZES = {"24 GiB (L4, A10, 4090)": 24, "40 GiB (A100-40)": 40, "48 GiB (L40S, A6000)": 48,
             "80 GiB (A100-80, H100)": 80, "140 GiB (H200)": 140}  # fmt: skip
CUDA_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS / NCCL workspaces
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, share of the tensors' bytes
STRATEGIES = ("ddp", "fsdp2")


@dataclass
class PlanConfig:
    """One run's settings. micro_batch: examples (DPO family: pairs) in one forward pass."""

    method: str = "dpo"
    lora: bool = True
    lora_r: int = 16
    lora_targets: str = "all-linear"
    max_length: int = 8192
    micro_batch: int = 1
    strategy: str = "fsdp2"
    gradient_checkpointing: bool = True
    gpus_per_node: int = 8
    nodes: int = 1
    vllm_share: float = 0.0  # colocated vLLM's gpu_memory_utilization (online methods)
    dtype: str = "bf16"  # bf16 | fp32
    attention: str = "flash"  # flash (sdpa / flash-attention: no T x T) | eager
    # longest: one forward per micro-batch (padded; the trainer's choice on a GPU) | none: one
    # forward per sequence, unpadded (its choice on a CPU: `padding: auto`)
    padding: str = "longest"

    def check(self) -> None:
        known = (*OFFLINE_METHODS, *ONLINE_METHODS)
        if self.method not in known:
            raise ConfigError(f"method: {self.method!r}; expected one of {', '.join(known)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r}; the planner knows ddp | fsdp2")
        for name in ("lora_r", "max_length", "micro_batch", "gpus_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)}; expected >= 1")
        if not 0.0 <= self.vllm_share < 1.0:
            raise ConfigError(f"vllm_share: {self.vllm_share}; expected a value in [0, 1)")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype: {self.dtype!r}; expected bf16 | fp32")
        if self.attention not in ("flash", "eager"):
            raise ConfigError(f"attention: {self.attention!r}; expected flash | eager")
        if self.padding not in ("longest", "none"):
            raise ConfigError(f"padding: {self.padding!r}; expected longest | none")

    @property
    def processes(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def sequences(self) -> int:
        """Sequences alive in one forward + backward."""
        return self.micro_batch * (2 if self.method in PREFERENCE_METHODS else 1)


def activation_bytes_per_token(s: Shape, layer: int, a: int) -> int:
    """What autograd keeps for backward in decoder layer `layer`, per token (module docstring)."""
    H, q, kv = s.hidden, s.q_dim, s.kv_dim
    n = 2 * (4 + a) * H + a * (3 * q + 2 * kv)
    if s.qk_norm:
        n += 4 * (q + kv)
    if layer in s.moe_layers:
        n += s.top_k * (2 * a * H + 4 * a * s.expert_intermediate) + 8 * s.experts
        if s.shared_intermediate:
            n += 4 * a * s.shared_intermediate
    else:
        n += 4 * a * s.intermediate
    return n


def estimate(s: Shape, cfg: PlanConfig) -> dict:
    """Bytes per process of each part of the training peak, and of the reference pass."""
    cfg.check()
    a = 2 if cfg.dtype == "bf16" else 4
    P = cfg.processes
    params = parameters(s)
    sharded = cfg.strategy == "fsdp2" and P > 1
    weight_bytes = a if cfg.lora else 4  # full fine-tuning keeps fp32 master weights
    weights = params["total"] * weight_bytes / (P if sharded else 1)
    # fsdp2: the root (embeddings, head, final norm) stays gathered from forward to backward;
    # the current and the prefetched decoder layer are gathered in the compute dtype. Full
    # fine-tuning in bf16 without fsdp2 computes under torch.autocast, which keeps a bf16 copy
    # of every fp32 weight it casts until the forward ends.
    if sharded:
        # + the all-gather's output buffer of the largest group, alive until it is copied out
        # into the unsharded parameters
        root = params["embeddings"] + params["head"]
        copies = (root + 2 * params["largest_layer"] + max(root, params["largest_layer"])) * a
    elif not cfg.lora and cfg.dtype == "bf16":
        copies = params["total"] * 2
    else:
        copies = 0
    trainable = lora_parameters(s, cfg.lora_targets, cfg.lora_r) if cfg.lora else params["total"]
    grads = trainable * 4 / (P if sharded else 1)
    if cfg.strategy == "ddp" and P > 1:
        grads *= 2  # DDP's gradient buckets
    adam = trainable * 8 / (P if sharded else 1)

    T = cfg.max_length
    tokens = cfg.sequences * T
    per_layer = [activation_bytes_per_token(s, i, a) for i in range(s.layers)]
    eager = s.heads * T * T * (4 + a) * cfg.sequences if cfg.attention == "eager" else 0
    if cfg.gradient_checkpointing:
        # every layer's input, plus one layer recomputed (the largest) during backward
        activations = s.layers * a * s.hidden * tokens + max(per_layer) * tokens + eager
    else:
        activations = sum(per_layer) * tokens + s.layers * eager
    activations += a * s.hidden * tokens  # the embedding output / final hidden states

    chunk_rows = max(1, CHUNK_ELEMENTS // s.vocab)
    # the fused head keeps up to KEEP_BYTES of logits per forward call: per micro-batch when
    # padded, per sequence when every sequence runs alone (padding none)
    calls = cfg.sequences if cfg.padding == "none" else 1
    if s.model_type in FUSED_HEAD:
        kept = calls * min(KEEP_BYTES, tokens // calls * s.vocab * a)
        logits = kept + 2 * 4 * chunk_rows * s.vocab
        logits += a * s.hidden * tokens  # the head's input kept for backward
    else:
        logits = tokens * s.vocab * a + 4 * chunk_rows * s.vocab + 4 * tokens
    # reference pass: no grad, one sequence at a time (unpadded), one layer's tensors at once
    reference = max(per_layer) * T + 4 * chunk_rows * s.vocab + a * s.hidden * T
    if cfg.method not in PREFERENCE_METHODS:
        reference = 0
    parts = {
        "weights": weights,
        "unsharded bf16 copies": copies,
        "trainable gradients": grads,
        "AdamW state": adam,
        "activations": activations,
        "logits": logits,
    }
    train_peak = sum(parts.values())
    reference_peak = weights + copies + reference
    return {
        "parts": parts,
        "reference pass": reference,
        "peak": max(train_peak, reference_peak),
        "trainable": trainable,
        "tokens per micro-batch": tokens,
    }


def gpu_need(peak: float) -> float:
    """Bytes a CUDA process needs for a tensor peak: context + allocator slack."""
    return peak * (1 + ALLOCATOR_SLACK) + CUDA_OVERHEAD_GIB * GIB


def fits(s: Shape, cfg: PlanConfig, gib: float) -> bool:
    return gpu_need(estimate(s, cfg)["peak"]) <= gib * GIB * (1 - cfg.vllm_share)


def changes(s: Shape, cfg: PlanConfig, gib: float) -> list[str]:
    """What to change so that the run fits a GPU of `gib` GiB: each setting alone that is
    enough; else all of them together; then the fewest nodes, then the longest max_length
    (with those settings)."""
    tries = []
    if cfg.strategy == "ddp":
        tries.append(("strategy fsdp2", {"strategy": "fsdp2"}))
    if not cfg.gradient_checkpointing:
        tries.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if cfg.micro_batch > 1:
        tries.append(("micro-batch 1", {"micro_batch": 1}))
    if cfg.vllm_share:
        tries.append(("no colocated vLLM", {"vllm_share": 0.0}))
    out = [label for label, change in tries if fits(s, replace(cfg, **change), gib)]
    if out:
        return out
    base, prefix = cfg, ""
    if tries:
        base = replace(cfg, **{k: v for _, change in tries for k, v in change.items()})
        prefix = " + ".join(label for label, _ in tries)
        if fits(s, base, gib):
            return [prefix]
        prefix += " + "
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes > cfg.nodes and fits(s, replace(base, nodes=nodes), gib):
            out.append(f"{prefix}{nodes} nodes of {cfg.gpus_per_node} GPUs")
            break
    length = cfg.max_length // 2
    while length >= 256 and not fits(s, replace(base, max_length=length), gib):
        length //= 2
    if length >= 256:
        out.append(f"{prefix}max_length {length}")
    return out or ["nothing here is enough: a larger GPU (or expert parallelism, not built)"]


def plan(model, cfg: PlanConfig) -> dict:
    """The memory plan of a run: parameter counts, per-process bytes by part, and for each
    of GPU_SIZES whether it fits and, if not, what to change. `model`: a config dict, a model
    folder or a config.json."""
    cfg.check()
    s = shape_of(read_config(model))
    params = parameters(s)
    est = estimate(s, cfg)
    gpus = {}
    for name, gib in GPU_SIZES.items():
        need = gpu_need(est["peak"]) + gib * GIB * cfg.vllm_share
        ok = need <= gib * GIB
        gpus[name] = {"gib": gib, "need_gib": round(need / GIB, 2), "fits": ok,
                      "changes": [] if ok else changes(s, cfg, gib)}  # fmt: skip
    return {
        "model_type": s.model_type,
        "parameters": params["total"],
        "active_parameters": params["active"],
        "trainable_parameters": est["trainable"],
        "settings": asdict(cfg),
        "processes": cfg.processes,
        "tokens_per_micro_batch": est["tokens per micro-batch"],
        "per_process_gib": {k: round(v / GIB, 3) for k, v in est["parts"].items()},
        "reference_pass_gib": round(est["reference pass"] / GIB, 3),
        "peak_gib": round(est["peak"] / GIB, 3),
        "gpus": gpus,
    }


def format_plan(p: dict) -> str:
    """A readable table of plan()'s result."""
    cfg = p["settings"]

    def b(n):
        return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

    how = "LoRA r{} ({})".format(cfg["lora_r"], cfg["lora_targets"]) if cfg["lora"] else "full"
    lines = [
        f"model: {p['model_type']}, {b(p['parameters'])} parameters, "
        f"{b(p['active_parameters'])} active a token; trainable {b(p['trainable_parameters'])}",
        f"run: {cfg['method']} {how}, {cfg['dtype']}, max_length {cfg['max_length']}, "
        f"micro-batch {cfg['micro_batch']} ({p['tokens_per_micro_batch']} tokens), "
        f"{cfg['strategy']}, checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}, "
        f"{cfg['nodes']} x {cfg['gpus_per_node']} GPUs, attention {cfg['attention']}",
        "",
        f"{'per GPU':<28}{'GiB':>10}",
    ]
    for k, v in p["per_process_gib"].items():
        lines.append(f"  {k:<26}{v:>10.2f}")
    lines.append(f"  {'reference pass (before)':<26}{p['reference_pass_gib']:>10.2f}")
    lines.append(f"  {'peak (tensors)':<26}{p['peak_gib']:>10.2f}")
    if cfg["vllm_share"]:
        lines.append(f"  + colocated vLLM: {cfg['vllm_share']:.0%} of each GPU")
    if p["active_parameters"] != p["parameters"]:
        lines.append(
            "  note: an MoE plan is a lower bound (its tensors match a CPU step's, but a small "
            "Qwen3-MoE's CPU process held 4-5x the plan; bench/results/plan_validate.json)"
        )
    lines += ["", f"{'GPU':<26}{'needs GiB':>10}  fits   what to change"]
    for name, g in p["gpus"].items():
        change = "; or ".join(g["changes"])
        lines.append(
            f"{name:<26}{g['need_gib']:>10.1f}  {'yes' if g['fits'] else 'no ':<5}  {change}"
        )
    return "\n".join(lines)
