r"""Hypergradients of the final loss: does more error feedback help, and where does it stop?

    python -m experiments.hypergradients --workdir=/tmp/hypergradients [--smoke]

On the bundled digits with the MLP (one hidden layer of 128), `P` workers and `R`
rounds, this differentiates the held-out loss of the final auxiliary model
(`ej.analysis.hypergradient`, forward mode: memory independent of `R`)

1. with respect to the error-feedback damping `beta` over a grid in [0, 1], for each
   Top-k fraction of `--k_fractions`, for sync SGD and for async SGD with every read
   delayed by exactly `P - 1` or `2P` updates (`delay="fixed"`);
2. with respect to the learning rate and `staleness` over a grid in [0, 1] (0: the
   freshest read the round allows; 1: the delayed read), Top-k with EF14 at the
   first fraction, sync against the two async ones.

Each configuration compiles once for both grids. It writes `report.md` (tables, the
answer read off the derivatives, the command), `results.json` and PNG plots into
`--workdir`; `--smoke` runs a tiny version for CI in well under a minute.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import studies, workdir
from experiments.flags import Flag

FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md, results.json and the PNGs (created "
         "if missing; required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 3, num_workers 2, batch_size 8, "
         "beta_points 3, staleness_points 2, k_fractions 0.01) unless those flags are given."),
    Flag("rounds", "int", 200, "Rounds R of every run.", 1, 100_000),
    Flag("num_workers", "int", 8, "Workers P (async delays are P - 1 and 2P updates).", 2, 1024),
    Flag("batch_size", "int", 32, "Samples per worker per round.", 1, 4096),
    Flag("learning_rate", "float", 0.05, "Learning rate eta of every update.", 0.0, 10.0,
         lo_open=True),
    Flag("beta_points", "int", 11, "Grid points of beta in [0, 1].", 2, 1001),
    Flag("staleness_points", "int", 5, "Grid points of staleness in [0, 1].", 2, 1001),
    Flag("k_fractions", "floats", "0.01,0.1", "Top-k fractions of the beta grid; the staleness "
         "grid uses the first.", 0.0, 1.0, lo_open=True),
    Flag("seed", "int", 0, "Seed of the initial parameters, the split and the batches.", 0,
         2**31 - 1),
)
SMOKE = {"rounds": 3, "num_workers": 2, "batch_size": 8, "beta_points": 3,
         "staleness_points": 2, "k_fractions": "0.01"}


class Problem(NamedTuple):
    loss_fn: Any  # (params, batch) -> (loss, {"accuracy": ...}); has_aux
    params: Any  # the initial MLP parameters
    batches: Any  # {"x": [R, P, b, 8, 8, 1], "y": [R, P, b]}
    eval_batch: Any  # the held-out split
    num_params: int
    num_train: int


def make_problem(s) -> Problem:
    """Digits, an IID split over workers, every round's batches drawn up front.

    Worker `p`'s batch of round `r` is `batch_size` samples drawn uniformly with
    replacement from its shard, by a NumPy generator seeded with `seed`.
    """
    data = data_lib.load_digits(seed=s.seed)
    module = models_lib.MLP(num_classes=data.num_classes)
    params = module.init(jax.random.key(s.seed), jnp.zeros((1, *data.x_train.shape[1:])))
    params = params["params"]
    part = data_lib.partition(data.y_train, s.num_workers, seed=s.seed)
    rng = np.random.default_rng(s.seed)
    positions = rng.integers(0, part.counts[None, :, None],
                             (s.rounds, s.num_workers, s.batch_size))
    rows = np.take_along_axis(part.indices[None], positions.reshape(s.rounds, s.num_workers, -1),
                              axis=2)
    batches = {"x": jnp.asarray(data.x_train[rows]), "y": jnp.asarray(data.y_train[rows])}
    eval_batch = {"x": jnp.asarray(data.x_test), "y": jnp.asarray(data.y_test)}
    return Problem(models_lib.classification_loss(module), params, batches, eval_batch,
                   models_lib.num_params(params), int(data.y_train.shape[0]))


def _algorithms(s) -> list[tuple[str, int | None]]:
    """`(label, max_delay or None for sync)`."""
    p = s.num_workers
    return [("sync", None), (f"async D={p - 1}", p - 1), (f"async D={2 * p}", 2 * p)]


def _maker(s, fraction: float, max_delay: int | None):
    """`make(learning_rate, beta[, staleness])`: Top-k `fraction` with error feedback `beta`.

    One function per configuration, so every grid point reuses one compiled run.
    """
    compressor = ej.top_k(fraction=fraction)
    if max_delay is None:
        def make(learning_rate, beta):
            return ej.sync_sgd(learning_rate, s.num_workers, compressor=compressor,
                               error_feedback=beta)
    else:
        def make(learning_rate, beta, staleness):
            return ej.async_sgd(learning_rate, s.num_workers, max_delay, delay="fixed",
                                compressor=compressor, error_feedback=beta,
                                staleness=staleness)
    return make


def _row(problem, s, make, label, fraction, beta, staleness):
    hparams = {"learning_rate": s.learning_rate, "beta": beta}
    if staleness is not None:
        hparams["staleness"] = staleness
    loss, grads = ej.analysis.hypergradient(  # forward mode: memory independent of R
        make, problem.loss_fn, problem.params, problem.batches, hparams, key=s.seed,
        eval_batch=problem.eval_batch, has_aux=True, mode="forward")
    grads = {name: float(g) for name, g in grads.items()}
    return {"k_fraction": fraction, "algorithm": label, "beta": beta, "staleness": staleness,
            "loss": float(loss), "dloss_dbeta": grads["beta"],
            "dloss_dlr": grads["learning_rate"], "dloss_dstaleness": grads.get("staleness")}


def sweeps(problem: Problem, s):
    """The beta grid for every (k, algorithm); the staleness grid at the first k, beta = 1.

    Every point gives the final loss and its derivatives with respect to
    `beta`, the learning rate and (async) `staleness` (at staleness 1 on the
    beta grid). Returns `(beta_rows, staleness_rows)`.
    """
    beta_rows, stale_rows = [], []
    progress = studies.Progress(len(s.k_fractions) * len(_algorithms(s)))
    for fraction in s.k_fractions:
        for label, max_delay in _algorithms(s):
            make = _maker(s, fraction, max_delay)
            staleness = None if max_delay is None else 1.0
            for beta in np.linspace(0.0, 1.0, s.beta_points):
                beta_rows.append(_row(problem, s, make, label, fraction, float(beta),
                                      staleness))
            if fraction == s.k_fractions[0] and max_delay is None:
                stale_rows.append(beta_rows[-1])  # beta = 1
            elif fraction == s.k_fractions[0]:
                stale_rows += [_row(problem, s, make, label, fraction, 1.0, float(staleness))
                               for staleness in np.linspace(0.0, 1.0, s.staleness_points)]
            progress.step(f"Top-k {fraction:.0%}, {label}")
    return beta_rows, stale_rows


def plot_beta(rows, fraction: float, path: str) -> None:
    fig, ((ax_loss, ax_grad),) = studies.figure(1, 2, (5.5, 4.2))
    for label in dict.fromkeys(r["algorithm"] for r in rows):
        sel = [r for r in rows if r["algorithm"] == label and r["k_fraction"] == fraction]
        beta = np.asarray([r["beta"] for r in sel])
        loss = np.asarray([r["loss"] for r in sel])
        grad = np.asarray([r["dloss_dbeta"] for r in sel])
        (line,) = ax_loss.plot(beta, loss, marker=".", label=label)
        ax_grad.plot(beta, grad, marker=".", color=line.get_color(), label=f"{label} (autodiff)")
        if beta.size > 1:
            mid, secant = (beta[1:] + beta[:-1]) / 2, np.diff(loss) / np.diff(beta)
            ax_grad.plot(mid, secant, "x", color=line.get_color(), alpha=0.6,
                         label=f"{label} (secant of the grid)")
    ax_grad.axhline(0.0, color="grey", lw=0.8)
    ax_loss.set(xlabel="beta (error-feedback damping)", ylabel="final test loss",
                title=f"Top-k {fraction:.0%}: final loss")
    ax_grad.set(xlabel="beta", ylabel="d loss / d beta",
                title="derivative (lines) and secant slopes of the grid (x)")
    for ax in (ax_loss, ax_grad):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    studies.save_figure(fig, path)


def plot_staleness(rows, path: str) -> None:
    fig, ((ax_loss, ax_grad),) = studies.figure(1, 2, (5.5, 4.2))
    for r in rows:
        if r["staleness"] is None:
            ax_loss.axhline(r["loss"], ls="--", color="grey", label=f"{r['algorithm']}")
    for label in dict.fromkeys(r["algorithm"] for r in rows if r["staleness"] is not None):
        sel = [r for r in rows if r["algorithm"] == label]
        stale = np.asarray([r["staleness"] for r in sel])
        (line,) = ax_loss.plot(stale, [r["loss"] for r in sel], marker=".", label=label)
        ax_grad.plot(stale, [r["dloss_dstaleness"] for r in sel], marker=".",
                     color=line.get_color(), label=label)
    ax_grad.axhline(0.0, color="grey", lw=0.8)
    ax_loss.set(xlabel="staleness (0: freshest read, 1: delayed read)",
                ylabel="final test loss", title="final loss")
    ax_grad.set(xlabel="staleness", ylabel="d loss / d staleness", title="derivative")
    for ax in (ax_loss, ax_grad):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    studies.save_figure(fig, path)


def answer(rows, fraction: float, label: str) -> str:
    """One sentence read off the loss and its derivative over the beta grid."""
    sel = [r for r in rows if r["algorithm"] == label and r["k_fraction"] == fraction]
    beta = np.asarray([r["beta"] for r in sel])
    loss = np.asarray([r["loss"] for r in sel])
    grad = np.asarray([r["dloss_dbeta"] for r in sel])
    best = int(np.argmin(loss))
    # Where the loss is rough in beta (a changing Top-k selection, chaotic long runs),
    # the derivative at a point says little about the grid: count the intervals where
    # the mean derivative at the two ends has the sign of the secant slope.
    secant = np.diff(loss) / np.diff(beta)
    agree = int(np.sum(np.sign(secant) == np.sign(grad[1:] + grad[:-1])))
    head = (f"Top-k {fraction:.0%}, {label}: the loss is lowest at beta = {beta[best]:.2f} "
            f"({loss[best]:.4f}; {loss[-1]:.4f} at beta = 1, {loss[0]:.4f} at beta = 0; "
            f"derivatives and secant slopes agree in sign on {agree} of {secant.size} "
            "intervals)")
    crossings = [i for i in range(len(grad) - 1) if grad[i] < 0 <= grad[i + 1]]
    if agree < 0.7 * secant.size:
        return head + ("; the loss is rough in beta here (the Top-k selection changes along "
                       "the run), so the derivative at a point does not predict the grid: "
                       "read the loss values.")
    if grad[-1] < 0:
        return head + f"; d loss / d beta = {grad[-1]:.3g} < 0 at beta = 1: more error " \
                      "feedback still helps at full strength."
    if crossings:
        i = crossings[-1]
        star = beta[i] - grad[i] * (beta[i + 1] - beta[i]) / (grad[i + 1] - grad[i])
        return head + (f"; d loss / d beta changes sign near beta = {star:.2f}: more error "
                       "feedback stops helping there.")
    if np.all(grad >= 0):
        return head + "; d loss / d beta >= 0 everywhere: error feedback does not help here."
    return head + "; the derivative changes sign more than once (see the plot)."


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_report(s, problem: Problem, beta_rows, stale_rows, seconds, invocation=None) -> str:
    pngs = []
    for fraction in s.k_fractions:
        name = f"beta_k{fraction * 100:g}.png"
        plot_beta(beta_rows, fraction, os.path.join(s.workdir, name))
        pngs.append((fraction, name))
    plot_staleness(stale_rows, os.path.join(s.workdir, "staleness.png"))
    lines = studies.header("Hypergradients of the final loss", "experiments.hypergradients",
                           FLAGS, s, invocation, seconds)
    lines += [
        f"Digits 8x8 ({problem.num_train} training images, {problem.eval_batch['y'].shape[0]} "
        f"held out), MLP with one hidden layer of 128 ({problem.num_params:,} parameters), "
        f"P = {s.num_workers} workers, batch {s.batch_size} per worker, R = {s.rounds} rounds, "
        f"learning rate {s.learning_rate:g}, seed {s.seed}. The objective is the loss on the "
        "held-out split of the final auxiliary model `ej.params(state)` (the virtual iterate "
        "under error feedback); derivatives by `ej.analysis.hypergradient` (forward mode). "
        "Async reads are delayed by exactly `D` updates "
        "(`delay=\"fixed\"`); async applies the `P` updates of a round one after another, "
        "sync averages them.",
        "",
        "The Top-k indices are discrete, so `d loss / d beta` is the derivative with the "
        "selection held fixed; the secant slopes of the grid (x in the plots) include the "
        "jumps where the selection changes.",
        "",
        "## Error feedback: does more of it help, and where does it stop helping?",
        "",
    ]
    for fraction in s.k_fractions:
        for label, _ in _algorithms(s):
            lines.append(f"- {answer(beta_rows, fraction, label)}")
    lines += ["", *studies.markdown_table(
        ("k", "algorithm", "beta", "final loss", "d loss / d beta", "d loss / d learning_rate",
         "d loss / d staleness"),
        [(f"{r['k_fraction']:.0%}", r["algorithm"], f"{r['beta']:.2f}", f"{r['loss']:.4f}",
          _fmt(r["dloss_dbeta"]), _fmt(r["dloss_dlr"]), _fmt(r["dloss_dstaleness"]))
         for r in beta_rows]), ""]
    for fraction, name in pngs:
        lines.append(f"![Top-k {fraction:.0%}]({name})")
    lines += [
        "",
        f"## Learning rate and staleness: sync against async (Top-k {s.k_fractions[0]:.0%}, "
        "beta = 1)",
        "",
        "Staleness 0 reads the freshest iterate the round allows (`X_{rP}`), 1 the delayed "
        "one; sync has no stale reads (its row is the beta = 1 point of the grid above).",
        "",
        *studies.markdown_table(
            ("algorithm", "staleness", "final loss", "d loss / d learning_rate",
             "d loss / d staleness"),
            [(r["algorithm"], _fmt(r["staleness"]), f"{r['loss']:.4f}", _fmt(r["dloss_dlr"]),
              _fmt(r["dloss_dstaleness"])) for r in stale_rows]),
    ]
    lines += ["", "![staleness](staleness.png)", "",
              f"{len(s.k_fractions) * len(_algorithms(s))} compiled runs.", ""]
    with workdir.atomic_open(os.path.join(s.workdir, "results.json")) as f:
        json.dump({"settings": s._asdict(), "beta": beta_rows, "staleness": stale_rows,
                   "seconds": seconds}, f, indent=1)
    return studies.write_report(s.workdir, lines)


def run(s, invocation=None) -> str:
    """Runs both sweeps and writes the report; returns its path."""
    start = time.perf_counter()
    problem = make_problem(s)
    beta_rows, stale_rows = sweeps(problem, s)
    return write_report(s, problem, beta_rows, stale_rows, time.perf_counter() - start,
                        invocation)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
