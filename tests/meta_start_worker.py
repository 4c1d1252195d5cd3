"""The meta-device start-up (posttrain/train/parallel/meta_start.py) under torchrun, for
tests/test_meta_start.py: the gathered state after the start-up, and the first steps of the
offline loop started on the meta device and started from a whole model.

    torchrun --standalone --nproc_per_node 2 tests/meta_start_worker.py CASES.json OUT

CASES.json: [{"name", "folder", "targets", "train": bool}]. Writes OUT/NAME.json on rank 0:
{"missing", "extra", "unequal": names of base weights not bitwise equal to a normal load,
"lora_unequal": adapter weights not equal to init_lora on the whole model, "lora_b_max",
"tied", "inv_freq_equal", "bytes_read": [per rank], "whole_bytes",
"meta_rows" / "whole_rows": metrics.jsonl of the two runs (when "data"), "meta_refusal" /
"whole_refusal": why a run could not start on the meta device (None: it did)}.
A case with "full": true trains its targets without an adapter (no state check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def check_state(folder: str, targets: str, procs) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from posttrain.models import load_model
    from posttrain.train.config import LoraConfig
    from posttrain.train.lora import apply_lora
    from posttrain.train.parallel.meta_start import (
        build_on_meta,
        checkpoint_name,
        fill_from_checkpoint,
        init_lora,
    )

    from posttrain.train.parallel import meta_start

    meta_start.READ_BYTES = 1000  # every larger tensor read in several pieces
    lora = LoraConfig(r=4, alpha=8, targets=targets)
    model = apply_lora(build_on_meta(folder, torch.float32), lora)
    model = procs.wrap(model)
    read = fill_from_checkpoint(model, folder, seed=7)
    base = model.get_base_model()
    tied = base.lm_head.weight is base.model.embed_tokens.weight
    rotary = base.model.rotary_emb
    freqs = (rotary.inv_freq.clone(), rotary.original_inv_freq.clone())
    got = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    per_rank = torch.zeros(procs.num_processes, dtype=torch.float64)
    per_rank[procs.process_index] = read["bytes_read"]
    per_rank = procs.reduce(per_rank).tolist()
    if not procs.is_main_process:
        return {}
    whole = load_model(folder, dtype="fp32")
    want_freqs = (whole.model.rotary_emb.inv_freq, whole.model.rotary_emb.original_inv_freq)
    want = dict(whole.state_dict())
    reference = apply_lora(load_model(folder, dtype="fp32"), lora)
    init_lora(reference, 7)
    want_lora = {k: v for k, v in reference.state_dict().items() if ".lora_" in k}
    base_got = {checkpoint_name(k): v for k, v in got.items() if ".lora_" not in k}
    return {
        "missing": sorted(set(want) - set(base_got)),
        "extra": sorted(set(base_got) - set(want)),
        "unequal": sorted(
            k for k in want if k in base_got and not torch.equal(want[k], base_got[k])
        ),
        "lora_count": len(want_lora),
        "lora_unequal": sorted(k for k, v in want_lora.items() if not torch.equal(v, got[k])),
        "lora_b_max": max(float(v.abs().max()) for k, v in got.items() if ".lora_B." in k),
        "tied": tied,
        "config_tied": bool(whole.config.tie_word_embeddings),
        "inv_freq_equal": all(torch.equal(a, b) for a, b in zip(freqs, want_freqs)),
        "bytes_read": per_rank,
        "whole_bytes": sum(p.numel() * 4 for p in whole.parameters()),  # tied: once
    }


def two_runs(folder: str, targets: str, data: str, out: Path, procs, full: bool = False) -> dict:
    """metrics.jsonl of 2 DPO steps started on the meta device and from a whole model, and
    how the meta run started (its log). `full`: no adapter, full fine-tuning of `targets`."""
    from posttrain.models import load_model
    from posttrain.train.config import train_config
    from posttrain.train.offline.loop import train
    from posttrain.train.parallel.meta_start import meta_start_refusal

    rows = {}
    for name in ("meta", "whole"):
        cfg = train_config(
            "dpo",
            None,
            [
                "dtype=fp32",
                "batch_size=1",
                "grad_accum=2",
                "lora.r=4",
                "lora.alpha=8",
                f"lora.targets={targets}",
                "strategy=fsdp2",
                "max_steps=2",
                "ref_cache=false",
                "seed=7",
                *(["lora.enabled=false"] if full else []),
            ],
            model=folder,
            data=data,
        )
        model = load_model(folder, dtype="fp32") if name == "whole" else None
        rows[f"{name}_refusal"] = meta_start_refusal(cfg, procs, model_given=model is not None)
        train(cfg, out / name, model=model, progress=False)
        path = out / name / "metrics.jsonl"
        rows[f"{name}_rows"] = [json.loads(x) for x in path.read_text().splitlines()]
    return rows


def main() -> None:
    from posttrain.train.parallel.processes import Processes

    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    procs = Processes("fsdp2")
    for case in cases:
        full = case.get("full", False)
        found = {} if full else check_state(case["folder"], case["targets"], procs)
        if case.get("data"):
            found.update(
                two_runs(
                    case["folder"], case["targets"], case["data"], out / case["name"], procs, full
                )
            )
        if procs.is_main_process:
            (out / f"{case['name']}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main()
