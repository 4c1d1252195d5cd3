"""One entry point: `posttrain VERB ...`. Each verb lives in its own module, imported on use.

posttrain sample --problems builtin:arith:8 --n 2 --out samples.jsonl
posttrain verify --samples samples.jsonl --out scored.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import sys

from posttrain.config import ConfigError
from posttrain.engines.base import EngineUnavailable
from posttrain.records import DataError

# verb -> (module, one-line help). A module defines add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "problems": (
        "posttrain.commands.problems",
        "load a problem source and write native problem JSONL",
    ),
    "sample": ("posttrain.commands.sample", "sample K answers per problem from a model"),
    "verify": ("posttrain.commands.verify", "grade sampled answers (correct / incorrect / ...)"),
    "pairs": ("posttrain.commands.pairs", "build preference pairs from graded samples"),
    "train": ("posttrain.commands.train", "train with SFT, DFT, CHORD, DPO family or GRPO family"),
    "expand": ("posttrain.commands.expand", "depth up-scaling: insert identity-initialised layers"),
    "export": ("posttrain.commands.export", "merge a LoRA adapter into a full model folder"),
    "eval": (
        "posttrain.commands.eval",
        "evaluate a model (or base + adapter) on a problem set",
    ),
    "compare": ("posttrain.commands.compare", "paired comparison of two eval folders"),
    "run": ("posttrain.pipeline.run", "run a whole recipe: sample -> ... -> compare"),
    "report": (
        "posttrain.commands.report",
        "one self-contained HTML page for a run or sweep folder",
    ),
    "sweep": (
        "posttrain.pipeline.sweep",
        "run a grid of recipes sharing their stages; noise-aware table",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: posttrain VERB [options]   (posttrain VERB --help for a verb's options)",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from posttrain import __version__

        print(__version__)
        return 0
    verb = argv[0]
    if verb not in COMMANDS:
        print(f"posttrain: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[verb][0])
    parser = argparse.ArgumentParser(prog=f"posttrain {verb}", description=COMMANDS[verb][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except (DataError, ConfigError) as e:  # bad input: one clear line, no traceback
        print(f"posttrain {verb}: error: {e}", file=sys.stderr)
        return 1
    except EngineUnavailable as e:  # a generation server died: what finished is on disk
        print(f"posttrain {verb}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"posttrain {verb}: interrupted; finished work is kept on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
