"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed).

`write_plots` reads the metrics records (as in `metrics.jsonl`) and draws, against
the round, each titled with the configuration and written atomically:

    loss.png           the training loss at the workers' views, and the actual
                       model's test (or whole-training-set) loss on evaluation rounds
    accuracy.png       its test accuracy (classification)
    suboptimality.png  f(X) - f* of the actual model (convex)
    consistency.png    b_hat at the logged rounds, its peak between them, and the bound
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
}
PLOTS = (  # file, metrics, y label, log scale
    ("loss.png", ("loss", "test/loss", "full/loss"), "loss", True),
    ("accuracy.png", ("test/accuracy",), "test accuracy", False),
    ("suboptimality.png", ("full/suboptimality",), "f(X) - f*", True),
    ("consistency.png", ("consistency/b_hat", "consistency/b_hat_peak", "consistency/bound"),
     "||x - v|| / eta", True),
)


def _series(records: Sequence[Mapping[str, Any]], name: str, at: str = "round"):
    """Rounds (or the `at` field) and values of `name` over the records that carry it."""
    rows = [(r.get(at), r[name]) for r in records if name in r]
    as_array = lambda xs: np.asarray([np.nan if x is None else x for x in xs], np.float64)
    return as_array([x for x, _ in rows]), as_array([v for _, v in rows])


def _plot(path: str, records, names: Sequence[str], ylabel: str, title: str, log: bool) -> bool:
    curves = [(n, *_series(records, n, "consistency/b_hat_peak_round" if n.endswith("_peak")
                           else "round")) for n in names]
    curves = [c for c in curves if c[1].size and np.isfinite(c[2]).any()]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=100)
    for name, rounds, values in curves:
        peak = name.endswith("_peak")
        ax.plot(rounds, values, ls="none" if peak else "-", label=LABELS.get(name, name),
                marker="v" if peak else "." if rounds.size < 30 else None)
        _, std = _series(records, name + "/std")
        if std.size == values.size and np.isfinite(std).any():
            ax.fill_between(rounds, values - std, values + std, alpha=0.25,
                            label=f"{LABELS.get(name, name)}: ± 1 std over seeds")
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in curves])
    if log and finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("round")
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
    return [path for name, names, ylabel, log in PLOTS
            if _plot(path := os.path.join(directory, name), records, names, ylabel, title, log)]
