"""Export: merge a LoRA adapter into its base model and write a plain transformers folder.

    posttrain export --adapter runs/dpo/adapter --out runs/dpo/merged [--model smollm2-135m]

The merge runs in fp32 (a bf16 merge rounds the small LoRA update away); `--dtype` sets what
is saved. The folder is written under a temporary name and renamed when complete; it holds the
tokenizer too, so `AutoModelForCausalLM.from_pretrained(FOLDER)` needs nothing else. The verb is
posttrain/commands/export.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from posttrain.records import DataError


def base_model_of(adapter: str | os.PathLike) -> str:
    """The base model an adapter names in adapter_config.json."""
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise DataError(path, None, "not found: --adapter must be a PEFT adapter folder")
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not base:
        raise DataError(path, None, "missing; pass --model", field="base_model_name_or_path")
    return base


def export_merged(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> Path:
    """Merge `adapter` into `model` (default: the adapter's base) and save to `out`."""
    from posttrain.models import (
        check_adapter,
        check_model,
        check_model_out,
        load_tokenizer,
        load_with_adapter,
    )
    from posttrain.train.lora import peft_targets_as_named

    out = check_model_out(out)
    check_adapter(adapter)
    name = model or base_model_of(adapter)
    check_model(name)  # before the load: a typo costs no minutes
    with peft_targets_as_named():  # MoE adapters load onto the modules they were trained on
        merged = load_with_adapter(
            name, adapter, dtype=dtype, merge=True, trust_remote_code=trust_remote_code
        )
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
