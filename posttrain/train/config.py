"""Typed settings of `posttrain train` for the offline methods, with defaults that run on a CPU.

    posttrain train --method dpo --data pairs.jsonl --out runs/dpo --set lr=5e-5 --set lora.r=8

Precedence: dataclass defaults <- the method's preset (METHOD_PRESETS) <- `--config FILE.yaml`
<- `--set key=value` <- the explicit flags `--model` and `--data`. The resolved config is saved
as OUT/config.yaml. `BaseTrainConfig` (model, dtype, AdamW, schedule, checkpoints, LoRA) is
shared with the online trainer (train/online/config.py), which extends it as this file's
`TrainConfig` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import ConfigError, from_dict, load_yaml, merge, parse_overrides

SFT_METHODS = ("sft", "dft", "chord-phi")
PREFERENCE_METHODS = ("dpo", "ipo", "robust-dpo", "bdpo", "rpo")
OFFLINE_METHODS = SFT_METHODS + PREFERENCE_METHODS

# Settings a method implies; the user's YAML and --set still win.
METHOD_PRESETS: dict[str, dict] = {
    # rDPO needs an assumed label-flip rate; 0.1 is the paper's setting for noisy labels.
    "robust-dpo": {"label_smoothing": 0.1},
    # RPO (Pang et al. 2024): DPO + alpha * NLL of the chosen answer, alpha = 1 in the paper.
    "rpo": {"nll_weight": 1.0},
}

LORA_INITS = ("default", "olora", "pissa")
# how processes share the work (train/parallel/processes.py); named here, torch-free, so that
# a config is checked without importing torch
STRATEGIES = ("ddp", "fsdp2", "deepspeed")
LENGTH_POLICIES = ("drop", "truncate_prompt", "truncate_completion")
SCHEDULES = ("cosine", "linear", "constant")
PADDINGS = ("auto", "none", "longest")


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning (every parameter trains)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
    init: str = "default"  # default (B = 0) | olora | pissa
    # Target names, combinable with commas: all-linear (attention + dense MLP linears),
    # attention, mlp, all-router, experts, shared-expert (train/lora.py lora_targets); or a
    # regex matched against whole module names; or a list of module names. Routers and routed
    # experts are adapted only when named (all-router, experts). new-layers: the layers
    # `posttrain expand` added (with enabled: false, full fine-tuning of those layers only).
    targets: str | list[str] = "all-linear"

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: {self.r}; expected >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: {self.alpha}; expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: {self.dropout}; expected a value in [0, 1)")
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora.init: {self.init!r}; expected {' | '.join(LORA_INITS)}")
        if not self.targets:
            raise ConfigError("lora.targets: empty; expected a preset, a regex or module names")


# Checks shared by every trainer: (field names, condition, what was expected).
AT_LEAST_ONE = ("keep_checkpoints",)
NOT_NEGATIVE = ("max_steps", "stop_after_steps", "checkpoint_every", "num_threads")


@dataclass
class MoeConfig:
    """Routing statistics of mixture-of-experts models (posttrain/train/moe/); ignored on a
    dense model. Shared with the online trainer."""

    stats_every: int = 10  # optimizer steps between `moe/...` metrics (and the last); 0: off
    probe_size: int = 4  # training prompts in the fixed probe batch, chosen once by the seed
    # routing replay (online methods; train/moe/replay.py): none | old (R2: the old-policy
    # pass's experts forced in the updates) | rollout (R3: the experts the engine chose while
    # sampling forced in the old-policy pass and the updates)
    replay: str = "none"

    def check(self) -> None:
        for name in ("stats_every", "probe_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}: {getattr(self, name)}; expected >= 0")
        if self.replay not in ("none", "old", "rollout"):
            raise ConfigError(f"moe.replay: {self.replay!r}; expected none | old | rollout")


def check_aux_coef(value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ConfigError(
            f"router_aux_loss_coef: {value!r}; expected >= 0 (or unset: the "
            "model config's own value)"
        )


@dataclass
class BaseTrainConfig:
    """What every trainer (offline and online) shares: model, precision, AdamW and its schedule,
    how long, checkpoints, runtime, MoE settings. Each trainer adds its own fields and checks."""

    method: str = ""
    model: str = "smollm2-135m"
    # auto: bf16 on GPUs and on CPUs with native bf16 (avx512_bf16 / amx), else fp32 (on an
    # AVX2-only CPU a bf16 LoRA forward + backward measured 30x slower than fp32).
    dtype: str = "auto"
    # optimiser (AdamW) and schedule
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming up linearly
    min_lr_ratio: float = 0.0  # where cosine / linear decay ends, relative to lr
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    # how long
    max_steps: int = 0
    stop_after_steps: int = 0  # > 0: stop cleanly after this step (schedule unchanged); --resume
    seed: int = 0
    # runtime
    checkpoint_every: int = 50  # steps; the last step always writes one
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False  # slows small models on CPU; saves memory on GPUs
    # none: each row (a pair or a demonstration offline, a group of G completions online) is
    # its own micro-batch, its graph freed by its backward before the next, and its prompt runs
    # once for all its completions (with gradient checkpointing too). Offline every sequence
    # runs unpadded (batch-independent bf16 log-probs: the reference pass matches the policy
    # exactly); online the prompt + first completion run, then the other G - 1 completions
    # together on its keys and values (logps.group_logits). longest: a micro-batch of
    # `batch_size` rows (online: `micro_batch_size` completions) runs as one forward,
    # left-padded to its longest sequence (bigger matmuls, better on GPUs). auto: none on CPU,
    # longest elsewhere.
    padding: str = "auto"
    # attention kernel: auto (eager on CPU for sequences up to 512 tokens, where it is about
    # twice as fast as torch's CPU flash attention in forward + backward; else the model's
    # own) | eager | sdpa (train/modes.py set_attention)
    attention: str = "auto"
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # how the model is spread over torchrun's processes (train/parallel/processes.py): ddp (a replica
    # each), fsdp2 (torch fully_shard: 1/N of weights, gradients, optimizer state each),
    # deepspeed (ZeRO-3 through accelerate; CUDA only)
    strategy: str = "ddp"
    trackers: list[str] = field(default_factory=list)  # tensorboard | wandb (offline), besides
    #                                                   metrics.jsonl (train/metrics.py)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # MoE models: coef x load-balancing loss added to the method's loss (logged as loss/aux);
    # unset: offline, the model config's router_aux_loss_coef (Qwen3-MoE 0.001); online, 0
    # (the 0.001 default was found to degrade RL); 0: off.
    router_aux_loss_coef: float | None = None
    moe: MoeConfig = field(default_factory=MoeConfig)

    @staticmethod
    def bad(name, value, expected):
        raise ConfigError(f"{name}: {value!r}; expected {expected}")

    def check_counts(
        self, at_least_one: tuple[str, ...] = (), not_negative: tuple[str, ...] = ()
    ) -> None:
        for name in AT_LEAST_ONE + at_least_one:
            if getattr(self, name) < 1:
                self.bad(name, getattr(self, name), ">= 1")
        for name in NOT_NEGATIVE + not_negative:
            if getattr(self, name) < 0:
                self.bad(name, getattr(self, name), ">= 0")

    def check(self) -> None:
        """The shared fields; subclasses call this and then check their own."""
        bad = self.bad
        if self.dtype not in ("auto", "bf16", "fp32", "fp16"):
            bad("dtype", self.dtype, "auto | bf16 | fp32 | fp16")
        if not self.lr > 0:  # inf passes: the non-finite guard stops that run
            bad("lr", self.lr, "> 0")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, getattr(self, name), "a value in [0, 1)")
        if not self.adam_eps > 0:
            bad("adam_eps", self.adam_eps, "> 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, " | ".join(SCHEDULES))
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", self.warmup_ratio, "a value in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", self.min_lr_ratio, "a value in [0, 1]")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", self.max_grad_norm, ">= 0 (0: no clipping)")
        self.check_counts()
        if self.padding not in PADDINGS:
            bad("padding", self.padding, " | ".join(PADDINGS))
        if self.attention not in ("auto", "eager", "sdpa"):
            bad("attention", self.attention, "auto | eager | sdpa")
        from posttrain.train.metrics import TRACKERS

        for name in self.trackers:
            if name not in TRACKERS:
                bad("trackers", name, " | ".join(TRACKERS))
        if self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, " | ".join(STRATEGIES))
        if self.strategy == "fsdp2" and self.lora.enabled and self.lora.init != "default":
            # Converting PiSSA / OLoRA into a plain LoRA loads the initial adapter into the
            # whole (unsharded) model; not done for sharded runs.
            bad(
                "lora.init",
                self.lora.init,
                "default with strategy=fsdp2 (pissa / olora: use strategy=ddp)",
            )
        self.lora.check()
        self.moe.check()
        check_aux_coef(self.router_aux_loss_coef)

    @property
    def adam_betas(self) -> tuple[float, float]:
        return self.adam_beta1, self.adam_beta2


@dataclass
class TrainConfig(BaseTrainConfig):
    method: str = "dpo"
    data: str = ""  # pairs (DPO family) or demonstrations / scored samples (SFT family)
    epochs: int = 1
    # > 0: exactly this many optimizer steps (cycling epochs), else epochs
    max_steps: int = 0
    # batches: rows (pairs or demonstrations) per micro-batch and process
    batch_size: int = 4
    grad_accum: int = 1
    group_by_length: bool = True  # batches of similar length: less padding
    max_length: int = 1024  # prompt + completion tokens
    # drop | truncate_completion | truncate_prompt (SFT family only; see data.py)
    length_policy: str = "drop"
    tokenize_workers: int = 1  # processes tokenising the data file (chunks of rows, in order)
    # losses (posttrain.losses)
    beta: float = 0.1
    label_smoothing: float = 0.0
    bdpo_lambda: float = 0.5
    nll_weight: float = 0.0  # RPO's alpha; the rpo preset sets 1.0
    sft_aggregation: str = "token_mean"  # token_mean | sequence_mean | sum
    ref_batch_size: int = 8  # pairs per no-grad forward of the reference pass (padding
    #                          longest; with padding none each sequence runs alone)
    ref_cache: bool = True  # keep reference log-probs beside the data for the next run
    # a LoRA adapter folder (PEFT) the policy starts from instead of a fresh adapter (an
    # iterative DPO round continues the last round's adapter); its r, alpha, rslora and targets
    # must be this config's lora settings
    init_adapter: str = ""
    # the DPO family's reference model: init (the policy as training starts: base +
    # init_adapter, the base when there is none) | base (the base model, without init_adapter)
    reference: str = "init"

    @property
    def preference(self) -> bool:
        return self.method in PREFERENCE_METHODS

    def check(self) -> None:
        bad = self.bad
        if self.method not in OFFLINE_METHODS:
            bad("method", self.method, " | ".join(OFFLINE_METHODS))
        if not self.data:
            bad("data", self.data, "a JSONL file (--data)")
        super().check()
        if self.moe.replay != "none":
            bad(
                "moe.replay",
                self.moe.replay,
                f"none with method {self.method} (routing replay "
                "is for the online methods, whose samples come from a rollout engine)",
            )
        self.check_counts(
            ("batch_size", "grad_accum", "max_length", "ref_batch_size", "tokenize_workers"),
            ("epochs",),
        )
        if self.epochs == 0 and self.max_steps == 0:
            bad("epochs", 0, ">= 1 (or max_steps > 0)")
        if self.length_policy not in LENGTH_POLICIES:
            bad("length_policy", self.length_policy, " | ".join(LENGTH_POLICIES))
        if self.preference and self.length_policy == "truncate_prompt":
            # a pair's prompt is never cut (train/data.py says why)
            bad(
                "length_policy", self.length_policy, f"drop | truncate_completion for {self.method}"
            )
        if self.sft_aggregation not in ("token_mean", "sequence_mean", "sum"):
            bad("sft_aggregation", self.sft_aggregation, "token_mean | sequence_mean | sum")
        if self.beta <= 0:
            bad("beta", self.beta, "> 0")
        self.check_start()
        if self.preference and self.lora.dropout:
            # The reference log-probs come from a pass without dropout; a policy with dropout
            # would differ from it by noise alone (train/modes.py), so it runs without too.
            bad(
                "lora.dropout",
                self.lora.dropout,
                f"0 for {self.method}: the DPO family runs "
                "the policy without dropout, as its reference pass",
            )

    def check_start(self) -> None:
        """init_adapter and reference: what the policy and the reference start from."""
        bad = self.bad
        if self.reference not in REFERENCES:
            bad("reference", self.reference, " | ".join(REFERENCES))
        if self.reference != "init" and not self.preference:
            bad("reference", self.reference, f"init: {self.method} has no reference model")
        if not self.init_adapter:
            return
        if not self.lora.enabled:
            bad("init_adapter", self.init_adapter, "unset with lora.enabled=false")
        if self.lora.init != "default":
            bad("lora.init", self.lora.init, "default with init_adapter (the adapter is loaded)")
        from pathlib import Path

        if not (Path(self.init_adapter) / "adapter_config.json").is_file():
            bad("init_adapter", self.init_adapter, "a LoRA adapter folder with adapter_config.json")


REFERENCES = ("init", "base")


def train_config(
    method: str, path: str | None = None, overrides: list[str] | None = None, **flags
) -> TrainConfig:
    """An offline method's config (`resolve_train_config`, refusing an online method)."""
    if method not in OFFLINE_METHODS:
        raise ConfigError(f"method: {method!r}; expected one of {' | '.join(OFFLINE_METHODS)}")
    return resolve_train_config(method, path=path, overrides=overrides, **flags)


def all_methods() -> tuple[str, ...]:
    """Every method `posttrain train` and a recipe's train.method accept, offline first."""
    from posttrain.train.online.config import METHODS

    return OFFLINE_METHODS + tuple(METHODS)


def config_class(method: str):
    """TrainConfig for the offline methods, OnlineConfig for the online ones."""
    if method in OFFLINE_METHODS:
        return TrainConfig
    from posttrain.train.online.config import METHODS, RENAMED, OnlineConfig

    if method in RENAMED:
        raise ConfigError(f"method {method!r} was renamed: use {RENAMED[method]}")
    if method not in METHODS:
        raise ConfigError(f"method: {method!r}; expected one of {' | '.join(all_methods())}")
    return OnlineConfig


def resolve_train_config(
    method: str,
    settings: dict | None = None,
    *,
    path: str | None = None,
    overrides: list[str] | None = None,
    where: str = "config",
    **flags,
):
    """The one resolver of train configs, offline (TrainConfig) or online (OnlineConfig) by
    method: defaults <- the method's preset <- `settings` (a recipe's train.config) <- YAML
    file <- --set overrides <- `flags` that are not None; then `check()`ed once. Errors name
    `where` (a recipe file and key, or "config" for `posttrain train`)."""
    cls = config_class(method)
    if cls is TrainConfig:
        preset = METHOD_PRESETS.get(method, {})
    else:
        from posttrain.train.online.config import METHODS

        preset = METHODS[method]
    base = merge({**preset, "method": method}, settings or {})
    data = merge(merge(base, load_yaml(path) if path else {}), parse_overrides(overrides))
    cfg = from_dict(cls, data, f"{where} (from {path} and --set)" if path else where)
    if cfg.method != method:
        raise ConfigError(f"method: the config says {cfg.method!r} but --method is {method!r}")
    for name, value in flags.items():
        if value is not None:
            setattr(cfg, name, value)
    check_config(cfg, where)
    return cfg


def check_config(cfg, where: str = "config") -> None:
    """`cfg.check()`, its error naming `where` ("config": as `posttrain train` always said)."""
    try:
        cfg.check()
    except ConfigError as e:
        if where == "config":
            raise
        raise ConfigError(f"{where}.{e}") from None
