"""One flag system for every program of experiments/: a table of flags, checked once.

Each program declares its flags as one tuple of `Flag`s (kind, default, help,
range, and `when` it applies); adding a flag is one entry. From the table come the
parser, `--help`, the validation, the effective configuration (the flags that
apply) and docs/arguments.md. Every refusal is one line on stderr and exit status
2, before anything compiles: `--<flag>: got <value>; expected <range>`, for a bad
or unknown flag and for a flag given that the configuration does not use (the line
names the option that would make it meaningful). A flag that does not apply and
was not given takes no part in the run.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

log = logging.getLogger("experiments")

EXIT_USAGE = 2  # a bad command line, data file or workdir: one line, nothing compiled
EXIT_IO = 4  # the workdir failed during a run (e.g. no space left): one line


class Failure(Exception):
    """An expected way for a program to fail: `str(e)` is one line, `status` the exit status."""

    status = 1


class UsageError(Failure, ValueError):
    """A bad command line, data file or workdir; nothing was compiled."""

    status = EXIT_USAGE


class IOFailure(Failure, OSError):
    """A write into the workdir failed during a run."""

    status = EXIT_IO


class Delay(NamedTuple):
    """A delay `a P + b` in terms of the worker count `P` (`P-1`: a = 1, b = -1)."""

    a: int
    b: int

    def __call__(self, num_workers: int) -> int:
        return self.a * num_workers + self.b

    def __str__(self) -> str:
        head = "" if self.a == 0 else ("P" if self.a == 1 else f"{self.a}P")
        return head + (f"{self.b:+d}" if head and self.b else "" if head else str(self.b))


_DELAY = re.compile(r"^(?:(\d*)P)?([+-]?\d+)?$")
_LISTS = ("ints", "floats", "names", "delays")


class Flag(NamedTuple):
    """One flag.

    Attributes:
      name: without `--`.
      kind: `"int"`, `"float"`, `"bool"`, `"enum"`, `"str"`, `"path"` (non-empty),
        or a comma-separated list of distinct `"ints"`, `"floats"`, `"names"` (among
        `choices`) or `"delays"` (`P-1`, `2P`, `3`: see `Delay`).
      default: its value when not given (lists as their comma-separated text).
      help: what it means.
      lo, hi, lo_open, hi_open: the range of a number or of each list element.
      choices: the values of an enum or a list of names.
      when: where the flag applies, `((other, allowed), ...)`: `allowed` is a tuple of
        values of `other`, or `">0"` / `">1"`; each `other` must apply itself.
      semantic: whether `--resume` must keep its value (experiments.train).
    """

    name: str
    kind: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    when: tuple = ()
    semantic: bool = True

    @property
    def expected(self) -> str:
        """The valid values, as `--help`, the errors and docs/arguments.md word them."""
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("str", "path"):
            return "a non-empty path" if self.kind == "path" else "a string"
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "names":
            return "comma-separated distinct names among " + ", ".join(self.choices)
        if self.kind == "delays":
            return ("comma-separated distinct delays such as P-1, 2P, 3 (a P, 2P, ... term "
                    "plus or minus an integer)")
        what = {"int": "an integer", "float": "a finite number", "ints":
                "comma-separated distinct integers", "floats": "comma-separated distinct numbers"}
        if self.lo is None and self.hi is None:
            return what[self.kind]
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return (f"{what[self.kind]} in {left}{_num('-inf', self.lo)}, "
                f"{_num('inf', self.hi)}{right}")

    def check(self, value) -> Any:
        """`value` (a Python value or command-line text) as the flag's type, or `UsageError`."""
        out = self._convert(value)
        if out is None:
            number = self._number(value) if isinstance(value, str) and self.kind in (
                "int", "float") else None
            raise usage(self.name, value if number is None else number, self.expected)
        return out

    def _convert(self, value):
        kind = self.kind
        if kind == "bool":
            text = str(value).lower() if isinstance(value, str) else None
            return value if isinstance(value, bool) else {"true": True, "1": True, "false":
                                                          False, "0": False}.get(text)
        if kind in ("str", "path", "enum"):
            ok = isinstance(value, str) and (kind != "path" or value.strip()) and (
                kind != "enum" or value in self.choices)
            return value if ok else None
        if kind in _LISTS:
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            items = [self._item(str(v).strip()) for v in items]
            ok = items and None not in items and len(set(items)) == len(items)
            return tuple(items) if ok else None
        if isinstance(value, str):
            value = self._number(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        if kind == "int":
            if not float(value).is_integer():
                return None
            value = int(value)
        return value if self._in_range(float(value)) else None

    def _number(self, text: str):
        try:
            return int(text) if self.kind in ("int", "ints") else float(text)
        except ValueError:
            return None

    def _item(self, text: str):
        if self.kind == "names":
            return text if text in self.choices else None
        if self.kind == "delays":
            match = _DELAY.match(text.replace(" ", ""))
            if not text or not match or match.groups() == (None, None):
                return None
            a = (int(match.group(1) or 1) if "P" in text else 0)
            return Delay(a, int(match.group(2) or 0))
        number = self._number(text)
        return number if number is not None and self._in_range(float(number)) else None

    def _in_range(self, x: float) -> bool:
        lo, hi = self.lo, self.hi
        return math.isfinite(x) and (lo is None or x > lo or (x == lo and not self.lo_open)) \
            and (hi is None or x < hi or (x == hi and not self.hi_open))

    def text(self, value) -> str:
        """`value` as it is written on the command line (after `--<name>=`)."""
        if isinstance(value, str):
            return value
        if self.kind in _LISTS:
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if self.kind == "bool":
            return "true" if value else "false"
        return f"{value:g}" if self.kind == "float" else str(value)


def clock(seconds: float) -> str:
    """`m:ss`, or `?`."""
    return f"{(s := round(seconds)) // 60}:{s % 60:02d}" if math.isfinite(seconds) else "?"


def _num(infinite: str, x: float | None) -> str:
    if x is None:
        return infinite
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def usage(name: str, value, expected: str) -> UsageError:
    """`UsageError("--<name>: got <value>; expected <expected>")`."""
    return UsageError(f"--{name}: got {value!r}; expected {expected}")


def unknown(name: str) -> UsageError:
    return UsageError(f"--{name}: got an unknown flag; expected a flag of this program "
                      "(see --help)")


def _chain(table: Mapping[str, Flag], name: str) -> list[tuple[str, Any]]:
    """Every condition `name` needs, those of the flags it depends on first."""
    out = []
    for other, allowed in table[name].when:
        out += [c for c in _chain(table, other) + [(other, allowed)] if c not in out]
    return out


def _holds(value, allowed) -> bool:
    return value > float(allowed[1:]) if isinstance(allowed, str) else value in allowed


def _setting(name: str, allowed) -> str:
    if isinstance(allowed, str):
        return f"--{name} {allowed[0]} {allowed[1:]}"
    if all(isinstance(a, bool) for a in allowed):
        return " or ".join(f"--{'' if a else 'no'}{name}" for a in allowed)
    values = [str(a) for a in allowed]
    return f"--{name}=" + (values[0] if len(values) == 1 else
                           ", ".join(values[:-1]) + " or " + values[-1])


def condition(table: Mapping[str, Flag], name: str) -> str:
    """Where flag `name` applies, in words (`""`: always)."""
    return " and ".join(_setting(o, a) for o, a in _chain(table, name))


def refusal(table: Mapping[str, Flag], values: Mapping[str, Any], name: str) -> str | None:
    """None when flag `name` applies to `values`; else why not, as an `expected` clause."""
    failed = [(o, a) for o, a in _chain(table, name) if not _holds(values[o], a)]
    if not failed:
        return None
    other = failed[0][0]
    here = _setting(other, (values[other],))
    return f"--{name} only with {condition(table, name)} (here {here})"


def by_name(flags: Sequence[Flag]) -> dict[str, Flag]:
    return {f.name: f for f in flags}


def effective(flags: Sequence[Flag], values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags that apply to `values`, in table order: the effective configuration."""
    table = by_name(flags)
    return {f.name: values[f.name] for f in flags if refusal(table, values, f.name) is None}


def validate(flags: Sequence[Flag], given: Mapping[str, Any], *,
             smoke: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every flag's value: `given` (Python values or command-line text) over the defaults.

    With `smoke` and `--smoke`, the smoke sizes replace the defaults of the flags
    not given. Raises `UsageError` (one line) for an unknown flag, a bad value, or
    a given flag that does not apply.
    """
    table = by_name(flags)
    for name in given:
        if name not in table:
            raise unknown(name)
    values = {f.name: f.default for f in flags}
    if smoke and table["smoke"].check(given.get("smoke", values["smoke"])):
        values.update(smoke)
    values.update(given)
    values = {name: table[name].check(value) for name, value in values.items()}
    for name in table:
        why = refusal(table, values, name) if name in given else None
        if why:
            raise usage(name, values[name], why)
    return values


class _Help(Exception):
    pass


def parse_argv(flags: Sequence[Flag], argv: Sequence[str]) -> dict[str, Any]:
    """Command-line text -> `{name: text}` of the flags given (`--x=v`, `--x v`, `--x`, `--nox`)."""
    table, given, args = by_name(flags), {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help", "--helpfull", "--helpshort"):
            raise _Help
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"argv: got {[arg, *args]!r}; expected no positional arguments")
        name, has_value, value = arg[2:].partition("=")
        negated = name[2:] if name.startswith("no") and not has_value else None
        if name not in table and negated in table and table[negated].kind == "bool":
            given[negated] = False
            continue
        if name not in table:
            raise unknown(name)
        if not has_value and table[name].kind == "bool":
            value = True
        elif not has_value:
            if not args or args[0].startswith("--"):
                raise UsageError(f"--{name}: got no value; expected {table[name].expected}")
            value = args.pop(0)
        given[name] = value
    return given


def help_text(doc: str, flags: Sequence[Flag]) -> str:
    table = by_name(flags)
    lines = [doc.strip().split("\n\n")[0], "", "Flags:"]
    for f in flags:
        applies = condition(table, f.name)
        lines += [f"  --{f.name}  (default: {f.text(f.default) or repr('')})",
                  f"    {f.help} Valid: {f.expected}." + (f" Applies with {applies}."
                                                         if applies else "")]
    return "\n".join(lines)


def main(doc: str, flags: Sequence[Flag], run: Callable[[dict, list], str | None],
         argv: Sequence[str] | None = None) -> None:
    """Parses the command line and calls `run(given, argv)`; exits with its status.

    `given` holds the flags on the command line, as text; `run` validates them.
    `--help` prints the flags and exits 0; a `Failure` prints its one line on
    stderr and exits with its status; whatever `run` returns goes to stdout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    logging.getLogger("jax").setLevel(logging.WARNING)  # not its INFO lines about backends
    status = 0
    try:
        out = run(parse_argv(flags, argv), argv)
        if out:
            print(out)
    except _Help:
        print(help_text(doc, flags))
    except Failure as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        status = e.status
    finally:
        log.removeHandler(handler)
    sys.exit(status)
