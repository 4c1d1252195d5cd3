"""Math grader: the stated answer is mathematically equal to the reference (math-verify), with a
hard time limit.

Run by `posttrain verify` for problems with answer_type "math".

Extraction: the last `\\boxed{...}` (several boxes: the last wins), else the last "Answer: X" /
"the answer is X" statement, else the last number in the response. Comparison: equal after
exact-match normalisation is correct at once; otherwise math-verify parses both sides as LaTeX
and checks equivalence with sympy (so \\frac{1}{2} == 0.5 and 2\\sqrt{3} == \\sqrt{12}).

Why a worker process: sympy can run for minutes or forever on a model's answer (try
9^{9^{9}}), and math-verify's own time limit uses SIGALRM, which works only on the main thread
of the main interpreter. Here parse and verify run in a long-lived worker process
(math_worker.py); the caller waits at most `timeout_s`, and on time-out kills the worker (a
fresh one starts on the next call). A time-out is recorded as `incorrect` with reason
"timeout". Workers are pooled, one per concurrent caller, so graders can be called from
threads. POSIX only (select on a pipe).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

from posttrain.records import Problem
from posttrain.verify.extract import (
    boxed_contents,
    clean_answer,
    find_numbers,
    normalize_text,
    parse_number,
    phrase_statements,
)
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


def equivalent(
    reference: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[bool, str | None]:
    """(equal?, reason) for two answers; raises MathTimeout past `timeout_s` seconds."""
    if normalize_text(reference) == normalize_text(answer):
        return True, None
    a, b = parse_number(clean_answer(reference)), parse_number(clean_answer(answer))
    if a is not None and b is not None and a == b:
        return True, None
    return _WORKERS.run((reference, answer), timeout_s)


# ---------------------------------------------------------------------------- worker processes


class _Worker:
    """One `python -m posttrain.verify.math_worker` process, spoken to in JSON lines.

    A plain subprocess rather than multiprocessing: spawn-style multiprocessing re-imports the
    caller's main script in the child, which breaks (or reruns) scripts without a main guard.
    """

    def __init__(self):
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # so the child finds posttrain
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain.verify.math_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        try:
            ready = self._read_line(WORKER_START_TIMEOUT_S)
        except (MathTimeout, EOFError):
            ready = b""
        if ready != b"ready\n":
            self.kill()
            raise RuntimeError(
                f"the math-verify worker did not start within "
                f"{WORKER_START_TIMEOUT_S:.0f} s; is math-verify installed?"
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job: tuple[str, str], timeout_s: float) -> tuple[bool, str | None]:
        self.proc.stdin.write((json.dumps([*job, timeout_s]) + "\n").encode())
        equal, reason = json.loads(self._read_line(timeout_s))
        return bool(equal), reason

    def _read_line(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise MathTimeout
        line = self.proc.stdout.readline()  # unbuffered pipe: never more than this one line
        if not line:
            raise EOFError("the math-verify worker exited")
        return line

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def close(self) -> None:
        self.proc.stdin.close()  # the worker sees end of input and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _WorkerPool:
    """Idle workers handed out one per call; a thread-safe pool that grows to the concurrency."""

    def __init__(self):
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, job, timeout_s: float):
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.alive():
            worker = _Worker()
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
            worker.close()


_WORKERS = _WorkerPool()
atexit.register(_WORKERS.close)
