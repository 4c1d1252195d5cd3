"""Peak RSS of a posttrain DPO run per stage (RSS sampled every 50 ms from /proc/self/statm).

    PYTHONPATH=. .venv/bin/python bench/dpo_memory_stages.py PAIRS.jsonl OUT_DIR GC

GC: true | false (gradient checkpointing). Stages follow the trainer's own log lines: imports,
data (tokenising, model loading and the reference pass), adapter, training steps. The pairs
file used for bench/results/dpo_memory_stages.json: bench/train_dpo.py's make_pairs(16, 200)
(4 pairs a step, ~186-token sequences), bf16, 1 thread, 2 steps.
"""

import sys, threading, time, os, json, builtins
import torch

torch.set_num_threads(1)
page = os.sysconf("SC_PAGE_SIZE") / 2**20
state = {"stage": "imports", "peaks": {}}


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


def sampler():
    while True:
        r = rss()
        s = state["stage"]
        state["peaks"][s] = max(state["peaks"].get(s, 0), r)
        time.sleep(0.05)


threading.Thread(target=sampler, daemon=True).start()
_print = builtins.print


def marking_print(*a, **k):
    text = " ".join(str(x) for x in a)
    for key in ("data:", "reference log-probs", "trainable parameters", "dpo:"):
        if text.startswith(key):
            state["stage"] = "after " + key
    _print(*a, **k)


builtins.print = marking_print
from posttrain.train.config import train_config
from posttrain.train.offline import loop as offline

state["stage"] = "before train (imports done)"
orig_step = offline.step_gradients


def step(*a, **k):
    state["stage"] = "training steps"
    return orig_step(*a, **k)


offline.step_gradients = step
data, out, gc = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = train_config(
    "dpo",
    None,
    [
        "dtype=bf16",
        "batch_size=4",
        "max_steps=2",
        "lora.r=16",
        "lora.alpha=32",
        "checkpoint_every=0",
        "ref_cache=false",
        "num_threads=1",
        f"gradient_checkpointing={gc}",
    ],
    model="smollm2-135m",
    data=data,
)
offline.train(cfg, out, progress=False)
time.sleep(0.2)
_print(json.dumps({k: round(v) for k, v in state["peaks"].items()}, indent=1))
import resource

_print("ru_maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
