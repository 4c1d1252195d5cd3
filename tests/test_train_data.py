"""Training data: chat-template tokenisation, the length policy, batching order, schedules, config.

.venv/bin/python -m pytest tests/test_train_data.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from posttrain.config import ConfigError
from posttrain.records import DataError
from posttrain.train.batches import collate, epoch_batches, micro_batches
from posttrain.train.config import train_config
from posttrain.train.data import Example, fit_length, load_examples, tokenize_turn
from posttrain.train.optim import lr_factor


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(q="What is 2 + 3?", good="2 + 3 = 5", bad="6"):
    return {
        "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
        "problem_id": "p",
    }


# ---------------------------------------------------------------------------- tokenising


def test_completion_is_the_assistant_turn_up_to_the_end_token(tok):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    reply = [{"role": "assistant", "content": "2 + 3 = 5"}]
    p, c, retokenised = tokenize_turn(tok, prompt, reply)
    assert tok.decode(c) == "2 + 3 = 5<|im_end|>"
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    # The pieces are exactly the template's whole conversation, minus the "\n" after the end
    # token (generation stops at <|im_end|>, so that newline is never produced).
    full = tok.apply_chat_template(prompt + reply, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert p + c == tok(full[:-1], add_special_tokens=False)["input_ids"]
    assert (
        p
        == tok(
            tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert not retokenised


def test_fit_length_policies_by_hand():
    """max_length 10; prompt 6 tokens, completions 5 and 3: 6 + 5 = 11 > 10."""
    prompt, comps = list(range(6)), [[10, 11, 12, 13, 14], [20, 21, 22]]
    assert fit_length(prompt, comps, 10, "drop") is None
    assert fit_length(prompt, comps, 11, "drop") == (prompt, comps, "fits")
    # completions cut to 10 - 6 = 4 tokens (the 3-token one stays whole)
    assert fit_length(prompt, comps, 10, "truncate_completion") == (
        prompt,
        [[10, 11, 12, 13], [20, 21, 22]],
        "completion_truncated",
    )
    # a pair's prompt is never cut: truncate_prompt is refused for two completions
    with pytest.raises(ConfigError, match="length_policy: 'truncate_prompt'.*pairs"):
        fit_length(prompt, comps, 10, "truncate_prompt")
    # one completion (SFT): keep the prompt's last 10 - 5 = 5 tokens
    assert fit_length(prompt, comps[:1], 10, "truncate_prompt") == (
        [1, 2, 3, 4, 5],
        comps[:1],
        "prompt_truncated",
    )
    # a completion longer than max_length on its own cannot be saved by cutting the prompt
    assert fit_length(prompt, [list(range(12))], 10, "truncate_prompt") is None


def test_load_pairs_counts_every_length_outcome(tmp_path, tok):
    long_answer = " ".join(["seven"] * 60)
    path = write(tmp_path / "pairs.jsonl", [pair(), pair(good=long_answer), pair()])
    examples, report = load_examples(path, tok, preference=True, max_length=40)
    assert (report.rows, report.kept, report.dropped_too_long) == (3, 2, 1)
    assert [e.line for e in examples] == [1, 3]
    assert all(len(e.completions) == 2 and e.length <= 40 for e in examples)
    assert "1 dropped (longer than max_length 40)" in report.summary()

    _, report = load_examples(
        path, tok, preference=True, max_length=40, length_policy="truncate_completion"
    )
    assert (report.kept, report.completion_truncated) == (3, 1)
    assert "END CUT" in report.summary()

    with pytest.raises(DataError, match="all 3 rows are longer than max_length 5"):
        load_examples(path, tok, preference=True, max_length=5)


def test_scored_rows_train_on_correct_answers_with_their_think_block(tmp_path, tok):
    base = {
        "messages": [{"role": "user", "content": "2+2?"}],
        "reasoning": "two and two",
        "response": "4",
    }
    path = write(
        tmp_path / "scored.jsonl",
        [
            {**base, "verdict": "correct"},
            {**base, "verdict": "incorrect", "response": "5"},
            {**base, "verdict": "truncated"},
        ],
    )
    examples, report = load_examples(path, tok, preference=False, max_length=512)
    assert (report.kind, report.rows, report.not_correct, report.kept) == ("scored", 3, 2, 1)
    assert tok.decode(examples[0].completions[0]) == "<think>\ntwo and two\n</think>\n\n4<|im_end|>"


def test_demonstration_formats_agree(tmp_path, tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write(
        tmp_path / "demos.jsonl", [{"messages": msgs}, {"prompt": msgs[:1], "completion": msgs[1:]}]
    )
    (a, b), report = load_examples(path, tok, preference=False, max_length=512)
    assert report.kind == "demonstrations"
    assert a.prompt.tolist() == b.prompt.tolist()
    assert [c.tolist() for c in a.completions] == [c.tolist() for c in b.completions]


@pytest.mark.parametrize(
    "row, preference, message",
    [
        ({"prompt": "q", "chosen": "a"}, True, "field 'rejected'"),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            True,
            "field 'chosen': the last message must be the assistant's",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            True,
            "field 'prompt': message 0",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, False, "this is a pair row"),
        ({"question": "q"}, False, "field 'messages'"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tok, row, preference, message):
    good = (
        pair()
        if preference
        else {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    path = write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=message) as e:
        load_examples(path, tok, preference=preference, max_length=512)
    assert f"{path}:2:" in str(e.value)


class CountingTokenizer:
    """The tokenizer, counting chat-template renderings and tokenizer calls."""

    def __init__(self, tok):
        self.tok, self.renders, self.calls = tok, 0, 0

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self.tok.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


def many_pairs(n):
    return [
        pair(
            q=f"What is {i} + {2 * i}?",
            good=f"{i} + {2 * i} = {3 * i}" + " ok" * (i % 4),
            bad=f"{3 * i + 1}" + " hm" * (i % 3),
        )
        for i in range(n)
    ]


def test_pairs_tokenise_the_prompt_once_in_batched_calls_into_int32_arrays(tmp_path, tok):
    """70 pairs: the prompt is rendered once per pair (3 renderings a pair: the prompt, and the
    whole conversation with each answer; it was 4), one tokenizer call per chunk of 64 rows
    (2 calls), and the ids equal those of tokenising each answer on its own (tokenize_turn)."""
    rows = many_pairs(70)
    path = write(tmp_path / "pairs.jsonl", rows)
    counting = CountingTokenizer(tok)
    examples, report = load_examples(path, counting, preference=True, max_length=512)
    assert (counting.renders, counting.calls) == (3 * 70, 2)
    assert report.kept == 70 and report.retokenised == 0
    for e, row in zip(examples, rows):
        assert e.prompt.dtype == np.int32 and all(c.dtype == np.int32 for c in e.completions)
        for k, side in enumerate(("chosen", "rejected")):
            p, c, _ = tokenize_turn(tok, row["prompt"], row[side])
            assert e.prompt.tolist() == p and e.completions[k].tolist() == c


def test_tokenize_workers_give_the_same_examples_and_errors(tmp_path, tok):
    """2 worker processes: identical examples and report; a bad row still names its line."""
    path = write(tmp_path / "pairs.jsonl", many_pairs(150))
    one, report_one = load_examples(
        path, tok, preference=True, max_length=40, length_policy="truncate_completion"
    )
    two, report_two = load_examples(
        path, tok, preference=True, max_length=40, length_policy="truncate_completion", workers=2
    )
    assert report_one.to_dict() == report_two.to_dict() and report_one.completion_truncated > 0
    assert [(e.line, e.prompt.tolist(), [c.tolist() for c in e.completions]) for e in one] == [
        (e.line, e.prompt.tolist(), [c.tolist() for c in e.completions]) for e in two
    ]
    bad = write(tmp_path / "bad.jsonl", many_pairs(100) + [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=f"{bad}:101: field 'rejected'"):
        load_examples(bad, tok, preference=True, max_length=512, workers=2)


# ------------------------------------------------------------------------------ batching


def test_collate_left_pads_and_masks_the_prompt():
    """prompt (1 2 3) + (4 5), prompt (6) + (7 8 9): T = 5, K = 3, pad 0."""
    b = collate([Example((1, 2, 3), ((4, 5),), 1), Example((6,), ((7, 8, 9),), 2)], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [0, 6, 7, 8, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, 4, 5], [7, 8, 9]]
    assert b["completion_lengths"].tolist() == [2, 3]


def test_collate_pairs_puts_all_chosen_rows_first():
    b = collate([Example((1,), ((2,), (3,)), 1), Example((4,), ((5,), (6,)), 2)], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2], [4, 5], [1, 3], [4, 6]]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    lengths = [3, 9, 4, 8, 1, 7, 2, 6, 5, 10]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert [len(b) for b in a] == [4, 4, 2]  # the short batch is the last one
    assert [len(b) for b in epoch_batches(lengths, 4, 1, 0, min_rows=3)] == [4, 4]


def test_length_grouping_puts_similar_lengths_together():
    """64 rows of lengths 1..64, global batch 4: one window of 16 batches, so each batch holds
    4 consecutive lengths (spread 3); without grouping the spread is far larger."""
    lengths = list(range(1, 65))
    grouped = epoch_batches(lengths, 4, seed=0, epoch=0)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) == 3 for b in grouped)
    plain = epoch_batches(lengths, 4, seed=0, epoch=0, group_by_length=False)
    assert sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) > 100


def test_micro_batches_split_a_global_batch_between_processes_and_steps():
    lengths = [10, 20, 30, 40, 50]
    batch = [0, 1, 2, 3, 4]
    # sorted: 4 3 2 1 0; 2 processes x 2 accumulation = runs of 2, 1, 1, 1 -> run a*2 + r
    assert micro_batches(batch, lengths, processes=2, rank=0, grad_accum=2) == [[4, 3], [1]]
    assert micro_batches(batch, lengths, processes=2, rank=1, grad_accum=2) == [[2], [0]]
    assert micro_batches(batch, lengths, processes=1, rank=0, grad_accum=1) == [[4, 3, 2, 1, 0]]
    assert micro_batches([0, 1], lengths, processes=1, rank=0, grad_accum=4) == [[1], [0]]


# ------------------------------------------------------------------------ schedule, config


def test_lr_schedule_by_hand():
    """total 10, warmup 2: warmup 1/2, 2/2; then p = (step - 2) / 7."""
    f = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[9] == pytest.approx(0.0)
    # step 5.5 would be p = 0.5; step 9 with min_ratio 0.1 ends at 0.1
    assert lr_factor(9, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(1 - 4 / 7)
    assert lr_factor(6, 10, 2, "constant") == 1.0
    # cosine at p = 3/7: (1 + cos(3 pi / 7)) / 2
    assert f[5] == pytest.approx((1 + torch.cos(torch.tensor(3 * torch.pi / 7)).item()) / 2)


def test_config_presets_overrides_and_flags(tmp_path):
    assert train_config("robust-dpo", data="x").label_smoothing == 0.1
    assert train_config("rpo", data="x").nll_weight == 1.0
    assert train_config("dpo", data="x").nll_weight == 0.0
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 1e-4\nlora:\n  r: 4\ndata: from-yaml.jsonl\n")
    cfg = train_config(
        "dpo",
        str(yaml_file),
        ["lora.alpha=8", "label_smoothing=0.2"],
        data="from-flag.jsonl",
        model=None,
    )
    assert (cfg.lr, cfg.lora.r, cfg.lora.alpha, cfg.label_smoothing) == (1e-4, 4, 8.0, 0.2)
    assert cfg.data == "from-flag.jsonl" and cfg.model == "smollm2-135m"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nope=1"], "unknown key"),
        (["length_policy=cut"], "length_policy"),
        # a pair's prompt is never cut (train/data.py)
        (["length_policy=truncate_prompt"], "length_policy: 'truncate_prompt'; expected drop"),
        (["lora.init=magic"], "lora.init"),
        (["batch_size=0"], "batch_size"),
        (["method=sft"], "--method is 'dpo'"),
        (["lora.dropout=0.1"], "lora.dropout: 0.1; expected 0 for dpo"),
        (["tokenize_workers=0"], "tokenize_workers"),
    ],
)
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_config("dpo", None, overrides, data="x")
