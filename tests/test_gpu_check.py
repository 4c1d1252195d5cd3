"""The GPU check (bench/gpu_check.py) in its CPU mode: the same parts on tiny models, so the
script that a GPU machine runs cannot rot between GPU sessions.

    .venv/bin/python -m pytest tests/test_gpu_check.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_cpu_mode():
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object: logs go to stderr
    assert proc.returncode == 0, (result, proc.stderr[-3000:])
    parts = result["parts"]
    assert set(parts) == {"matmul", "sample", "dpo", "grpo", "moe", "meta_startup", "fsdp2"}
    assert not [name for name, p in parts.items() if "error" in p]
    assert parts["matmul"]["tflops"] > 0
    assert parts["sample"]["completions"] == 4 * 2  # 4 prompts x G 2 (tiny)
    # DPO with a fresh adapter (B = 0): policy = reference, so step 1's loss is ln 2
    assert parts["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert parts["dpo"]["steps"] == 2 and parts["dpo"]["tokens_per_s"] > 0
    assert 0 < parts["dpo"]["mfu"] and 0 < parts["dpo"]["hfu_lora"]
    # MoE: ln 2 + coef x the balance loss (router_aux_loss_coef 0.01), the aux actually added
    moe = parts["moe"]
    assert moe["first_loss"] == pytest.approx(math.log(2) + 0.01 * moe["first_aux"], abs=1e-5)
    assert parts["grpo"]["steps"] == 1
    assert parts["fsdp2"]["processes"]["sharded"] is True
    assert parts["fsdp2"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the fsdp2 part's model is a local safetensors folder: it started on the meta device
    assert parts["meta_startup"]["fsdp2_part_started_on_meta"] is True
