"""Parse a problem-source string (`KIND:BODY?key=value&key=value`) and report what a load did.

    python -c "from posttrain.tasks.spec import parse_spec; print(parse_spec('gsm8k:a.jsonl'))"

The syntax is described in the package docstring (posttrain/tasks/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.records import DataError

KINDS = ("builtin", "hle", "gsm8k", "dna", "jsonl", "hf", "mix", "native")


class SpecError(DataError):
    """A source string that cannot be read: `source 'SPEC': what is wrong`."""

    def __init__(self, spec: str, message: str):
        super().__init__(None, None, message)
        self.args = (f"source {spec!r}: {message}",)


@dataclass(frozen=True)
class Spec:
    text: str  # the whole source string, for messages
    kind: str  # one of KINDS
    body: str  # between "KIND:" and "?" (a path, a dataset name, "arith:300", ...)
    options: dict = field(default_factory=dict)  # the key=value pairs after "?"

    def check_options(self, allowed) -> None:
        """Reject option names this kind does not know: a typo must not be silently ignored."""
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise SpecError(
                self.text,
                f"unknown option(s) {', '.join(unknown)}; "
                f"{self.kind} takes: {', '.join(sorted(allowed)) or 'none'}",
            )

    def int_option(self, name: str, default: int | None) -> int | None:
        value = self.options.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise SpecError(self.text, f"option {name}={value!r}: expected an integer") from None


@dataclass
class LoadReport:
    """What one `load_problems` call did: counts kept, items skipped and why, mixture draws."""

    spec: str
    count: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count, e.g. {"image": 12}
    drawn: dict = field(default_factory=dict)  # mixture only: source spec -> problems taken

    def lines(self) -> list[str]:
        out = [f"{self.count} problems from {self.spec}"]
        out += [f"  skipped {n} ({reason})" for reason, n in self.skipped.items() if n]
        out += [f"  drew {n} from {src}" for src, n in self.drawn.items()]
        return out


def parse_options(spec: str, query: str) -> dict:
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise SpecError(spec, f"option {part!r}: expected key=value")
        if key in options:
            raise SpecError(spec, f"option {key!r} given twice")
        options[key] = value
    return options


def parse_spec(text: str) -> Spec:
    """Split a source string into kind, body and options; a bare `*.jsonl` or `*.csv` path is
    `auto`: its format is told from its fields when it is loaded (formats.detect_format)."""
    text = text.strip()
    if not text:
        raise SpecError(text, "empty source")
    kind, colon, rest = text.partition(":")
    if colon and kind == "mix":
        # A mixture's parts carry their own "?options"; mixture.py splits them itself.
        return Spec(text, "mix", rest)
    head, _, query = text.partition("?")
    kind, colon, body = head.partition(":")
    if not (colon and kind in KINDS):
        if head.endswith((".jsonl", ".csv")):
            kind, body = "auto", head
        else:
            raise SpecError(
                text,
                "expected KIND:... with KIND one of "
                f"{', '.join(KINDS[:-1])}, or a path ending in .jsonl or .csv",
            )
    if not body:
        raise SpecError(text, f"nothing after '{kind}:'")
    return Spec(text, kind, body, parse_options(text, query))
