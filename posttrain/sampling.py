"""Sampling: K answers per problem from an engine, one JSONL row per sample, resumable.

    posttrain sample --model smollm2-135m --problems builtin:arith:8 --n 2 --out samples.jsonl

(the verb is posttrain/commands/sample.py). `prompt_messages` builds a problem's chat prompt and
`sample_row` the row a completion becomes (the GRPO rollouts reuse both). Rerunning
`sample_problems` after a crash (even `kill -9`) keeps every finished row, writes no duplicate
(problem id, sample index) and completes the rest. A server engine whose server dies mid-run
stops it with EngineUnavailable after the finished prompts' rows are written, saying how many
rows are done and that a rerun resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from posttrain.engines import Engine, SamplingParams
from posttrain.engines.base import EngineUnavailable
from posttrain.reasoning import Split, prompt_opens_think, split_reasoning
from posttrain.records import DataError, JsonlAppender, Problem, iter_jsonl

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def prompt_messages(problem: Problem, system_prompt: str | None = None) -> list[dict]:
    """The chat prompt for a problem; choices are listed when the question does not hold them."""
    question = problem.question
    if problem.choices and not all(c in question for c in problem.choices):
        question += "\n\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(problem.choices))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def sampling_settings(params: SamplingParams) -> dict:
    """What a sample row records of how it was drawn (n is not here: adding samples is allowed)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "seed": params.seed,
    }


def check_same_source(path: Path, engine: Engine, params: SamplingParams) -> None:
    """Refuse to add rows to a file whose rows came from another engine, model or settings.

    Only the first row is read: a file is written by one command, and this check runs before
    every resumed write, so the first row speaks for all of them."""
    if not path.exists():
        return
    for line, row in iter_jsonl(path, allow_empty=True):
        mine = {
            "engine": engine.name,
            "model": engine.model_id,
            "sampling": sampling_settings(params),
        }
        for key, value in mine.items():
            if key == "sampling" and key not in row:
                continue  # rows written before sampling settings were recorded
            if row.get(key) != value:
                raise DataError(
                    path,
                    line,
                    f"this file was sampled with {key} = "
                    f"{row.get(key)!r}, this command has {value!r}; resuming would "
                    "mix the two: use another --out file or the same settings",
                    field=key,
                )
        return


def sample_row(
    problem: Problem,
    index: int,
    messages: list[dict],
    completion,
    *,
    think_open: bool,
    engine: Engine,
    params: SamplingParams | None = None,
) -> dict:
    if completion.reasoning is not None:  # the server split the think block off itself
        split = Split(completion.reasoning.strip(), completion.text.strip(), False)
    else:
        split = split_reasoning(completion.text, think_open_in_prompt=think_open)
    # A think block that never closed has no answer: it is reported as cut by the limit, so
    # the grader calls it truncated instead of grading an answer that was never given.
    finish = "length" if split.truncated else completion.finish_reason
    return {
        "problem": problem.to_dict(),
        "sample_index": index,
        "messages": messages,
        "reasoning": split.reasoning,
        "response": split.response,
        "finish_reason": finish,
        "num_tokens": completion.num_tokens,
        "sum_logprob": completion.sum_logprob,
        "mean_logprob": completion.mean_logprob,
        "model": engine.model_id,
        "engine": engine.name,
        **({"sampling": sampling_settings(params)} if params is not None else {}),
    }


def sample_problems(
    engine: Engine,
    problems: list[Problem],
    out: str | Path,
    params: SamplingParams,
    *,
    system_prompt: str | None = None,
    chunk_size: int = 8,
    progress: bool = True,
) -> dict:
    """Sample `params.n` answers per problem into `out`, skipping samples already there."""

    def key(row: dict):
        return (str(row["problem"]["id"]), int(row["sample_index"]))

    start = time.time()
    tokens = 0
    check_same_source(Path(out), engine, params)
    with JsonlAppender(out, key) as sink:
        todo = [(p, [i for i in range(params.n) if not sink.done((p.id, i))]) for p in problems]
        todo = [(p, missing) for p, missing in todo if missing]
        total = sum(len(m) for _, m in todo)
        bar = tqdm(total=total, desc="sample", unit="sample", disable=not progress)
        # Problems with the same number of missing samples are generated together.
        by_count: dict[int, list] = {}
        for p, missing in todo:
            by_count.setdefault(len(missing), []).append((p, missing))
        for count, group in by_count.items():
            # a server engine asks for enough prompts per call to keep its requests in flight
            per_chunk = max(1, chunk_size // count, getattr(engine, "prompts_per_call", 1))
            for c in range(0, len(group), per_chunk):
                chunk = group[c : c + per_chunk]
                prompts = [prompt_messages(p, system_prompt) for p, _ in chunk]
                # A seed tied to the chunk's first problem, so a resumed run is reproducible.
                seed = params.seed * 1_000_003 + _stable_hash(chunk[0][0].id)
                chunk_params = SamplingParams(
                    n=count,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=seed,
                    max_new_tokens=params.max_new_tokens,
                )
                results, stopped, opens = [None] * len(prompts), None, [False] * len(prompts)
                try:
                    opens = [prompt_opens_think(engine.render_prompt(m)) for m in prompts]
                    results = engine.generate(prompts, chunk_params)
                except EngineUnavailable as e:  # keep the prompts that did finish
                    results, stopped = e.partial or results, e
                for (p, missing), messages, think_open, completions in zip(
                    chunk, prompts, opens, results
                ):
                    if completions is None:
                        continue
                    for index, completion in zip(missing, completions):
                        sink.append(
                            sample_row(
                                p,
                                index,
                                messages,
                                completion,
                                think_open=think_open,
                                engine=engine,
                                params=params,
                            )
                        )
                        tokens += completion.num_tokens
                if stopped is not None:
                    bar.close()
                    raise EngineUnavailable(
                        f"{stopped}\n{sink.count} samples are done in {out}; rerun the same "
                        "command to resume (finished samples are kept, none is drawn twice)"
                    )
                bar.update(sum(len(m) for _, m in chunk))
                elapsed = time.time() - start
                bar.set_postfix(tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        bar.close()
        n_rows = sink.count
    elapsed = time.time() - start
    return {
        "rows": n_rows,
        "new_samples": total,
        "new_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_second": tokens / elapsed if elapsed > 0 and tokens else 0.0,
    }


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8")) % 1_000_003
