"""Record kinds and JSONL I/O shared by every stage.

Every stage reads and writes JSONL, one JSON object per line. Reading validates as it goes and
fails with `FILE:LINE: field 'x': what was expected`; writing appends one flushed line at a time
so a killed stage keeps every finished row, and `JsonlAppender` resumes from what is on disk
(a half-written last line from `kill -9` is cut off, never parsed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from posttrain.errors import InputError

ANSWER_TYPES = ("exact", "choice", "math", "refusal")
# how a missing value reads once a spreadsheet or pandas exported it (as text or as a NaN float);
# "none" and "null" can be real answers, NaN cannot
MISSING_ANSWERS = ("nan",)
VERDICTS = ("correct", "incorrect", "no_answer", "truncated", "judge_error")


class DataError(InputError):  # a user mistake (posttrain/errors.py); a ValueError
    """Bad input, located: `FILE:LINE: field 'name': message` (no location when there is no
    file, e.g. rows given in memory)."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        line: int | None,
        message: str,
        field: str | None = None,
    ):
        self.path, self.line, self.field = (str(path) if path else None), line, field
        self.message = message
        where = f"{self.path}:{line}" if (self.path and line) else self.path
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}" if where else f"{what}{message}")


# ---------------------------------------------------------------------------- reading


def iter_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; raise DataError on bad lines."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, "a folder; expected a JSONL file")
    seen_any = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            if "\\ud" in text or "\\uD" in text:  # a surrogate escape: maybe half a pair
                _refuse_lone_surrogates(obj, path, lineno)
            seen_any = True
            yield lineno, obj
    if not seen_any and not allow_empty:
        raise DataError(path, None, "empty file: no JSON rows")


def _refuse_lone_surrogates(obj: dict, path, line) -> None:
    """A JSON escape of half a UTF-16 surrogate pair (`"\\ud800"` alone) decodes to a string
    that cannot be written as UTF-8: refused here, naming file, line and field, rather than
    replaced (a changed question or answer would be graded against something else)."""
    for key, value in obj.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                path,
                line,
                f"a lone UTF-16 surrogate ({e.object[e.start]!r}): not text; expected "
                "valid Unicode (a pair \\ud83d\\ude00 is fine, half of one is not)",
                field=key,
            ) from None


def read_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, allow_empty=allow_empty)]


def require(
    row: dict,
    name: str,
    types: type | tuple[type, ...],
    path=None,
    line=None,
    *,
    optional: bool = False,
) -> Any:
    """Return row[name] checked against `types`; DataError naming file, line and field."""
    if name not in row or row[name] is None:
        if optional:
            return None
        raise DataError(path, line, "missing", field=name)
    value = row[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataError(path, line, f"expected {_type_names(types)}, got bool", field=name)
    if not isinstance(value, types):
        raise DataError(
            path, line, f"expected {_type_names(types)}, got {type(value).__name__}", field=name
        )
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


# ---------------------------------------------------------------------------- writing


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file the command will write: not an existing folder (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: a folder; expected a file path to write")
    return path


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder the command will write into: not an existing file (checked before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: an existing file; expected a folder")
    return path


def read_text_file(path: str | os.PathLike, flag: str) -> str:
    """A text file the user named (a system prompt, a template): one line if it is not one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {str(path)!r}: file not found")
    if not path.is_file():
        raise InputError(f"{flag} {str(path)!r}: not a file (a folder?)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {str(path)!r}: not valid UTF-8 (byte {e.start})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write all rows atomically (temp file + rename). Returns the row count."""
    path = check_output_file(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class JsonlAppender:
    """Append rows to a JSONL file that may already hold finished rows of an earlier run.

    On open it drops a torn last line (a crash mid-write), reads the file once, line by line,
    keeping only the keys of finished rows (never the rows: a file of millions of long samples
    must not be held in memory), and then `append` writes each new row as one flushed line.
    `key(row)` identifies a unit of work, e.g. (problem id, sample index); `done(k)` tells the
    caller what to skip and `count` how many distinct keys are in the file.
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], Hashable]):
        self.path = check_output_file(path, "output")
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set = set()
        if self.path.exists():
            self._repair_tail()
            for _, row in iter_jsonl(self.path, allow_empty=True):
                self.keys.add(key(row))
        self._f = open(self.path, "a", encoding="utf-8")

    @property
    def count(self) -> int:
        return len(self.keys)

    def _repair_tail(self, block: int = 1 << 16) -> None:
        """Cut the file after its last newline, reading backwards from the end a block at a
        time (a torn line is at most one row; the rest of the file is never read here)."""
        with open(self.path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            pos = end
            while pos > 0:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                cut = f.read(step).rfind(b"\n")
                if cut >= 0:
                    f.truncate(pos + cut + 1)
                    return
            f.truncate(0)  # not one complete line

    def done(self, k: Hashable) -> bool:
        return k in self.keys

    def append(self, row: dict) -> None:
        k = self.key(row)
        if k in self.keys:
            return
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.keys.add(k)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A question with a reference answer. `answer_type` picks the grader."""

    id: str
    question: str
    answer: str
    answer_type: str
    choices: list[str] | None = None
    category: str | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)  # source-specific extras (difficulty, risk_area...)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["meta"]:
            d.pop("meta")
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, row: dict, path=None, line=None) -> "Problem":
        pid = require(row, "id", (str, int), path, line)
        if not str(pid).strip():
            raise DataError(path, line, "empty id; expected a non-empty string", field="id")
        question = require(row, "question", str, path, line)
        if not question.strip():
            raise DataError(path, line, "empty question", field="question")
        answer_type = require(row, "answer_type", str, path, line)
        if answer_type not in ANSWER_TYPES:
            raise DataError(
                path,
                line,
                f"expected one of {', '.join(ANSWER_TYPES)}; got {answer_type!r}",
                field="answer_type",
            )
        answer = row.get("answer")
        if answer_type != "refusal":
            answer = require(row, "answer", (str, int, float), path, line)
            check_answer(answer, answer_type, path, line)
        choices = require(row, "choices", list, path, line, optional=True)
        if choices is not None and not all(isinstance(c, str) for c in choices):
            raise DataError(path, line, "expected a list of strings", field="choices")
        category = require(row, "category", str, path, line, optional=True)
        source = require(row, "source", str, path, line, optional=True)
        meta = require(row, "meta", dict, path, line, optional=True) or {}
        return cls(
            id=str(pid),
            question=question,
            answer="" if answer is None else str(answer),
            answer_type=answer_type,
            choices=choices,
            category=category,
            source=source,
            meta=meta,
        )


def check_answer(answer, answer_type: str, path=None, line=None, field: str = "answer") -> None:
    """A reference answer a grader can compare with: not empty, not a missing value exported
    as text or as a NaN float (DataError naming file, line and field)."""
    text = str(answer).strip()
    if not text or text.lower() in MISSING_ANSWERS:
        raise DataError(
            path,
            line,
            f"{answer!r} is no reference answer (a missing value?); expected the answer the "
            f"{answer_type} grader compares with",
            field=field,
        )


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Read a native problems JSONL (the Problem fields), validated; duplicate ids rejected."""
    problems, seen = [], {}
    for line, row in iter_jsonl(path):
        p = Problem.from_dict(row, path, line)
        if p.id in seen:
            raise DataError(
                path, line, f"duplicate id {p.id!r} (first on line {seen[p.id]})", field="id"
            )
        seen[p.id] = line
        problems.append(p)
    return problems
