"""The package's layering, read from the source with `ast`: the CLI verbs live in
posttrain/commands/ (argparse and one call into the library each) and nothing in the library
imports them, so a library module can be used without pulling in a command.

    .venv/bin/python -m pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

from posttrain.cli import COMMANDS, command_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "posttrain"
COMMANDS_DIR = PACKAGE / "commands"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, resolved to a full name
    (`from posttrain import commands` counts as importing posttrain.commands)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def is_command(name: str) -> bool:
    return name == "posttrain.commands" or name.startswith("posttrain.commands.")


def library_modules() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if COMMANDS_DIR not in p.parents and p != PACKAGE / "cli.py"
    ]


def test_the_walk_sees_imports():
    # the checks below would pass vacuously if the parser found nothing
    assert "posttrain.sampling" in imported_modules(COMMANDS_DIR / "sample.py")
    assert "posttrain.commands.engine_args" in imported_modules(COMMANDS_DIR / "eval.py")
    assert len(library_modules()) > 50


def test_no_library_module_imports_a_command():
    offenders = {
        str(p.relative_to(ROOT)): sorted(filter(is_command, imported_modules(p)))
        for p in library_modules()
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"library modules importing posttrain.commands: {offenders}"


def test_every_verb_is_a_module_under_commands():
    for verb in COMMANDS:
        module = command_module(verb)
        assert module.startswith("posttrain.commands."), verb
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.exists(), f"verb {verb!r}: {path} not found"
        functions = {
            node.name
            for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, ast.FunctionDef)
        }
        assert {"add_arguments", "main"} <= functions, f"{path}: no add_arguments / main"


def test_argparse_lives_in_the_commands():
    """A library module that builds parsers is a verb left behind. The one exception is the
    torchrun entry point, a process's main rather than a verb (train/launch.py)."""
    entry_points = {"posttrain.train.launch"}
    left_behind = {
        module_name(p) for p in library_modules() if "argparse" in imported_modules(p)
    } - entry_points
    assert not left_behind, f"argparse outside posttrain/commands/: {sorted(left_behind)}"
