"""One engine choice for sample, eval and run: CLI options and recipe blocks -> EngineConfig, the
hf engine's device placement and on-device adapter merge, and resumed files that refuse rows from
another engine, model or sampling settings. Fast: the tiny random Llama, one thread.

    .venv/bin/python -m pytest tests/test_engine_choice.py -q
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.engines import EngineConfig, SamplingParams, make_engine
from posttrain.records import DataError, Problem, read_jsonl
from posttrain.commands.engine_args import add_engine_arguments, engine_config
from posttrain.sampling import sample_problems

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_options_map_onto_engine_config(tmp_path):
    cfg_file = tmp_path / "engine.yaml"
    cfg_file.write_text("kind: vllm\ntensor_parallel_size: 2\nmax_model_len: 4096\n")
    cfg = engine_config(
        parse(
            "--engine-config",
            str(cfg_file),
            "--engine-set",
            "gpu_memory_utilization=0.5",
            "--engine-set",
            "chat_template_kwargs.enable_thinking=false",
        )
    )
    assert (cfg.kind, cfg.tensor_parallel_size, cfg.max_model_len) == ("vllm", 2, 4096)
    assert cfg.gpu_memory_utilization == 0.5
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    cfg = engine_config(
        parse(
            "--engine", "openai", "--base-url", "http://a:8000/v1", "--base-url", "http://b:8000/v1"
        )
    )
    assert cfg.base_urls == ["http://a:8000/v1", "http://b:8000/v1"]
    assert engine_config(parse()).kind == "hf"
    assert engine_config(parse("--batch-size", "4")).batch_size == 4
    with pytest.raises(ConfigError, match="--batch-size 4 and the engine's batch_size 2"):
        engine_config(parse("--batch-size", "4", "--engine-set", "batch_size=2"))


def test_unknown_or_misplaced_engine_options_are_errors_that_name_them():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) tensor_paralel_size; known: kind"):
        engine_config(parse("--engine", "vllm", "--engine-set", "tensor_paralel_size=2"))
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size: .* a vllm option"):
        engine_config(parse("--engine-set", "tensor_parallel_size=2"))
    with pytest.raises(ConfigError, match="engine.base_urls: .* a openai option"):
        engine_config(parse("--engine", "hf", "--base-url", "http://a:8000/v1"))
    with pytest.raises(ConfigError, match="engine.base_urls: empty"):
        engine_config(parse("--engine", "openai"))


def test_recipe_engine_block_is_shared_and_overridden_per_stage(tmp_path):
    from posttrain.pipeline.recipe import load_recipe
    from posttrain.pipeline.stage_engines import engine_settings, stage_engine

    path = tmp_path / "r.yaml"
    path.write_text(
        "engine: {kind: vllm, max_model_len: 2048, chat_template_kwargs: "
        "{enable_thinking: false}}\n"
        "sample: {engine: {gpu_memory_utilization: 0.6}}\n"
        "eval: {engine: {kind: hf, batch_size: 4}}\n"
    )
    recipe = load_recipe(str(path))
    s, e = stage_engine(recipe, recipe.sample), stage_engine(recipe, recipe.eval[0])
    assert (s.kind, s.max_model_len, s.gpu_memory_utilization) == ("vllm", 2048, 0.6)
    # eval switched kind: the vllm-only key is dropped, the shared ones stay
    assert (e.kind, e.batch_size, e.max_model_len) == ("hf", 4, None)
    assert e.chat_template_kwargs == {"enable_thinking": False}
    assert engine_settings(s)["kind"] == "vllm" and "gpu_memory_utilization" not in engine_settings(
        s
    )
    path.write_text("sample: {batch_size: 8, engine: {batch_size: 4}}\n")
    with pytest.raises(
        ConfigError,
        match=r"sample.batch_size \(8\) and the engine's batch_size "
        r"\(4\) are both set",
    ):
        load_recipe(str(path))
    path.write_text("eval: {batch_size: 8}\n")
    recipe = load_recipe(str(path))
    assert stage_engine(recipe, recipe.eval[0]).batch_size == 8
    # resolved once at load: the stages use that config, not a new merge
    assert recipe.eval[0].resolved_engine == stage_engine(recipe, recipe.eval[0])
    path.write_text("engine: {kind: vllm, tensor_parallel: 2}\n")
    with pytest.raises(ConfigError, match=r"sample.engine: unknown key\(s\) tensor_parallel"):
        load_recipe(str(path))


def test_device_auto_resolves_to_the_cpu_here_and_says_so(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = make_engine("hf", tiny_model_dir, dtype="auto")
    assert engine.model.device.type == "cpu"
    assert "device auto -> cpu (torch.cuda.is_available() is false)" in capsys.readouterr().err
    from posttrain.models import resolve_dtype

    assert (
        engine.model.dtype
        == {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_dtype("auto", "cpu")]
    )


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, cfg).save_pretrained(out)
    return str(out)


def test_adapter_merges_on_the_device_in_its_dtype(tiny_model_dir, adapter_dir, monkeypatch):
    """bf16: the base loads once, in bf16 (never an fp32 copy), and each merged weight is
    round(round(W) + B A) with B A in fp32. Each rounding to bf16 (8 significant bits) is off by
    at most 2^-9 of its value, so against W + B A in fp32 the error is at most
    2^-9 (|W| + |W + B A|); the test allows 2^-8 (|W| + |W + B A|)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_with_adapter

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        loads.append(k.get("dtype"))
        return real(cls, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    merged = load_with_adapter(tiny_model_dir, adapter_dir, dtype="bf16", device="cpu")
    assert loads == [torch.bfloat16]
    monkeypatch.undo()
    ref = load_with_adapter(tiny_model_dir, adapter_dir, dtype="fp32", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    got, want = merged.state_dict()[name], ref.state_dict()[name]
    assert got.dtype == torch.bfloat16 and got.device.type == "cpu"
    assert not torch.equal(want, base.state_dict()[name])  # the adapter did change it
    bound = (base.state_dict()[name].abs() + want.abs()) * 2.0**-8
    assert ((got.float() - want).abs() <= bound).all()


def problems(k: int) -> list[Problem]:
    return [
        Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i), answer_type="exact")
        for i in range(k)
    ]


def test_resumed_sampling_refuses_another_engine_model_or_settings(tiny_model_dir, tmp_path):
    engine = make_engine("hf", tiny_model_dir, dtype="fp32", batch_size=4)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=3)
    out = tmp_path / "s.jsonl"
    sample_problems(engine, problems(2), out, params, progress=False)
    rows = read_jsonl(out)
    assert rows[0]["engine"] == "hf" and rows[0]["model"] == tiny_model_dir
    assert rows[0]["sampling"] == {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 6, "seed": 3}
    # the same settings resume (more problems); another temperature, seed or model does not
    stats = sample_problems(engine, problems(3), out, params, progress=False)
    assert stats["new_samples"] == 2 and len(read_jsonl(out)) == 6
    for change, field in [({"temperature": 0.5}, "sampling"), ({"seed": 4}, "sampling")]:
        other = SamplingParams(**{**params.__dict__, **change})
        with pytest.raises(DataError, match=f"s.jsonl:1: field '{field}': this file was sampled"):
            sample_problems(engine, problems(4), out, other, progress=False)
    engine.model_id = "another-model"
    with pytest.raises(DataError, match="field 'model'"):
        sample_problems(engine, problems(4), out, params, progress=False)
    engine.model_id, engine.name = tiny_model_dir, "vllm"
    with pytest.raises(DataError, match="field 'engine'"):
        sample_problems(engine, problems(4), out, params, progress=False)
    assert len(read_jsonl(out)) == 6


def test_sample_cli_refuses_a_mixed_resume_with_one_line(tiny_model_dir, tmp_path):
    from conftest import run_cli

    out = tmp_path / "s.jsonl"
    common = [
        "sample",
        "--model",
        tiny_model_dir,
        "--problems",
        "builtin:arith:2",
        "--n",
        "1",
        "--max-new-tokens",
        "4",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    ]
    run_cli(*common)
    proc = run_cli(*common, "--temperature", "0.5", check=False)
    assert proc.returncode == 1
    assert "field 'sampling': this file was sampled with sampling = " in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(*common, "--engine-set", "tensor_parallel_size=2", check=False)
    assert proc.returncode == 1 and "a vllm option" in proc.stderr
    assert (
        len(read_jsonl(out)) == 2 and json.loads(out.read_text().splitlines()[0])["engine"] == "hf"
    )


@pytest.mark.gpu
def test_hf_engine_samples_on_cuda(tiny_model_dir, adapter_dir):
    engine = make_engine(EngineConfig(kind="hf"), tiny_model_dir, dtype="auto", adapter=adapter_dir)
    assert engine.model.device.type == "cuda"
    out = engine.generate(
        [[{"role": "user", "content": "What is 2 + 2?"}]],
        SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0),
    )
    assert len(out[0]) == 2 and all(c.num_tokens > 0 for c in out[0])
    assert all(len(c.token_logprobs) == c.num_tokens for c in out[0])


def test_vllm_lora_rank_is_the_adapters_rounded_up_to_one_vllm_accepts(tmp_path):
    """vLLM 0.32 takes max_lora_rank in {1, 8, 16, 32, 64, ...}: r 4 -> 8; r 16 with one module
    at 40 (rank_pattern) -> 64; r 1024 -> error; a folder without adapter_config.json -> error."""
    from posttrain.engines.vllm import lora_rank

    def adapter(cfg: dict):
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        return tmp_path

    assert lora_rank(adapter({"r": 4})) == 8
    assert lora_rank(adapter({"r": 16, "rank_pattern": {"q_proj": 40}})) == 64
    with pytest.raises(ConfigError, match="LoRA rank 1024 is above vLLM's largest"):
        lora_rank(adapter({"r": 1024}))
    with pytest.raises(ConfigError, match="adapter_config.json: not found"):
        lora_rank(tmp_path / "nothing")


def test_several_gpus_are_used_only_when_the_model_outgrows_one(monkeypatch, tiny_model_dir):
    """CUDA cannot run here, so the GPU count and size are stand-ins; the weights' size is real:
    the tiny Llama's safetensors (fp32) halved for bf16. One GPU -> cuda:0; two GPUs and weights
    under 90 % of the first -> cuda:0; two GPUs of fewer bytes than that -> accelerate's auto."""
    from types import SimpleNamespace

    from posttrain import models

    need = models.weights_bytes(tiny_model_dir, torch.bfloat16)
    files = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    assert need == files // 2
    gpu = {"total_memory": 10 * need}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(**gpu))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.device_map_for(tiny_model_dir, torch.bfloat16, "cuda") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.device_map_for(tiny_model_dir, torch.bfloat16, "cuda") == "cuda:0"
    assert models.device_map_for(tiny_model_dir, torch.bfloat16, "cuda:1") == "cuda:1"
    gpu["total_memory"] = need  # 90 % of it is less than the weights
    assert models.device_map_for(tiny_model_dir, torch.bfloat16, "cuda") == "auto"
    assert models.device_map_for(tiny_model_dir, torch.bfloat16, "cpu") is None
