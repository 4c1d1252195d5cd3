"""The pruning decode loop against transformers' own `generate` and a teacher-forced pass."""

from __future__ import annotations

import pytest
import torch

from posttrain.engines.decode import choose_tokens, decode

PROMPTS = [
    "What is 17 + 25? Answer with a number.",
    "Name a colour.",
    "Write one long sentence about the sea, the sky, ships and the wind over the waves.",
]


def _batch(tok, texts):
    tok.padding_side = "left"
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]
    return tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.fixture(scope="module")
def smollm(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_dir)


@pytest.mark.slow
def test_greedy_matches_generate_token_for_token(smollm):
    """Rows end at different steps (short answers vs a long sentence), so the cache is pruned
    mid-batch; the surviving rows must continue exactly as in an unpruned `generate`."""
    model, tok = smollm
    enc = _batch(tok, PROMPTS)
    eos = {tok.eos_token_id}
    ours = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40, eos_ids=eos)
    ref = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=40,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    lengths = set()
    for row, d in zip(ref[:, enc["input_ids"].shape[1] :].tolist(), ours):
        expected = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        assert d.token_ids == expected
        assert d.finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")
        lengths.add(len(d.token_ids))
    assert len(lengths) > 1  # the batch really was pruned part-way


@pytest.mark.slow
def test_logprobs_equal_a_teacher_forced_forward_pass(smollm):
    model, tok = smollm
    enc = _batch(tok, PROMPTS)
    gen = torch.Generator().manual_seed(0)
    rows = decode(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=24,
        eos_ids={tok.eos_token_id},
        temperature=1.0,
        generator=gen,
    )
    for i, d in enumerate(rows):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        full = torch.cat([prompt, torch.tensor(d.token_ids)])[None]
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, full[0, len(prompt) :, None])[:, 0]
        assert torch.allclose(torch.tensor(d.logprobs), expected, atol=1e-3), i


def test_same_seed_same_samples_and_zero_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = _batch(tok, PROMPTS)

    def run(seed, n=12):
        return decode(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=n,
            eos_ids={tok.eos_token_id},
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
        )

    assert [d.token_ids for d in run(3)] == [d.token_ids for d in run(3)]
    assert [d.token_ids for d in run(3)] != [d.token_ids for d in run(4)]
    assert all(len(d.token_ids) <= 12 for d in run(3))
    assert [d.finish_reason for d in run(3, n=0)] == ["length"] * 3


def test_top_p_keeps_the_nucleus_and_always_the_top_token():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0, 1}; top_p 0.1 keeps only {0}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(choose_tokens(logits, 1.0, 0.7, gen)) for _ in range(300)}
    assert drawn == {0, 1}
    assert {int(choose_tokens(logits, 1.0, 0.1, gen)) for _ in range(50)} == {0}
    assert int(choose_tokens(logits, 0.0, 1.0, None)) == 0
    everything = {int(choose_tokens(logits, 1.0, 1.0, gen)) for _ in range(600)}
    assert everything == {0, 1, 2, 3}
