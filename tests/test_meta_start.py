"""The sharded start-up on the meta device (posttrain/train/parallel/meta_start.py) under real
torchrun (gloo, 2 processes, fp32), on tiny random models written as several safetensors files:
a dense Llama with tied embeddings, a Qwen3-MoE (fused 3-D experts, stored per expert), a
Mixtral (w1 / w3 / w2 per expert), and the dense model after `posttrain expand` (llama-pro, one
new layer) trained fully in its new layer only (lora.enabled false, targets new-layers).

    .venv/bin/python -m pytest tests/test_meta_start.py -q

What must hold: the whole state gathered from the shards equals a normal load bitwise (every
base weight, the rotary buffers, tied embeddings still one parameter), each process read about
half of the weights, the adapter equals the one the whole-model path initialises from the same
seed, and the offline loop started on the meta device (checked: it did) gives the same two DPO
steps as the loop started from a whole model, with an adapter and, after expand, without. Tolerance on the metrics: 1e-5 relative; the two runs differ only
in where the reference pass ran (sharded with the adapter disabled, or whole before it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_offline import write_data

from posttrain.expand.depth import expand

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


def save_tiny(folder: Path, model, tok) -> str:
    model.save_pretrained(folder, max_shard_size="20KB")  # several files
    tok.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 2
    return str(folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory, embedded_dir):
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    root = tmp_path_factory.mktemp("meta-start")
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ids = {
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True, **small, **ids
        )
    )
    qwen = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=6,  # 3 per process
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            **small,
            **ids,
        )
    )
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            intermediate_size=48, num_key_value_heads=2, num_local_experts=4, **small, **ids
        )
    )
    pairs, _ = write_data(root / "data", n=8)
    dense_folder = save_tiny(root / "dense", dense, tok)
    # `posttrain expand` of the dense model: 1 new layer (llama-pro: a copy whose output
    # projections are zero), trained fully (no adapter) while the old layers stay frozen
    expanded = expand(dense_folder, "llama-pro", 1, root / "expanded")
    cases = [
        {
            "name": "dense",
            "folder": dense_folder,
            "targets": "all-linear",
            "data": str(pairs),
        },
        {
            "name": "qwen3moe",
            "folder": save_tiny(root / "qwen3moe", qwen, tok),
            "targets": "all-linear,all-router,experts",
            "data": str(pairs),
        },
        {
            "name": "expanded-full",
            "folder": str(expanded),
            "targets": "new-layers",
            "data": str(pairs),
            "full": True,
        },
        {
            "name": "mixtral",
            "folder": save_tiny(root / "mixtral", mixtral, tok),
            "targets": "all-linear,experts",
        },
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "meta_start_worker.py"),
            str(root / "cases.json"),
            str(root / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    (root / "worker.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {c["name"]: json.loads((root / "out" / f"{c['name']}.json").read_text()) for c in cases}


@pytest.mark.parametrize("case", ["dense", "qwen3moe", "mixtral"])
def test_the_gathered_shards_equal_a_normal_load_bitwise(results, case):
    r = results[case]
    assert r["missing"] == [] and r["extra"] == [] and r["unequal"] == []
    assert r["inv_freq_equal"]
    assert r["tied"] == r["config_tied"]
    # the adapter: the whole-model path's init_lora from the same seed, B = 0
    assert r["lora_count"] > 0 and r["lora_unequal"] == [] and r["lora_b_max"] == 0.0
    # each process read its half of the base weights (uneven splits: within a row per tensor)
    assert sum(r["bytes_read"]) <= r["whole_bytes"]
    for b in r["bytes_read"]:
        assert abs(b - r["whole_bytes"] / 2) < 0.1 * r["whole_bytes"], r["bytes_read"]


def test_tied_embeddings_stay_tied(results):
    assert results["dense"]["config_tied"] and results["dense"]["tied"]


@pytest.mark.parametrize("case", ["dense", "qwen3moe", "expanded-full"])
def test_two_dpo_steps_equal_those_started_from_a_whole_model(results, case):
    meta, whole = results[case]["meta_rows"], results[case]["whole_rows"]
    assert results[case]["meta_refusal"] is None  # it did start on the meta device
    assert results[case]["whole_refusal"] == "the model was given as an object"
    assert len(meta) == len(whole) == 2
    for a, b in zip(meta, whole):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
            if key in b:
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (key, a, b)
    # step 2 moved away from step 1: the adapter trained (the comparison is not of constants)
    assert meta[1]["loss"] != meta[0]["loss"]
