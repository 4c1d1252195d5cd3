"""The bad-input table: every mistake a new user makes is one clear line before any work starts.

    .venv/bin/python -m pytest tests/test_bad_input.py -q

Each case runs the real CLI in-process (`posttrain.cli.main(argv)`) and checks: the exit code
(2 usage: flags or a value out of range; 1 input: a file, a recipe, a model); stderr is exactly
one line `posttrain VERB: error: ...` with no traceback; the key words of that line; and that
nothing was written (no output file or folder, no stage folder: the set of paths under the
test's folder is unchanged). No model is loaded: loading one raises ModelLoadStarted, which
fails the case (each mistake must be found before that).

A case is one line of CASES: (id, argv, YAML, exit code, key words). In argv and the key words
`{t}` is the test's folder (its files are FILES below, plus the folders made in `tmp`) and
`{r}` the repository's recipes/ folder; YAML, when not None, is written to {t}/case.yaml (a
recipe or a grid) before the command runs.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from posttrain import cli, models

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _problem(pid, question="What is 2 + 3?", answer="5", answer_type="math", **extra) -> str:
    row = {"id": pid, "question": question, "answer": answer, "answer_type": answer_type}
    return json.dumps({**row, **extra})


def _sample(pid="p1", index=0, response="#### 5", **extra) -> str:
    problem = json.loads(_problem(pid))
    row = {"problem": problem, "sample_index": index, "response": response}
    row |= {"messages": [{"role": "user", "content": problem["question"]}]}
    row |= {"reasoning": "", "finish_reason": "stop", "num_tokens": 3, "mean_logprob": -0.5}
    return json.dumps({**row, **extra})


def _scored(pid, index, verdict) -> str:
    return _sample(pid, index, verdict=verdict, reward=float(verdict == "correct"), extracted="5")


def _pair(chosen="#### 5", rejected="#### 6", prompt="What is 2 + 3?") -> str:
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    row = {"prompt": [{"role": "user", "content": prompt}], "problem_id": "p1"}
    return json.dumps({**row, "chosen": reply(chosen), "rejected": reply(rejected)})


def _item(pid, verdict) -> str:
    return json.dumps({"problem_id": pid, "verdict": verdict, "response": "#### 5"})


# the test folder's files (name -> text); every case sees all of them
FILES = {
    "p.jsonl": "\n".join([_problem("p1"), _problem("p2", "What is 7 - 2?")]) + "\n",
    # a lone UTF-16 surrogate (a JSON escape that decodes to no character) on line 2
    "p-surrogate.jsonl": _problem("p1") + '\n{"id": "p2", "question": "bad \\ud800 here", '
    '"answer": "1", "answer_type": "exact"}\n',
    "p-empty-id.jsonl": _problem("") + "\n",
    "p-nan.jsonl": _problem("p1") + "\n" + _problem("p2", answer="nan") + "\n",
    "p-bad-json.jsonl": _problem("p1") + '\n{"id": "p2", "question": \n',
    "p-empty.jsonl": "",
    "p-dup.jsonl": _problem("p1") + "\n" + _problem("p1") + "\n",
    "p-type.jsonl": _problem("p1", answer_type="number") + "\n",
    "s.jsonl": "\n".join([_sample("p1", 0), _sample("p1", 1, "#### 6")]) + "\n",
    "s-no-response.jsonl": json.dumps({**json.loads(_sample()), "response": None}) + "\n",
    "s-finish.jsonl": _sample(finish_reason="eos") + "\n",
    "s-surrogate.jsonl": _sample()
    + "\n"
    + _sample(index=1).replace("#### 5", "#### \\udc80")
    + "\n",
    "sc.jsonl": "\n".join([_scored("p1", 0, "correct"), _scored("p1", 1, "incorrect")]) + "\n",
    "sc-verdict.jsonl": _scored("p1", 0, "right") + "\n",
    "sc-wrong.jsonl": _scored("p1", 0, "incorrect") + "\n" + _scored("p1", 1, "no_answer") + "\n",
    "pairs.jsonl": _pair() + "\n",
    "pairs-same.jsonl": _pair("#### 5", "#### 5") + "\n" + _pair("#### 6", "#### 6") + "\n",
    "pairs-no-rejected.jsonl": json.dumps({"prompt": "q", "chosen": "#### 5"}) + "\n",
    "pairs-int.jsonl": json.dumps({"prompt": "q", "chosen": 5, "rejected": 6}) + "\n",
    "A/items.jsonl": _item("p1", "correct") + "\n" + _item("p2", "incorrect") + "\n",
    "B/items.jsonl": _item("p1", "correct") + "\n" + _item("p2", "correct") + "\n",
    "C/items.jsonl": _item("q1", "correct") + "\n",
    "D/items.jsonl": _item("p1", "maybe") + "\n",
    "adapter/README": "not an adapter\n",
    "config-only/config.json": '{"model_type": "llama"}\n',
    "judge.txt": "Judge {question} {response} {correct_answer}\n",
    "judge-bad.txt": "Judge {question} {response}\n",
    "train.yaml": "lr: 1.0e-4\nbogus_key: 3\n",
    "train-bad.yaml": "lr: [1\n",
    "old-run/checkpoints/step-2/state.json": '{"step": 2}\n',  # an earlier run's checkpoint
}
FOLDERS = ["outdir", "empty", "runs-none"]

# fmt: off
# (id, argv, YAML written to {t}/case.yaml or None, exit code, key words of the message)
CASES = [
    # ---- problems
    ("problems-out-is-dir", "problems builtin:arith:2 --out {t}/outdir", None, 1, ["{t}/outdir", "folder"]),
    ("problems-surrogate", "problems {t}/p-surrogate.jsonl --out {t}/o.jsonl", None, 1, ["p-surrogate.jsonl:2", "question", "surrogate"]),
    ("problems-empty-id", "problems {t}/p-empty-id.jsonl --out {t}/o.jsonl", None, 1, ["p-empty-id.jsonl:1", "'id'", "empty"]),
    ("problems-answer-nan", "problems {t}/p-nan.jsonl --out {t}/o.jsonl", None, 1, ["p-nan.jsonl:2", "'answer'", "nan"]),
    ("problems-bad-json", "problems {t}/p-bad-json.jsonl --out {t}/o.jsonl", None, 1, ["p-bad-json.jsonl:2", "invalid JSON"]),
    ("problems-empty-file", "problems {t}/p-empty.jsonl --out {t}/o.jsonl", None, 1, ["p-empty.jsonl", "empty"]),
    ("problems-duplicate-id", "problems {t}/p-dup.jsonl --out {t}/o.jsonl", None, 1, ["p-dup.jsonl:2", "duplicate id"]),
    ("problems-answer-type", "problems {t}/p-type.jsonl --out {t}/o.jsonl", None, 1, ["p-type.jsonl:1", "answer_type", "number"]),
    ("problems-missing-file", "problems {t}/none.jsonl --out {t}/o.jsonl", None, 1, ["{t}/none.jsonl", "not found"]),
    ("problems-source-a-dir", "problems {t}/empty --out {t}/o.jsonl", None, 1, ["{t}/empty"]),
    ("problems-unknown-kind", "problems arith:10 --out {t}/o.jsonl", None, 1, ["arith:10", "builtin"]),
    ("problems-arith-negative", "problems builtin:arith:-1 --out {t}/o.jsonl", None, 1, ["builtin:arith:-1", ">= 1"]),
    ("problems-arith-zero", "problems builtin:arith:0 --out {t}/o.jsonl", None, 1, ["builtin:arith:0", ">= 1"]),
    ("problems-arith-split", "problems builtin:arith:5?split=dev --out {t}/o.jsonl", None, 1, ["split", "dev", "train"]),
    ("problems-arith-option", "problems builtin:arith:5?dificulty=2 --out {t}/o.jsonl", None, 1, ["dificulty"]),
    ("problems-limit-0", "problems builtin:arith:5 --limit 0 --out {t}/o.jsonl", None, 2, ["--limit", ">= 1"]),
    ("problems-limit-negative", "problems builtin:arith:5 --limit -3 --out {t}/o.jsonl", None, 2, ["--limit", ">= 1"]),
    ("problems-limit-text", "problems builtin:arith:5 --limit ten --out {t}/o.jsonl", None, 2, ["--limit", "ten"]),
    ("problems-exclude-missing", "problems builtin:arith:5 --exclude {t}/none.jsonl --out {t}/o.jsonl", None, 1, ["{t}/none.jsonl", "not found"]),
    ("problems-jsonl-field", "problems jsonl:{t}/p.jsonl?question=prompt --out {t}/o.jsonl", None, 1, ["p.jsonl:1", "'prompt'", "missing"]),
    ("problems-jsonl-option", "problems jsonl:{t}/p.jsonl?anwser=x --out {t}/o.jsonl", None, 1, ["anwser"]),
    ("problems-hle-wrong-file", "problems hle:{t}/s.jsonl --out {t}/o.jsonl", None, 1, ["s.jsonl:1"]),
    ("problems-mix-weight", "problems mix:builtin:arith:4@-1,builtin:arith:4@1 --out {t}/o.jsonl", None, 1, ["-1"]),
    ("problems-mix-missing", "problems mix:{t}/none.yaml --out {t}/o.jsonl", None, 1, ["{t}/none.yaml"]),
    ("problems-no-out", "problems builtin:arith:5", None, 2, ["--out"]),
    # ---- sample
    ("sample-out-is-dir", "sample --problems builtin:arith:2 --out {t}/outdir", None, 1, ["{t}/outdir", "folder"]),
    ("sample-surrogate", "sample --problems {t}/p-surrogate.jsonl --out {t}/s2.jsonl", None, 1, ["p-surrogate.jsonl:2", "surrogate"]),
    ("sample-n-0", "sample --problems builtin:arith:2 --n 0 --out {t}/s2.jsonl", None, 2, ["--n", "0", ">= 1"]),
    ("sample-n-negative", "sample --problems builtin:arith:2 --n -1 --out {t}/s2.jsonl", None, 2, ["--n", "-1", ">= 1"]),
    ("sample-max-new-tokens-0", "sample --problems builtin:arith:2 --max-new-tokens 0 --out {t}/s2.jsonl", None, 2, ["--max-new-tokens", ">= 1"]),
    ("sample-max-new-tokens-negative", "sample --problems builtin:arith:2 --max-new-tokens -1 --out {t}/s2.jsonl", None, 2, ["--max-new-tokens", ">= 1"]),
    ("sample-temperature-negative", "sample --problems builtin:arith:2 --temperature -1 --out {t}/s2.jsonl", None, 2, ["--temperature", ">= 0"]),
    ("sample-top-p-2", "sample --problems builtin:arith:2 --top-p 2 --out {t}/s2.jsonl", None, 2, ["--top-p", "(0, 1]"]),
    ("sample-top-p-0", "sample --problems builtin:arith:2 --top-p 0 --out {t}/s2.jsonl", None, 2, ["--top-p", "(0, 1]"]),
    ("sample-temperature-nan", "sample --problems builtin:arith:2 --temperature nan --out {t}/s2.jsonl", None, 2, ["--temperature", "nan"]),
    ("sample-limit-0", "sample --problems builtin:arith:2 --limit 0 --out {t}/s2.jsonl", None, 2, ["--limit", ">= 1"]),
    ("sample-batch-size-0", "sample --problems builtin:arith:2 --batch-size 0 --out {t}/s2.jsonl", None, 2, ["--batch-size", ">= 1"]),
    ("sample-engine-set-batch-0", "sample --engine-set batch_size=0 --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["engine.batch_size: 0", ">= 1"]),
    ("sample-model-missing", "sample --model {t}/nope --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["{t}/nope", "no such file or folder"]),
    ("sample-model-empty-folder", "sample --model {t}/empty --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["{t}/empty", "no config.json"]),
    ("sample-model-gguf-missing", "sample --model {t}/m.gguf --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["m.gguf", "not found"]),
    ("sample-engine-config-dir", "sample --engine-config {t}/empty --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["{t}/empty", "not a file"]),
    ("sample-base-url-ftp", "sample --engine openai --base-url ftp://127.0.0.1/v1 --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["ftp://127.0.0.1/v1", "http"]),
    ("sample-openai-no-url", "sample --engine openai --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["base_url"]),
    ("sample-engine-set-unknown", "sample --engine-set gpu_mem=0.9 --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["gpu_mem"]),
    ("sample-engine-set-nested", "sample --engine-set a.b=1 --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["a.", "not nested"]),
    ("sample-engine-config-missing", "sample --engine-config {t}/none.yaml --problems builtin:arith:2 --out {t}/s2.jsonl", None, 1, ["{t}/none.yaml", "not found"]),
    ("sample-engine-unknown", "sample --engine tgi --problems builtin:arith:2 --out {t}/s2.jsonl", None, 2, ["--engine", "tgi"]),
    ("sample-problems-missing", "sample --problems {t}/none.jsonl --out {t}/s2.jsonl", None, 1, ["{t}/none.jsonl", "not found"]),
    ("sample-problems-bad-type", "sample --problems {t}/p-type.jsonl --out {t}/s2.jsonl", None, 1, ["p-type.jsonl:1", "answer_type"]),
    # ---- verify
    ("verify-out-is-dir", "verify --samples {t}/s.jsonl --out {t}/outdir", None, 1, ["{t}/outdir", "folder"]),
    ("verify-workers-0", "verify --samples {t}/s.jsonl --workers 0 --out {t}/v.jsonl", None, 2, ["--workers", ">= 1"]),
    ("verify-workers-negative", "verify --samples {t}/s.jsonl --workers -1 --out {t}/v.jsonl", None, 2, ["--workers", ">= 1"]),
    ("verify-math-timeout-0", "verify --samples {t}/s.jsonl --math-timeout 0 --out {t}/v.jsonl", None, 2, ["--math-timeout", "> 0"]),
    ("verify-samples-missing", "verify --samples {t}/none.jsonl --out {t}/v.jsonl", None, 1, ["{t}/none.jsonl", "not found"]),
    ("verify-samples-a-dir", "verify --samples {t}/empty --out {t}/v.jsonl", None, 1, ["{t}/empty", "folder"]),
    ("verify-no-response", "verify --samples {t}/s-no-response.jsonl --out {t}/v.jsonl", None, 1, ["s-no-response.jsonl:1", "'response'", "missing"]),
    ("verify-finish-reason", "verify --samples {t}/s-finish.jsonl --out {t}/v.jsonl", None, 1, ["s-finish.jsonl:1", "finish_reason", "eos"]),
    ("verify-problems-not-samples", "verify --samples {t}/p.jsonl --out {t}/v.jsonl", None, 1, ["p.jsonl:1", "'problem'", "missing"]),
    ("verify-surrogate", "verify --samples {t}/s-surrogate.jsonl --out {t}/v.jsonl", None, 1, ["s-surrogate.jsonl:2", "'response'", "surrogate"]),
    # ---- pairs
    ("pairs-out-is-dir", "pairs --scored {t}/sc.jsonl --out {t}/outdir", None, 1, ["{t}/outdir", "folder"]),
    ("pairs-strategy-best", "pairs --scored {t}/sc.jsonl --strategy best --out {t}/pp.jsonl", None, 2, ["--strategy", "best", "random"]),
    ("pairs-max-per-problem-0", "pairs --scored {t}/sc.jsonl --max-pairs-per-problem 0 --out {t}/pp.jsonl", None, 2, ["--max-pairs-per-problem", ">= 1", "got 0"]),
    ("pairs-scored-missing", "pairs --scored {t}/none.jsonl --out {t}/pp.jsonl", None, 1, ["{t}/none.jsonl", "not found"]),
    ("pairs-not-scored", "pairs --scored {t}/s.jsonl --out {t}/pp.jsonl", None, 1, ["s.jsonl:1", "verdict"]),
    ("pairs-bad-verdict", "pairs --scored {t}/sc-verdict.jsonl --out {t}/pp.jsonl", None, 1, ["sc-verdict.jsonl:1", "verdict", "right"]),
    # ---- train
    ("train-data-a-dir", "train --method dpo --data {t}/empty --out {t}/run", None, 1, ["{t}/empty", "folder"]),
    ("train-data-missing", "train --method dpo --data {t}/none.jsonl --out {t}/run", None, 1, ["{t}/none.jsonl", "not found"]),
    ("train-no-data", "train --method dpo --out {t}/run", None, 1, ["--data"]),
    ("train-pairs-identical", "train --method dpo --data {t}/pairs-same.jsonl --out {t}/run", None, 1, ["pairs-same.jsonl", "chosen", "rejected", "same"]),
    ("train-pairs-no-rejected", "train --method dpo --data {t}/pairs-no-rejected.jsonl --out {t}/run", None, 1, ["pairs-no-rejected.jsonl:1", "'rejected'"]),
    ("train-pairs-not-text", "train --method dpo --data {t}/pairs-int.jsonl --out {t}/run", None, 1, ["pairs-int.jsonl:1", "'chosen'"]),
    ("train-dpo-on-scored", "train --method dpo --data {t}/sc.jsonl --out {t}/run", None, 1, ["sc.jsonl:1", "pair rows"]),
    ("train-sft-none-correct", "train --method sft --data {t}/sc-wrong.jsonl --out {t}/run", None, 1, ["sc-wrong.jsonl", "none correct"]),
    ("train-sft-on-pairs", "train --method sft --data {t}/pairs.jsonl --out {t}/run", None, 1, ["pairs.jsonl:1", "pair row"]),
    ("train-grpo-no-problems", "train --method grpo --out {t}/run", None, 2, ["--problems", "required", "grpo"]),
    ("train-grpo-with-data", "train --method grpo --data {t}/pairs.jsonl --problems builtin:arith:4 --out {t}/run", None, 1, ["--data", "grpo"]),
    ("train-dpo-with-problems", "train --method dpo --data {t}/pairs.jsonl --problems builtin:arith:4 --out {t}/run", None, 1, ["--problems", "dpo"]),
    ("train-method-unknown", "train --method ppo --data {t}/pairs.jsonl --out {t}/run", None, 2, ["--method", "ppo"]),
    ("train-set-unknown-key", "train --method dpo --data {t}/pairs.jsonl --set lrate=1e-4 --out {t}/run", None, 1, ["lrate"]),
    ("train-set-lr-text", "train --method dpo --data {t}/pairs.jsonl --set lr=fast --out {t}/run", None, 1, ["lr", "fast"]),
    ("train-set-lr-negative", "train --method dpo --data {t}/pairs.jsonl --set lr=-1 --out {t}/run", None, 1, ["lr", "-1"]),
    ("train-set-lora-r-0", "train --method dpo --data {t}/pairs.jsonl --set lora.r=0 --out {t}/run", None, 1, ["lora.r", "0"]),
    ("train-set-no-equals", "train --method dpo --data {t}/pairs.jsonl --set lr --out {t}/run", None, 1, ["'lr'", "key=value"]),
    ("train-set-strategy", "train --method dpo --data {t}/pairs.jsonl --set strategy=zero9 --out {t}/run", None, 1, ["strategy", "zero9"]),
    ("train-config-missing", "train --method dpo --data {t}/pairs.jsonl --config {t}/none.yaml --out {t}/run", None, 1, ["{t}/none.yaml", "not found"]),
    ("train-config-unknown-key", "train --method dpo --data {t}/pairs.jsonl --config {t}/train.yaml --out {t}/run", None, 1, ["train.yaml", "bogus_key"]),
    ("train-config-bad-yaml", "train --method dpo --data {t}/pairs.jsonl --config {t}/train-bad.yaml --out {t}/run", None, 1, ["train-bad.yaml", "line"]),
    ("train-nproc-0", "train --method dpo --data {t}/pairs.jsonl --nproc 0 --out {t}/run", None, 1, ["--nproc", ">= 1"]),
    ("train-over-a-run", "train --method dpo --data {t}/pairs.jsonl --out {t}/old-run", None, 1, ["old-run", "already holds checkpoints", "--resume"]),
    ("train-model-missing", "train --method dpo --model {t}/nope --data {t}/pairs.jsonl --out {t}/run", None, 1, ["{t}/nope", "no such file or folder"]),
    ("train-bnpo-renamed", "train --method bnpo --problems builtin:arith:4 --out {t}/run", None, 1, ["bnpo"]),
    ("train-grpo-bad-source", "train --method grpo --problems builtin:arth:4 --out {t}/run", None, 1, ["builtin:arth:4"]),
    # ---- eval
    ("eval-n-0", "eval --problems builtin:arith:2 --n 0 --out {t}/ev", None, 2, ["--n", ">= 1"]),
    ("eval-zero-items", "eval --problems {t}/p-empty.jsonl --out {t}/ev", None, 1, ["p-empty.jsonl", "empty"]),
    ("eval-limit-0", "eval --problems builtin:arith:2 --limit 0 --out {t}/ev", None, 2, ["--limit", ">= 1"]),
    ("eval-n-2-greedy", "eval --problems builtin:arith:2 --n 2 --out {t}/ev", None, 2, ["--n", "--temperature"]),
    ("eval-temperature-negative", "eval --problems builtin:arith:2 --temperature -0.5 --out {t}/ev", None, 2, ["--temperature", ">= 0"]),
    ("eval-top-p-2", "eval --problems builtin:arith:2 --top-p 2 --out {t}/ev", None, 2, ["--top-p", "(0, 1]"]),
    ("eval-max-new-tokens-0", "eval --problems builtin:arith:2 --max-new-tokens 0 --out {t}/ev", None, 2, ["--max-new-tokens", ">= 1"]),
    ("eval-judge-ftp", "eval --problems builtin:arith:2 --judge ftp://127.0.0.1/v1 --judge-model j --out {t}/ev", None, 1, ["ftp://127.0.0.1/v1", "http"]),
    ("eval-judge-no-model", "eval --problems builtin:arith:2 --judge http://127.0.0.1:9/v1 --out {t}/ev", None, 2, ["--judge", "--judge-model"]),
    ("eval-judge-template-missing", "eval --problems builtin:arith:2 --judge http://127.0.0.1:9/v1 --judge-model j --judge-template {t}/none.txt --out {t}/ev", None, 1, ["{t}/none.txt", "not found"]),
    ("eval-judge-template-dir", "eval --problems builtin:arith:2 --judge http://127.0.0.1:9/v1 --judge-model j --judge-template {t}/empty --out {t}/ev", None, 1, ["{t}/empty", "not a file"]),
    ("eval-judge-template-placeholder", "eval --problems builtin:arith:2 --judge http://127.0.0.1:9/v1 --judge-model j --judge-template {t}/judge-bad.txt --out {t}/ev", None, 1, ["judge-bad.txt", "{{correct_answer}}"]),
    ("eval-judge-template-alone", "eval --problems builtin:arith:2 --judge-template {t}/judge.txt --out {t}/ev", None, 2, ["--judge-template", "--judge"]),
    ("eval-judge-model-alone", "eval --problems builtin:arith:2 --judge-model j --out {t}/ev", None, 2, ["--judge-model", "only with --judge"]),
    ("eval-judge-concurrency-alone", "eval --problems builtin:arith:2 --judge-concurrency 4 --out {t}/ev", None, 2, ["--judge-concurrency", "only with --judge"]),
    ("eval-judge-concurrency-0", "eval --problems builtin:arith:2 --judge http://127.0.0.1:9/v1 --judge-model j --judge-concurrency 0 --out {t}/ev", None, 2, ["--judge-concurrency", ">= 1"]),
    ("eval-system-prompt-missing", "eval --problems builtin:arith:2 --system-prompt-file {t}/none.txt --out {t}/ev", None, 1, ["{t}/none.txt", "not found"]),
    ("eval-system-prompt-dir", "eval --problems builtin:arith:2 --system-prompt-file {t}/empty --out {t}/ev", None, 1, ["{t}/empty", "not a file"]),
    ("eval-system-prompt-both", "eval --problems builtin:arith:2 --system-prompt hi --system-prompt-file {t}/judge.txt --out {t}/ev", None, 2, ["--system-prompt", "--system-prompt-file"]),
    ("eval-adapter-no-config", "eval --problems builtin:arith:2 --adapter {t}/adapter --out {t}/ev", None, 1, ["{t}/adapter", "adapter_config.json"]),
    ("eval-adapter-missing", "eval --problems builtin:arith:2 --adapter {t}/none --out {t}/ev", None, 1, ["{t}/none", "no such folder"]),
    ("eval-model-empty-folder", "eval --model {t}/empty --problems builtin:arith:2 --out {t}/ev", None, 1, ["{t}/empty", "no config.json"]),
    ("eval-out-is-file", "eval --problems builtin:arith:2 --out {t}/p.jsonl", None, 1, ["{t}/p.jsonl", "existing file"]),
    ("eval-protocol-unknown", "eval --problems builtin:arith:2 --protocol mmlu --out {t}/ev", None, 2, ["--protocol", "mmlu"]),
    ("eval-openai-no-url", "eval --engine openai --problems builtin:arith:2 --out {t}/ev", None, 1, ["base_urls", "http"]),
    ("eval-engine-set-kind", "eval --engine-set tensor_parallel_size=2 --problems builtin:arith:2 --out {t}/ev", None, 1, ["tensor_parallel_size", "vllm"]),
    ("eval-surrogate", "eval --problems {t}/p-surrogate.jsonl --out {t}/ev", None, 1, ["p-surrogate.jsonl:2", "surrogate"]),
    # ---- compare
    ("compare-n-boot-0", "compare {t}/A {t}/B --n-boot 0", None, 1, ["n_boot", ">= 1"]),
    ("compare-missing", "compare {t}/A {t}/none", None, 1, ["{t}/none", "not found"]),
    ("compare-no-items", "compare {t}/A {t}/empty", None, 1, ["{t}/empty", "items"]),
    ("compare-bad-verdict", "compare {t}/A {t}/D", None, 1, ["D/items.jsonl:1", "verdict", "maybe"]),
    ("compare-disjoint", "compare {t}/A {t}/C", None, 1, ["2 only in A", "q1", "--intersect"]),
    # ---- report
    ("report-missing", "report {t}/none", None, 1, ["{t}/none"]),
    ("report-not-a-run", "report {t}/empty", None, 1, ["{t}/empty"]),
    ("report-an-eval-folder", "report {t}/A", None, 1, ["{t}/A"]),
    ("report-a-file", "report {t}/p.jsonl", None, 1, ["{t}/p.jsonl", "folder"]),
    # ---- expand
    ("expand-new-layers-0", "expand --method llama-pro --new-layers 0 --out {t}/x", None, 2, ["--new-layers", ">= 1"]),
    ("expand-new-layers-negative", "expand --method opt-deus --new-layers -2 --out {t}/x", None, 2, ["--new-layers", ">= 1"]),
    ("expand-new-layers-missing", "expand --method opt-deus --out {t}/x", None, 1, ["--new-layers", "required"]),
    ("expand-upcycle-flag-on-depth", "expand --method opt-deus --new-layers 2 --experts 8 --out {t}/x", None, 1, ["--experts", "upcycle"]),
    ("expand-experts-1", "expand --method upcycle --experts 1 --out {t}/x", None, 1, ["experts: 1", "2 or more"]),
    ("expand-top-k-over-experts", "expand --method upcycle --experts 4 --top-k 5 --out {t}/x", None, 1, ["top_k: 5", "number of experts"]),
    ("expand-noise-unknown", "expand --method upcycle --noise blur:3 --out {t}/x", None, 1, ["noise", "blur:3"]),
    ("expand-model-missing", "expand --method opt-deus --new-layers 2 --model {t}/nope --out {t}/x", None, 1, ["{t}/nope", "no such file or folder"]),
    ("expand-out-is-file", "expand --method opt-deus --new-layers 2 --out {t}/p.jsonl", None, 1, ["{t}/p.jsonl", "existing file"]),
    ("expand-out-other-files", "expand --method upcycle --out {t}/A", None, 1, ["{t}/A", "no config.json", "delete"]),
    # ---- export
    ("export-adapter-missing", "export --adapter {t}/none --out {t}/m", None, 1, ["{t}/none", "no such folder"]),
    ("export-adapter-no-config", "export --adapter {t}/adapter --out {t}/m", None, 1, ["{t}/adapter", "adapter_config.json"]),
    ("export-out-other-files", "export --adapter {t}/adapter --out {t}/A", None, 1, ["{t}/A", "no config.json", "delete"]),
    ("export-out-is-file", "export --adapter {t}/adapter --out {t}/p.jsonl", None, 1, ["{t}/p.jsonl", "existing file"]),
    # ---- run: --set on the shipped recipe
    ("run-recipe-missing", "run {t}/none.yaml --out {t}/run", None, 1, ["{t}/none.yaml", "not found"]),
    ("run-set-unknown-key", "run {r}/default.yaml --set sample.temprature=0.5 --out {t}/run", None, 1, ["temprature"]),
    ("run-set-unknown-top-key", "run {r}/default.yaml --set modle=x --out {t}/run", None, 1, ["modle"]),
    ("run-set-eval-empty", "run {r}/default.yaml --set eval=[] --out {t}/run", None, 1, ["eval", "non-empty list"]),
    ("run-set-eval-number", "run {r}/default.yaml --set eval=3 --out {t}/run", None, 1, ["eval"]),
    ("run-set-method-unknown", "run {r}/default.yaml --set train.method=ppo --out {t}/run", None, 1, ["train.method", "ppo"]),
    ("run-set-strategy-unknown", "run {r}/default.yaml --set pairs.strategy=best --out {t}/run", None, 1, ["pairs.strategy", "best"]),
    ("run-set-n-negative", "run {r}/default.yaml --set sample.n=-2 --out {t}/run", None, 1, ["sample.n: -2", ">= 1"]),
    ("run-set-n-zero", "run {r}/default.yaml --set sample.n=0 --out {t}/run", None, 1, ["sample.n", ">= 1"]),
    ("run-set-n-text", "run {r}/default.yaml --set sample.n=four --out {t}/run", None, 1, ["sample.n", "four"]),
    ("run-set-top-p", "run {r}/default.yaml --set sample.top_p=2 --out {t}/run", None, 1, ["sample.top_p", "(0, 1]"]),
    ("run-set-temperature", "run {r}/default.yaml --set sample.temperature=-1 --out {t}/run", None, 1, ["sample.temperature", ">= 0"]),
    ("run-set-eval-max-tokens", "run {r}/default.yaml --set eval.max_new_tokens=0 --out {t}/run", None, 1, ["max_new_tokens", ">= 1"]),
    ("run-set-eval-n-greedy", "run {r}/default.yaml --set eval.n=4 --out {t}/run", None, 1, ["n > 1", "temperature"]),
    ("run-set-lr-unknown", "run {r}/default.yaml --set train.config.lrate=1 --out {t}/run", None, 1, ["train.config", "lrate"]),
    ("run-set-lr-text", "run {r}/default.yaml --set train.config.lr=big --out {t}/run", None, 1, ["lr", "big"]),
    ("run-set-train-data", "run {r}/default.yaml --set train.data=pears --out {t}/run", None, 1, ["train.data", "pears"]),
    ("run-set-nproc-0", "run {r}/default.yaml --set train.nproc=0 --out {t}/run", None, 1, ["train.nproc", ">= 1"]),
    ("run-set-dtype", "run {r}/default.yaml --set dtype=fp8 --out {t}/run", None, 1, ["dtype", "fp8"]),
    ("run-set-engine-kind", "run {r}/default.yaml --set engine.kind=tgi --out {t}/run", None, 1, ["kind", "tgi"]),
    ("run-set-problems-typo", "run {r}/default.yaml --set sample.problems=builtin:arth:5 --out {t}/run", None, 1, ["builtin:arth:5"]),
    ("run-set-arith-negative", "run {r}/default.yaml --set eval.problems=builtin:arith:-1 --out {t}/run", None, 1, ["builtin:arith:-1", ">= 1"]),
    ("run-set-model-missing", "run {r}/default.yaml --set model={t}/nope --out {t}/run", None, 1, ["{t}/nope", "no such file or folder"]),
    ("run-set-grpo-data", "run {r}/default.yaml --set train.method=grpo --set train.data=pairs --out {t}/run", None, 1, ["train.data", "grpo"]),
    ("run-set-lora-r-0", "run {r}/default.yaml --set train.config.lora.r=0 --out {t}/run", None, 1, ["lora.r", "0"]),
    ("run-set-sample-batch-0", "run {r}/default.yaml --set sample.batch_size=0 --out {t}/run", None, 1, ["sample.batch_size: 0", ">= 1"]),
    ("run-set-epochs-negative", "run {r}/default.yaml --set train.config.epochs=-1 --out {t}/run", None, 1, ["epochs", "-1"]),
    ("run-set-grpo-generations-1", "run {r}/grpo.yaml --set train.config.num_generations=1 --out {t}/run", None, 1, ["num_generations", "1"]),
    ("run-set-method-keeps-keys", "run {r}/default.yaml --set train.method=grpo --out {t}/run", None, 1, ["unknown key", "beta"]),
    ("run-set-eval-name-slash", "run {r}/default.yaml --set eval.name=a/b --out {t}/run", None, 1, ["a/b"]),
    ("run-out-is-file", "run {r}/default.yaml --out {t}/p.jsonl", None, 1, ["{t}/p.jsonl", "existing file"]),
    # ---- run: recipes written out
    ("recipe-bad-yaml", "run {t}/case.yaml --out {t}/run", "model: smollm2-135m\nsample:\n  n: 4\n n: [\n", 1, ["case.yaml", "line"]),
    ("recipe-not-a-mapping", "run {t}/case.yaml --out {t}/run", "- sample\n- train\n", 1, ["case.yaml", "mapping"]),
    ("recipe-empty", "run {t}/case.yaml --out {t}/run", "", 1, ["case.yaml", "empty"]),
    ("recipe-unknown-stage", "run {t}/case.yaml --out {t}/run", "smaple: {n: 2}\n", 1, ["case.yaml", "smaple"]),
    ("recipe-n-a-list", "run {t}/case.yaml --out {t}/run", "sample: {n: [1, 2]}\n", 1, ["sample.n", "int"]),
    ("recipe-pairs-best", "run {t}/case.yaml --out {t}/run", "pairs: {strategy: best}\n", 1, ["case.yaml", "pairs.strategy", "best"]),
    ("recipe-judge-no-model", "run {t}/case.yaml --out {t}/run", "eval: [{name: hle, judge: {url: 'http://127.0.0.1:9/v1'}}]\n", 1, ["judge", "model"]),
    ("recipe-judge-ftp", "run {t}/case.yaml --out {t}/run", "eval: [{name: hle, judge: {url: 'ftp://x/v1', model: j}}]\n", 1, ["ftp://x/v1", "http"]),
    ("recipe-judge-template-missing", "run {t}/case.yaml --out {t}/run", "eval: [{name: hle, judge: {url: 'http://127.0.0.1:9/v1', model: j, template: /no/such.txt}}]\n", 1, ["case.yaml", "'hle'", "judge.template", "/no/such.txt", "not found"]),
    ("recipe-eval-names-twice", "run {t}/case.yaml --out {t}/run", "eval: [{name: a}, {name: a}]\n", 1, ["unique"]),
    ("recipe-eval-protocol", "run {t}/case.yaml --out {t}/run", "eval: [{name: a, protocol: mmlu}]\n", 1, ["protocol", "mmlu"]),
    ("recipe-engine-ftp", "run {t}/case.yaml --out {t}/run", "engine: {kind: openai, base_urls: ['ftp://x/v1']}\n", 1, ["engine.base_urls", "ftp://x/v1", "http"]),
    ("recipe-lora-r-text", "run {t}/case.yaml --out {t}/run", "train: {method: dpo, config: {lora: {r: eight}}}\n", 1, ["lora.r", "eight"]),
    ("recipe-adapter-in-sample", "run {t}/case.yaml --out {t}/run", "sample: {adapter: x}\n", 1, ["sample", "adapter"]),
    # ---- sweep
    ("sweep-missing", "sweep {t}/none.yaml --out {t}/sw", None, 1, ["{t}/none.yaml", "not found"]),
    ("sweep-unknown-grid-key", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\naxis: {{train.config.lr: [1, 2]}}\n", 1, ["axis", "axes"]),
    ("sweep-bad-axis-key", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\naxes: {{train.config.lrate: [1.0e-4, 5.0e-5]}}\n", 1, ["lrate"]),
    ("sweep-bad-run-method", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\nruns: [{{id: a}}, {{id: b, set: {{train.method: ppo}}}}]\n", 1, ["b", "ppo"]),
    ("sweep-axis-not-a-list", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\naxes: {{train.config.lr: 1.0e-4}}\n", 1, ["axes.train.config.lr", "non-empty list"]),
    ("sweep-recipe-missing", "sweep {t}/case.yaml --out {t}/sw", "recipe: nowhere.yaml\naxes: {seed: [0, 1]}\n", 1, ["nowhere.yaml", "not found"]),
    ("sweep-run-ids-twice", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\nruns: [{{id: a}}, {{id: a}}]\n", 1, ["run ids", "unique"]),
    ("sweep-recipe-a-number", "sweep {t}/case.yaml --out {t}/sw", "recipe: 3\naxes: {seed: [0, 1]}\n", 1, ["recipe", "mapping"]),
    ("sweep-shard", "sweep {r}/sweep-dpo.yaml --shard 4/4 --out {t}/sw", None, 1, ["--shard", "4/4"]),
    ("sweep-shard-text", "sweep {r}/sweep-dpo.yaml --shard half --out {t}/sw", None, 1, ["--shard", "half"]),
    ("sweep-negative-n", "sweep {t}/case.yaml --out {t}/sw", f"recipe: {RECIPES}/default.yaml\naxes: {{sample.n: [2, -1]}}\n", 1, ["sample.n", ">= 1"]),
    ("sweep-poll-0", "sweep {r}/sweep-dpo.yaml --poll 0 --out {t}/sw", None, 2, ["--poll", "> 0"]),
    # ---- the CLI itself
    ("cli-unknown-flag", "sample --problems builtin:arith:2 --out {t}/s2.jsonl --temprature 1", None, 2, ["--temprature"]),
]
# fmt: on


class ModelLoadStarted(BaseException):
    """Raised where a model or tokenizer would load: a case reaching it failed too late."""


def write_inputs(folder: Path) -> None:
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    for name in FOLDERS:
        (folder / name).mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The input files, written once for the table (a case that writes is put back after)."""
    folder = tmp_path_factory.mktemp("bad-input")
    write_inputs(folder)
    return folder, snapshot(folder)


@pytest.fixture
def tmp(inputs, monkeypatch):
    folder, baseline = inputs
    monkeypatch.chdir(folder)  # default output folders (runs/NAME) land here too
    monkeypatch.setenv("POSTTRAIN_HOME", str(folder / "home"))  # no converted model there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def guarded(cls, name, **kwargs):  # the path checks run; the load itself does not
        models.resolve_model(name)
        raise ModelLoadStarted(name)

    def no_conversion(gguf, folder_name=None):
        raise ModelLoadStarted(str(gguf))

    monkeypatch.setattr(models, "_from_pretrained", guarded)
    monkeypatch.setattr(models, "_ensure_gguf_folder", no_conversion)
    yield folder
    if snapshot(folder) != baseline:  # the case failed by writing: undo it for the next ones
        for name in sorted(set(snapshot(folder)) - set(baseline), reverse=True):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        write_inputs(folder)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse; a message given to SystemExit is printed by Python
        return e.code if isinstance(e.code, int) else 1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp, capsys):
    _, argv, yaml, code, words = case
    fill = {"t": str(tmp), "r": str(RECIPES)}
    if yaml is not None:
        (tmp / "case.yaml").write_text(yaml, encoding="utf-8")
    before = snapshot(tmp)
    try:
        got = run_cli([a.format(**fill) for a in shlex.split(argv)])
    except ModelLoadStarted as e:
        pytest.fail(f"a model load started ({e}) before the mistake was found")
    err = capsys.readouterr().err
    verb = argv.split()[0]
    lines = [line for line in err.splitlines() if not line.startswith("posttrain: device")]
    assert "Traceback" not in err, err
    assert got == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"posttrain {verb}: error: "), lines[0]
    for word in words:
        assert word.format(**fill) in lines[0], (word, lines[0])
    assert snapshot(tmp) == before, "the failed command wrote files"
