"""Memory of a training step: chunked / fused log-probs, gradient checkpointing, dropout-free mode.

    .venv/bin/python -m pytest tests/test_train_memory.py -q

The log-prob functions are checked against the straightforward `log_softmax(...).gather(...)`
(values and gradients, float32, torch.testing's float32 tolerances: rtol 1.3e-6, atol 1e-5),
and what they keep for backward is measured with torch.autograd.graph.saved_tensors_hooks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.losses.logprobs import chunked_token_logps, linear_token_logps
from posttrain.train.batches import collate
from posttrain.train.data import Example
from posttrain.train.forward import completion_logps, fused_head
from posttrain.train.modes import enable_gradient_checkpointing, train_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def straightforward(logits, labels):
    """(B, T) log p(label), 0 at -100, by plain autograd over a float32 log-softmax."""
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0)


def saved_bytes(fn, *inputs):
    """(fn's result, bytes of the storages autograd saved for backward that are not `inputs`')."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    new = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            new[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(new.values())


def labels_with_padding(B, T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # prompt / padding positions
    labels[1, -1] = -100
    return labels


def test_chunked_token_logps_values_and_gradients_equal_the_straightforward_ones():
    """B 2, T 7, V 50, 3 positions per chunk (chunk_elements 150): 3 chunks per row."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50, requires_grad=True)
    labels = labels_with_padding(2, 7, 50)
    got = chunked_token_logps(logits, labels, chunk_elements=150)
    want = straightforward(logits, labels)
    assert got.dtype == torch.float32 and (got[labels == -100] == 0).all()
    assert_close(got, want)
    w = torch.randn(2, 7)  # an arbitrary upstream gradient
    (g_got,) = torch.autograd.grad((got * w).sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    assert_close(g_got, g_want)


def test_linear_token_logps_values_and_gradients_equal_the_straightforward_ones():
    """The fused head: gradients of hidden states, weight and bias all match."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = labels_with_padding(2, 6, 50)
    got = linear_token_logps(hidden, weight, labels, bias, chunk_elements=100)  # 2 per chunk
    want = straightforward(F.linear(hidden, weight, bias), labels)
    assert_close(got, want)
    w = torch.randn(2, 6)
    grads_got = torch.autograd.grad((got * w).sum(), (hidden, weight, bias))
    grads_want = torch.autograd.grad((want * w).sum(), (hidden, weight, bias))
    for a, b in zip(grads_got, grads_want):
        assert_close(a, b)


def test_saved_bytes_no_longer_scale_with_the_vocabulary_in_float32():
    """bf16 logits (B 4, T 32, V 2048): plain autograd keeps a float32 log-softmax of every
    logit, 4 * 32 * 2048 * 4 B = 1 MiB beyond the logits; the chunked version keeps the logits
    themselves (already there) plus a float32 logsumexp a position (4 * 32 * 4 B = 512 B) and
    its int64 labels. The fused head with no logits kept (keep_bytes 0) keeps hidden-size state
    only: the same bytes at V 512 and V 4096 (the weight, an input, is not counted)."""
    B, T = 4, 32
    logits = torch.randn(B, T, 2048).to(torch.bfloat16).requires_grad_()
    labels = labels_with_padding(B, T, 2048)
    _, plain = saved_bytes(lambda: straightforward(logits, labels), logits, labels)
    _, chunked = saved_bytes(lambda: chunked_token_logps(logits, labels), logits, labels)
    assert plain >= B * T * 2048 * 4
    assert chunked <= B * T * (4 + 8 + 1)  # lse float32, labels int64, mask bool

    hidden = torch.randn(B, T, 64, requires_grad=True)
    fused = []
    for V in (512, 4096):
        weight = torch.randn(V, 64, requires_grad=True)
        labels = labels_with_padding(B, T, V)
        _, n = saved_bytes(
            lambda: linear_token_logps(hidden, weight, labels, keep_bytes=0), hidden, weight, labels
        )
        fused.append(n)
    assert fused[0] == fused[1] < B * T * 64 * 4 + B * T * 32  # hidden rows + small per-token


def test_fused_head_keeps_logits_up_to_its_budget_with_bitwise_equal_results():
    """bf16 hidden (B 2, T 6 -> 9 labelled rows), H 16, V 50, 2 rows a chunk (chunk_elements
    100): 5 chunks of 2 x 50 bf16 logits = 200 B each (the last, 1 row, 100 B). A budget of
    450 B keeps the first 2 chunks (400 B; a third would make 600). Values and every gradient
    are bitwise those of keeping nothing (the kept logits are what the matmul makes again)."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 16).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(50, 16).to(torch.bfloat16).requires_grad_()
    labels = labels_with_padding(2, 6, 50)
    assert int((labels != -100).sum()) == 9
    w = torch.randn(2, 6)
    results = {}
    for keep in (0, 450, 1 << 20):
        out, n = saved_bytes(
            lambda: linear_token_logps(hidden, weight, labels, chunk_elements=100, keep_bytes=keep),
            hidden,
            weight,
            labels,
        )
        results[keep] = (n, out.detach(), torch.autograd.grad((out * w).sum(), (hidden, weight)))
    assert results[450][0] - results[0][0] == 400
    assert results[1 << 20][0] - results[0][0] == 4 * 200 + 100
    for keep in (450, 1 << 20):
        assert torch.equal(results[keep][1], results[0][1])
        for a, b in zip(results[keep][2], results[0][2]):
            assert torch.equal(a, b)


def batch_of(tok, n=3):
    examples = [
        Example(
            tok.encode(f"Question {i}: what is {i} + {i}?"),
            (tok.encode(f"{i} + {i} = {2 * i}." + " Yes." * i),),
            i,
        )
        for i in range(n)
    ]
    return collate(examples, tok.pad_token_id)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def lora_model(tiny_model_dir):
    from posttrain.models import load_model
    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_model_dir, dtype="fp32"), LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # B = 0 at init; make the adapter matter so its gradients differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def lora_grads(model, batch, weights):
    model.zero_grad(set_to_none=True)
    (completion_logps(model, batch) * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_completion_logps_fused_head_equals_the_logits_path_with_lora(lora_model, tok):
    """The tiny Llama under PEFT takes the fused path; its log-probs and every LoRA gradient
    equal those of the model's own logits through a float32 log-softmax."""
    assert fused_head(lora_model) is not None
    batch = batch_of(tok)
    weights = torch.randn(batch["labels"].shape)
    train_mode(lora_model, dropout=False)
    got = completion_logps(lora_model, batch)
    grads = lora_grads(lora_model, batch, weights)
    K = batch["labels"].shape[1]
    lora_model.zero_grad(set_to_none=True)
    logits = lora_model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=K + 1,
    ).logits
    want = straightforward(logits[:, :-1], batch["labels"])
    (want * weights).sum().backward()
    assert_close(got, want.detach())
    for name, g in grads.items():
        assert_close(g, dict(lora_model.named_parameters())[name].grad, msg=name)


def test_fsdp2_on_gloo_keeps_the_fused_head_and_its_memory_settings(lora_model, tok):
    """processes.shard in a 1-process gloo group (in this process): the untied head, a unit of
    its own (FSDPLinear), still takes the fused path; the frozen input embedding is never
    gathered in backward, the head is; every unit all-gathers in place
    (gloo_gather.in_place_all_gather) and frees the buffer after copy-out; log-probs and LoRA
    gradients equal the unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from posttrain.train.parallel.gloo_gather import in_place_all_gather
    from posttrain.train.parallel.processes import shard

    batch = batch_of(tok)
    weights = torch.randn(batch["labels"].shape)
    train_mode(lora_model, dropout=False)
    want = completion_logps(lora_model, batch).detach()
    want_grads = lora_grads(lora_model, batch, weights)
    lora_model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = shard(copy.deepcopy(lora_model))
        base = sharded.get_base_model()
        head, embed = base.get_output_embeddings(), base.get_input_embeddings()
        assert isinstance(head, FSDPModule) and fused_head(sharded) is head

        def groups(module):
            return module._get_fsdp_state()._fsdp_param_groups

        assert [g.unshard_in_backward for g in groups(embed)] == [False]
        assert [g.unshard_in_backward for g in groups(head)] == [True]
        units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 2 + 2 + 1  # layers, embeddings and head, root
        for g in (g for m in units for g in groups(m)):
            assert type(g._all_gather_comm) is in_place_all_gather() and g.unshard_async_op
        got = completion_logps(sharded, batch).detach()
        grads = lora_grads(sharded, batch, weights)
    finally:
        dist.destroy_process_group()
    assert_close(got, want)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert_close(g.full_tensor(), want_grads[name], msg=name)


def test_gradient_checkpointing_gives_the_same_lora_gradients(lora_model, tok):
    """Checkpointing on: each decoder layer starts twice (forward + recompute in backward; a
    forward pre-hook counts, since the recompute stops early once it has what it needs),
    and every LoRA gradient equals the run without it (float32)."""
    batch = batch_of(tok)
    weights = torch.randn(batch["labels"].shape)
    checkpointed = copy.deepcopy(lora_model)
    enable_gradient_checkpointing(checkpointed)
    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", lora_model), ("checkpointed", checkpointed)):
        layer = model.get_base_model().model.layers[0]
        layer.register_forward_pre_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
        train_mode(model, dropout=False)  # checkpointing must survive the dropout-free mode
    want = lora_grads(lora_model, batch, weights)
    got = lora_grads(checkpointed, batch, weights)
    assert calls == {"plain": 1, "checkpointed": 2}
    assert want.keys() == got.keys()
    for name in want:
        assert_close(got[name], want[name], msg=name)


def test_dropout_free_train_mode_turns_every_dropout_off(tiny_model_dir):
    """Attention dropout 0.5 and LoRA dropout 0.5: in train_mode(dropout=False) two forwards
    give identical log-probs, equal to eval mode's; with dropout=True they differ."""
    from transformers import AutoModelForCausalLM

    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attention_dropout=0.5
    )
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        model.eval()
        reference = model(input_ids=ids).logits
        train_mode(model, dropout=False)
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        train_mode(model, dropout=True)
        noisy = model(input_ids=ids).logits
    assert torch.equal(a, reference) and torch.equal(b, reference)
    assert (noisy - reference).abs().max() > 1e-3


def test_bf16_lora_under_autocast_keeps_no_float32_copy_of_layer_inputs(tiny_model_dir, tok):
    """A bf16 model with its fp32 LoRA adapter (PEFT's default): PEFT casts every adapted
    layer's input to fp32 for lora_A, and autograd keeps those copies (one per adapter: q, k, v
    each hold their own). Under autocast with the input passed as is (what the trainer does in
    bf16) lora_A gets the bf16 input. Counted: float32 tensors of at least a hidden-size row
    (64) per token kept for backward. The only ones left are the RMSNorms' float32 inputs
    (transformers' LlamaRMSNorm upcasts): 2 per layer + the final norm, less layer 0's first
    (its input, the frozen embedding, needs no gradient) = 4; before, 4 + one per adapted
    linear (7 x 2 layers = 14). The log-probs are equal (B = 0: the adapter adds 0)."""
    from posttrain.models import load_model
    from posttrain.train.config import LoraConfig
    from posttrain.train.parallel.processes import master_weights
    from posttrain.train.lora import adapter_input_as_is, apply_lora

    batch = batch_of(tok)
    tokens = batch["input_ids"].numel()

    def fp32_saved(autocast: bool):
        model = load_model(tiny_model_dir, dtype="bf16")
        model = master_weights(model, "bf16" if autocast else None, "cpu", upcast=False)
        model = apply_lora(model, LoraConfig(r=4, alpha=8))
        if autocast:
            assert adapter_input_as_is(model) == 14
        train_mode(model, dropout=False)
        kept = set()

        def pack(t):
            if t.dtype == torch.float32 and t.numel() >= tokens * 64:
                kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = completion_logps(model, batch)
        return logps.detach(), len(kept)

    plain_logps, plain = fp32_saved(autocast=False)
    cast_logps, cast = fp32_saved(autocast=True)
    assert (plain, cast) == (4 + 14, 4)
    assert torch.equal(cast_logps, plain_logps)
