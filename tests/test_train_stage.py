"""The training stage as a function: `train.nproc: 2` launches torchrun with 2 real processes and
checks their exit code (a failing trainer is an error naming the code, not a silent success)."""

from __future__ import annotations

import pytest

from posttrain.demos import demonstration_rows
from posttrain.records import write_jsonl
from posttrain.tasks import load_problems
from posttrain.pipeline.recipe import TrainStage
from posttrain.train.stage import train_stage

STAGE = TrainStage(
    method="sft",
    nproc=2,
    config={
        "dtype": "fp32",
        "max_steps": 2,
        "batch_size": 1,
        "num_threads": 1,
        "lora": {"r": 2, "alpha": 4},
    },
)


@pytest.mark.slow
@pytest.mark.distributed
def test_train_stage_under_torchrun(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "demos.jsonl"
    write_jsonl(data, demonstration_rows(load_problems("builtin:arith:4?split=train")))
    out = tmp_path / "run"
    train_stage(STAGE, out, model=tiny_model_dir, data=str(data), progress=False)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "recipe-train.yaml").exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": "not a list"}\n')
    with pytest.raises(RuntimeError, match="torchrun \\(2 processes\\) failed with exit code"):
        train_stage(
            STAGE, tmp_path / "broken-run", model=tiny_model_dir, data=str(broken), progress=False
        )
