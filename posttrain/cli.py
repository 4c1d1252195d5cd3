"""One entry point: `posttrain VERB ...`. Each verb lives in its own module, imported on use.

posttrain sample --problems builtin:arith:8 --n 2 --out samples.jsonl
posttrain verify --samples samples.jsonl --out scored.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import traceback

from posttrain.engines.base import EngineUnavailable
from posttrain.errors import UserError

# verb -> one-line help. Each verb is the module posttrain/commands/VERB.py, which defines
# add_arguments(parser) and main(args) -> int; it is imported only when its verb runs.
COMMANDS: dict[str, str] = {
    "problems": "load a problem source and write native problem JSONL",
    "sample": "sample K answers per problem from a model",
    "verify": "grade sampled answers (correct / incorrect / ...)",
    "pairs": "build preference pairs from graded samples",
    "train": "train with SFT, DFT, CHORD, DPO family or GRPO family",
    "expand": "depth up-scaling: insert identity-initialised layers",
    "export": "merge a LoRA adapter into a full model folder",
    "eval": "evaluate a model (or base + adapter) on a problem set",
    "compare": "paired comparison of two eval folders",
    "run": "run a whole recipe: sample -> ... -> compare",
    "report": "one self-contained HTML page for a run or sweep folder",
    "sweep": "run a grid of recipes sharing their stages; noise-aware table",
    "plan": "will a training run fit? memory per GPU from a model config",
}


class VerbParser(argparse.ArgumentParser):
    """argparse's own mistakes (an unknown flag, a value out of `choices` or not a number) are
    one line too, like every other user error: no usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def command_module(verb: str) -> str:
    return f"posttrain.commands.{verb}"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: posttrain VERB [options]   (posttrain VERB --help for a verb's options)",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {help_}" for verb, help_ in COMMANDS.items()]
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
    module = importlib.import_module(command_module(verb))
    parser = VerbParser(prog=f"posttrain {verb}", description=COMMANDS[verb])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except EngineUnavailable as e:  # a generation server died: what finished is on disk
        print(f"posttrain {verb}: stopped: {e}", file=sys.stderr)
        return 3
    except UserError as e:  # the user's mistake (errors.py): one clear line, no traceback
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"posttrain {verb}: error: {message or type(e).__name__}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"posttrain {verb}: interrupted; finished work is kept on disk", file=sys.stderr)
        return 130
    except Exception:  # anything else is posttrain's fault: the traceback is for the report
        traceback.print_exc()
        print(
            f"posttrain {verb}: this is a bug in posttrain; please report it with the command "
            f"above (posttrain {shlex.join(argv)}) and the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
