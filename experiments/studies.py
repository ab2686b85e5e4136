"""What the study scripts share: launching, seeds, progress lines, tables and reports.

A study declares its flags (a table of `experiments.flags.Flag`s), the sizes
`--smoke` sets, and `run(settings, invocation=None) -> report path`; `launch` checks
the command line and that the workdir can be created and written before anything
compiles (else one line, exit status 2), then runs it. `Progress` logs a line per
configuration with the elapsed time and an estimate of the rest. Reports
(`report.md`: tables, the command, date, machine, settings) and plots are written
atomically; a refused write ends the study with one line and exit status 4.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import subprocess
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np

from experiments import flags
from experiments import workdir as workdir_lib
from experiments.flags import Flag, IOFailure, log

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

REPORT = "report.md"


def validate(table: Sequence[Flag], given: Mapping[str, Any],
             smoke: Mapping[str, Any] | None = None):
    """The settings (a named tuple, one field per flag) of the flags given; see `flags.validate`."""
    values = flags.validate(table, given, smoke=smoke)
    return namedtuple("Settings", list(values))(**values)


def command(module: str, table: Sequence[Flag], settings) -> str:
    """The command that reruns `settings` exactly: every flag, resolved (smoke sizes too)."""
    return " ".join([f"python -m {module}"] + [
        shlex.quote(f"--{f.name}={f.text(getattr(settings, f.name))}") for f in table
        if f.name != "smoke"])


def launch(doc: str, table: Sequence[Flag], smoke: Mapping[str, Any],
           run: Callable[..., str], argv: Sequence[str] | None = None) -> None:
    """Runs `run(settings, invocation=argv)` as a program: see the module docstring."""

    def go(given: dict, argv: list) -> str:
        settings = validate(table, given, smoke)
        try:
            with workdir_lib.writing(settings.workdir):
                os.makedirs(settings.workdir, exist_ok=True)
                tempfile.TemporaryFile(dir=settings.workdir).close()
        except IOFailure as e:
            raise flags.usage("workdir", settings.workdir, "a directory this process can "
                              f"create and write ({e})") from None
        return run(settings, invocation=argv)

    flags.main(doc, table, go, argv)


class Progress:
    """Logs one line per configuration: its time, the elapsed time and the time left."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()

    def step(self, label: str) -> None:
        now = time.perf_counter()
        self.done += 1
        left = (now - self.start) / self.done * (self.total - self.done)
        log.info("[%d/%d] %s: %.1f s; elapsed %s, ETA %s", self.done, self.total, label,
                 now - self.last, flags.clock(now - self.start), flags.clock(left))
        self.last = now


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


def first_reached(loss: np.ndarray, x: np.ndarray, target: float) -> list[float | None]:
    """Per seed (a row of `loss`, `[seeds, records]`), the `x` value of its first record
    with a loss at or below `target`, or None where no record is; `x` is `[records]` (the
    same for every seed) or `[seeds, records]`."""
    x = np.broadcast_to(np.asarray(x, np.float64), np.shape(loss))
    out = []
    for row, curve in zip(x, loss, strict=True):
        hits = np.flatnonzero(np.asarray(curve) <= target)
        out.append(float(row[hits[0]]) if hits.size else None)
    return out


def reached_text(values: Sequence[float | None], digits: int = 3) -> str:
    """`mean ± std` of per-seed values to a target, or how many seeds reached it."""
    hits = [v for v in values if v is not None]
    if len(hits) < len(values):
        return f"not reached ({len(hits)}/{len(values)} seeds did)"
    return fmt_mean_std(hits, digits)


def first_to_target(reached: Mapping[str, Sequence[float | None]], unit: str,
                    lead: str) -> str | None:
    """`lead` and the entry with the lowest mean over seeds among those every seed of
    which reached the target (`reached`: name -> per-seed values, None: not reached),
    with the others whose `mean ± std` overlaps its; None when none did."""
    done = {name: mean_std(v) for name, v in reached.items() if None not in v}
    if not done:
        return None
    best = min(done, key=lambda name: done[name][0])
    mean, std = done[best]
    level = [name for name, (m, sd) in done.items() if name != best and m - sd <= mean + std]
    return (f"{lead} {unit}: {best} ({fmt(mean)} {unit}, mean over seeds" + (
        f"; within the seeds' spread of it: {', '.join(level)}" if level
        else "; every other beyond the seeds' spread") + ")")


def reductions(table: Sequence[Flag], settings, reference: Mapping[str, Any]) -> list[str]:
    """How `settings` differ from a study's reference grid (`{flag: its value there}`),
    and fewer than 3 seeds: the lines a report lists as its grid's reductions."""
    flags = {f.name: f for f in table}
    reference = {name: flags[name].text(value) for name, value in reference.items()}
    out = [f"--{name}={flags[name].text(getattr(settings, name))} instead of {text}"
           for name, text in reference.items()
           if flags[name].text(getattr(settings, name)) != text]
    return out + [f"{settings.num_seeds} seeds instead of at least 3"] * (settings.num_seeds < 3)


def seeds(first: int, count: int) -> list[int]:
    """Seeds `first .. first + count - 1`, as `--num_seeds` numbers them."""
    return list(range(first, first + count))


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


def header(title: str, module: str, table: Sequence[Flag], settings,
           invocation: Sequence[str] | None, seconds: float) -> list[str]:
    """The report's opening: title, date, machine, command, wall time and settings."""
    lines = [f"# {title}", "",
             f"- Date: {now()}",
             f"- Machine: {machine()}",
             f"- Code: git commit {code_version()}",
             f"- Command (every flag, resolved): `{command(module, table, settings)}`"]
    if invocation is not None:
        lines.append("- As invoked: `" + " ".join(
            [f"python -m {module}"] + [shlex.quote(a) for a in invocation]) + "`")
    lines += [f"- Wall time: {seconds:.0f} s, compilation included", "",
              "Settings:", ""]
    lines += markdown_table(("flag", "value", "meaning"), (
        (f"`--{f.name}`", f.text(getattr(settings, f.name)), f.help) for f in table))
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
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """`plt.subplots` with a per-panel size (inches at 100 dpi); axes always a 2-D array."""
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), dpi=100,
                             squeeze=False)
    return fig, axes
