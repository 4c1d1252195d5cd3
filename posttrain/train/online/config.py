"""Typed settings of `posttrain train` for the online methods (GRPO family, CISPO, CHORD,
on-policy distillation).

    posttrain train --method grpo --problems "builtin:arith:512?split=train" --out runs/grpo \
        --set rollout.engine.kind=hf --set rollout.sync=adapter --set max_steps=40

Precedence as for the offline methods (train/config.py): defaults <- the method's preset
(METHODS) <- `--config FILE.yaml` <- `--set key=value` <- `--model` / `--problems`. The model,
precision, AdamW, schedule, checkpoint and LoRA settings come from `BaseTrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import ConfigError
from posttrain.engines.config import check_url
from posttrain.train.config import OFFLINE_METHODS, BaseTrainConfig, resolve_train_config
from posttrain.train.online.rollout_config import RolloutConfig, check_rollout

# The aggregations losses/policy_gradient.py implements, named here so that a config is checked
# without importing torch (a recipe's typo fails in well under a second); a test keeps the two
# equal.
AGGREGATIONS = ("grpo", "token_mean", "dapo", "dr_grpo")

# Method name -> the settings it implies (under the user's YAML and --set overrides).
METHODS: dict[str, dict] = {
    "grpo": {"aggregation": "grpo", "advantage_scale": "group"},
    # Dr. GRPO (Liu et al. 2025): no std division; token sum / (B * max_new_tokens).
    "dr-grpo": {"aggregation": "dr_grpo", "advantage_scale": "none"},
    # DAPO (Yu et al. 2025): clip-higher 0.28, token-level loss over the whole batch, dynamic
    # sampling on accuracy, soft overlong punishment (paper: a 4096-token buffer of 20480 =
    # 20 %), no KL.
    "dapo": {
        "aggregation": "dapo",
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dynamic_sampling": True,
        "overlong_buffer": 0.2,
        "kl_beta": 0.0,
    },
    # GRPO whose per-token loss is averaged over the tokens of each micro-batch (what TRL calls
    # "bnpo"; not the BNPO paper's beta-normalised method, hence the name).
    "grpo-token-mean": {"aggregation": "token_mean"},
    # GSPO (Zheng et al. 2025, v2 sec. 5.1): sequence-level ratio, clip ranges 3e-4 / 4e-4, no
    # KL. The clip only acts off-policy, i.e. with updates_per_batch > 1.
    "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "kl_beta": 0.0},
    # CISPO (MiniMax-M1, Chen et al. 2025): sg(clip(r, 1 - low, 1 + high)) A log p on every
    # token; the paper sets no lower bound (low 1.0 -> 0) and tunes only the upper one.
    # Token-level aggregation over the step, as the paper's normalisation by all tokens.
    "cispo": {
        "loss": "cispo",
        "clip_low": 1.0,
        "clip_high": 0.28,
        "kl_beta": 0.0,
        "aggregation": "dapo",
    },
    "chord": {"aggregation": "grpo", "advantage_scale": "group"},
    # On-policy distillation (losses/distill.py): per-token advantage log p_teacher -
    # log p_student of the student's samples, PPO-clipped ratio, the token mean over the step.
    "distill": {"aggregation": "dapo", "advantage_scale": "group"},
}
RENAMED = {
    "bnpo": "grpo-token-mean (aggregation token_mean): it averages the loss over the "
    "tokens of each micro-batch; it is not the BNPO paper's method"
}


@dataclass
class ChordConfig:
    variant: str = "mu"  # mu: plain SFT term; phi: SFT weighted by p(1 - p) per token
    demos: str = ""  # demonstrations (messages / prompt + completion) or scored rows (correct)
    ratio: float = 0.5  # demonstrations per step = max(1, round(ratio * problems_per_step))
    max_length: int = 1024  # longer demonstrations are dropped (and counted)
    # mu = losses.mu_schedule(step, ...); for a constant mu set mu_peak == mu_valley.
    mu_peak: float = 0.9
    mu_valley: float = 0.05
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 100


@dataclass
class DistillConfig:
    """method distill: the teacher that scores the student's samples (train/online/teacher.py)."""

    # Exactly one of teacher / teacher_url. teacher: a local model folder (config.json) or the
    # embedded smollm2-135m, loaded in the trainer's process (no gradient, eval mode, the
    # policy's dtype). Either way its tokenizer must be the student's (checked at start).
    teacher: str = ""
    teacher_adapter: str = ""  # a LoRA adapter folder merged into the in-process teacher
    # teacher_url: a vLLM OpenAI-compatible server (http://host:port/v1) scoring the student's
    # tokens with /v1/completions `prompt_logprobs` (train/online/teacher.py ServerTeacher);
    # teacher_model: the name it serves the teacher under (a LoRA adapter's name, too).
    # Prompt log-probs are of the raw distribution: temperature must be 1 with a server.
    teacher_url: str = ""
    teacher_model: str = ""
    # advantage += reward_weight x the group advantage of the verifiable reward
    reward_weight: float = 0.0


@dataclass
class OnlineConfig(BaseTrainConfig):
    method: str = "grpo"  # see METHODS
    problems: str = "builtin:arith:512?split=train"
    limit: int = 0  # > 0: only the first N problems
    system_prompt: str | None = None
    # rollouts
    num_generations: int = 4  # G: completions per problem
    problems_per_step: int = 4  # over all processes; each takes an equal share of the groups
    max_new_tokens: int = 64
    # The policy trained is softmax(logits / temperature) (the distribution sampled from).
    # top_p < 1 samples from a renormalised nucleus the loss does not model (rollouts.py).
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 16  # sequences per generate call
    dynamic_sampling: bool = False  # drop groups all right or all wrong, draw again (DAPO)
    max_sampling_rounds: int = 3  # generate calls per step at most, with dynamic sampling
    # reward = grader reward + format_reward * format_ok - overlong penalty
    format_reward: float = 0.0
    overlong_buffer: float = 0.0  # share of max_new_tokens in DAPO's soft-penalty zone; 0: off
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens
    mask_truncated: bool = False  # truncated completions keep their reward but get no loss
    # loss (posttrain.losses.policy_loss; offpolicy.cispo_loss)
    loss: str = "ppo"  # ppo (clipped ratio) | cispo (clipped, detached IS weight)
    aggregation: str = "grpo"  # grpo | token_mean | dapo | dr_grpo
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    ratio_level: str = "token"  # token | sequence (GSPO)
    clip_low: float = 0.2
    clip_high: float | None = None  # None: clip_low; DAPO's clip-higher: 0.28
    kl_beta: float = 0.0  # k3 KL to the base model (adapter disabled)
    updates_per_batch: int = 1  # optimizer steps on each sampled batch (PPO epochs)
    micro_batch_size: int = 8  # sequences per forward / backward (gradients accumulate)
    # optimisation: BaseTrainConfig's, with these defaults
    lr: float = 2e-5
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_steps: int = 40  # rollout steps (optimizer steps = max_steps * updates_per_batch)
    checkpoint_every: int = 10  # rollout steps
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    chord: ChordConfig = field(default_factory=ChordConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def check(self) -> None:
        bad = self.bad
        if self.method in RENAMED or self.aggregation == "bnpo":
            raise ConfigError(f"'bnpo' was renamed: use {RENAMED['bnpo']}")
        if self.method not in METHODS:
            bad("method", self.method, " | ".join(METHODS))
        super().check()
        if self.num_generations < 2:
            bad("num_generations", self.num_generations, ">= 2 (advantages need a group)")
        self.check_counts(
            (
                "problems_per_step",
                "max_new_tokens",
                "updates_per_batch",
                "max_steps",
                "micro_batch_size",
                "generation_batch_size",
                "max_sampling_rounds",
            ),
            ("limit",),
        )
        if self.temperature <= 0:
            bad("temperature", self.temperature, "> 0 (RL needs sampling; the loss uses it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "a value in (0, 1]")
        if self.loss not in ("ppo", "cispo"):
            bad("loss", self.loss, "ppo | cispo")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", self.aggregation, " | ".join(AGGREGATIONS))
        if self.advantage_scale not in ("group", "batch", "none"):
            bad("advantage_scale", self.advantage_scale, "group | batch | none")
        if self.ratio_level not in ("token", "sequence"):
            bad("ratio_level", self.ratio_level, "token | sequence")
        if self.loss == "cispo" and self.ratio_level != "token":
            bad("ratio_level", self.ratio_level, "token with loss cispo")
        if not 0.0 <= self.overlong_buffer <= 1.0:
            bad("overlong_buffer", self.overlong_buffer, "a share of max_new_tokens in [0, 1]")
        if self.kl_beta > 0 and not self.lora.enabled:
            bad(
                "kl_beta",
                self.kl_beta,
                "0 with lora.enabled false (the KL reference is the "
                "model with its adapter disabled)",
            )
        if self.kl_beta > 0 and self.lora.init != "default":
            bad(
                "kl_beta",
                self.kl_beta,
                f"0 with lora.init {self.lora.init}: with the adapter "
                "disabled that model is the residual base, not the model trained from",
            )
        check_rollout(self)
        if self.method == "distill":
            self._check_distill()
        self._check_unused()
        self._check_strategy()
        if self.method == "chord":
            c = self.chord
            if c.variant not in ("mu", "phi"):
                bad("chord.variant", c.variant, "mu | phi")
            if not c.demos:
                bad("chord.demos", c.demos, "a JSONL file of demonstrations")
            if not (0.0 <= c.mu_valley <= 1.0 and 0.0 <= c.mu_peak <= 1.0):
                bad("chord.mu_peak/mu_valley", (c.mu_peak, c.mu_valley), "values in [0, 1]")
            if c.ratio <= 0:
                bad("chord.ratio", c.ratio, "> 0")

    def _check_unused(self) -> None:
        """A setting that the chosen options never read is an error, not silently ignored."""
        default, r, d = OnlineConfig(), self.rollout, RolloutConfig()
        unused = {
            "chord": self.method != "chord" and self.chord != ChordConfig(),
            "distill": self.method != "distill" and self.distill != DistillConfig(),
            "max_sampling_rounds": not self.dynamic_sampling
            and self.max_sampling_rounds != default.max_sampling_rounds,
            "overlong_penalty": self.overlong_buffer == 0
            and self.overlong_penalty != default.overlong_penalty,
            "rollout.tis_cap": r.correction != "tis" and r.tis_cap != d.tis_cap,
            "rollout.mis_low/mis_high": r.correction != "mis"
            and (r.mis_low, r.mis_high) != (d.mis_low, d.mis_high),
            "rollout.correction_level": r.correction == "none"
            and r.correction_level != d.correction_level,
            "rollout.max_staleness": r.mode == "sync" and r.max_staleness != d.max_staleness,
        }
        for name, is_unused in unused.items():
            if is_unused:
                raise ConfigError(
                    f"{name}: set, but not used with method {self.method!r} and "
                    f"these settings (chord needs method chord; distill method distill; "
                    f"max_sampling_rounds dynamic_sampling; overlong_penalty "
                    f"overlong_buffer > 0; the rollout.* knobs their correction; "
                    "rollout.max_staleness rollout.mode async)"
                )

    def _check_distill(self) -> None:
        """Exactly one teacher: a local folder or a server (with the name it serves it under);
        the options the per-token advantage cannot honour are refused. Its files (a folder) are
        checked by check_teacher_files, its server and tokenizer when training starts."""
        bad, d = self.bad, self.distill
        if bool(d.teacher) == bool(d.teacher_url):
            raise ConfigError(
                f"distill.teacher ({d.teacher!r}) and distill.teacher_url ({d.teacher_url!r}): "
                "expected exactly one teacher: a local model folder (config.json) or a server"
            )
        if "://" in d.teacher:
            bad("distill.teacher", d.teacher, "a local model folder; a server: teacher_url")
        if not d.teacher_url and d.teacher_model:
            bad("distill.teacher_model", d.teacher_model, "empty without distill.teacher_url")
        if d.teacher_url:
            check_url(d.teacher_url, "distill.teacher_url:")
            if not d.teacher_model:
                bad("distill.teacher_model", "", "the name the server serves the teacher under")
            if d.teacher_adapter:  # vllm serve --enable-lora --lora-modules NAME=PATH
                bad("distill.teacher_adapter", d.teacher_adapter, "empty with teacher_url")
            if self.temperature != 1.0:
                # vLLM's prompt_logprobs are of softmax(logits) whatever the logprobs mode;
                # softmax(logits / T) of one token needs every logit of the position
                raise ConfigError(
                    f"temperature: {self.temperature:g} with distill.teacher_url: a server "
                    "teacher's prompt log-probs are of the untempered distribution, and the "
                    "student is scored at the sampling temperature; expected temperature 1.0 "
                    "(or an in-process teacher, distill.teacher)"
                )
        if d.reward_weight < 0:
            bad("distill.reward_weight", d.reward_weight, ">= 0")
        if self.loss != "ppo":
            bad("loss", self.loss, "ppo with method distill (per-token advantages)")
        if self.dynamic_sampling:
            # a group all right or all wrong still carries the teacher's per-token signal
            bad("dynamic_sampling", True, "false with method distill (every token has a signal)")

    def check_teacher_files(self) -> None:
        """method distill: the teacher is a local model folder (or the embedded model) and its
        adapter a LoRA folder. Checked when training starts (train/launch.check_inputs), not at
        load: a recipe may name the adapter of a run that has not happened yet."""
        from pathlib import Path

        from posttrain.models import EMBEDDED

        bad, d = self.bad, self.distill
        if self.method != "distill" or d.teacher_url:  # a server: checked when it is asked
            return
        if d.teacher != EMBEDDED and not (Path(d.teacher).expanduser() / "config.json").is_file():
            bad(
                "distill.teacher", d.teacher, f"a local model folder with config.json or {EMBEDDED}"
            )
        if d.teacher_adapter and not (Path(d.teacher_adapter) / "adapter_config.json").is_file():
            bad(
                "distill.teacher_adapter",
                d.teacher_adapter,
                "a LoRA adapter folder with adapter_config.json (e.g. RUN/train/adapter)",
            )

    def _check_strategy(self) -> None:
        """Strategies the online loop cannot honour are refused, naming both (no fallback)."""
        if self.strategy == "deepspeed":
            raise ConfigError(
                f"strategy: 'deepspeed' with method {self.method!r}: the online loop does not "
                "run under DeepSpeed ZeRO-3 (its engine steps inside backward); use "
                "strategy=fsdp2 (shards on CPU and GPU) or ddp"
            )
        if self.strategy == "fsdp2" and self.rollout.sync == "live":
            # FSDP2 all-gathers in every forward: generate's forwards (as many as the longest
            # completion of each process's own prompts) would differ between processes.
            raise ConfigError(
                f"rollout.sync: 'live' with strategy fsdp2 (method {self.method!r}): the "
                "engine cannot sample a sharded model; set rollout.sync=adapter (the engine "
                "keeps its own weights and loads the adapter after each update)"
            )


def online_config(
    method: str, path: str | None = None, overrides: list[str] | None = None, **flags
) -> OnlineConfig:
    """An online method's config (`train.config.resolve_train_config`, refusing an offline
    method)."""
    if method in OFFLINE_METHODS:
        raise ConfigError(f"method: {method!r} is offline; expected one of {' | '.join(METHODS)}")
    return resolve_train_config(method, path=path, overrides=overrides, **flags)
