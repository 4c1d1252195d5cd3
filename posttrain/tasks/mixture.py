"""Mix several problem sources by weight, deterministically, with unique ids.

    posttrain problems "mix:builtin:arith:400@0.7,gsm8k:gsm8k.jsonl@0.3?n=200&seed=0" --out p.jsonl
    posttrain problems mix:recipes/mix.yaml --out p.jsonl

String form: `mix:SPEC@WEIGHT,SPEC@WEIGHT,...?n=N&seed=S`. Every part needs its `@WEIGHT` (a part's
own options go before it: `builtin:arith:300?split=train@2`); the mixture's options follow the
last weight. Parts cannot contain commas; use the YAML form then:

    n: 200          # optional
    seed: 0         # optional
    sources:
      - {source: builtin:arith:400, weight: 0.7}
      - {source: gsm8k:gsm8k.jsonl, weight: 0.3}   # relative paths: from the YAML's folder first

Counts: weights are normalised; source i gets floor(n * w_i) problems and the leftover ones go to
the largest fractional parts (ties: earlier source), so the counts always sum to n. Without n, n
is the largest total every source can fill at its weight. A source with too few problems for its
count is an error. Each source is shuffled with its own seed before its first `count` are taken,
then the whole mixture is shuffled. Ids that occur in more than one source get the prefix
`mixI-` (I = the source's position, from 0); every problem records `meta["mix_source"]`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import yaml

from posttrain.records import DataError, Problem
from posttrain.tasks.spec import Spec, SpecError, parse_options, parse_spec

_PART = re.compile(r"^(?P<source>.+)@(?P<weight>[^@?]+)(?:\?(?P<options>.*))?$")
_FILE_KINDS = ("hle", "gsm8k", "dna", "jsonl", "native", "auto", "hf", "mix")
MAX_DEPTH = 4


def allocate(n: int, weights: list[float]) -> list[int]:
    """Split n by weight: floors, then leftovers to the largest remainders (largest remainder
    method). E.g. n=10, weights 0.7/0.2/0.1 -> 7/2/1; n=10, weights 1/1/1 -> 4/3/3."""
    total = sum(weights)
    shares = [n * w / total for w in weights]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def largest_n(sizes: list[int], weights: list[float]) -> int:
    """The largest n whose allocation fits every source (0 when a weighted source is empty)."""
    total = sum(weights)
    n = min(math.floor(s * total / w) for s, w in zip(sizes, weights) if w > 0)
    while n > 0 and any(c > s for c, s in zip(allocate(n, weights), sizes)):
        n -= 1  # float rounding can overshoot by one
    return n


def parse_mix(spec: Spec) -> tuple[list[tuple[str, float]], dict, Path | None]:
    """[(source spec, weight)], mixture options, and the YAML folder (None for the string form)."""
    body, _, query = spec.body.partition("?")
    if body.endswith((".yaml", ".yml")):
        return _read_yaml(spec, Path(body), query)
    parts, options = [], {}
    pieces = spec.body.split(",")
    for k, piece in enumerate(pieces):
        m = _PART.match(piece.strip())
        if not m:
            raise SpecError(spec.text, f"part {piece!r}: expected SOURCE@WEIGHT")
        if m["options"] is not None and k < len(pieces) - 1:
            raise SpecError(spec.text, f"part {piece!r}: mixture options go after the last part")
        parts.append((m["source"], _weight(spec, m["weight"])))
        if m["options"] is not None:
            options = parse_options(spec.text, m["options"])
    return parts, options, None


def _read_yaml(spec: Spec, path: Path, query: str):
    if not path.exists():
        raise DataError(path, None, "file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"not valid YAML: {e}") from None
    doc = {"sources": doc} if isinstance(doc, list) else doc
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise DataError(
            path, None, "expected a non-empty list of {source, weight}", field="sources"
        )
    parts = []
    for k, entry in enumerate(doc["sources"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise DataError(path, None, "expected {source: SPEC, weight: W}", field=f"sources[{k}]")
        parts.append((entry["source"], _weight(spec, entry.get("weight", 1), path, k)))
    options = {k: str(doc[k]) for k in ("n", "seed") if doc.get(k) is not None}
    options.update(parse_options(spec.text, query))  # the source string overrides the file
    return parts, options, path.parent


def _weight(spec: Spec, value, path=None, k=None) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if not (w >= 0 and math.isfinite(w)):
        if path is not None:
            raise DataError(
                path, None, f"expected a number >= 0; got {value!r}", field=f"sources[{k}].weight"
            )
        raise SpecError(spec.text, f"weight {value!r}: expected a number >= 0")
    return w


def _resolve(source: str, folder: Path | None) -> str:
    """A relative file path in a YAML mixture is tried next to the YAML file first."""
    if folder is None:
        return source
    inner = parse_spec(source)
    path = inner.body.partition("?")[0] if inner.kind == "mix" else inner.body
    if inner.kind in _FILE_KINDS and not Path(path).is_absolute() and (folder / path).exists():
        return source.replace(path, str(folder / path), 1)
    return source


def load_mix(
    spec: Spec,
    skipped: dict,
    drawn: dict,
    load: Callable[[str, int], tuple[list[Problem], object]],
    depth: int = 0,
) -> list[Problem]:
    """Draw from each source by weight; `load(spec, depth)` loads one part (and its report).
    `drawn` gets every source, in order, with a zero count: the caller counts what it returns."""
    if depth > MAX_DEPTH:
        raise SpecError(spec.text, "mixtures nested too deep (does a YAML include itself?)")
    parts, options, folder = parse_mix(spec)
    opt = Spec(spec.text, "mix", spec.body, options)
    opt.check_options({"n", "seed"})
    seed, n = opt.int_option("seed", 0), opt.int_option("n", None)
    if not any(w > 0 for _, w in parts):
        raise SpecError(spec.text, "every weight is 0")
    loaded = []
    for source, weight in parts:
        source = _resolve(source, folder)
        problems, report = load(source, depth + 1) if weight > 0 else ([], None)
        for reason, count in report.skipped.items() if report else ():
            skipped[reason] = skipped.get(reason, 0) + count
        loaded.append((source, weight, problems))
        drawn.setdefault(source, 0)
    sizes, weights = [len(p) for _, _, p in loaded], [w for _, w, _ in loaded]
    n = largest_n(sizes, weights) if n is None else n
    counts = allocate(n, weights)
    for (source, _, problems), count in zip(loaded, counts):
        if count > len(problems):
            raise SpecError(
                spec.text,
                f"{source!r} has {len(problems)} problems; the mixture asks for {count} of n={n}",
            )
    ids: dict[str, int] = {}
    chosen = []
    for i, ((source, _, problems), count) in enumerate(zip(loaded, counts)):
        take = random.Random(f"mix|{seed}|{i}").sample(problems, count)
        chosen.append(take)
        for p in take:
            ids[p.id] = ids.get(p.id, 0) + 1
    mixed = [
        replace(
            p, id=f"mix{i}-{p.id}" if ids[p.id] > 1 else p.id, meta={**p.meta, "mix_source": source}
        )
        for i, ((source, _, _), take) in enumerate(zip(loaded, chosen))
        for p in take
    ]
    if len({p.id for p in mixed}) != len(mixed):  # a source repeating its own ids, prefixed
        raise SpecError(spec.text, "ids are not unique after prefixing clashing ids")
    random.Random(f"mix|{seed}").shuffle(mixed)
    return mixed
