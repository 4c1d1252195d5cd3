"""The offline loop end to end on a tiny model: outputs, resume, NaN guard, reference cache, export.

.venv/bin/python -m pytest tests/test_train_offline.py -q      # -m slow: the embedded model
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.config import ConfigError
from posttrain.train.config import train_config
from posttrain.train.metrics import NonFiniteError
from posttrain.train.offline.loop import train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_data(folder, n=8):
    """n arithmetic pairs and demonstrations with answers of different lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs, demos = [], []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        prompt = [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ]
        good = f"{a} + {b} = {a + b}." + " Check: fine." * (i % 3)
        bad = f"It is {a + b + 1}." + " Sure." * (i % 2)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "problem_id": str(i),
            }
        )
        demos.append({"messages": prompt + [{"role": "assistant", "content": good}]})
    for name, rows in (("pairs", pairs), ("demos", demos)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl", folder / "demos.jsonl"


def cfg_for(method, model, data, *settings):
    return train_config(
        method,
        None,
        ["dtype=fp32", "batch_size=2", "lora.r=4", "lora.alpha=8", *settings],
        model=model,
        data=str(data),
    )


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_writes_config_metrics_checkpoints_and_adapter(tiny_model_dir, tmp_path):
    pairs, _ = write_data(tmp_path / "data")
    out = tmp_path / "run"
    summary = train(
        cfg_for("dpo", tiny_model_dir, pairs, "checkpoint_every=2", "warmup_ratio=0.25", "lr=1e-3"),
        out,
        progress=False,
    )
    assert summary["finished"] and summary["total_steps"] == 4  # 8 pairs / batch 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1: policy = reference (LoRA B = 0), so every pair's log-ratio is 0: loss = ln 2.
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/accuracies", "logps/chosen", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    # warmup 1 step (0.25 * 4), then cosine over steps 1..3, p = 0, 1/2, 1: 1, 0.5, 0
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.0])
    assert rows[-1]["rewards/margins"] > 0  # it learned to prefer the chosen answers
    saved = (out / "config.yaml").read_text()
    assert "method: dpo" in saved and "lr: 0.001" in saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    assert len(adapter["target_modules"]) == 2 * 7
    report = json.loads((out / "data_report.json").read_text())
    assert (report["rows"], report["kept"], report["dropped_too_long"]) == (8, 8, 0)


def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """2 epochs of 4 steps of SFT, LoRA dropout on (so the RNG state matters; the DPO family
    runs without dropout): one run straight through, one stopped after step 3 (with junk
    metrics of a step 4 the killed run logged after its checkpoint), then resumed. Adapter
    tensors must be identical (torch.equal)."""
    _, demos = write_data(tmp_path / "data")
    settings = ["epochs=2", "lora.dropout=0.1", "lr=1e-3", "checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg_for("sft", tiny_model_dir, demos, *settings), straight, progress=False)
    train(
        cfg_for("sft", tiny_model_dir, demos, *settings, "stop_after_steps=3"),
        resumed,
        progress=False,
    )
    assert not (resumed / "adapter").exists()
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + '\n{"step": 5, "lo')
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg_for("sft", tiny_model_dir, demos, *settings), resumed, progress=False)
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.002"):
        train(
            cfg_for("sft", tiny_model_dir, demos, *settings[:2], "lr=2e-3", "checkpoint_every=2"),
            resumed,
            resume=True,
            progress=False,
        )
    train(cfg_for("sft", tiny_model_dir, demos, *settings), resumed, resume=True, progress=False)

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = metrics(straight), metrics(resumed)
    assert [r["step"] for r in rb] == list(range(1, 9))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_lr_inf_stops_before_a_broken_checkpoint(tiny_model_dir, tmp_path):
    _, demos = write_data(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 1: the weights hold NaN or inf"):
        train(
            cfg_for("sft", tiny_model_dir, demos, "lr=.inf", "checkpoint_every=1"),
            out,
            progress=False,
        )
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    assert not (out / "adapter").exists()


def test_nan_in_the_forward_pass_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from posttrain.models import load_model

    _, demos = write_data(tmp_path / "data")
    out = tmp_path / "run"
    model = load_model(tiny_model_dir, dtype="fp32")
    calls = []

    def poison(module, args, output):  # the 3rd forward (step 3) produces NaN
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteError) as e:
        # padding longest: one forward per step (padding none runs one per row)
        train(
            cfg_for("sft", tiny_model_dir, demos, "checkpoint_every=1", "padding=longest"),
            out,
            model=model,
            progress=False,
        )
    assert "step 3: non-finite loss = nan and grad norm = nan" in str(e.value)
    assert "step-00000002" in str(e.value)
    last = out / "checkpoints" / "step-00000002"
    assert all(
        torch.isfinite(t).all()
        for t in load_file(last / "adapter" / "adapter_model.safetensors").values()
    )
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_reference_logps_are_cached_beside_the_data_and_never_stale(
    tiny_model_dir, tmp_path, capsys
):
    pairs, _ = write_data(tmp_path / "data")
    cfg = cfg_for("dpo", tiny_model_dir, pairs, "max_steps=1")
    train(cfg, tmp_path / "a", progress=False)
    caches = list(pairs.parent.glob("pairs.jsonl.ref-*.pt"))
    assert len(caches) == 1
    assert "reference log-probs: computed for 8 pairs" in capsys.readouterr().out
    train(cfg, tmp_path / "b", progress=False)
    assert "reference log-probs: read from cache" in capsys.readouterr().out
    # Another max_length that cuts answers changes the token ids, hence the key and the file.
    train(
        cfg_for(
            "dpo",
            tiny_model_dir,
            pairs,
            "max_steps=1",
            "max_length=30",
            "length_policy=truncate_completion",
        ),
        tmp_path / "c",
        progress=False,
    )
    assert "computed for" in capsys.readouterr().out
    # the data report training writes counts the pairs whose two answers were cut
    cut = json.loads((tmp_path / "c" / "data_report.json").read_text())
    assert cut["completion_truncated"] > 0 and cut["prompt_truncated"] == 0
    assert cut["completion_tokens_cut"] >= cut["completion_truncated"]
    assert len(list(pairs.parent.glob("pairs.jsonl.ref-*.pt"))) == 2
    # A cache file holding another key (e.g. copied over) is not trusted.
    saved = torch.load(caches[0])
    torch.save({"key": "other", "logps": saved["logps"]}, caches[0])
    train(cfg, tmp_path / "d", progress=False)
    assert "computed for" in capsys.readouterr().out


def test_export_merges_into_a_folder_plain_transformers_loads(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.export import export_merged

    pairs, _ = write_data(tmp_path / "data")
    out = tmp_path / "run"
    train(cfg_for("dpo", tiny_model_dir, pairs, "lr=1e-2", "max_steps=2"), out, progress=False)
    merged = export_merged(out / "adapter", tmp_path / "merged")
    ids = torch.randint(0, 1000, (2, 16))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), out / "adapter"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits for m in (peft, plain, base))
    assert (want - before).abs().max() > 1e-4  # the adapter does change the model
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (merged / "tokenizer.json").exists()


def test_pissa_adapter_is_exported_as_a_plain_lora_for_the_original_base(tiny_model_dir, tmp_path):
    """PiSSA changes the base weights; the final adapter is converted so that the untouched
    base + adapter equals the trained policy (residual base + trained PiSSA adapter)."""
    from peft import PeftModel

    from posttrain.models import load_model
    from posttrain.train.parallel.checkpoint import load_weights
    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora

    _, demos = write_data(tmp_path / "data")
    out = tmp_path / "run"
    train(
        cfg_for("sft", tiny_model_dir, demos, "lora.init=pissa", "lr=1e-2", "max_steps=2"),
        out,
        progress=False,
    )
    policy = apply_lora(
        load_model(tiny_model_dir, dtype="fp32"), LoraConfig(r=4, alpha=8, init="pissa")
    )
    load_weights(policy, out / "checkpoints" / "step-00000002")
    exported = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype="fp32"), out / "adapter")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert_close(
            exported(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("method", ["dft", "chord-phi"])
def test_every_method_runs_a_step(tiny_model_dir, tmp_path, method):
    _, demos = write_data(tmp_path / "data", n=2)
    train(cfg_for(method, tiny_model_dir, demos, "max_steps=1"), tmp_path / "run", progress=False)
    row = metrics(tmp_path / "run")[0]
    assert row["loss"] == row["loss"]  # finite, logged


def test_dpo_family_first_step_losses_worked_by_hand(tiny_model_dir, tmp_path):
    """Step 1 of each preference method, before any update (LoRA B = 0: policy = reference).
    2 pairs, batch 2, beta 0.1, fp32.
    ipo at zero log-ratios: (0 - 1 / (2 beta))^2 = 5^2 = 25.
    At zero log-ratios dpo, robust-dpo ([(1 - ls) ln 2 - ls ln 2] / (1 - 2 ls)) and bdpo
    (log(lam + 1 - lam) = 0) are all ln 2, so the cached reference is then shifted: ref chosen
    - 1, ref rejected + 1, giving every pair c = +1, r = -1, h = 2 at step 1:
      dpo:        softplus(-beta h) = softplus(-0.2) = 0.598139;
      robust-dpo: ls 0.1 (preset): [0.9 softplus(-0.2) - 0.1 softplus(0.2)] / 0.8
                  = softplus(-0.2) - 0.025 = 0.573139 (softplus(0.2) = softplus(-0.2) + 0.2);
      bdpo:       lam 0.5: r' = log(0.5 e^-1 + 0.5) = -0.379885,
                  softplus(-0.1 (1 + 0.379885)) = 0.626531;
      rpo:        nll_weight 1 (preset): 0.598139 + mean over pairs of chosen NLL / chosen
                  tokens, the NLL computed here from the base model."""
    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.batches import collate
    from posttrain.train.data import load_examples
    from posttrain.train.forward import completion_logps

    pairs, _ = write_data(tmp_path / "data", n=2)

    def first_loss(method):
        out = tmp_path / method
        train(cfg_for(method, tiny_model_dir, pairs, "max_steps=1"), out, progress=False)
        return metrics(out)[0]["loss"]

    assert first_loss("ipo") == pytest.approx(25.0, abs=1e-4)
    (cache,) = pairs.parent.glob("pairs.jsonl.ref-*.pt")
    saved = torch.load(cache)
    shifted = saved["logps"] + torch.tensor([-1.0, 1.0])  # (N, 2): chosen - 1, rejected + 1
    torch.save({"key": saved["key"], "logps": shifted}, cache)

    tok = load_tokenizer(tiny_model_dir)
    examples, _ = load_examples(pairs, tok, preference=True, max_length=1024)
    model = load_model(tiny_model_dir, dtype="fp32").eval()
    with torch.no_grad():
        nll = [
            -completion_logps(model, collate([e], tok.pad_token_id))[0].sum().item()
            / len(e.completions[0])
            for e in examples
        ]
    want = {
        "dpo": 0.598139,
        "robust-dpo": 0.573139,
        "bdpo": 0.626531,
        "rpo": 0.598139 + sum(nll) / len(nll),
    }
    got = {method: first_loss(method) for method in want}
    assert got == pytest.approx(want, abs=1e-5)


def test_dpo_policy_runs_without_dropout_like_its_reference(tiny_model_dir, tmp_path):
    """A model with attention dropout 0.5: the reference pass runs without dropout, so the
    policy must too, and the step-1 loss is ln 2 to 1e-5 (it was 0.696977 when the policy ran in
    train mode)."""
    from transformers import AutoModelForCausalLM

    pairs, _ = write_data(tmp_path / "data", n=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attention_dropout=0.5
    )
    train(
        cfg_for("dpo", tiny_model_dir, pairs, "max_steps=1"),
        tmp_path / "run",
        model=model,
        progress=False,
    )
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_reference_cache_misses_when_the_weights_or_config_change(tiny_model_dir, tmp_path, capsys):
    """A weight rewritten in place with the file's size and mtime put back (the old key, name
    + size + whole-second mtime, matched it) is a miss; so is a config change."""
    import os
    import shutil

    from safetensors.torch import save_file

    pairs, _ = write_data(tmp_path / "data", n=2)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cfg = cfg_for("dpo", str(folder), pairs, "max_steps=1")
    train(cfg, tmp_path / "a", progress=False)
    assert "computed for 2 pairs" in capsys.readouterr().out
    train(cfg, tmp_path / "b", progress=False)
    assert "read from cache" in capsys.readouterr().out

    weights = folder / "model.safetensors"
    before = weights.stat()
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    train(cfg, tmp_path / "c", progress=False)
    assert "computed for 2 pairs" in capsys.readouterr().out

    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    train(cfg, tmp_path / "d", progress=False)
    assert "computed for 2 pairs" in capsys.readouterr().out
    assert len(list(pairs.parent.glob("pairs.jsonl.ref-*.pt"))) == 3


def test_cli_trains_and_refuses_to_overwrite(tiny_model_dir, tmp_path):
    _, demos = write_data(tmp_path / "data", n=4)
    out = tmp_path / "run"
    args = [
        "train",
        "--method",
        "sft",
        "--model",
        tiny_model_dir,
        "--data",
        str(demos),
        "--out",
        str(out),
        "--set",
        "dtype=fp32",
        "--set",
        "max_steps=2",
        "--no-progress",
    ]
    proc = run_cli(*args, env=ONE_THREAD)
    assert "trainable parameters" in proc.stdout and "finished at step 2 of 2" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    again = run_cli(*args, check=False, env=ONE_THREAD)
    assert again.returncode == 1 and "pass --resume" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    proc = run_cli(
        "train",
        "--method",
        "sft",
        "--model",
        tiny_model_dir,
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "x"),
        check=False,
        env=ONE_THREAD,
    )
    assert proc.returncode == 1
    assert f"{bad}:1: field 'messages': the last message must be the assistant's" in proc.stderr


@pytest.mark.slow
def test_embedded_model_dpo_then_export_through_the_cli(tmp_path):
    """The embedded SmolLM2-135M: a DPO step through the CLI, export, plain transformers."""
    from transformers import AutoModelForCausalLM

    pairs, _ = write_data(tmp_path / "data", n=2)
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--method",
        "dpo",
        "--data",
        str(pairs),
        "--out",
        str(out),
        "--set",
        "batch_size=2",
        "--no-progress",
    )
    assert "finished at step 1 of 1" in proc.stdout
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=2e-3)
    run_cli("export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.model_type == "llama"


def test_hub_model_fingerprint_is_its_blob_hashes(tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot, whose weight files are links to blobs named by
    their content hash: the names are the fingerprint (another blob: another key); an id that
    is not in the cache has no fingerprint, so its reference log-probs are not cached."""
    import huggingface_hub.constants

    from posttrain.train.offline.refcache import cache_key, model_fingerprint

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "rev1", repo / "blobs"
    for d in (repo / "refs", snapshot, blobs):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text("rev1")
    for name in ("sha-one", "sha-two"):
        (blobs / name).write_bytes(b"weights " + name.encode())
    (snapshot / "model.safetensors").symlink_to("../../blobs/sha-one")
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    first = model_fingerprint("org/tiny")
    assert first["files"]["model.safetensors"] == "blob:sha-one"
    key = cache_key("org/tiny", "bf16", [])
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to("../../blobs/sha-two")
    assert cache_key("org/tiny", "bf16", []) != key
    assert cache_key("org/tiny", "fp32", []) != cache_key("org/tiny", "bf16", [])
    assert model_fingerprint("org/absent") is None and cache_key("org/absent", "bf16", []) is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_step_one_dpo_loss_is_exactly_ln2(tiny_model_dir, tmp_path, checkpointing):
    """bf16, 4 pairs of different lengths in one batch. At step 1 the policy is the reference
    (B = 0), so every log-ratio is 0 and the loss is ln 2 = 0.693147182 in float32, exactly,
    provided the reference pass computes each sequence exactly as the policy's forward does. A
    bf16 sequence's log-prob depends on the shape of the batch it runs in (SmolLM2-135M, 4 pairs
    of ~186 tokens, reference in batches of 8 pairs, training batch 4: 0.7195; the tiny model's
    GEMMs happen not to show it, so the forward shapes are checked too): with padding none,
    the default on CPU, every pair runs alone, unpadded, in both passes (its prompt once, with
    gradient checkpointing too: forward.prefix_cache)."""
    from posttrain.models import load_model

    pairs, _ = write_data(tmp_path / "data", n=4)
    model = load_model(tiny_model_dir, dtype="bf16")
    shapes = {True: [], False: []}  # grad enabled (policy) -> input shapes
    model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: shapes[torch.is_grad_enabled()].append(tuple(args[0].shape))
    )
    out = tmp_path / "run"
    train(
        cfg_for(
            "dpo",
            tiny_model_dir,
            pairs,
            "dtype=bf16",
            "batch_size=4",
            "max_steps=1",
            "ref_cache=false",
            f"gradient_checkpointing={checkpointing}",
        ),
        out,
        model=model,
        progress=False,
    )
    assert metrics(out)[0]["loss"] == float(torch.log(torch.tensor(2.0)))
    # a forward per completion, each of one unpadded sequence
    assert len(shapes[True]) == 8 and all(s[0] == 1 for s in shapes[True])
    assert sorted(shapes[False]) == sorted(shapes[True])
