"""Math grader: the stated answer is mathematically equal to the reference (math-verify), with a
hard time limit.

Run by `posttrain verify` for problems with answer_type "math".

Extraction: the last `\\boxed{...}` (several boxes: the last wins), else the last "Answer: X" /
"the answer is X" statement, else the last number in the response. Comparison: equal after
exact-match normalisation is correct at once; otherwise math-verify parses both sides as LaTeX
and checks equivalence with sympy (so \\frac{1}{2} == 0.5 and 2\\sqrt{3} == \\sqrt{12}).

Why a worker process: sympy can run for minutes or forever on a model's answer (try
9^{9^{9}}), and math-verify's own time limit uses SIGALRM, which works only on the main thread
of the main interpreter. Here parse and verify run in a long-lived worker process; the caller
waits at most `timeout_s`, and on time-out kills the worker (a fresh one starts on the next
call). A time-out is recorded as `incorrect` with reason "timeout". Workers are pooled, one per
concurrent caller, so graders can be called from threads.
"""

from __future__ import annotations

import atexit
import multiprocessing
import threading

from posttrain.records import Problem
from posttrain.verify.extract import (boxed_contents, clean_answer, find_numbers, normalize_text,
                                      parse_number, phrase_statements)
from posttrain.verify.result import Grade, graded, ungraded

DEFAULT_TIMEOUT_S = 5.0  # math-verify's own default per parse/verify
WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take a while


class MathTimeout(Exception):
    """math-verify did not answer within the time limit; the worker was killed."""


def grade_math(response: str, problem: Problem, timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    extracted = extract_math(response)
    if not extracted:
        return ungraded("no_answer", "no boxed answer, answer statement or number found")
    try:
        same, reason = equivalent(str(problem.answer), extracted, timeout_s)
    except MathTimeout:
        return graded(False, extracted, "timeout")
    return graded(same, extracted, reason)


def extract_math(text: str) -> str | None:
    boxes = boxed_contents(text)
    if boxes:
        return clean_answer(boxes[-1][1]) or None
    statements = phrase_statements(text)
    if statements:
        return clean_answer(statements[-1][1]) or None
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def equivalent(reference: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S
               ) -> tuple[bool, str | None]:
    """(equal?, reason) for two answers; raises MathTimeout past `timeout_s` seconds."""
    if normalize_text(reference) == normalize_text(answer):
        return True, None
    a, b = parse_number(clean_answer(reference)), parse_number(clean_answer(answer))
    if a is not None and b is not None and a == b:
        return True, None
    return _WORKERS.run((reference, answer), timeout_s)


# ---------------------------------------------------------------------------- in the worker


def _as_latex(s: str) -> str:
    # math-verify extracts from LaTeX inside math delimiters; bare "\frac12" or "x^2" needs them.
    return s if ("$" in s or "\\(" in s or "\\[" in s) else f"${s}$"


def _check_in_worker(reference: str, answer: str) -> tuple[bool, str | None]:
    from math_verify import parse, verify

    gold = parse(_as_latex(reference), parsing_timeout=None)
    if not gold:
        return False, "reference could not be parsed by math-verify"
    pred = parse(_as_latex(answer), parsing_timeout=None)
    if not pred:
        return False, "answer could not be parsed by math-verify"
    return bool(verify(gold, pred, timeout_seconds=None)), None


def _serve(conn) -> None:
    """Worker main loop: answer (reference, answer) jobs until the pipe closes."""
    import logging

    # Time-outs are ours (the parent kills us), so math-verify's warning about them is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import before saying ready: startup is not graded time)

    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = _check_in_worker(*job)
        except Exception as e:  # a bug or odd input in sympy must not end the worker
            result = (False, f"math-verify error: {type(e).__name__}: {e}"[:300])
        conn.send(result)


# ---------------------------------------------------------------------------- in the caller


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True,
                                name="posttrain-math-verify")
        self.proc.start()
        child.close()
        if not self.conn.poll(WORKER_START_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"math-verify worker did not start in {WORKER_START_TIMEOUT_S} s")

    def run(self, job, timeout_s: float):
        self.conn.send(job)
        if not self.conn.poll(timeout_s):
            raise MathTimeout
        return self.conn.recv()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


class _WorkerPool:
    """Idle workers handed out one per call; a thread-safe pool that grows to the concurrency."""

    def __init__(self):
        self._ctx = multiprocessing.get_context("spawn")  # fork is unsafe in threaded parents
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, job, timeout_s: float):
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.proc.is_alive():
            worker = _Worker(self._ctx)
        try:
            result = worker.run(job, timeout_s)
        except MathTimeout:
            worker.kill()
            raise
        except (EOFError, OSError):  # the worker died (e.g. out of memory)
            worker.kill()
            return False, "math-verify worker died"
        with self._lock:
            self._idle.append(worker)
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.conn.close()  # the worker sees EOF and exits
            worker.proc.join(timeout=5)
            if worker.proc.is_alive():
                worker.kill()


_WORKERS = _WorkerPool()
atexit.register(_WORKERS.close)
