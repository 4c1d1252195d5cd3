"""LoRA target presets on a dense Llama and a Qwen3-MoE, and the trainable-parameter report.

.venv/bin/python -m pytest tests/test_train_lora.py -q
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.train.config import LoraConfig
from posttrain.train.lora import apply_lora, parameter_group, parameter_report, target_modules


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def tiny_qwen3_moe():
    """Layer 0 dense MLP (mlp_only_layers), layer 1 sparse: 8 fused experts and a router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        )
    )


def test_presets_on_a_dense_model():
    model = tiny_llama()
    assert len(target_modules(model, "all-linear")) == 2 * 7
    assert target_modules(model, "attention")[:4] == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert len(target_modules(model, "mlp")) == 2 * 3
    assert len(target_modules(model, ["q_proj", "v_proj"])) == 4
    assert target_modules(model, r"model\.layers\.1\.mlp\..*") == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert "lm_head" not in target_modules(model, "all-linear")
    with pytest.raises(ConfigError, match="selects no nn.Linear"):
        target_modules(model, "nothing_here")
    with pytest.raises(ConfigError, match="valid regex"):
        target_modules(model, "(")


def test_all_linear_never_touches_moe_router_or_experts():
    model = tiny_qwen3_moe()
    names = target_modules(model, "all-linear")
    assert not any(".gate" == n[-5:] or "experts" in n for n in names)
    assert "model.layers.0.mlp.gate_proj" in names  # the dense MLP layer is targeted
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    assert not peft_model.peft_config["default"].target_parameters  # no hidden 3-D targets
    report = parameter_report(peft_model)
    print({g: v["trainable"] for g, v in report.items()})
    # r 4 on layer 0: q 64->64, k 64->32, v 64->32, o 64->64: 4*(64+64) + 4*(64+32) * 2 +
    # 4*(64+64) = 1792 per layer (x2 layers); dense MLP 64->96 twice, 96->64: 3 * 4*(64+96).
    assert report["attention"]["trainable"] == 2 * 1792
    assert report["mlp"]["trainable"] == 3 * 4 * (64 + 96)
    assert report["router"] == {"trainable": 0, "total": 8 * 64}
    assert report["experts"]["trainable"] == 0
    assert report["experts"]["total"] == 8 * 64 * 64 + 8 * 64 * 32
    assert report["embeddings"]["trainable"] == report["other"]["trainable"] == 0


def test_moe_adapter_reloads_onto_the_modules_it_trained(tmp_path):
    """PEFT's transformers-4 -> 5 remapping would move the dense layer's gate_proj / up_proj /
    down_proj adapters onto the fused experts when the adapter is loaded again."""
    from peft import PeftModel

    from posttrain.train.lora import peft_targets_as_named

    trained = apply_lora(tiny_qwen3_moe(), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B = 0 at init changes nothing)
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        with peft_targets_as_named():
            loaded = PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "adapter")
        assert not loaded.peft_config["default"].target_parameters
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_parameter_groups_from_names():
    assert (
        parameter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        == "attention"
    )
    assert parameter_group("model.layers.1.mlp.gate.weight") == "router"
    assert parameter_group("model.layers.1.mlp.experts.gate_up_proj") == "experts"
    assert parameter_group("model.layers.1.mlp.shared_expert.up_proj.weight") == "mlp"
    assert parameter_group("model.embed_tokens.weight") == "embeddings"
    assert parameter_group("model.norm.weight") == "norms"


def test_full_finetuning_trains_everything_and_lora_only_adapters():
    model = apply_lora(tiny_llama(), LoraConfig(enabled=False))
    assert all(p.requires_grad for p in model.parameters())
    model = apply_lora(tiny_llama(), LoraConfig(r=2, alpha=4, targets="attention"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "self_attn" in n for n in trainable)
    # adapters stay fp32 on a bf16 model, so small AdamW steps are not rounded away
    bf16 = apply_lora(tiny_llama().to(torch.bfloat16), LoraConfig(r=2, alpha=4))
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_keep_the_model_function_at_init(init):
    """PiSSA / OLoRA move a part of W into A B and subtract it from the base: the sum is W."""
    ids = torch.randint(0, 128, (1, 12))
    base = tiny_llama()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = apply_lora(base, LoraConfig(r=4, alpha=4, init=init))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
