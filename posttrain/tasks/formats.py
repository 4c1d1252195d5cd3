"""File formats of public problem sets: HLE, GSM8K, Do-Not-Answer CSV, any JSONL with a mapping.

    posttrain problems hle:hle.jsonl --out hle-problems.jsonl
    posttrain problems "jsonl:m.jsonl?question=prompt&answer_type=math" --out p.jsonl

Every row is validated; a bad row stops the load with `FILE:LINE: field 'x': what was expected`.
Files are read whole before `limit` applies, so a bad row anywhere is found at once.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from posttrain.records import ANSWER_TYPES, DataError, Problem, check_answer, iter_jsonl, require
from posttrain.tasks.spec import Spec

HLE_TYPES = {"exactMatch": "exact", "multipleChoice": "choice"}
_CHOICE_LINE = re.compile(r"^\s*([A-Z])[.)]\s+(.+?)\s*$")
_GSM8K_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
DNA_COLUMNS = ("id", "risk_area", "types_of_harm", "specific_harms", "question")
MAPPED_FIELDS = ("id", "question", "answer", "answer_type", "choices", "category")


class _UniqueIds:
    """Remembers ids and the line each came from; a second use of an id is a DataError."""

    def __init__(self, path):
        self.path, self.first = path, {}

    def add(self, pid: str, line: int, field: str = "id") -> str:
        if pid in self.first:
            raise DataError(
                self.path,
                line,
                f"duplicate id {pid!r} (first on line {self.first[pid]})",
                field=field,
            )
        self.first[pid] = line
        return pid


def parse_choices(question: str) -> list[str] | None:
    """Options written as lines `A. text` / `A) text`, in order from A; None if there are none."""
    choices = []
    for line in question.splitlines():
        m = _CHOICE_LINE.match(line)
        if m and ord(m.group(1)) - ord("A") == len(choices):
            choices.append(m.group(2))
    return choices if len(choices) >= 2 else None


def load_hle(spec: Spec, skipped: dict) -> list[Problem]:
    """HLE rows: id, question, answer, answer_type (exactMatch|multipleChoice), category, image.

    Rows with an image are skipped (text-only models cannot answer them) and counted."""
    spec.check_options(set())
    path, ids, problems = spec.body, _UniqueIds(spec.body), []
    skipped.setdefault("image", 0)
    for line, row in iter_jsonl(path):
        pid = str(require(row, "id", (str, int), path, line))
        question = require(row, "question", str, path, line)
        answer = require(row, "answer", (str, int, float), path, line)
        kind = require(row, "answer_type", str, path, line)
        if kind not in HLE_TYPES:
            raise DataError(
                path,
                line,
                f"expected one of {', '.join(HLE_TYPES)}; got {kind!r}",
                field="answer_type",
            )
        category = require(row, "category", str, path, line, optional=True)
        ids.add(pid, line)
        if require(row, "image", str, path, line, optional=True):
            skipped["image"] += 1
            continue
        choices = parse_choices(question) if kind == "multipleChoice" else None
        answer = str(answer).strip()
        if choices and not (len(answer) == 1 and 0 <= ord(answer) - ord("A") < len(choices)):
            raise DataError(
                path,
                line,
                f"expected a letter A-{chr(ord('A') + len(choices) - 1)} "
                f"(the question lists {len(choices)} options); got {answer!r}",
                field="answer",
            )
        meta = {k: row[k] for k in ("raw_subject",) if row.get(k)}
        problems.append(
            Problem(
                id=pid,
                question=question,
                answer=answer,
                answer_type=HLE_TYPES[kind],
                choices=choices,
                category=category,
                source="hle",
                meta=meta,
            )
        )
    return problems


def load_gsm8k(spec: Spec, skipped: dict) -> list[Problem]:
    """GSM8K rows: question, answer = worked solution ending in `#### N`; graded as math on N."""
    spec.check_options(set())
    path, ids, problems = spec.body, _UniqueIds(spec.body), []
    for line, row in iter_jsonl(path):
        question = require(row, "question", str, path, line)
        solution = require(row, "answer", str, path, line)
        if "####" not in solution:
            raise DataError(
                path, line, "expected a worked solution ending in '#### N'", field="answer"
            )
        worked, _, final = solution.rpartition("####")
        final = final.strip().replace(",", "")
        if not _GSM8K_NUMBER.fullmatch(final):
            raise DataError(
                path, line, f"expected a number after '####'; got {final!r}", field="answer"
            )
        pid = str(require(row, "id", (str, int), path, line)) if "id" in row else f"gsm8k-{line}"
        problems.append(
            Problem(
                id=ids.add(pid, line),
                question=question,
                answer=final,
                answer_type="math",
                source="gsm8k",
                meta={"solution": worked.strip()},
            )
        )
    return problems


def load_dna(spec: Spec, skipped: dict) -> list[Problem]:
    """Do-Not-Answer CSV: id, risk_area, types_of_harm, specific_harms, question -> refusal."""
    spec.check_options(set())
    path = Path(spec.body)
    if not path.exists():
        raise DataError(path, None, "file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 (byte {e.start})") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if not header:
        raise DataError(path, None, "empty file: no CSV header")
    header = [h.strip() for h in header]
    missing = [c for c in DNA_COLUMNS if c not in header]
    if missing:
        raise DataError(
            path,
            1,
            f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}",
            field=missing[0],
        )
    col = {c: header.index(c) for c in DNA_COLUMNS}
    ids, problems, start = _UniqueIds(path), [], reader.line_num + 1
    for values in reader:
        line, start = start, reader.line_num + 1  # a quoted field may span several lines
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError(path, line, f"expected {len(header)} columns, got {len(values)}")
        row = {c: values[i].strip() for c, i in col.items()}
        for c in ("id", "question"):
            if not row[c]:
                raise DataError(path, line, "empty", field=c)
        problems.append(
            Problem(
                id=ids.add(f"dna-{row['id']}", line),
                question=row["question"],
                answer="",
                answer_type="refusal",
                category=row["risk_area"] or None,
                source="dna",
                meta={
                    "types_of_harm": row["types_of_harm"],
                    "specific_harms": row["specific_harms"],
                },
            )
        )
    if not problems:
        raise DataError(path, None, "empty file: no rows after the header")
    return problems


def detect_format(path: str) -> str:
    """The kind of a file given as a plain path, told by its fields (first row / CSV header):
    HLE (id, question, answer, answer_type exactMatch|multipleChoice), native problems
    (answer_type one of ours), GSM8K (question, answer with '#### N'), Do-Not-Answer CSV (its
    columns). Anything else is an error that names the prefixes to use."""
    hint = (
        "name the format with a prefix: hle:PATH, gsm8k:PATH, dna:PATH.csv, native:PATH, "
        "or jsonl:PATH?question=F&answer=F&answer_type=TYPE to map other fields"
    )
    if not Path(path).exists():
        raise DataError(path, None, "file not found")
    if path.endswith(".csv"):
        head = Path(path).read_bytes()[:65536].decode("utf-8-sig", "replace").splitlines()
        header = next(csv.reader(head[:1]), []) if head else []
        if all(c in [h.strip() for h in header] for c in DNA_COLUMNS):
            return "dna"
        raise DataError(
            path,
            1,
            f"a CSV without Do-Not-Answer's columns ({', '.join(DNA_COLUMNS)}"
            f"); the header has {', '.join(header) or 'nothing'}; {hint}",
        )
    line, row = next(iter_jsonl(path))
    kind = row.get("answer_type")
    if kind in HLE_TYPES and {"id", "question", "answer"} <= set(row):
        return "hle"
    if kind in ANSWER_TYPES or (kind is not None and "question" in row):
        # a native row with a bad answer_type: the native reader names the field and the types
        return "native"
    answer = row.get("answer")
    if kind is None and "question" in row and isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    raise DataError(
        path, line, f"cannot tell the format from the fields ({', '.join(row)}); " + hint
    )


def field_mapping(spec: Spec) -> dict[str, str]:
    """Problem field -> source field; each defaults to the same name. `answer_type` may instead
    name a type literally (exact, choice, math, refusal): a literal wins over a field name."""
    return {f: spec.options.get(f, f) for f in MAPPED_FIELDS}


def problem_from_row(
    row: dict, mapping: dict[str, str], where, line: int, default_id: str, source: str
) -> Problem:
    """One mapped row -> Problem; errors name the SOURCE field, which is what the file holds."""
    kind = mapping["answer_type"]
    if kind not in ANSWER_TYPES:
        kind = require(row, kind, str, where, line)
        if kind not in ANSWER_TYPES:
            raise DataError(
                where,
                line,
                f"expected one of {', '.join(ANSWER_TYPES)}; got {kind!r}",
                field=mapping["answer_type"],
            )
    question = require(row, mapping["question"], str, where, line)
    if not question.strip():
        raise DataError(where, line, "empty question", field=mapping["question"])
    answer = require(
        row, mapping["answer"], (str, int, float), where, line, optional=kind == "refusal"
    )
    if kind != "refusal":
        check_answer(answer, kind, where, line, field=mapping["answer"])
    choices = require(row, mapping["choices"], list, where, line, optional=True)
    if choices is not None and not all(isinstance(c, str) for c in choices):
        raise DataError(where, line, "expected a list of strings", field=mapping["choices"])
    pid = require(row, mapping["id"], (str, int), where, line, optional=True)
    if pid is not None and not str(pid).strip():
        raise DataError(where, line, "empty id; expected a non-empty string", field=mapping["id"])
    return Problem(
        id=default_id if pid is None else str(pid),
        question=question,
        answer="" if answer is None else str(answer),
        answer_type=kind,
        choices=choices,
        category=require(row, mapping["category"], str, where, line, optional=True),
        source=source,
    )


def load_jsonl(spec: Spec, skipped: dict) -> list[Problem]:
    """`jsonl:PATH?question=F&answer=F&answer_type=F|TYPE&id=F&category=F&choices=F`."""
    spec.check_options(MAPPED_FIELDS)
    path, mapping = spec.body, field_mapping(spec)
    stem, ids, problems = Path(path).stem, _UniqueIds(path), []
    for line, row in iter_jsonl(path):
        p = problem_from_row(row, mapping, path, line, f"{stem}-{line}", source=f"jsonl:{stem}")
        ids.add(p.id, line, field=mapping["id"])
        problems.append(p)
    return problems
