"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed).

`write_plots` reads the metrics records (as in `metrics.jsonl`) and draws

    loss.png          training loss (and test/full loss on evaluation rounds)
    accuracy.png      test accuracy (classification) or suboptimality f - f* (convex)
    consistency.png   the measured elastic consistency b_hat against its bound

against the round, each written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

from experiments import workdir as workdir_lib  # noqa: E402


def _series(records: Sequence[Mapping[str, Any]], name: str):
    """Rounds and values of `name` over the records that carry it (None -> NaN)."""
    rows = [(r["round"], r[name]) for r in records if name in r]
    rounds = np.asarray([x for x, _ in rows], np.float64)
    values = np.asarray([np.nan if v is None else v for _, v in rows], np.float64)
    return rounds, values


def _plot(path: str, records, names: Sequence[str], ylabel: str, title: str,
          log: bool = False) -> bool:
    curves = [(name, *_series(records, name)) for name in names]
    curves = [c for c in curves if c[1].size and np.isfinite(c[2]).any()]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rounds, values in curves:
        std_rounds, std = _series(records, name + "/std")
        ax.plot(rounds, values, label=name, marker="." if rounds.size < 30 else None)
        if std.size == values.size and np.isfinite(std).any():
            ax.fill_between(rounds, values - std, values + std, alpha=0.25)
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in curves])
    if log and finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with workdir_lib.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def write_plots(directory: str, records: Sequence[Mapping[str, Any]], title: str) -> list[str]:
    """Draws the run's plots into `directory`; returns the files written."""
    written = []
    plots = [
        ("loss.png", ["loss", "test/loss", "full/loss"], "loss", True),
        ("accuracy.png", ["test/accuracy"], "test accuracy", False),
        ("suboptimality.png", ["full/suboptimality"], "f(X) - f*", True),
        ("consistency.png", ["consistency/b_hat", "consistency/bound"],
         "||x - v|| / eta", True),
    ]
    for name, names, ylabel, log in plots:
        path = os.path.join(directory, name)
        if _plot(path, records, names, ylabel, title, log):
            written.append(path)
    return written
