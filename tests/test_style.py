"""House rules that a reviewer would otherwise count by hand: every module of posttrain/ is at
most 400 lines (after `make format`) and opens with a docstring; the ruff that formats is the
same in the Makefile and pyproject.toml.

    .venv/bin/python -m pytest tests/test_style.py -q
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
MODULES = sorted((ROOT / "posttrain").rglob("*.py"))


def test_the_modules_are_found():
    # the walk below would pass vacuously on a wrong root
    assert len(MODULES) > 50 and ROOT / "posttrain" / "cli.py" in MODULES


def test_no_module_is_over_400_lines():
    """A long module is split by what its parts are for (see posttrain/losses/), not trimmed."""
    lengths = {
        p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES
    }
    over = {str(p): n for p, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"


def test_every_module_opens_with_a_docstring():
    missing = [
        str(p.relative_to(ROOT))
        for p in MODULES
        if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
    ]
    assert not missing, f"modules without a docstring saying what they are for: {missing}"


def test_the_makefile_and_pyproject_pin_the_same_ruff():
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^RUFF_SPEC\s*\?=\s*(\S+)\s*$", makefile, re.M)
    assert spec, "Makefile: no RUFF_SPEC line"
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extra["optional-dependencies"]["lint"] == [spec.group(1)]
    assert re.fullmatch(r"ruff==[\d.]+", spec.group(1)), "pin ruff exactly: versions format apart"
