"""GRPO with a rollout engine that holds its own weights (in-process vLLM, a vLLM server), run
twice: in sync, and with one adapter load skipped. Shared by tests/vllm_engine_checks.py (the
in-process engine, under the vLLM venv) and tests/test_online_engines.py (the session's server).

    from online_sync_checks import sync_checks
    results = sync_checks(engine, model_dir, out_dir, kind="vllm")   # a JSON-able dict
    results = sync_checks(None, model_dir, out_dir, kind="openai", engine_settings=[...])

Both runs train the embedded model in fp32 with LoRA r 8 at lr 1e-4 for 2 steps of 4 problems
x 4 completions (16 new tokens at most). The reward is the parity of the sum of the sampled
token ids: not a grader under test, but a reward that differs within almost every group (a
group of 4 is all even or all odd with probability 1/8, all four groups 1/4096), so step 1
always moves the policy and a skipped sync is visible at step 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from stub_rewards import graded

SETTINGS = [
    "num_generations=4",
    "problems_per_step=4",
    "max_new_tokens=16",
    "temperature=1.0",
    "lr=1e-4",
    "lora.r=8",
    "dtype=fp32",
    "max_steps=2",
    "checkpoint_every=0",
    "micro_batch_size=16",
    "generation_batch_size=16",
    "num_threads=1",
    "rollout.sync=adapter",
]


def parity_score(problem, index, messages, completion, *, think_open, engine, cfg) -> dict:
    """Reward 1 when the sampled token ids sum to an even number (module docstring)."""
    return graded(float(sum(completion.token_ids) % 2 == 0), completion.finish_reason == "length")


class Loads:
    """The engine, recording the adapter names it is asked to load; load number `skip`
    (1: the initial adapter, k + 1: the one after step k) is left out on purpose."""

    def __init__(self, engine, skip: int | None = None):
        self.engine, self.skip, self.names = engine, skip, []

    def load_adapter(self, path, name):
        self.names.append(name)
        if len(self.names) != self.skip:
            self.engine.load_adapter(path, name)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def sync_checks(
    engine, model_dir: str, out: str | Path, *, kind: str, engine_settings: list[str] = ()
) -> dict:
    """The in-sync run's metrics rows and loaded names, then the run whose load after step 1
    is skipped: its rows and the RolloutSyncError it stopped with (None if it did not).
    `engine` None: the one `rollout.engine` (kind and `engine_settings`) describes."""
    from posttrain.train.online.loop import online_config, train_online
    from posttrain.train.online.rollout_engine import RolloutSyncError

    cfg = online_config(
        "grpo",
        overrides=[*SETTINGS, f"rollout.engine.kind={kind}", *engine_settings],
        model=model_dir,
        problems="builtin:arith:64?split=train",
    )
    built = engine is None
    if built:  # from the config, as `posttrain train` builds it
        from posttrain.models import load_tokenizer
        from posttrain.train.online.rollout_engine import make_rollout_engine

        engine = make_rollout_engine(cfg, None, load_tokenizer(model_dir))
    out = Path(out)
    results: dict = {}
    for name, skip in (("in_sync", None), ("skipped", 2)):
        wrapped = Loads(engine, skip)
        error = None
        try:
            train_online(cfg, out / name, engine=wrapped, score=parity_score)
        except RolloutSyncError as e:
            error = str(e)
        rows = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
        results[name] = {"rows": rows, "loaded": wrapped.names, "error": error}
    if built:
        engine.close()
    return results


def check_sync_results(results: dict, kind: str, kl_tol: float, logp_tol: float) -> None:
    """What the two runs must show (the tests' assertions, shared by both engines):
    in sync, the engine was given the adapter saved after each step (policy-TAG-step-0
    before step 1, policy-TAG-step-1 before step 2) and its log-probs of the sampled tokens
    equal the trainer's within `kl_tol` (k3 KL) and `logp_tol` (largest |difference|), while
    step 1 moved the policy (grad norm > 0); with the load after step 1 skipped, the run
    stops at step 2, before its update, with RolloutSyncError naming the step and the engine,
    its KL at least 100x the in-sync one."""
    import re

    ok, bad = results["in_sync"], results["skipped"]
    assert ok["error"] is None, ok["error"]
    assert [r["step"] for r in ok["rows"]] == [1, 2]
    assert [n.rsplit("-", 1)[1] for n in ok["loaded"]] == ["0", "1", "2"]
    assert len({n.rsplit("-step-", 1)[0] for n in ok["loaded"] + bad["loaded"]}) == 2  # a run
    # tags its names: the second run never loads under the first one's names
    assert ok["rows"][0]["grad_norm"] > 0
    for r in ok["rows"]:
        assert r["mismatch/kl"] < kl_tol and r["mismatch/abs_logp_max"] < logp_tol, r
    assert bad["error"] is not None, "the run with a skipped adapter load did not stop"
    assert re.match(
        rf"step 2: the rollout engine \({kind}\) is not sampling the current policy", bad["error"]
    ), bad["error"]
    assert [r["step"] for r in bad["rows"]] == [1]
    assert [n.rsplit("-", 1)[1] for n in bad["loaded"]] == ["0", "1"]
    stale_kl = float(re.search(r"mismatch/kl (\S+) >", bad["error"]).group(1))
    assert stale_kl > 100 * max(r["mismatch/kl"] for r in ok["rows"])
