"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed).

`write_plots` reads the metrics records (as in `metrics.jsonl`) and draws, against
the round, each titled with the configuration and written atomically:

    loss.png           the training loss at the workers' views, and the actual
                       model's test (or whole-training-set) loss on evaluation rounds
    accuracy.png       its test accuracy (classification)
    suboptimality.png  f(X) - f* of the actual model (convex)
    consistency.png    b_hat at the logged rounds, its peak between them, and the bound

and, for a run on the simulated clock (`--compute`), against simulated seconds:

    loss_seconds.png, accuracy_seconds.png, suboptimality_seconds.png
                       the same curves
    utilisation.png    the share of worker-seconds spent computing gradients so far
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

from experiments import workdir as workdir_lib  # noqa: E402

LABELS = {
    "loss": "training loss at the workers' views (mean over workers)",
    "test/loss": "test loss of the actual model",
    "full/loss": "loss of the actual model over the training set",
    "test/accuracy": "test accuracy of the actual model",
    "full/suboptimality": "f(X) - f* of the actual model",
    "consistency/b_hat": "b_hat at the logged rounds",
    "consistency/b_hat_peak": "largest b_hat since the previous logged round (over seeds)",
    "consistency/bound": "its bound (docs/theory.md section 5)",
    "time/utilisation": "share of worker-seconds spent computing (1 - time/idle_fraction)",
}
SECONDS = "time/elapsed"
PLOTS = (  # file, metrics, y label, log scale, x axis
    ("loss.png", ("loss", "test/loss", "full/loss"), "loss", True, "round"),
    ("accuracy.png", ("test/accuracy",), "test accuracy", False, "round"),
    ("suboptimality.png", ("full/suboptimality",), "f(X) - f*", True, "round"),
    ("consistency.png", ("consistency/b_hat", "consistency/b_hat_peak", "consistency/bound"),
     "||x - v|| / eta", True, "round"),
    ("loss_seconds.png", ("loss", "test/loss", "full/loss"), "loss", True, SECONDS),
    ("accuracy_seconds.png", ("test/accuracy",), "test accuracy", False, SECONDS),
    ("suboptimality_seconds.png", ("full/suboptimality",), "f(X) - f*", True, SECONDS),
    ("utilisation.png", ("time/utilisation",), "worker utilisation", False, SECONDS),
)
XLABELS = {"round": "round", SECONDS: "simulated seconds (ej.clock)"}
# Metrics drawn from another one: name -> (source, transform).
DERIVED = {"time/utilisation": ("time/idle_fraction", lambda v: 1.0 - v)}


def _series(records: Sequence[Mapping[str, Any]], name: str, at: str = "round"):
    """Rounds (or the `at` field) and values of `name` over the records that carry it."""
    if name in DERIVED:
        source, transform = DERIVED[name]
        x, values = _series(records, source, at)
        return x, transform(values)
    rows = [(r.get(at), r[name]) for r in records if name in r and at in r]
    as_array = lambda xs: np.asarray([np.nan if x is None else x for x in xs], np.float64)
    return as_array([x for x, _ in rows]), as_array([v for _, v in rows])


def _plot(path: str, records, names: Sequence[str], ylabel: str, title: str, log: bool,
          x: str = "round") -> bool:
    curves = [(n, *_series(records, n, "consistency/b_hat_peak_round" if n.endswith("_peak")
                           else x)) for n in names]
    curves = [c for c in curves if c[1].size and np.isfinite(c[2]).any()]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=100)
    for name, rounds, values in curves:
        peak = name.endswith("_peak")
        ax.plot(rounds, values, ls="none" if peak else "-", label=LABELS.get(name, name),
                marker="v" if peak else "." if rounds.size < 30 else None)
        _, std = (np.zeros(0), np.zeros(0)) if name in DERIVED else _series(
            records, name + "/std", x)
        if std.size == values.size and np.isfinite(std).any():
            ax.fill_between(rounds, values - std, values + std, alpha=0.25,
                            label=f"{LABELS.get(name, name)}: ± 1 std over seeds")
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in curves])
    if log and finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel(XLABELS[x])
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              frameon=False)
    fig.tight_layout()
    with workdir_lib.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def write_plots(directory: str, records: Sequence[Mapping[str, Any]], title: str) -> list[str]:
    """Draws the run's plots into `directory`; returns the files written."""
    return [path for name, names, ylabel, log, x in PLOTS
            if _plot(path := os.path.join(directory, name), records, names, ylabel, title, log,
                     x)]
