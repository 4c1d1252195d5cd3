"""Sharded training (strategy=fsdp2, torch fully_shard) on 2 CPU processes (gloo), and the
trainer defects fixed with it: fp32 master weights for full fine-tuning, weights_only RNG state,
DCP metadata read without running code, deepspeed refused without CUDA.

    .venv/bin/python -m pytest tests/test_train_fsdp.py -q        # -m distributed: torchrun tests

Tolerance of the 1-vs-2-process comparisons: fp32 summation order only (the two processes'
gradients are averaged by a reduce-scatter instead of summed in one backward): 1e-5 relative on
the loss, 1e-4 relative (or 1e-4 of the tensor's largest entry) on gradients and norms.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_train_invariance import assert_grads_close
from test_train_offline import write_data

from posttrain.config import ConfigError
from posttrain.train.config import train_config

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(model, data, *settings, method="dpo"):
    return train_config(
        method,
        None,
        ["dtype=fp32", "lora.r=4", "lora.alpha=8", *settings],
        model=model,
        data=str(data),
    )


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def worker_out(tiny_model_dir, tmp_path_factory):
    """tests/train_fsdp_worker.py under torchrun, 2 processes: step 1 and per-rank storage."""
    folder = tmp_path_factory.mktemp("fsdp-worker")
    pairs, _ = write_data(folder / "data", n=4)
    lines = pairs.read_text().splitlines(keepends=True)
    (folder / "data" / "pairs3.jsonl").write_text("".join(lines[:3]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "train_fsdp_worker.py"),
            tiny_model_dir,
            str(pairs),
            str(folder / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


@pytest.mark.distributed
@pytest.mark.parametrize("pairs", [4, 3])
def test_fsdp2_step_one_loss_and_lora_gradients_equal_one_process(
    tiny_model_dir, worker_out, pairs
):
    """2 processes x 2 accumulation steps x 1 pair, LoRA inside fully_shard-ed layers, against
    1 process x 4 pairs unwrapped: same DPO loss, same whole LoRA gradients (gathered from
    the shards), same total gradient norm (computed from the shards by clip). With 3 pairs
    process 1 has one micro-batch to process 0's two, and must still take part in both
    passes' collectives (else FSDP2 hangs) without adding to the gradient."""
    from accelerate import Accelerator
    from train_dist_worker import one_step

    two = torch.load(worker_out / "out" / ("step.pt" if pairs == 4 else "step3.pt"))
    data = worker_out / "data" / ("pairs.jsonl" if pairs == 4 else "pairs3.jsonl")
    loss, grads = one_step(cfg_for(tiny_model_dir, data, "batch_size=4"), Accelerator(cpu=True))
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert two["loss"] == pytest.approx(loss, rel=1e-5)
    assert_grads_close(two["grads"], grads)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    assert two["grad_norm"] == pytest.approx(norm, rel=1e-4)


@pytest.mark.distributed
def test_fsdp2_full_finetune_stores_at_most_055_of_ddp_per_process(worker_out):
    """Measured, not assumed: each process's local shards of the parameters, gradients and
    AdamW state of a full fine-tune. The shards of the two processes partition the model
    (their element counts add up to DDP's), and each holds <= 0.55 of what DDP holds
    (1/2 plus the uneven split of odd first dimensions)."""
    ranks = [json.loads((worker_out / "out" / f"storage-{r}.json").read_text()) for r in (0, 1)]
    ddp = ranks[0]["ddp"]
    assert ranks[1]["ddp"] == ddp  # DDP: a whole replica on each process
    assert sum(r["fsdp2"]["param_numel"] for r in ranks) == ddp["param_numel"]
    assert ddp["grad_bytes"] == ddp["param_bytes"] and ddp["optim_bytes"] == 2 * ddp["param_bytes"]
    for r in ranks:
        for key in ("param_bytes", "grad_bytes", "optim_bytes"):
            assert r["fsdp2"][key] <= 0.55 * ddp[key], (key, r["fsdp2"], ddp)


def running_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # after "(comm)": state ppid pgrp
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def killed_and_straight(tiny_model_dir, tmp_path_factory):
    """Two `posttrain train --nproc 2 ... strategy=fsdp2` SFT runs of 12 steps with LoRA
    dropout (the RNG state matters; the DPO family runs without dropout): one straight through; one whose torchrun launcher gets SIGKILL
    after step 3 (the newest checkpoint is step 2), then rerun with --resume. The workers must
    die with the launcher (host.die_with_launcher), not train on as orphans."""
    folder = tmp_path_factory.mktemp("fsdp-resume")
    _, demos = write_data(folder / "data", n=8)
    args = [
        "train",
        "--method",
        "sft",
        "--model",
        tiny_model_dir,
        "--data",
        str(demos),
        "--nproc",
        "2",
        "--no-progress",
    ]
    for item in (
        "dtype=fp32",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "lr=1e-3",
        "batch_size=2",
        "max_steps=12",
        "checkpoint_every=2",
        "strategy=fsdp2",
    ):
        args += ["--set", item]
    straight, resumed = folder / "straight", folder / "resumed"
    run_cli(*args, "--out", str(straight), env=ENV)

    # `posttrain train --nproc` execs torchrun: this pid is the launcher; the workers are its
    # children, in a session of their own so that the test can see them all go.
    killed = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", *args, "--out", str(resumed)],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = resumed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    while running_in_group(killed.pid):  # SIGKILL from their parent's death
        assert time.monotonic() < deadline, "torchrun's workers outlived their launcher"
        time.sleep(0.05)
    steps_before = len(log.read_text().splitlines())
    assert 3 <= steps_before < 12 and not (resumed / "adapter").exists()
    run_cli(*args, "--out", str(resumed), "--resume", env=ENV)
    return straight, resumed, steps_before


@pytest.mark.distributed
def test_fsdp2_kill_9_then_resume_ends_bitwise_equal(killed_and_straight):
    straight, resumed, steps_before = killed_and_straight
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7  # A and B, 2 layers x 7 linears
    assert all(torch.equal(a[k], b[k]) for k in a), steps_before
    ra, rb = metrics(straight), metrics(resumed)
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert (straight / "checkpoints" / "step-00000012" / "sharded" / ".metadata").exists()


@pytest.mark.distributed
def test_fsdp2_adapter_loads_with_eval_and_export(tiny_model_dir, killed_and_straight, tmp_path):
    """The gathered adapter is an ordinary PEFT folder: `export` merges it, the eval engine
    loads it, and both give the logits of base + adapter (which differ from the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.engines import SamplingParams, make_engine
    from posttrain.evaluation.evaluate import evaluate
    from posttrain.export import export_merged
    from posttrain.tasks import load_problems

    adapter = killed_and_straight[0] / "adapter"
    merged = export_merged(adapter, tmp_path / "merged", dtype="fp32")
    ids = torch.randint(0, 1000, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        want = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(
            input_ids=ids
        ).logits
    assert (want - before).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    engine = make_engine("hf", tiny_model_dir, dtype="fp32", adapter=str(adapter))
    summary = evaluate(
        engine,
        load_problems("builtin:arith:2?split=test"),
        tmp_path / "eval",
        SamplingParams(temperature=0.0, max_new_tokens=4),
        progress=False,
    )
    assert summary["n"] == 2 and (tmp_path / "eval" / "items.jsonl").exists()


def test_deepspeed_without_cuda_is_refused_clearly(tiny_model_dir, tmp_path):
    from posttrain.train.offline.loop import train

    pairs, _ = write_data(tmp_path / "data", n=2)
    with pytest.raises(ConfigError, match="'deepspeed' needs CUDA"):
        train(
            cfg_for(tiny_model_dir, pairs, "strategy=deepspeed"), tmp_path / "run", progress=False
        )
    with pytest.raises(ConfigError, match="strategy: 'zero3'; expected ddp | fsdp2 | deepspeed"):
        cfg_for(tiny_model_dir, pairs, "strategy=zero3")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_full_finetune_in_bf16_keeps_fp32_master_weights(tiny_model_dir, tmp_path):
    """dtype=bf16, lora.enabled=false: the weights AdamW updates are fp32 and move by lr.
    AdamW's first step moves each weight by lr * m/sqrt(v) = lr * g/|g| = 1e-5 (for g != 0).
    A bf16 weight near 0.02 has a spacing of 2**-6 * 2**-7 = 1.2e-4: pure-bf16 AdamW would
    round that step away and leave it unchanged. The forward runs in bf16 (autocast)."""
    from posttrain.models import load_model
    from posttrain.train.offline.loop import train

    _, demos = write_data(tmp_path / "data", n=2)
    model = load_model(tiny_model_dir, dtype="fp32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append((args[0].dtype, out.dtype))
    )
    train(
        cfg_for(
            tiny_model_dir,
            demos,
            "dtype=bf16",
            "lora.enabled=false",
            "lr=1e-5",
            "batch_size=2",
            "max_steps=1",
            "warmup_ratio=0",
            "max_grad_norm=0",
            method="sft",
        ),
        tmp_path / "run",
        model=model,
        progress=False,
    )
    assert seen and seen[0] == (torch.bfloat16, torch.bfloat16)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32
    step = (weight.detach() - before["model.layers.0.self_attn.q_proj.weight"]).abs()
    assert step.max() == pytest.approx(1e-5, rel=0.01)
    assert (step > 0.5e-5).float().mean() > 0.9  # nearly every weight moved by ~lr
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    with pytest.raises(ConfigError, match="full fine-tuning in fp16 needs loss scaling"):
        train(
            cfg_for(tiny_model_dir, demos, "dtype=fp16", "lora.enabled=false", method="sft"),
            tmp_path / "fp16",
            progress=False,
        )


def test_rng_state_loads_with_weights_only(tmp_path):
    """The RNG file holds tensors and plain numbers only; a pickle that would run code in its
    place is refused by torch.load(weights_only=True)."""
    import random

    from posttrain.train.parallel.checkpoint import rng_state, set_rng_state

    random.seed(3)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng-0.pt")
    want = (random.random(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng-0.pt", weights_only=True))
    got = (random.random(), torch.rand(3))
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    # a file of the earlier form ({"python": random.getstate(), ...}) still loads and applies
    random.seed(3)
    torch.manual_seed(3)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, tmp_path / "old.pt")
    set_rng_state(torch.load(tmp_path / "old.pt", weights_only=True))
    assert random.random() == want[0]

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"python_version": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)


def test_dcp_metadata_with_code_is_refused():
    """torch.distributed.checkpoint reads `.metadata` with pickle.load; our reader allows only
    the classes that file holds."""
    from posttrain.train.parallel.sharded_checkpoint import _MetadataUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="system"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    # a dotted name reaching a function through an allowed module is refused too
    module, name = b"torch.distributed.checkpoint.filesystem", b"os.system"
    dotted = (
        b"\x80\x04\x8c"
        + bytes([len(module)])
        + module
        + b"\x94\x8c"  # protocol 4
        + bytes([len(name)])
        + name
        + b"\x94\x93\x94."
    )  # STACK_GLOBAL, STOP
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        _MetadataUnpickler(io.BytesIO(dotted)).load()


@pytest.mark.gpu
@pytest.mark.distributed
def test_fsdp2_lora_dpo_steps_on_one_gpu(tmp_path):
    """bench/train_fsdp_gpu.py at a small size on one GPU: sharded with the bf16 / fp32-reduce
    policy, step 1's DPO loss is ln 2 (LoRA B = 0: policy = reference; bf16 tolerance), and
    tokens/s and MFU are measured (0 < MFU < 1)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_fsdp_gpu.py"),
            "--layers",
            "2",
            "--hidden",
            "256",
            "--vocab",
            "32000",
            "--pairs",
            "2",
            "--prompt",
            "32",
            "--completion",
            "32",
            "--steps",
            "2",
            "--peak-tflops",
            "100",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sharded"] and result["mixed_precision"]
    assert result["first_step_loss"] == pytest.approx(math.log(2), abs=1e-2)
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
