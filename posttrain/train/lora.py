"""LoRA through PEFT with explicit target presets, full fine-tuning, and a trainable-parameter report.

    python -c "from posttrain.train.lora import lora_targets; help(lora_targets)"

Target names resolve to explicit module and parameter names, never PEFT's "all-linear" string:
on transformers 5 MoE models (Qwen3-MoE) the experts are fused 3-D parameters and the router
holds a bare weight, and PEFT's "all-linear" then also reaches them through `target_parameters`
without a word. Our `all-linear` targets only `nn.Linear` modules named like attention
projections or dense MLP projections (a shared expert is a dense MLP), never a module inside
`experts` or a router. Routers (`all-router`) and routed experts (`experts`) are adapted only
when named, through PEFT's `target_parameters`: a rank-r delta B A on the router weight, and on
each 3-D expert parameter one rank-r delta per expert, applied to the weight in the forward
(measured in tests/test_moe.py against the merged weights).

PEFT 0.21 on transformers 5 also rewrites the targets of Qwen2/3-MoE and Mixtral adapters from
transformers-4 names: any target called gate_proj / up_proj / down_proj, including the dense
MLP of a non-MoE layer or a shared expert, is moved onto the fused expert parameters, at
creation and again at loading (measured: a reloaded adapter changed the logits by 0.5).
Our targets are already transformers-5 module names, so `peft_targets_as_named()` switches
that rewrite off; create and load adapters inside it.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from posttrain.config import ConfigError
from posttrain.train.config import LoraConfig

# Module names across Llama, Qwen2/3 (dense and MoE), Mistral, Gemma, Phi-3, Olmo.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PRESETS = {"all-linear": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}
MOE_TARGETS = ("all-router", "experts", "shared-expert")
NEW_LAYERS = "new-layers"  # the layers `posttrain expand` added (expand.py)
TARGET_NAMES = (*PRESETS, *MOE_TARGETS, NEW_LAYERS)
GROUPS = ("attention", "mlp", "router", "experts", "embeddings", "norms", "other")


def _parts(name: str) -> list[str]:
    return name.split(".")


def is_expert_or_router(name: str) -> bool:
    """Module / parameter names inside routed experts or a router (`mlp.gate` in Qwen3-MoE)."""
    parts = _parts(name)
    if "experts" in parts or "router" in parts:  # shared_expert(s) is a dense MLP: allowed
        return True
    return any(parts[i] == "mlp" and parts[i + 1] == "gate" for i in range(len(parts) - 1))


def _preset_modules(model: nn.Module, preset: str) -> list[str]:
    """The nn.Linear modules of a module preset (all-linear, attention, mlp)."""
    wanted = set(PRESETS[preset])
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and _parts(n)[-1] in wanted and not is_expert_or_router(n)
    ]


def _moe_target(model: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(modules, parameters) of all-router | experts | shared-expert; ConfigError when the
    model has none of what the name asks for."""
    from posttrain.train import moe

    kind = type(moe.transformers_model(model)).__name__
    if name == "shared-expert":
        found = moe.shared_expert_linears(model)
        if not found:
            raise ConfigError(
                f"lora.targets: 'shared-expert': {kind} has no shared expert "
                "(Qwen2-MoE and DeepSeek-MoE have one; Qwen3-MoE and Mixtral do not)"
            )
        return found, []
    found = moe.router_weights(model) if name == "all-router" else moe.expert_parameters(model)
    if not found:
        what = "router" if name == "all-router" else "routed experts with fused 3-D weights"
        raise ConfigError(
            f"lora.targets: {name!r}: {kind} has no {what} (not a mixture of "
            "experts, or a layout posttrain does not know)"
        )
    return [], found


def split_targets(targets: str | list[str]) -> list[str] | None:
    """The target names of a spec when it is made of TARGET_NAMES (a name, a comma-separated
    mix, or a list of them); None when it is a regex or module names. A mix that holds an
    unknown name is an error listing the known ones."""
    parts = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    known = [t for t in parts if t in TARGET_NAMES]
    if not known:
        return None
    unknown = [t for t in parts if t not in TARGET_NAMES]
    if unknown:
        raise ConfigError(
            f"lora.targets: {', '.join(map(repr, unknown))} in {targets!r} is not a "
            f"target name; known: {', '.join(TARGET_NAMES)}"
        )
    return list(dict.fromkeys(known))


def lora_targets(model: nn.Module, targets: str | list[str]) -> tuple[list[str], list[str]]:
    """(nn.Linear module names, parameter names) a LoRA spec selects, each sorted.

    `targets`: target names, combinable with commas (`all-linear,all-router`): all-linear,
    attention, mlp (nn.Linear modules; never a router or routed expert), all-router (the
    routers' weights), experts (the routed experts' fused 3-D parameters), shared-expert (the
    shared expert's linears), new-layers (all-linear inside the layers `posttrain expand`
    added); or a list of module names, each matching a module whose last name
    part equals it; or any other string, a regex that must match the whole module name (e.g.
    r"model\\.layers\\.[0-3]\\..*_proj"). Parameters are adapted through PEFT's
    `target_parameters` (a low-rank delta per expert for a 3-D parameter).
    """
    names = split_targets(targets)
    modules: set[str] = set()
    parameters: set[str] = set()
    if names is not None:
        for name in names:
            if name in PRESETS:
                modules.update(_preset_modules(model, name))
            elif name == NEW_LAYERS:  # all-linear inside the layers posttrain_expand.json names
                from posttrain.expand.depth import in_new_layers

                modules.update(in_new_layers(model, _preset_modules(model, "all-linear")))
            else:
                found_modules, found_parameters = _moe_target(model, name)
                modules.update(found_modules)
                parameters.update(found_parameters)
    elif isinstance(targets, (list, tuple)):
        wanted = set(targets)
        modules.update(
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (_parts(n)[-1] in wanted or n in wanted)
        )
    else:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(
                f"lora.targets: {targets!r} is neither a target name "
                f"({', '.join(TARGET_NAMES)}) nor a valid regex: {e}"
            ) from None
        modules.update(
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)
        )
    if not modules and not parameters:
        raise ConfigError(
            f"lora.targets: {targets!r} selects no nn.Linear module of {type(model).__name__}"
        )
    return sorted(modules), sorted(parameters)


def target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The nn.Linear module names of lora_targets (sorted)."""
    return lora_targets(model, targets)[0]


@contextlib.contextmanager
def peft_targets_as_named():
    """Within: PEFT uses LoRA target names as given (no transformers-4 -> 5 MoE remapping)."""
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:  # an older PEFT without the rewrite
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def apply_lora(model: nn.Module, cfg: LoraConfig, init_adapter: str | None = None) -> nn.Module:
    """The model with a LoRA adapter (a PeftModel), or the model itself for full fine-tuning.
    `init_adapter`: a PEFT folder whose weights the adapter starts from (trainable), instead
    of a fresh one; its settings must be `cfg`'s (check_init_adapter).

    LoRA weights are kept in fp32 even on a bf16 model (PEFT's autocast_adapter_dtype): AdamW
    steps of ~lr * 1 on bf16 weights would round away.
    """
    cfg.check()
    if init_adapter:
        from peft import PeftModel

        check_init_adapter(model, cfg, init_adapter)
        modules, _ = lora_targets(model, cfg.targets)
        with peft_targets_as_named():
            loaded = PeftModel.from_pretrained(
                model, str(init_adapter), is_trainable=True, autocast_adapter_dtype=True
            )
        found, _ = adapted_modules(loaded)
        if found != set(modules):
            odd = sorted(found ^ set(modules))
            raise ConfigError(
                f"init_adapter: {init_adapter}: it adapts other modules than lora.targets "
                f"{cfg.targets!r} selects ({len(odd)} differ, e.g. {odd[0]!r}); train with the "
                "adapter's lora settings"
            )
        return loaded
    if not cfg.enabled and cfg.targets == NEW_LAYERS:  # full fine-tuning of the new layers
        from posttrain.expand.depth import select_new_layers_for_full_finetuning

        select_new_layers_for_full_finetuning(model)
        return model
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    init = True if cfg.init == "default" else cfg.init
    modules, parameters = lora_targets(model, cfg.targets)
    if parameters and (cfg.dropout or cfg.init != "default"):
        raise ConfigError(
            f"lora.targets: {cfg.targets!r} adapts router / expert parameters, "
            "which PEFT supports only with lora.dropout 0 and lora.init default "
            f"(got dropout {cfg.dropout}, init {cfg.init!r})"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.rslora,
        init_lora_weights=init,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )
    with peft_targets_as_named():
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)


def check_init_adapter(model: nn.Module, cfg: LoraConfig, path: str) -> None:
    """The adapter at `path` must be one `cfg` would create (r, alpha, rslora, dropout): a
    loaded adapter whose settings differ would silently override the config's. ConfigError
    naming the first difference. (Its targets are checked once loaded: adapted_modules.)"""
    import json
    from pathlib import Path

    saved = json.loads((Path(path) / "adapter_config.json").read_text())
    expected = {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
    }
    for key, want in expected.items():
        if saved.get(key) != want:
            raise ConfigError(
                f"init_adapter: {path}: its {key} is {saved.get(key)!r} but the lora settings "
                f"give {want!r}; train with the adapter's lora settings"
            )


def adapted_modules(peft_model: nn.Module) -> tuple[set[str], set[str]]:
    """(module names, parameter names) a loaded PeftModel adapts, named as in the base model."""
    modules, parameters = set(), set()
    for name, m in peft_model.named_modules():
        if not hasattr(m, "lora_A") or not len(m.lora_A):
            continue
        name = name.removeprefix("base_model.model.")
        names = getattr(m, "parameter_name", None)  # PEFT's ParamWrapper (target_parameters)
        if names:
            parameters.add(f"{name}.{names}")
        else:
            modules.add(name)
    return modules, parameters


def adapter_input_as_is(model: nn.Module) -> int:
    """Let every LoRA layer feed its input to the adapter in the input's own dtype; returns how
    many layers were switched.

    PEFT casts each adapted layer's input to the adapter's dtype (fp32 on a bf16 model) before
    lora_A, and autograd keeps that fp32 copy for lora_A's gradient: one per adapter, so q, k
    and v hold three copies of the same input. Under torch.autocast (distributed.precision) the
    cast is a round trip anyway (fp32, then back to bf16 for the matmul); without it the adapter
    reads the bf16 input that q, k and v share. Only for a forward that runs under autocast:
    otherwise lora_A would get bf16 input against fp32 weights.
    """
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def parameter_group(name: str) -> str:
    """attention | mlp | router | experts | embeddings | norms | other, from a parameter name."""
    parts = _parts(name)
    if "experts" in parts:
        return "experts"
    if is_expert_or_router(name):
        return "router"
    if any(p in ("embed_tokens", "lm_head", "wte", "wpe", "embeddings") for p in parts):
        return "embeddings"
    if any(p in ATTENTION or p in ("self_attn", "attn", "attention") for p in parts):
        return "attention"
    if any(p in MLP or p in ("mlp", "feed_forward", "shared_expert") for p in parts):
        return "mlp"
    if any("norm" in p for p in parts):
        return "norms"
    return "other"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} over unique parameters (tied weights count once)."""
    report = {g: {"trainable": 0, "total": 0} for g in GROUPS}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = report[parameter_group(name)]
        group["total"] += p.numel()
        if p.requires_grad:
            group["trainable"] += p.numel()
    return report


def format_parameter_report(report: dict[str, dict[str, int]]) -> str:
    trainable = sum(g["trainable"] for g in report.values())
    total = sum(g["total"] for g in report.values())
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)"]
    for name, g in report.items():
        if g["total"] or g["trainable"]:
            lines.append(f"  {name:<11} {g['trainable']:>13,} trainable of {g['total']:>14,}")
    return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
