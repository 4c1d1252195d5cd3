"""The math-verify worker process: reads jobs on stdin, answers on stdout, one JSON line each.

Started by posttrain/verify/math.py as `python -m posttrain.verify.math_worker`; not a command
people type. A job is `[reference, answer, timeout_s]`; the reply is `[equal, reason]`. The
parent kills this process when a job runs past its time limit. As a second guard, each job
runs under a CPU-time limit of timeout + 2 s (RLIMIT_CPU), so a worker whose parent died
(kill -9) while sympy was stuck stops by itself instead of spinning forever.
"""

from __future__ import annotations

import json
import logging
import math
import sys


def as_latex(s: str) -> str:
    # math-verify extracts from LaTeX inside math delimiters; bare "\frac12" or "x^2" needs them.
    return s if ("$" in s or "\\(" in s or "\\[" in s) else f"${s}$"


def check(reference: str, answer: str) -> tuple[bool, str | None]:
    from math_verify import parse, verify

    gold = parse(as_latex(reference), parsing_timeout=None)
    if not gold:
        return False, "reference could not be parsed by math-verify"
    pred = parse(as_latex(answer), parsing_timeout=None)
    if not pred:
        return False, "answer could not be parsed by math-verify"
    return bool(verify(gold, pred, timeout_seconds=None)), None


def _limit_cpu(seconds: float) -> None:
    try:
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        total = used.ru_utime + used.ru_stime
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(total + seconds + 2)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, ValueError, OSError):  # not on this platform: the parent's kill remains
        pass


def serve() -> None:
    # Time limits are the parent's job, so math-verify's warning that its own are off is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (imported before "ready": start-up is not graded time)

    out, sys.stdout = sys.stdout, sys.stderr  # stray prints from libraries must not reach the pipe
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:  # ends when the parent closes the pipe (or dies)
        reference, answer, timeout_s = json.loads(line)
        _limit_cpu(float(timeout_s))
        try:
            result = check(reference, answer)
        except Exception as e:  # odd input or a sympy bug must not end the worker
            result = (False, f"math-verify error: {type(e).__name__}: {e}"[:300])
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
