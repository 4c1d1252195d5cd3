"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer (fast tests), the
embedded model's cached folder (slow tests), and one real vLLM server of it for the whole session
(server tests; tests/vllm_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from posttrain.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> str:
    """A random 2-layer Llama (hidden 64) that speaks the SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def vllm_server(embedded_dir, tmp_path_factory):
    """A real vLLM OpenAI-compatible server of the embedded model, served as "smol" with runtime
    LoRA loading, started on first use and shared by every test of the session (start-up is
    60-230 s on this CPU, paid once). Yields a tests/vllm_server.VLLMServer (.base_url)."""
    from vllm_server import start_server

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        server = start_server(embedded_dir, log)
    except RuntimeError as e:
        pytest.fail(str(e))
    print(f"\nvLLM server ready after {server.startup_s:.0f} s at {server.base_url}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~5x faster on one thread than on two on a shared 2-core CPU (OpenMP
    threads of concurrent processes collapse). Use with pytestmark = usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600):
    """Run `python -m posttrain.cli ARGS` in a subprocess; returns CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"posttrain {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA exists; elsewhere they are skipped, and say why."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
