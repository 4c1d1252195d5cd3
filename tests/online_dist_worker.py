"""The online trainer's first step under torchrun, for the 1-vs-2-process test.

    torchrun --standalone --nproc_per_node 2 tests/online_dist_worker.py TINY_MODEL_DIR OUT [STRATEGY]
    torchrun ... tests/online_dist_worker.py TINY_MOE_DIR OUT ddp --set router_aux_loss_coef=0.01
    torchrun ... tests/online_dist_worker.py TINY_MODEL_DIR OUT fsdp2 --steps 12 [--resume]

Each process trains one GRPO step of the tiny model on its share of the step's problems (a
group never split), with seeded sampling whose seeds count completions over all processes,
so 1 and 2 processes sample the same completions. The gradients the optimizer is about to
use (after DDP's average, or FSDP2's reduce-scatter: gathered whole) are caught at
Processes.clip; process 0 saves OUT/grads.pt with them, the logged loss and the step's whole
logged row (`--set KEY=VALUE`: more overrides; any causal LM folder, e.g. a tiny MoE). STRATEGY: ddp
(default) or fsdp2 (then rollout.sync adapter: a sharded model cannot sample live). The
single-process side calls `first_step` in the test. Under fsdp2 step 1 runs a second time,
started on the meta device (OUT/meta-run: no model object, the rollout engine given, as a vLLM
server would be), saved as OUT/meta.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from stub_rewards import graded

from posttrain.records import Problem

PROBLEMS = [
    Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1), answer_type="exact")
    for i in range(6)
]


def parity_score(problem, index, messages, completion, *, think_open, engine, cfg):
    """Reward 1 when the first sampled token id is even (groups get both rewards)."""
    return graded(float(completion.token_ids[0] % 2 == 0))


def first_step(
    model_dir: str,
    out: Path,
    strategy: str = "ddp",
    extra: tuple[str, ...] = (),
    meta: bool = False,
) -> tuple[float, dict[str, torch.Tensor]]:
    """(logged loss, {parameter: gradient}) of step 1: 2 problems x G 3, one problem per
    generate batch (generation_batch_size = G), micro-batches of 2 completions. `meta`: no model
    object (fsdp2 then starts on the meta device) and a detached hf engine built here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.train.online import loop as O
    from posttrain.train.online.rollout_engine import DetachedHFEngine
    from posttrain.train.parallel.processes import Processes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = None
    if meta:
        engine = DetachedHFEngine(model, tok, model_id=model_dir, batch_size=3)
        model = None
    cfg = O.online_config(
        "grpo",
        overrides=[
            "max_steps=1",
            "num_generations=3",
            "problems_per_step=2",
            "max_new_tokens=4",
            "generation_batch_size=3",
            "micro_batch_size=2",
            "lr=1e-2",
            "lora.r=4",
            "checkpoint_every=0",
            "dtype=fp32",
            "temperature=1.0",
            f"strategy={strategy}",
            *(["rollout.sync=adapter"] if strategy == "fsdp2" else []),
            f"model={model_dir}",
            *extra,
        ],
    )
    caught: dict[str, torch.Tensor] = {}
    real = Processes.clip

    def catch(self, policy, max_norm):
        for name, p in self.unwrap(policy).named_parameters():
            if p.grad is not None:  # an FSDP2 shard is gathered whole (every process calls)
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                caught[name] = g.detach().clone()
        return real(self, policy, max_norm)

    Processes.clip = catch
    try:
        O.train_online(
            cfg,
            out,
            model=model,
            tokenizer=tok,
            problems=PROBLEMS,
            score=parity_score,
            engine=engine,
        )
    finally:
        Processes.clip = real
    rows = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else [{}]
    )
    return rows[0].get("loss"), caught


def several_steps(model_dir: str, out: Path, strategy: str, steps: int, resume: bool) -> None:
    """`steps` GRPO steps with a checkpoint every 2, written to OUT (--steps): the run a test
    kills with SIGKILL and resumes."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from posttrain.train.online import loop as O

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = O.online_config(
        "grpo",
        overrides=[
            f"max_steps={steps}",
            "num_generations=3",
            "problems_per_step=2",
            "max_new_tokens=4",
            "generation_batch_size=3",
            "micro_batch_size=2",
            "lr=1e-2",
            "lora.r=4",
            "checkpoint_every=2",
            "dtype=fp32",
            f"strategy={strategy}",
            "rollout.sync=adapter",
        ],
    )
    O.train_online(
        cfg, out, resume=resume, model=model, tokenizer=tok, problems=PROBLEMS, score=parity_score
    )


def main() -> None:
    torch.set_num_threads(1)
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    strategy = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else "ddp"
    if "--steps" in sys.argv:
        steps = int(sys.argv[sys.argv.index("--steps") + 1])
        several_steps(model_dir, out, strategy, steps, resume="--resume" in sys.argv)
        return
    extra = tuple(sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--set")
    loss, grads = first_step(model_dir, out / "run", strategy, extra)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        row = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
        torch.save({"loss": loss, "grads": grads, "row": row}, out / "grads.pt")
    if strategy == "fsdp2":
        loss, grads = first_step(model_dir, out / "meta-run", strategy, extra, meta=True)
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            torch.save({"loss": loss, "grads": grads}, out / "meta.pt")


if __name__ == "__main__":
    main()
