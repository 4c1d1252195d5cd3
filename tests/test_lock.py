"""The lock files match pyproject.toml (scripts/lock.py check), and the check catches a
requirement that the lock does not pin or pins at a version the requirement refuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_lock_module(tmp_path=None, pyproject_text=None):
    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    if pyproject_text is not None:
        lock.PYPROJECT = tmp_path / "pyproject.toml"
        lock.PYPROJECT.write_text(pyproject_text)
    return lock


def test_committed_locks_match_pyproject():
    lock = load_lock_module()
    assert [p for name in lock.LOCKS for p in lock.check(name)] == []


def test_changed_pyproject_is_caught(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    assert '"pyyaml>=6",' in text
    changed = text.replace('"pyyaml>=6",', '"pyyaml>=99",\n    "not-a-locked-package>=1",')
    lock = load_lock_module(tmp_path, changed)
    problems = lock.check("cpu")
    assert any("dependency hash differs" in p for p in problems)
    assert any("pyyaml==" in p and "does not satisfy 'pyyaml>=99'" in p for p in problems)
    assert any("not-a-locked-package" in p and "is not pinned" in p for p in problems)
