"""The training stage as a function: `nproc=2` launches torchrun with 2 real processes on the
resolved config (`-m posttrain.train.launch OUT/launch.yaml`) and checks their exit code (a
failing trainer is an error naming the code, not a silent success)."""

from __future__ import annotations

import pytest

from posttrain.demos import demonstration_rows
from posttrain.records import write_jsonl
from posttrain.tasks import load_problems
from posttrain.config import load_yaml
from posttrain.train.config import resolve_train_config
from posttrain.train.launch import launch_command
from posttrain.train.stage import train_stage

SETTINGS = {
    "dtype": "fp32",
    "max_steps": 2,
    "batch_size": 1,
    "num_threads": 1,
    "lora": {"r": 2, "alpha": 4},
}


def test_the_launch_command_is_torchrun_on_the_saved_config():
    command = launch_command("runs/x/launch.yaml", 4, resume=True)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        "-m",
        "posttrain.train.launch",
        "runs/x/launch.yaml",
        "--resume",
        "--no-progress",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_train_stage_under_torchrun(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "demos.jsonl"
    write_jsonl(data, demonstration_rows(load_problems("builtin:arith:4?split=train")))
    out = tmp_path / "run"
    cfg = resolve_train_config("sft", SETTINGS, model=tiny_model_dir, data=str(data))
    train_stage(cfg, out, nproc=2, progress=False)
    assert (out / "adapter" / "adapter_config.json").exists()
    # the workers trained the config as resolved here, not one they rebuilt
    assert load_yaml(out / "launch.yaml") == load_yaml(out / "config.yaml")
    assert load_yaml(out / "config.yaml")["data"] == str(data)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": "not a list"}\n')
    cfg = resolve_train_config("sft", SETTINGS, model=tiny_model_dir, data=str(broken))
    with pytest.raises(RuntimeError, match="torchrun \\(2 processes\\) failed with exit code"):
        train_stage(cfg, tmp_path / "broken-run", nproc=2, progress=False)
