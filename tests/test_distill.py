"""On-policy distillation (`--method distill`): the per-token advantage by hand, a teacher equal
to the student (zero advantage, weights unchanged), a teacher that prefers a token pulling the
student towards it, a teacher with another tokenizer refused, and the config checks.

Run: .venv/bin/python -m pytest tests/test_distill.py -q
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from stub_rewards import graded

from posttrain.config import ConfigError
from posttrain.losses import distill_advantages, policy_loss
from posttrain.records import Problem
from posttrain.train.online import config as OC
from posttrain.train.online import loop as O
from posttrain.train.online.teacher import check_same_tokenizer

URL = "http://127.0.0.1:8000/v1"
PROBLEMS = [
    Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1), answer_type="exact")
    for i in range(6)
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared CPU (see test_train_online.py)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_tokenizer_of(tiny_model_dir, out) -> None:
    """Copy the tiny model's tokenizer files into `out` (cheaper than save_pretrained)."""
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def stub_score(problem, index, messages, completion, *, think_open, engine, cfg):
    return graded(float(completion.token_ids[0] % 2 == 0), completion.finish_reason == "length")


def config(teacher: str, *overrides):
    return OC.online_config(
        "distill",
        overrides=[
            f"distill.teacher={teacher}",
            "max_steps=2",
            "num_generations=3",
            "problems_per_step=2",
            "max_new_tokens=4",
            "lr=1e-2",
            "lora.r=4",
            "checkpoint_every=0",
            *overrides,
        ],
    )


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ the loss


def test_advantage_and_loss_by_hand():
    """Teacher [-1, -2, pad], student [-1.5, -1, pad]: A = t - s = [0.5, -1, 0].
    reverse_kl = mean(s - t) over the 2 tokens = (-0.5 + 1) / 2 = 0.25.
    With a sequence advantage 2 and reward_weight 0.25: A = [0.5 + 0.5, -1 + 0.5, 0].
    policy_loss on-policy (ratio 1), token mean: -(0.5 - 1) / 2 = 0.25; its gradient with
    respect to the student's log-probs is -A / 2 = [-0.25, 0.5, 0]."""
    teacher = torch.tensor([[-1.0, -2.0, -7.0]])
    student = torch.tensor([[-1.5, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    adv, m = distill_advantages(teacher, student, mask)
    assert_close(adv, torch.tensor([[0.5, -1.0, 0.0]]))
    assert not adv.requires_grad
    assert_close(m["distill/reverse_kl"], torch.tensor(0.25))
    assert_close(m["distill/advantage"], torch.tensor(-0.25))
    mixed, _ = distill_advantages(
        teacher, student, mask, sequence_advantages=torch.tensor([2.0]), reward_weight=0.25
    )
    assert_close(mixed, torch.tensor([[1.0, -0.5, 0.0]]))
    loss, _ = policy_loss(student, None, adv, mask, aggregation="token_mean")
    assert_close(loss, torch.tensor(0.25))
    loss.backward()
    assert_close(student.grad, torch.tensor([[-0.25, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="sequence_advantages"):
        distill_advantages(teacher, student, mask, reward_weight=1.0)


def test_per_token_advantages_equal_to_a_sequence_advantage_change_nothing():
    """policy_loss with A (B, T) constant along each row equals the (B,) form, clipped too."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -4.0]])
    old = torch.tensor([[-1.4, -1.9, -0.5], [-0.1, -0.2, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    seq = torch.tensor([1.5, -0.7])
    for aggregation in ("grpo", "token_mean"):
        a, _ = policy_loss(logps, old, seq, mask, aggregation=aggregation)
        b, _ = policy_loss(logps, old, seq[:, None].expand(2, 3), mask, aggregation=aggregation)
        assert_close(a, b)


# ------------------------------------------------------------------------------ the loop


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_teacher_equal_to_the_student_gives_zero_advantage_and_no_update(
    tiny_model_dir, tok, tmp_path
):
    """The teacher is the student's own folder; the adapter starts at B = 0, so the two give
    the same log-probs, every advantage is exactly 0, every gradient 0, and AdamW (no weight
    decay) leaves the weights bitwise as they were (fp32)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    before = {}

    def score(*args, **kwargs):
        if not before:
            before.update(lora_weights(model))
        return stub_score(*args, **kwargs)

    cfg = config(tiny_model_dir, "dtype=fp32", "temperature=0.7")
    O.train_online(cfg, tmp_path, model=model, tokenizer=tok, problems=PROBLEMS, score=score)
    got = rows(tmp_path / "metrics.jsonl")
    assert [r["distill/reverse_kl"] for r in got] == [0.0, 0.0]
    assert [r["distill/advantage"] for r in got] == [0.0, 0.0]
    after = lora_weights(model)
    assert before and all(torch.equal(before[k], after[k]) for k in before)


# The "prefers" test: dimension J of the residual stream is a bias channel (every token's
# embedding holds BIAS there, so after each RMSNorm the hidden state is ~8 e_J plus small
# noise), and column J of lm_head is then a per-token logit offset. Student: four tokens get
# offset 3 (logit ~24, p ~1/4 each, the rest ~0); the teacher gives the first of them 2 more
# (p ~0.7). The student samples all four, and only the teacher's token gains.
J, BIAS = 0, 10.0


def _biased_model(tiny_model_dir, favourite: int, tokens: list[int], bonus: float):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, J] = BIAS
        head = model.lm_head.weight  # (V, H)
        head[:, J] = 0.0
        head[tokens, J] = 3.0  # logit ~24
        head[favourite, J] += bonus / 8
    return model


def _mean_logp(model, tok, token: int) -> float:
    """The mean log-prob of `token` as the first answer token of every problem."""
    from posttrain.sampling import prompt_messages

    out = []
    with torch.no_grad():
        for p in PROBLEMS:
            text = tok.apply_chat_template(
                prompt_messages(p, None), tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append(torch.log_softmax(logits.float(), -1)[token])
    return float(torch.stack(out).mean())


def test_a_teacher_that_prefers_a_token_raises_its_student_log_prob(tiny_model_dir, tok, tmp_path):
    tokens = [tok.convert_tokens_to_ids(t) for t in ("1", "2", "3", "4")]
    favourite = tokens[0]
    teacher = _biased_model(tiny_model_dir, favourite, tokens, 2.0)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    with_tokenizer_of(tiny_model_dir, teacher_dir)
    student = _biased_model(tiny_model_dir, favourite, tokens, 0.0)
    start = _mean_logp(student, tok, favourite)
    assert -1.6 < start < -1.2  # ~ log 1/4: the student has no preference among the four
    assert _mean_logp(teacher, tok, favourite) > -0.5
    # lr 3e-3 for 6 steps: -1.38 -> -0.89 to -0.91 over seeds 0-2 (lr 1e-2 for 3 steps overshot
    # on two of those three draws of LoRA's A: -3.2 and -2.5, after a first step up)
    cfg = config(
        str(teacher_dir), "dtype=fp32", "max_steps=6", "lr=3e-3", "lora.targets=attention,mlp"
    )
    O.train_online(
        cfg, tmp_path / "run", model=student, tokenizer=tok, problems=PROBLEMS, score=stub_score
    )
    got = rows(tmp_path / "run" / "metrics.jsonl")
    assert got[0]["distill/reverse_kl"] > 0.1
    end = _mean_logp(student, tok, favourite)
    assert end > start + 0.2


# ------------------------------------------------------------------------------ refusals


def test_a_teacher_with_another_tokenizer_is_refused(tiny_model_dir, tok, tmp_path):
    """A teacher folder whose tokenizer has one more token: refused at start, before either
    model loads (the folder holds no weights) and before any step."""
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra_token>"])
    teacher = tmp_path / "teacher"
    other.save_pretrained(teacher)
    shutil.copy(Path(tiny_model_dir) / "config.json", teacher / "config.json")
    with pytest.raises(ConfigError, match="distill.teacher: .*1 token -> id entries differ"):
        O.train_online(config(str(teacher)), tmp_path / "run", tokenizer=tok, problems=PROBLEMS)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_teacher_with_another_chat_template_or_eos_is_refused(tok):
    other = copy.deepcopy(tok)
    check_same_tokenizer(tok, other)  # the same: accepted
    template = other.chat_template
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="chat template renders .* other token ids"):
        check_same_tokenizer(tok, other)
    other.chat_template = template
    other.eos_token = "<|im_start|>"
    with pytest.raises(ConfigError, match="eos / bos"):
        check_same_tokenizer(tok, other)


def test_config_checks(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir)
    assert cfg.aggregation == "dapo" and cfg.loss == "ppo" and cfg.distill.reward_weight == 0.0
    cases = [
        ([], r"distill.teacher \(''\) and distill.teacher_url \(''\): expected exactly one"),
        (["distill.teacher=http://127.0.0.1:8000/v1"], "local model folder; a server: teacher_url"),
        (
            [f"distill.teacher={tiny_model_dir}", f"distill.teacher_url={URL}"],
            "distill.teacher .* and distill.teacher_url .*: expected exactly one teacher",
        ),
        ([f"distill.teacher_url={URL}"], "distill.teacher_model: ''; expected the name"),
        (
            [f"distill.teacher_url={URL}", "distill.teacher_model=t", "temperature=0.7"],
            "temperature: 0.7 with distill.teacher_url: .* untempered .* expected temperature 1",
        ),
        (
            [f"distill.teacher_url={URL}", "distill.teacher_model=t"]
            + [f"distill.teacher_adapter={tmp_path}"],
            "distill.teacher_adapter: .*; expected empty with teacher_url",
        ),
        (["distill.teacher_url=127.0.0.1:8000"], "expected an http"),
        ([f"distill.teacher={tiny_model_dir}", "distill.teacher_model=t"], "teacher_model"),
        ([f"distill.teacher={tiny_model_dir}", "distill.reward_weight=-1"], "reward_weight"),
        ([f"distill.teacher={tiny_model_dir}", "loss=cispo"], "loss: 'cispo'; expected ppo"),
        ([f"distill.teacher={tiny_model_dir}", "dynamic_sampling=true"], "dynamic_sampling"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            OC.online_config("distill", overrides=overrides)
    # the files, checked when training starts (a recipe may name a run's future adapter)
    from posttrain.train.launch import check_inputs

    missing = config(f"{tmp_path}/none")
    with pytest.raises(ConfigError, match="distill.teacher: .*config.json"):
        check_inputs(missing)
    no_adapter = config(tiny_model_dir, f"distill.teacher_adapter={tmp_path}")
    with pytest.raises(ConfigError, match="distill.teacher_adapter: .*adapter_config.json"):
        check_inputs(no_adapter)
    check_inputs(config(tiny_model_dir, "model=" + tiny_model_dir))
    served = OC.online_config(
        "distill",
        overrides=[f"distill.teacher_url={URL}", "distill.teacher_model=t"],
    )
    check_inputs(served)  # a server's teacher is checked when training starts, asking it
    with pytest.raises(ConfigError, match="distill: set, but not used with method 'grpo'"):
        OC.online_config("grpo", overrides=[f"distill.teacher={tiny_model_dir}"])
