"""The loss and gradients of a step must not depend on how its batch is split or padded.

    .venv/bin/python -m pytest tests/test_train_invariance.py -q          # -m distributed: torchrun

The same global batch of 4 rows, as 1 micro-batch of 4, 2 of 2, 4 of 1, or 2 processes x
2 accumulation steps of 1 row, must give one loss and one gradient (fp32, tolerance for the
summation order only). What makes it hold (offline.py): each micro-batch's loss is weighted by
its share of the global batch's units, pairs for DPO, completion tokens for SFT's token mean,
times the number of processes because DDP averages gradients over processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from train_dist_worker import one_step, perturbed_lora

from posttrain.train.config import train_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Equal up to float32 summation order: 1e-4 relative, or 1e-4 of the tensor's largest
    entry for entries that nearly cancel."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        assert_close(actual[name], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """4 pairs / demonstrations whose completions differ in length (1 to ~12 words)."""
    folder = tmp_path_factory.mktemp("invariance")
    answers = [
        ("5", "6"),
        ("two plus three is five, so 5", "7"),
        ("5", "I think the sum of these two numbers is 9 for sure"),
        ("adding gives 5 in the end after carrying nothing", "4"),
    ]
    pairs, demos = [], []
    for i, (good, bad) in enumerate(answers):
        prompt = [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": f"{i} + {5 - i}?"},
        ]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
        demos.append({"messages": prompt + [{"role": "assistant", "content": good}]})
    for name, rows in (("pairs", pairs), ("demos", demos)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(method, model, folder, *settings):
    data = folder / ("pairs.jsonl" if method in ("dpo", "ipo", "rpo", "bdpo") else "demos.jsonl")
    return train_config(
        method,
        None,
        ["dtype=fp32", "lora.r=4", "lora.alpha=8", *settings],
        model=model,
        data=str(data),
    )


@pytest.mark.parametrize(
    "method, extra",
    [("dpo", []), ("rpo", []), ("sft", []), ("dft", ["sft_aggregation=sequence_mean"])],
)
def test_accumulation_split_gives_the_same_loss_and_gradients(
    tiny_model_dir, data_files, accelerator, method, extra
):
    """Left-padded micro-batches of 4 rows and of 1, and padding none (each sequence its own
    forward, each row its own micro-batch) with batch 4 and 1: one loss, one gradient."""
    results = [
        one_step(
            config(
                method,
                tiny_model_dir,
                data_files,
                f"batch_size={b}",
                f"grad_accum={4 // b}",
                f"padding={padding}",
                *extra,
            ),
            accelerator,
        )
        for padding in ("longest", "none")
        for b in (4, 1)
    ]
    (loss, grads), others = results[0], results[1:]
    assert all(g.abs().sum() > 0 for g in grads.values())
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert_grads_close(other_grads, grads)


def test_token_mean_is_over_the_whole_batch_not_a_mean_of_micro_batch_means(
    tiny_model_dir, data_files, accelerator
):
    """The check above has teeth: 4 micro-batches of 1 row must give sum(nll) / sum(tokens),
    which differs from the mean of the 4 rows' own token means when their lengths differ."""
    from train_dist_worker import perturbed_lora

    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import collate
    from posttrain.train.data import load_examples
    from posttrain.train.forward import completion_logps

    cfg = config("sft", tiny_model_dir, data_files, "batch_size=1", "grad_accum=4")
    loss, _ = one_step(cfg, accelerator)
    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data, tok, preference=False, max_length=512)
    model = perturbed_lora(load_model(cfg.model, dtype="fp32"))
    with torch.no_grad():
        nll = [
            -completion_logps(model, collate([e], tok.pad_token_id)).sum().item() for e in examples
        ]
    tokens = [len(e.completions[0]) for e in examples]
    assert loss == pytest.approx(sum(nll) / sum(tokens), rel=1e-5)
    naive = sum(n / t for n, t in zip(nll, tokens)) / len(examples)
    assert abs(naive - loss) > 1e-3


def test_padding_does_not_change_log_probs(tiny_model_dir, data_files):
    """A row's completion log-probs alone and left-padded next to a longer row agree."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import collate
    from posttrain.train.data import load_examples
    from posttrain.train.forward import completion_logps

    tok = load_tokenizer(tiny_model_dir)
    examples, _ = load_examples(data_files / "demos.jsonl", tok, preference=False, max_length=512)
    short = min(examples, key=lambda e: e.length)
    long = max(examples, key=lambda e: e.length)
    assert long.length - short.length >= 8
    model = load_model(tiny_model_dir, dtype="fp32").eval()
    with torch.no_grad():
        alone = completion_logps(model, collate([short], tok.pad_token_id))  # (1, k)
        padded = completion_logps(model, collate([short, long], tok.pad_token_id))  # (2, K)
    k = alone.shape[1]
    assert_close(padded[0, -k:], alone[0], rtol=1e-5, atol=1e-5)
    assert (padded[0, :-k] == 0).all()  # positions before the completion carry nothing


def test_unpadded_pairs_share_the_prompt_and_equal_whole_sequences(tiny_model_dir, data_files):
    """padding none: a pair's prompt runs once (with the first completion) and the second
    completion attends to its keys and values. Log-probs and every LoRA gradient equal those of
    the left-padded batch (fp32)."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import collate
    from posttrain.train.data import load_examples
    from posttrain.train.forward import completion_logps, unpadded_logps

    tok = load_tokenizer(tiny_model_dir)
    examples, _ = load_examples(data_files / "pairs.jsonl", tok, preference=True, max_length=512)
    model = perturbed_lora(load_model(tiny_model_dir, dtype="fp32"))
    embed = model.get_input_embeddings()
    tokens_in = []
    embed.register_forward_pre_hook(lambda m, args: tokens_in.append(args[0].numel()))
    weights = torch.randn(2 * len(examples), max(len(c) for e in examples for c in e.completions))

    def run(fn):
        model.zero_grad(set_to_none=True)
        logps = fn()
        (logps * weights).sum().backward()
        return logps.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
        }

    tokens_in.clear()
    shared, shared_grads = run(lambda: unpadded_logps(model, examples, "cpu"))
    prompt = sum(len(e.prompt) for e in examples)
    whole = sum(2 * len(e.prompt) + sum(len(c) for c in e.completions) for e in examples)
    # every prompt token once, not twice; the last once per completion (it predicts the first)
    assert sum(tokens_in) == whole - prompt + len(examples)
    padded, padded_grads = run(lambda: completion_logps(model, collate(examples, tok.pad_token_id)))
    assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    assert_grads_close(shared_grads, padded_grads)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_two_processes_match_one(tiny_model_dir, data_files, accelerator, tmp_path, method):
    """torchrun, 2 processes (gloo) x 2 accumulation steps x 1 row vs 1 process x 4 rows."""
    data = data_files / ("pairs.jsonl" if method == "dpo" else "demos.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "train_dist_worker.py"),
            tiny_model_dir,
            str(data),
            method,
            str(tmp_path / "p2"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "p2" / "grads.pt")

    cfg = config(method, tiny_model_dir, data_files, "batch_size=4")
    loss, grads = one_step(cfg, accelerator)
    assert two["loss"] == pytest.approx(loss, rel=1e-5)
    assert_grads_close(two["grads"], grads)

    # The whole loop too: 2 steps, same logged losses and gradient norms, same adapter.
    from posttrain.train.offline.loop import train

    run = config(method, tiny_model_dir, data_files, "batch_size=4", "max_steps=2", "lr=1e-3")
    train(run, tmp_path / "p1", progress=False)
    rows = [
        [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
        for p in ("p2/run", "p1")
    ]
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    from safetensors.torch import load_file

    w2 = load_file(tmp_path / "p2" / "run" / "adapter" / "adapter_model.safetensors")
    w1 = load_file(tmp_path / "p1" / "adapter" / "adapter_model.safetensors")
    for name in w1:
        assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6)
