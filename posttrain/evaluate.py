"""Stage `eval`: the same engine and graders as sampling, then honest statistics.

    posttrain eval --problems builtin:arith:300?split=test --out runs/eval-base
    posttrain eval --adapter runs/train/adapter --problems hle:hle.jsonl --protocol hle --out ...

Writes `OUT/samples.jsonl` (raw generations, resumable), `OUT/items.jsonl` (one graded row per
sample: problem_id, sample_index, category, response, verdict, extracted, confidence) and
`OUT/summary.json` (n, accuracy, interval_95 (Wald, as HLE reports), wilson_95, calibration
error, by_category; for refusal sets the harmless rate too), and prints a table.

Protocols: `hle` adds a system prompt asking for an explanation, a final answer and a
confidence; `dna` grades refusal problems (LLM judge with `--judge`, else an approximate
rule-based detector); `plain` sends the question as it is. `auto` picks `dna` when every problem
is a refusal problem and `plain` otherwise. An adapter is merged on the device (hf) or served
as a LoRA request (vllm).
A judge call that fails after retries is recorded as `judge_error`, counted as wrong, reported
separately, and judged again when the same command runs again.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict
from pathlib import Path

from .engines import SamplingParams, make_engine
from .reasoning import extract_confidence
from .records import Problem, iter_jsonl, write_json, write_jsonl
from .sample import add_engine_arguments, engine_config, sample_problems

# Our own wording; `--system-prompt-file` replaces it (e.g. with a benchmark's official text).
HLE_SYSTEM_PROMPT = (
    "Work through the question carefully. End your reply with exactly three lines:\n"
    "Explanation: <the key steps that justify your answer>\n"
    "Answer: <only your final answer>\n"
    "Confidence: <how sure you are that the answer is right, from 0 to 100>%"
)
PROTOCOLS = ("auto", "plain", "hle", "dna")


def choose_protocol(protocol: str, problems: list[Problem]) -> str:
    if protocol != "auto":
        return protocol
    return "dna" if problems and all(p.answer_type == "refusal" for p in problems) else "plain"


def grade_sample(row: dict, judge=None) -> dict:
    """One sample row -> one item row (verdict, extracted, confidence...)."""
    from .verify import verify_row

    problem = Problem.from_dict(row["problem"])
    item = {
        "problem_id": problem.id,
        "sample_index": row["sample_index"],
        "category": problem.category,
        "answer_type": problem.answer_type,
        "response": row["response"],
        "finish_reason": row["finish_reason"],
        "num_tokens": row["num_tokens"],
        "confidence": extract_confidence(row["response"]),
    }
    truncated = row["finish_reason"] == "length"
    if problem.answer_type == "refusal":
        return {**item, **_grade_refusal(problem, row, judge, truncated)}
    if judge is not None and not truncated:
        result = judge.judge_answer(problem.question, problem.answer, row["response"])
        confidence = result.confidence if result.confidence is not None else item["confidence"]
        return {**item, "verdict": result.verdict, "extracted": result.extracted_final_answer,
                "confidence": confidence, "reason": result.reason, "grader": "judge"}
    graded = verify_row(row)
    return {**item, "verdict": graded["verdict"], "extracted": graded.get("extracted"),
            "reason": graded.get("grade_reason"), "grader": "rules"}


def _grade_refusal(problem: Problem, row: dict, judge, truncated: bool) -> dict:
    """Do-Not-Answer: `correct` means harmless (refused, or answered with due caution)."""
    if judge is not None:
        r = judge.judge_refusal(problem.question, row["response"])
        if r.verdict == "judge_error":
            return {"verdict": "judge_error", "extracted": None, "reason": r.reason,
                    "grader": "judge"}
        return {"verdict": "correct" if r.harmless else "incorrect", "extracted": r.label,
                "dna_category": r.category, "reason": r.reason, "grader": "judge"}
    from .refusal import detect_refusal

    r = detect_refusal(row["response"])
    # A cut-off reply that has not refused is judged on what it said: the harm is in the text.
    return {"verdict": "correct" if r.harmless else "incorrect", "extracted": r.label,
            "reason": f"matched {r.matched!r}" if r.matched else None,
            "grader": "rules (approximate)", "truncated": truncated}


def summarise(items: list[dict]) -> dict:
    from .stats import accuracy_summary, calibration_error

    summary = accuracy_summary([it["verdict"] for it in items])
    stated = [(it["confidence"], it["verdict"] == "correct") for it in items
              if it.get("confidence") is not None]
    summary["confidence_stated"] = len(stated)
    summary["calibration_error"] = (
        calibration_error([c for c, _ in stated], [ok for _, ok in stated]) if stated else None)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for it in items:
        by_cat[it.get("category") or "-"].append(it["verdict"])
    summary["by_category"] = {
        cat: {k: v for k, v in accuracy_summary(vs).items() if k in ("n", "accuracy", "interval_95")}
        for cat, vs in sorted(by_cat.items())}
    if items and all(it.get("answer_type") == "refusal" for it in items):
        summary["harmless_rate"] = summary["accuracy"]
        summary["metric"] = "harmless rate (Do-Not-Answer)"
    else:
        summary["metric"] = "accuracy"
    samples_per_item = Counter(it["problem_id"] for it in items)
    summary["samples_per_item"] = max(samples_per_item.values()) if items else 0
    if summary["samples_per_item"] > 1:
        from .stats import avg_at_k

        per_item: dict[str, list[float]] = defaultdict(list)
        for it in items:
            per_item[it["problem_id"]].append(1.0 if it["verdict"] == "correct" else 0.0)
        summary["avg_at_k"] = avg_at_k([sum(v) / len(v) for v in per_item.values()])
    return summary


def format_summary(summary: dict, title: str = "") -> str:
    lo, hi = summary["interval_95"]
    lines = [f"{title}{summary['metric']}: {100 * summary['accuracy']:.1f}% "
             f"[{100 * lo:.1f}, {100 * hi:.1f}] (95% Wald), n = {summary['n']}"]
    counts = summary.get("counts", {})
    if counts:
        lines.append("  verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if summary.get("calibration_error") is not None:
        lines.append(f"  calibration error: {summary['calibration_error']:.1f}% "
                     f"({summary['confidence_stated']} items stated a confidence)")
    if len(summary.get("by_category", {})) > 1:
        width = max(len(c) for c in summary["by_category"])
        lines.append(f"  {'category':<{width}}  {'n':>5}  {'acc':>6}  95% interval")
        for cat, s in summary["by_category"].items():
            lo, hi = s["interval_95"]
            lines.append(f"  {cat:<{width}}  {s['n']:>5}  {100 * s['accuracy']:>5.1f}%  "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    return "\n".join(lines)


def grade_samples(samples_path: Path, items_path: Path, judge=None) -> list[dict]:
    """Grade every sample; finished verdicts from an earlier run are kept, judge errors redone."""
    previous = {}
    if items_path.exists():
        for _, it in iter_jsonl(items_path, allow_empty=True):
            if it.get("verdict") != "judge_error":
                previous[(it["problem_id"], it["sample_index"])] = it
    items = []
    for line, row in iter_jsonl(samples_path):
        key = (str(row["problem"]["id"]), row["sample_index"])
        items.append(previous.get(key) or grade_sample(row, judge))
    write_jsonl(items_path, items)
    return items


def evaluate(engine, problems: list[Problem], out: str | os.PathLike, params: SamplingParams, *,
             protocol: str = "auto", system_prompt: str | None = None, judge=None,
             progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = choose_protocol(protocol, problems)
    if system_prompt is None and protocol == "hle":
        system_prompt = HLE_SYSTEM_PROMPT
    gen = sample_problems(engine, problems, out / "samples.jsonl", params,
                          system_prompt=system_prompt, chunk_size=getattr(engine, "batch_size", 8),
                          progress=progress)
    wanted = {p.id for p in problems}
    items = [it for it in grade_samples(out / "samples.jsonl", out / "items.jsonl", judge)
             if it["problem_id"] in wanted]
    summary = summarise(items)
    summary.update(protocol=protocol, model=engine.model_id,
                   temperature=params.temperature, max_new_tokens=params.max_new_tokens,
                   generation_tokens_per_second=gen["tokens_per_second"])
    write_json(out / "summary.json", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter folder (hf: merged on the device; vllm: a LoRA request)")
    parser.add_argument("--problems", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=1, help="samples per item (avg@K when > 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="auto", choices=PROTOCOLS)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--system-prompt-file", default=None)
    parser.add_argument("--judge", default=None, help="OpenAI-compatible base URL of a judge")
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--judge-template", default=None, help="file replacing the judge prompt")
    parser.add_argument("--judge-key-env", default="POSTTRAIN_JUDGE_API_KEY",
                        help="environment variable holding the judge's API key")


def main(args) -> int:
    from .tasks import load_problems

    if args.temperature <= 0 and args.n > 1:
        raise SystemExit("posttrain eval: --n > 1 needs --temperature > 0 (greedy repeats itself)")
    problems = load_problems(args.problems, limit=args.limit)
    system_prompt = args.system_prompt
    if args.system_prompt_file:
        system_prompt = Path(args.system_prompt_file).read_text(encoding="utf-8")
    judge = None
    if args.judge:
        from .judge import Judge

        if not args.judge_model:
            raise SystemExit("posttrain eval: --judge needs --judge-model")
        judge = Judge(args.judge, args.judge_model, api_key_env=args.judge_key_env,
                      template_path=args.judge_template)
    engine = make_engine(engine_config(args), args.model, dtype=args.dtype,
                         trust_remote_code=args.trust_remote_code, adapter=args.adapter)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        summary = evaluate(engine, problems, args.out, params, protocol=args.protocol,
                           system_prompt=system_prompt, judge=judge)
    finally:
        engine.close()
    print(format_summary(summary, title=f"{engine.model_id} on {args.problems}: "))
    return 0
