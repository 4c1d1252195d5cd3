"""Long reasoning traces: the length policy for pairs, the shared prompt under gradient
checkpointing, the chunked entropy of the online loss.

    .venv/bin/python -m pytest tests/test_long_traces.py -q

Tiny random Llamas built from a config here (float32): the shared-prompt forwards with
checkpointing are compared with the plain left-padded batch, values and gradients.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ConfigError
from posttrain.records import DataError
from posttrain.train.batches import collate
from posttrain.train.config import TrainConfig
from posttrain.train.data import Example, load_examples
from posttrain.train.forward import completion_logps, group_logits, unpadded_logps
from posttrain.train.modes import enable_gradient_checkpointing, layout, train_mode

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, V, n).astype(np.int32)


def pairs() -> list[Example]:
    return [
        Example(ids(6, 0), (ids(9, 1), ids(4, 2)), 1),
        Example(ids(3, 3), (ids(5, 4), ids(11, 5)), 2),
    ]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def weighted(logps: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every token differently, so a wrong position cannot cancel out."""
    w = torch.linspace(0.5, 1.5, logps.numel()).reshape(logps.shape)
    return (logps * w).sum()


# ------------------------------------------------------------------------ length policy


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_long_pairs_keep_their_prompt_and_cut_both_answers_to_one_budget(tmp_path, tok):
    """max_length 60, truncate_completion: a pair whose answers are long keeps its whole prompt
    and both answers are cut to 60 - prompt tokens; a pair whose prompt alone is longer than 60
    is dropped and counted as such; with the default (drop) both long pairs are dropped."""
    short = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    long_answers = {
        "prompt": "Count.",
        "chosen": " ".join(["one"] * 200),
        "rejected": " ".join(["two"] * 150),
    }
    long_prompt = {"prompt": " ".join(["why"] * 100), "chosen": "a", "rejected": "b"}
    path = write_pairs(tmp_path / "pairs.jsonl", [short, long_answers, long_prompt])
    whole, _ = load_examples(path, tok, preference=True, max_length=10_000)
    assert len(whole) == 3 and len(whole[2].prompt) > 60

    examples, report = load_examples(
        path, tok, preference=True, max_length=60, length_policy="truncate_completion"
    )
    assert [e.line for e in examples] == [1, 2]
    cut = examples[1]
    np.testing.assert_array_equal(cut.prompt, whole[1].prompt)  # the prompt is never cut
    budget = 60 - len(cut.prompt)
    assert [len(c) for c in cut.completions] == [budget, budget]
    for got, full in zip(cut.completions, whole[1].completions):
        np.testing.assert_array_equal(got, full[:budget])  # each answer's tail cut
    np.testing.assert_array_equal(examples[0].completions[0], whole[0].completions[0])
    assert (report.kept, report.completion_truncated, report.prompt_truncated) == (2, 1, 0)
    assert (report.dropped_too_long, report.dropped_prompt_too_long) == (1, 1)
    assert "1 dropped (longer than max_length 60; 1 of them by the prompt alone)" in (
        report.summary()
    )
    assert report.to_dict()["dropped_prompt_too_long"] == 1

    kept, report = load_examples(path, tok, preference=True, max_length=60)
    assert [e.line for e in kept] == [1]
    assert (report.dropped_too_long, report.dropped_prompt_too_long) == (2, 1)


def test_a_file_whose_every_pair_is_dropped_is_an_error(tmp_path, tok):
    rows = [{"prompt": " ".join(["why"] * 100), "chosen": "a", "rejected": "b"}] * 2
    path = write_pairs(tmp_path / "pairs.jsonl", rows)
    for policy in ("drop", "truncate_completion"):
        with pytest.raises(DataError, match="all 2 rows are longer than max_length 60.*2 by the"):
            load_examples(path, tok, preference=True, max_length=60, length_policy=policy)


# ------------------------------------------------------------------------ shared prompt


def test_shared_prompt_with_checkpointing_equals_the_padded_batch():
    """padding none (prompt run once, the rejected answer on the chosen one's prompt keys and
    values) with gradient checkpointing: the log-probs and every gradient equal those of one
    left-padded batch without checkpointing. Before the fix the checkpointed layers dropped the
    cache, so the rejected answer saw only the prompt's last token."""
    examples = pairs()
    padded = tiny_llama()
    train_mode(padded, dropout=False)
    batch = collate(examples, pad_id=0)
    want = completion_logps(padded, batch)  # (4, K)
    weighted(want).backward()

    shared = copy.deepcopy(padded)
    shared.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(shared)
    train_mode(shared, dropout=False)
    runs, lengths = [], []
    # a pre-hook counts: the recompute stops early once it has what backward needs
    shared.model.layers[0].register_forward_pre_hook(lambda *a: runs.append(1))
    shared.model.embed_tokens.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    got = unpadded_logps(shared, examples, "cpu", share_prompt=True)
    n_forwards = len(runs)
    weighted(got).backward()

    assert lengths == [6 + 9, 1 + 4, 3 + 5, 1 + 11]  # the prompt ran once per pair
    assert len(runs) == 2 * n_forwards == 8  # every layer recomputed in backward
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected = grads(padded)
    actual = grads(shared)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_group_with_checkpointing_equals_whole_sequences():
    """The online group layout (first completion whole, the other G - 1 as one right-padded batch
    on its prompt cache) with checkpointing: logits and gradients equal every sequence run
    whole without checkpointing."""
    prompt = torch.from_numpy(ids(5, 7).astype(np.int64))[None]
    completions = [torch.from_numpy(ids(m, 10 + m).astype(np.int64))[None] for m in (4, 7, 2)]
    K = 7
    labels = torch.full((3, K), -100)
    for i, c in enumerate(completions):
        labels[i, K - c.shape[1] :] = c[0]

    def run(model, share):
        batch = {
            "labels": labels,
            "prompt_ids": prompt,
            "completion_ids": completions,
            "share_prompt": share,
        }
        logits = group_logits(model, batch)  # (3, K, V)
        mask = labels != -100
        loss = (logits.log_softmax(-1) * torch.linspace(0.1, 1.0, V)).sum(-1)[mask].sum()
        loss.backward()
        return logits.detach()

    whole = tiny_llama(1)
    train_mode(whole, dropout=False)
    want = run(whole, share=False)
    shared = copy.deepcopy(whole)
    shared.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(shared)
    train_mode(shared, dropout=False)
    got = run(shared, share=True)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected, actual = grads(whole), grads(shared)
    for name in expected:
        assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_none_keeps_the_prompt_shared_with_checkpointing():
    cfg = TrainConfig(method="dpo", data="x.jsonl", model="m", padding="auto")
    cfg.gradient_checkpointing = True
    assert layout(cfg, "cpu") == "shared"
    cfg.padding = "longest"
    assert layout(cfg, "cpu") == "longest"


# ------------------------------------------------------------------------ GRPO entropy


@pytest.mark.parametrize("chunk_elements", [None, 3 * 50, 1])
def test_token_entropy_in_chunks_equals_the_whole_softmax(chunk_elements):
    """B 2, T 7, V 50 bf16 logits, temperature 0.7: chunks of 3 positions (and of 1, and the
    default: one chunk) give the entropy of the whole float32 softmax."""
    from posttrain.losses.logprobs import token_entropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g) * 3).bfloat16()
    logp = torch.log_softmax(logits.float() / 0.7, dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    got = token_entropy(logits, 0.7, chunk_elements=chunk_elements)
    assert got.dtype == torch.float32 and got.shape == (2, 7)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    uniform = token_entropy(torch.zeros(1, 3, 50))
    assert_close(uniform, torch.full((1, 3), float(np.log(50))))


def test_pairs_never_get_a_cut_prompt_and_the_cut_tokens_are_counted(tmp_path, tok):
    """Chosen 'one' x 200 and rejected 'two' x 150: each word is one token, plus <|im_end|>, so
    201 and 151 completion tokens; the prompt 'Count.' renders to P tokens. max_length 60 with
    truncate_completion: both answers cut to b = 60 - P tokens, (201 - b) + (151 - b) tokens
    cut, the prompt whole. truncate_prompt on pairs is an error naming the option, never a cut."""
    row = {
        "prompt": "Count.",
        "chosen": " ".join(["one"] * 200),
        "rejected": " ".join(["two"] * 150),
    }
    path = write_pairs(tmp_path / "pairs.jsonl", [row])
    (whole,), _ = load_examples(path, tok, preference=True, max_length=10_000)
    P = len(whole.prompt)
    assert [len(c) for c in whole.completions] == [201, 151]
    (cut,), report = load_examples(
        path, tok, preference=True, max_length=60, length_policy="truncate_completion"
    )
    b = 60 - P
    assert [len(c) for c in cut.completions] == [b, b] and len(cut.prompt) == P
    assert (report.completion_truncated, report.completion_tokens_cut) == (1, 352 - 2 * b)
    assert f"1 with the completion's END CUT ({352 - 2 * b} tokens" in report.summary()
    with pytest.raises(ConfigError, match="length_policy: 'truncate_prompt'; expected drop"):
        load_examples(path, tok, preference=True, max_length=60, length_policy="truncate_prompt")
