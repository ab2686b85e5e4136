"""What the study scripts share: flags as data, validation, seeds, tables and reports.

A study (`experiments.error_feedback_study`, `experiments.consistency_table`,
`experiments.convex_rates`) declares its flags once as a `{name: Spec}` table and
a `run(settings, invocation=None) -> report path`; `launch` turns the table into
absl flags and runs it. Everything is checked before anything compiles or is
written: a bad value prints one line, `--<flag>: got <value>; expected <range>`,
on stderr and exits with status 2 (as `python -m experiments.train` does).
`--smoke` replaces the sizes a study lists in its smoke table, except the flags
given explicitly.

Every study writes `report.md` (the tables, the exact command, the date, the
machine, the settings) and PNG plots into `--workdir`, each file atomically
(`experiments.workdir.atomic_open`): a crash leaves the old report or the new one.
"""

from __future__ import annotations

import datetime
import logging as std_logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import matplotlib
import numpy as np

from experiments import workdir as workdir_lib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

REPORT = "report.md"


class UsageError(ValueError):
    """A bad command line: the message is one line naming the flag."""


class Spec(NamedTuple):
    """One flag of a study.

    Attributes:
      kind: `"int"`, `"float"`, `"bool"`, `"string"`, `"path"` (a non-empty string),
        `"enum"`, `"names"` (comma-separated distinct choices), `"ints"` or `"floats"`
        (comma-separated lists, each element in the range, distinct), or `"delays"`
        (comma-separated delays in terms of the worker count: `P-1`, `2P`, `3`, `P+2`).
      default: the default value (lists as their comma-separated text).
      help: what the flag means.
      lo, hi: the range of a number or of every list element (None: unbounded).
      lo_open: whether `lo` itself is excluded.
      choices: the values of an enum or of a list of names.
    """

    kind: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()

    @property
    def expected(self) -> str:
        """The range, as it appears in `--helpfull` and in error messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "string":
            return "a string"
        if self.kind == "path":
            return "a non-empty path"
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "names":
            return "comma-separated distinct names among " + ", ".join(self.choices)
        if self.kind == "delays":
            return ("comma-separated distinct delays such as P-1, 2P, 3 (a P, 2P, ... term "
                    "plus or minus an integer), each >= P - 1 for every worker count")
        what = {"int": "an integer", "float": "a finite number",
                "ints": "comma-separated distinct integers",
                "floats": "comma-separated distinct numbers"}[self.kind]
        if self.lo is None and self.hi is None:
            return what
        left = "(" if self.lo_open or self.lo is None else "["
        lo = "-inf" if self.lo is None else _number_text(self.lo)
        hi = "inf" if self.hi is None else _number_text(self.hi)
        return f"{what} in {left}{lo}, {hi}]"


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ------------------------------------------------------------------- validation


def _in_range(spec: Spec, value: float) -> bool:
    if not math.isfinite(value):
        return False
    if spec.lo is not None and (value < spec.lo or (spec.lo_open and value == spec.lo)):
        return False
    return spec.hi is None or value <= spec.hi


def _parse_list(spec: Spec, value) -> tuple | None:
    """A comma-separated list (or a list) as a tuple; None when any element is bad."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    cast = int if spec.kind == "ints" else float
    out = []
    for item in items:
        try:
            number = cast(str(item).strip())
        except ValueError:
            return None
        if not _in_range(spec, number):
            return None
        out.append(number)
    if not out or len(set(out)) != len(out):
        return None
    return tuple(out)


_DELAY = re.compile(r"^(?:(\d*)P)?([+-]?\d+)?$")


class Delay(NamedTuple):
    """A delay as `a P + b` of the worker count `P` (`P-1`: a = 1, b = -1)."""

    a: int
    b: int

    def __call__(self, num_workers: int) -> int:
        return self.a * num_workers + self.b

    def __str__(self) -> str:
        if self.a == 0:
            return str(self.b)
        head = "P" if self.a == 1 else f"{self.a}P"
        return head if self.b == 0 else f"{head}{self.b:+d}"


def _parse_delays(value) -> tuple[Delay, ...] | None:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out = []
    for item in items:
        text = str(item).replace(" ", "")
        match = _DELAY.match(text)
        if not text or not match or (match.group(1) is None and match.group(2) is None):
            return None
        has_p = "P" in text
        a = (int(match.group(1)) if match.group(1) else 1) if has_p else 0
        b = int(match.group(2)) if match.group(2) else 0
        out.append(Delay(a, b))
    if len(set(out)) != len(out):
        return None
    return tuple(out)


def _check(name: str, spec: Spec, value):
    """One flag's value, checked and converted; raises `UsageError`."""
    bad = UsageError(f"--{name}: got {value!r}; expected {spec.expected}")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if spec.kind in ("string", "path", "enum"):
        if not isinstance(value, str) or (spec.kind == "path" and not value.strip()) or (
                spec.kind == "enum" and value not in spec.choices):
            raise bad
        return value
    if spec.kind == "names":
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        names = tuple(str(v).strip() for v in items)
        if not names or len(set(names)) != len(names) or not set(names) <= set(spec.choices):
            raise bad
        return names
    if spec.kind in ("ints", "floats"):
        parsed = _parse_list(spec, value)
        if parsed is None:
            raise bad
        return parsed
    if spec.kind == "delays":
        parsed = _parse_delays(value)
        if parsed is None:
            raise bad
        return parsed
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise bad
    if spec.kind == "int":
        if isinstance(value, float | np.floating) and not float(value).is_integer():
            raise bad
        value = int(value)
    else:
        value = float(value)
    if not _in_range(spec, value):
        raise bad
    return value


def validate(specs: Mapping[str, Spec], values: Mapping[str, Any], *,
             smoke: Mapping[str, Any] | None = None, given: Iterable[str] | None = None):
    """Checks flag values against their specs; applies the smoke sizes.

    Args:
      specs: the study's flags.
      values: flag name -> value; missing flags take their defaults.
      smoke: the sizes `--smoke` sets.
      given: the flags given explicitly, which win over the smoke sizes (None: the
        names in `values`).

    Returns:
      A named tuple `Settings` with one field per flag (lists as tuples).

    Raises:
      UsageError: `--<flag>: got <value>; expected <range>`.
    """
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise UsageError(f"--{unknown[0]}: got an unknown flag; expected one of "
                         f"{', '.join('--' + n for n in specs)}")
    given = set(values) if given is None else set(given)
    raw = {name: values.get(name, spec.default) for name, spec in specs.items()}
    if raw.get("smoke") is True and smoke:
        for name, value in smoke.items():
            if name not in given:
                raw[name] = value
    out = {name: _check(name, specs[name], raw[name]) for name in specs}
    workdir = out.get("workdir")
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir: got {workdir!r}; expected a directory (it is a file)")
    return namedtuple("Settings", list(specs))(**out)


def usage(name: str, value, expected: str) -> UsageError:
    """`UsageError("--<name>: got <value>; expected <expected>")`."""
    return UsageError(f"--{name}: got {value!r}; expected {expected}")


def flag_text(spec: Spec, value) -> str:
    """A settings value as it is written on the command line."""
    if spec.kind in ("ints", "floats", "delays", "names"):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if spec.kind == "bool":
        return "true" if value else "false"
    if spec.kind == "float":
        return f"{value:g}"
    return str(value)


def command(module: str, specs: Mapping[str, Spec], settings) -> str:
    """The command that reruns `settings` exactly: every flag, resolved (smoke sizes too)."""
    parts = [f"python -m {module}"]
    for name, spec in specs.items():
        if name == "smoke":
            continue
        parts.append(shlex.quote(f"--{name}={flag_text(spec, getattr(settings, name))}"))
    return " ".join(parts)


# ------------------------------------------------------------------------ seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, as over seeds in `experiments.train`."""
    array = np.asarray(values, np.float64)
    return float(np.mean(array)), float(np.std(array))


def fmt(x: float | None, digits: int = 4) -> str:
    """A number with `digits` significant digits; `n/a` for None, `inf` / `nan` as such."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return f"{x:.{digits}g}"


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """`mean ± std` over seeds."""
    mean, std = mean_std(values)
    return f"{fmt(mean, digits)} ± {fmt(std, 2)}"


def seeds(first: int, count: int) -> list[int]:
    """Seeds `first .. first + count - 1`, as `--num_seeds` numbers them."""
    return list(range(first, first + count))


# ------------------------------------------------------------------------ report


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub markdown table, one line per row."""
    escape = lambda cell: str(cell).replace("|", "\\|")
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [escape(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row: got {len(cells)} cells; expected {len(header)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine() -> str:
    """The machine: platform, processor, CPU count, Python, JAX and its devices."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    cpu = platform.processor() or platform.machine()
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs (os.cpu_count()), "
            f"Python {platform.python_version()}, JAX {jax.__version__} on "
            f"{jax.default_backend()} ({len(devices)} device(s): {', '.join(kinds)})")


def code_version() -> str:
    """The git commit of this checkout, and whether its working tree differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown (not a git checkout)"
        dirty = git("status", "--porcelain").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return head.stdout.strip() + (" plus uncommitted changes" if dirty else "")


def now() -> str:
    """The current date and time in UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(title: str, module: str, specs: Mapping[str, Spec], settings,
           invocation: Sequence[str] | None, seconds: float) -> list[str]:
    """The report's opening: title, date, machine, command, wall time and settings."""
    lines = [f"# {title}", "",
             f"- Date: {now()}",
             f"- Machine: {machine()}",
             f"- Code: git commit {code_version()}",
             f"- Command (every flag, resolved): `{command(module, specs, settings)}`"]
    if invocation is not None:
        lines.append("- As invoked: `" + " ".join(
            [f"python -m {module}"] + [shlex.quote(a) for a in invocation]) + "`")
    lines += [f"- Wall time: {seconds:.0f} s, compilation included", "",
              "Settings:", ""]
    lines += markdown_table(("flag", "value", "meaning"), (
        (f"`--{name}`", flag_text(spec, getattr(settings, name)), spec.help)
        for name, spec in specs.items()))
    lines.append("")
    return lines


def write_report(directory: str, lines: Sequence[str]) -> str:
    """Writes `report.md` atomically; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, REPORT)
    with workdir_lib.atomic_open(path) as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    return path


def save_figure(fig, path: str) -> str:
    """Saves a matplotlib figure as PNG atomically and closes it; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    with workdir_lib.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """`plt.subplots` with a per-panel size; axes always a 2-D array."""
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), dpi=80,
                             squeeze=False)
    return fig, axes


# ------------------------------------------------------------------------ launch


def _define_flags(specs: Mapping[str, Spec]) -> None:
    from absl import flags

    for name, spec in specs.items():
        text = f"{spec.help} Range: {spec.expected}."
        if spec.kind == "int":
            flags.DEFINE_integer(name, spec.default, text)
        elif spec.kind == "float":
            flags.DEFINE_float(name, spec.default, text)
        elif spec.kind == "bool":
            flags.DEFINE_bool(name, spec.default, text)
        elif spec.kind == "enum":
            flags.DEFINE_enum(name, spec.default, list(spec.choices), spec.help)
        else:
            flags.DEFINE_string(name, spec.default, text)


def _exit_usage(line: str) -> None:
    print(line, file=sys.stderr)
    sys.exit(2)


def _flag_error_line(specs: Mapping[str, Spec], error: Exception) -> str:
    message = " ".join(str(error).split())
    match = re.match(r"^flag --(\w+)=(.*?): ", message)
    if match and match.group(1) in specs:
        name, value = match.groups()
        return f"--{name}: got {value!r}; expected {specs[name].expected}"
    match = re.match(r"^Missing value for flag --(\w+)", message)
    if match and match.group(1) in specs:
        return f"--{match.group(1)}: got no value; expected {specs[match.group(1)].expected}"
    match = re.match(r"^Unknown command line flag '(\w+)'", message)
    if match:
        return (f"--{match.group(1)}: got an unknown flag; expected one of "
                f"{', '.join('--' + n for n in specs)}")
    return message


def launch(module: str, specs: Mapping[str, Spec], smoke: Mapping[str, Any],
           run: Callable[..., str]) -> None:
    """Defines the absl flags of `specs` and runs `run(settings, invocation)` under absl.

    A parsing or validation error prints one line on stderr and exits with status 2;
    `run` may raise `UsageError` (e.g. for a combination the library refuses) before
    it compiles anything, with the same effect. The report's path goes to stdout.
    """
    from absl import app, flags

    _define_flags(specs)
    FLAGS = flags.FLAGS

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = FLAGS(argv)
        except flags.Error as e:
            _exit_usage(_flag_error_line(specs, e))
        if len(rest) > 1:
            _exit_usage(f"argv: got {rest[1:]!r}; expected no positional arguments")
        return rest

    def main(argv: list[str]) -> None:
        del argv
        # JAX reports at INFO level which backends it could not find: keep stderr for
        # what matters (a usage error is its only line).
        std_logging.getLogger("jax").setLevel(std_logging.WARNING)
        given = [n for n in specs if FLAGS[n].present]
        try:
            settings = validate(specs, {n: FLAGS[n].value for n in specs}, smoke=smoke,
                                given=given)
            print(run(settings, invocation=sys.argv[1:]))
        except UsageError as e:
            _exit_usage(str(e))

    app.run(main, flags_parser=parse)
