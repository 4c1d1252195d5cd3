"""The built-in task: seeded two-operand integer arithmetic, train and test disjoint by fact.

    posttrain problems "builtin:arith:300?split=test&difficulty=1&seed=0" --out test.jsonl

A fact is the canonical form of a question: `3 + 5` and `5 + 3` are one fact (addition and
multiplication are commutative), `8 - 3` is its own fact. Each fact belongs to exactly one split,
decided by a hash of the fact alone (not of N, seed or difficulty), so no test fact can ever be
trained on. Within a split, items are drawn one by one from a generator seeded by
(split, difficulty, seed, ops); a longer N extends a shorter one (N=100 is the first 100 of N=300),
and no fact repeats within one list.

Operand ranges per difficulty (subtraction puts the larger operand first, so answers are >= 0;
x0 and x1 are left out as free points). Accuracy: SmolLM2-135M-Instruct, greedy, 40 new tokens,
the question as the only user message, last number in the reply compared with the answer:

    difficulty  add / sub operands   mul operands      facts   greedy accuracy on test
    0           0-9                  2-9 x 2-9           146   73 % (55/75; ad hoc sample)
    1 (default) 0-39                 2-9 x 2-49        ~2.0k   26.5 % (53/200; 95 % CI 21-33)
    2           10-99                2-9 x 10-99       ~8.9k    8 % (8/100)
    3           100-999              10-99 x 10-99
    4           1000-9999            10-99 x 100-999

About a fifth of the facts are test facts, so difficulty 0 only suits smoke tests. Operations are
drawn uniformly; one whose unused facts run short in a split simply appears less often.
"""

from __future__ import annotations

import hashlib
import random

from posttrain.records import Problem
from posttrain.tasks.spec import Spec, SpecError

OPS = ("add", "sub", "mul")
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
TEST_PERCENT = 20  # share of all facts that belong to the test split
QUESTION = "What is {a} {symbol} {b}? Give the final answer as a number."


_ONES = range(2, 10)
RANGES = {  # difficulty -> {op: (range of one operand, range of the other)}
    0: {"add": (range(0, 10),) * 2, "sub": (range(0, 10),) * 2, "mul": (_ONES, _ONES)},
    1: {"add": (range(0, 40),) * 2, "sub": (range(0, 40),) * 2, "mul": (_ONES, range(2, 50))},
    2: {"add": (range(10, 100),) * 2, "sub": (range(10, 100),) * 2, "mul": (_ONES, range(10, 100))},
    3: {
        "add": (range(100, 1000),) * 2,
        "sub": (range(100, 1000),) * 2,
        "mul": (range(10, 100), range(10, 100)),
    },
    4: {
        "add": (range(1000, 10000),) * 2,
        "sub": (range(1000, 10000),) * 2,
        "mul": (range(10, 100), range(100, 1000)),
    },
}


def operand_ranges(op: str, difficulty: int) -> tuple[range, range]:
    if difficulty not in RANGES:
        raise ValueError(
            f"difficulty must be one of {', '.join(map(str, RANGES))}, got {difficulty}"
        )
    return RANGES[difficulty][op]


def canonical_fact(op: str, a: int, b: int) -> tuple[str, int, int]:
    """The fact a question asks: commutative operations sorted, subtraction kept in order."""
    if op in ("add", "mul"):
        a, b = min(a, b), max(a, b)
    return (op, a, b)


def split_of(fact: tuple[str, int, int]) -> str:
    """'test' or 'train', from a hash of the fact only (stable across runs and machines)."""
    digest = hashlib.sha256("{} {} {}".format(*fact).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def answer_of(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def generate(
    n: int, *, split: str = "train", difficulty: int = 1, seed: int = 0, ops: tuple[str, ...] = OPS
) -> list[Problem]:
    """`n` distinct-fact questions of one split; raises ValueError if the split runs out."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {', '.join(OPS)}, got {ops}")
    rng = random.Random(f"arith|{split}|{difficulty}|{seed}|{'+'.join(ops)}")
    ranges = {op: operand_ranges(op, difficulty) for op in ops}
    seen: set[tuple] = set()
    problems: list[Problem] = []
    tries, budget = 0, 100 * n + 10_000  # generous: a test draw is accepted 1 time in 5
    while len(problems) < n:
        tries += 1
        if tries > budget:
            raise ValueError(
                f"found only {len(problems)} distinct {split} facts at difficulty "
                f"{difficulty} with ops {'+'.join(ops)}; ask for fewer"
            )
        op = rng.choice(ops)
        a, b = rng.choice(ranges[op][0]), rng.choice(ranges[op][1])
        if op == "sub" and a < b:
            a, b = b, a
        elif op == "mul" and rng.random() < 0.5:
            a, b = b, a  # show both orders of the 1-digit factor
        fact = canonical_fact(op, a, b)
        if fact in seen or split_of(fact) != split:
            continue
        seen.add(fact)
        problems.append(
            Problem(
                id=f"arith-{split}-{len(problems)}",
                question=QUESTION.format(a=a, symbol=SYMBOLS[op], b=b),
                answer=str(answer_of(op, a, b)),
                answer_type="exact",
                category=op,
                source="builtin:arith",
                meta={"difficulty": difficulty, "op": op, "operands": [a, b]},
            )
        )
    return problems


def fact_of(problem: Problem) -> tuple[str, int, int] | None:
    """The canonical fact of a built-in arithmetic problem (None for any other problem)."""
    meta = problem.meta or {}
    if (
        meta.get("op") in OPS
        and isinstance(meta.get("operands"), list)
        and len(meta["operands"]) == 2
    ):
        return canonical_fact(meta["op"], *meta["operands"])
    return None


def load(spec: Spec, limit: int | None) -> list[Problem]:
    """`builtin:arith[:N]?split=train|test&difficulty=1&seed=0&ops=add+sub+mul&start=0` (N default
    100): questions start .. start+N-1 of the seeded sequence, so `arith:200?start=200` holds the
    200 questions that follow `arith:200` (for a fresh block of problems per round)."""
    spec.check_options({"split", "difficulty", "seed", "ops", "start"})
    name, _, count = spec.body.partition(":")
    if name != "arith":
        raise SpecError(spec.text, f"unknown builtin task {name!r}; builtin tasks: arith")
    try:
        n = int(count) if count else 100
    except ValueError:
        raise SpecError(spec.text, f"N={count!r}: expected an integer") from None
    if n < 1:
        raise SpecError(spec.text, f"N={n}: expected an integer >= 1 (how many questions)")
    start = spec.int_option("start", 0)
    if start < 0:
        raise SpecError(spec.text, f"start={start}: expected an integer >= 0")
    if limit is not None:
        n = min(n, limit)
    ops = tuple(spec.options.get("ops", "+".join(OPS)).split("+"))
    try:
        return generate(
            start + n,
            split=spec.options.get("split", "train"),
            difficulty=spec.int_option("difficulty", 1),
            seed=spec.int_option("seed", 0),
            ops=ops,
        )[start:]
    except ValueError as e:
        raise SpecError(spec.text, str(e)) from None
