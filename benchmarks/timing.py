"""Interleaved timing, paired ratios and memory accounting for the benchmarks.

The benchmark machine is shared (2 cores, other jobs running), so absolute
seconds drift by 2x within a minute. Every comparison is therefore measured
*interleaved*: the candidates run one after another inside each repetition (in
alternating order), and a ratio is the median over repetitions of the per-
repetition ratio, which cancels the slow drift that a median of each column
alone would not. Every callable given to `measure` does a fixed amount of work
and returns what must be waited for (a pytree of `jax.Array`s, or None for
synchronous work), or the `SelfTimed` seconds it measured itself (the PyTorch
baseline, timed in its own process by `benchmarks.torch_worker`).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def block(out: Any) -> Any:
    """Waits for every array in `out` (a no-op for host values)."""
    return jax.block_until_ready(out)


class SelfTimed(float):
    """Seconds a callable measured itself (in another process, say): `measure`
    records them instead of its own wall clock around the call."""


def time_call(fn: Callable[[], Any]) -> float:
    """The seconds one call of `fn` takes: its `SelfTimed` result, or the wall
    clock around the call and the wait for its result."""
    start = time.perf_counter()
    out = fn()
    if isinstance(out, SelfTimed):
        return float(out)
    block(out)
    return time.perf_counter() - start


def measure(
    fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Times each callable `repeats` times, interleaved; returns seconds per call.

    Args:
      fns: name -> callable doing a fixed amount of work.
      repeats: repetitions (each runs every callable once).
      warmup: untimed calls of each callable first (compilation, caches).

    Returns:
      name -> list of `repeats` seconds (`time_call`), in repetition order.
    """
    for fn in fns.values():
        for _ in range(warmup):
            time_call(fn)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        gc.collect()
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(time_call(fns[name]))
    return samples


def median(xs) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of `num[r] / den[r]` (interleaved samples)."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def paired_min_ratio(num: list[float], *dens: list[float]) -> float:
    """Median over repetitions of `num[r] / min_j dens[j][r]`."""
    return median(paired_min_ratios(num, *dens))


def paired_min_ratios(num: list[float], *dens: list[float]) -> list[float]:
    """The per-repetition ratios `num[r] / min_j dens[j][r]`."""
    return [a / min(d[r] for d in dens) for r, a in enumerate(num)]


def quartiles(xs) -> tuple[float, float]:
    """The 25th and 75th percentiles of `xs` (linear interpolation)."""
    q25, q75 = np.percentile(np.asarray(xs, np.float64), [25, 75])
    return float(q25), float(q75)


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS gives none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _spin(stop) -> None:
    """Busy-loops until `stop` is set (a background load for `BackgroundLoad`)."""
    while not stop.is_set():
        for _ in range(100_000):
            pass


class BackgroundLoad:
    """`n` busy-looping processes for the duration of a `with` block.

    The round/floor ratios depend on how loaded the machine is: the floor's
    convolutions use every core XLA:CPU has, most of the algorithm's work runs
    on one, so a busy machine slows the floor more than the round. This makes
    a loaded machine reproducible (`python -m benchmarks.run --background-load 2`).
    """

    def __init__(self, n: int):
        self.n = int(n)
        self._procs: list = []
        self._stop = None

    def __enter__(self):
        if self.n > 0:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self._stop = ctx.Event()
            self._procs = [ctx.Process(target=_spin, args=(self._stop,), daemon=True)
                           for _ in range(self.n)]
            for proc in self._procs:
                proc.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._procs = []
        return False


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (works on `jax.ShapeDtypeStruct`s, so
    the state of a configuration too large to build can be sized from
    `jax.eval_shape(alg.init, ...)`). A typed PRNG key counts its key data."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def compiled_temp_bytes(fn, *args) -> int | None:
    """XLA's temporary (scratch) allocation of the compiled `jax.jit(fn)(*args)`.

    `args` may be `jax.ShapeDtypeStruct`s: nothing runs. None where the backend
    gives no memory analysis.
    """
    try:
        analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001  (backends without the analysis)
        return None
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:  # the installed version, without importing torch into this process
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        info["torch"] = None
    return info


def utc_now() -> str:
    """The current UTC time, `2026-12-05T21:40:00+00:00`."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit(root: str | None = None) -> str | None:
    """`git rev-parse --short HEAD` of the repository at `root` (default: the one
    holding `benchmarks/`; None where git or the repository is missing)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def fmt_time(seconds: float) -> str:
    """`1.23 ms`, `45.6 us`, `2.10 s`."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (cells already formatted as strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
