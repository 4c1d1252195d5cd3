"""The user's mistakes, as one family of exceptions that the CLI prints as one line.

    posttrain sample --model /no/such/folder --problems builtin:arith:2 --out s.jsonl
    # posttrain sample: error: model '/no/such/folder': no such file or folder (expected ...)

`posttrain VERB` (cli.py) catches `UserError` and prints `posttrain VERB: error: MESSAGE` on one
line with the class's exit code: 2 for a usage mistake (flags, as argparse does), 1 for bad input
or a runtime condition the user can fix. Any other exception is a bug in posttrain: the CLI prints
its traceback and says so. Each message names the file, line, field or URL at fault and what was
expected. `records.DataError` (an InputError located FILE:LINE: field) and ConfigError (also
importable from posttrain.config, where it lived) are ValueErrors too, as they always were.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; never a bug. `exit_code` is the CLI's exit status."""

    exit_code = 1


class UsageError(UserError):
    """Flags that cannot go together or a value out of its accepted range (say the range)."""

    exit_code = 2


class InputError(UserError, ValueError):
    """A file or text the user gave is wrong; name the file, line and field."""


class ConfigError(UserError, ValueError):
    """A recipe, grid or `--set` that does not resolve to a valid typed config."""


class ServerUnreachable(UserError):
    """A generation server or judge URL that cannot be reached or used; name the URL."""


class ModelNotFound(UserError):
    """A model or adapter that is not where the user said, or not what was expected there."""
