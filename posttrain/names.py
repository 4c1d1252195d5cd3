"""The one rule for names that become parts of paths: eval set names, sweep run ids, stage names
and adapter names sent to servers.

    python -c "from posttrain.names import check_name; check_name('eval set', 'dna', 'recipe.yaml')"

A name is 1-100 characters of letters, digits, `.`, `_` and `-`, and not `.` or `..`: it stays
inside the folder it is joined to (a set named `..` once wrote its base/trained/compare folders
into the run folder) and means the same on every file system and in a URL. Checked where the
name is read (recipe, grid), before anything is written.
"""

from __future__ import annotations

import re

from posttrain.config import ConfigError

MAX_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def name_problem(name) -> str | None:
    """Why `name` cannot be a path part, or None when it can."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_LENGTH:
        return f"is {len(name)} characters long (at most {MAX_LENGTH})"
    if not _NAME.fullmatch(name):
        return "may hold only letters, digits, '.', '_' and '-'"
    if name in (".", ".."):
        return "cannot be '.' or '..'"
    return None


def check_name(kind: str, name, where: str = "") -> str:
    """`name` when it is a safe path part; else ConfigError `WHERE: KIND 'NAME': why`."""
    problem = name_problem(name)
    if problem is not None:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{kind} {name!r} {problem}")
    return name


def check_path_name(kind: str, name: str, where: str = "") -> str:
    """A name of parts joined by '/' (a stage such as `eval/dna/base`): each part checked."""
    if not isinstance(name, str) or not name:
        return check_name(kind, name, where)
    for part in name.split("/"):
        problem = name_problem(part)
        if problem is not None:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}{kind} {name!r}: part {part!r} {problem}")
    return name
