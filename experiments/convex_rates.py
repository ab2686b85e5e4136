r"""docs/theory.md section 3 on convex problems: measured suboptimality against the rate bounds.

    python -m experiments.convex_rates --workdir=DIR [--smoke]

On least squares and L2-regularised logistic regression (`experiments.data`: `L`,
strong convexity `c`, `x*` and `f*` exact, float64), a linear model is trained
from `x_0 = 0` by sync SGD, async SGD (consistent and inconsistent reads) and
Top-k variants of both with and without error feedback, `P` workers on an IID
split, over `--num_seeds` seeds. Means over seeds are compared with section 3,
evaluated at the measured `B` (largest `b_hat`) and `M` (largest `grad_norm/max`):

1. strongly convex (constant `eta <= 1/c`; `T` updates: rounds for sync, `P` per
   round for async): `E ||x_T - x*||^2 <= (1 - c eta)^T ||x_0 - x*||^2 + eta M^2 / c
   + eta^2 L^2 B^2 / c^2`, and `f(x_T) - f* <= (L/2) ||x_T - x*||^2`. It covers the
   variants whose auxiliary model is SGD with gradients at views (not Top-k without
   error feedback, which applies `C(eta g)`: n/a);
2. non-convex (`eta = 1/sqrt(T)`): `(1/T) sum_t E ||grad f(x_t)||^2 <= (f(x_0) - f*
   + L M B + L M^2 / 2) / sqrt(T)`, the first and last terms over `gamma = k/d` for
   Top-k without error feedback; measured at the start of every round.

By default `eta = 1/sqrt(T)` (it satisfies both); `--learning_rate` sets a constant
and makes table 2 n/a. The suboptimality is the auxiliary model's (the virtual
iterate under error feedback); the report also gives the actual model's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from experiments import data as data_lib
from experiments import studies
from experiments.flags import Flag, usage

MODULE = "experiments.convex_rates"
PROBLEMS = ("least_squares", "logistic")
VARIANTS = ("sync", "sync_topk", "sync_topk_ef", "async_consistent", "async_inconsistent",
            "async_topk", "async_topk_ef")
FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md and the PNG (created if missing; "
         "required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 60, num_seeds 2, samples 256, "
         "dim 8) unless those flags are given."),
    Flag("rounds", "int", 4000, "Rounds R of every run.", 1, 10_000_000),
    Flag("num_seeds", "int", 8, "Seeds per configuration (seed, seed + 1, ...).", 1, 10_000),
    Flag("seed", "int", 0, "First seed; it also draws the problems and the split.", 0,
         2**31 - 1),
    Flag("num_workers", "int", 4, "P, the number of workers.", 1, 1024),
    Flag("max_delay", "int", 8, "Largest async lag in updates (at least P - 1).", 0, 100_000),
    Flag("k_fraction", "float", 0.125, "Top-k fraction (k = max(1, floor(fraction d))).", 0.0,
         1.0, lo_open=True),
    Flag("dim", "int", 32, "Dimension d of both problems.", 1, 100_000),
    Flag("samples", "int", 2048, "Samples n of both problems.", 2, 10_000_000),
    Flag("batch_size", "int", 8, "Samples per worker per round.", 1, 65_536),
    Flag("learning_rate", "float", 0.0, "Constant learning rate; 0: 1/sqrt(T), T the run's "
         "number of updates (needed by the non-convex bound).", 0.0, 100.0),
    Flag("noise", "float", 0.1, "Label noise of least squares (as experiments.train).", 0.0),
    Flag("logistic_reg", "float", 0.1, "L2 regularisation of logistic regression (its strong "
         "convexity c).", 0.0, lo_open=True),
    Flag("problems", "names", ",".join(PROBLEMS), "Problems to run.", choices=PROBLEMS),
    Flag("variants", "names", ",".join(VARIANTS), "Variants to run.", choices=VARIANTS),
)
SMOKE = {"rounds": 60, "num_seeds": 2, "samples": 256, "dim": 8}


class Variant(NamedTuple):
    label: str
    asynchronous: bool
    compressed: bool
    error_feedback: bool
    reads: str | None


def variant(name: str) -> Variant:
    return {
        "sync": Variant("sync", False, False, False, None),
        "sync_topk": Variant("sync Top-k", False, True, False, None),
        "sync_topk_ef": Variant("sync Top-k + EF", False, True, True, None),
        "async_consistent": Variant("async, consistent", True, False, False, "consistent"),
        "async_inconsistent": Variant("async, inconsistent", True, False, False,
                                      "inconsistent"),
        "async_topk": Variant("async Top-k", True, True, False, "inconsistent"),
        "async_topk_ef": Variant("async Top-k + EF", True, True, True, "inconsistent"),
    }[name]


def updates(s, v: Variant) -> int:
    """`T`: the number of updates of the auxiliary model in the run."""
    return s.rounds * (s.num_workers if v.asynchronous else 1)


def learning_rate(s, v: Variant) -> float:
    return s.learning_rate or 1.0 / math.sqrt(updates(s, v))


def make_algorithm(s, v: Variant) -> ej.Algorithm:
    eta = learning_rate(s, v)
    compressor = ej.top_k(fraction=s.k_fraction) if v.compressed else None
    if v.asynchronous:
        return ej.async_sgd(eta, s.num_workers, s.max_delay, reads=v.reads,
                            compressor=compressor, error_feedback=v.error_feedback)
    return ej.sync_sgd(eta, s.num_workers, compressor=compressor,
                       error_feedback=v.error_feedback)


def make_problem(name: str, s) -> data_lib.ConvexProblem:
    if name == "least_squares":
        return data_lib.least_squares(s.samples, s.dim, noise=s.noise, seed=s.seed)
    return data_lib.logistic_regression(s.samples, s.dim, seed=s.seed, reg=s.logistic_reg)


def batch_fn(problem: data_lib.ConvexProblem, s) -> Callable:
    """IID shards of the samples; `batch_size` rows per worker per round, on the device."""
    labels = (problem.b > 0).astype(np.int32)
    shards = data_lib.partition(labels, s.num_workers, seed=s.seed)
    return data_lib.make_batch_fn(problem.a, problem.b, *shards, batch_size=s.batch_size)


class Curves(NamedTuple):
    """Per seed and round `[seeds, R]`."""

    suboptimality: np.ndarray  # f(x_{r+1}) - f* of the auxiliary model
    actual: np.ndarray  # f(X_{r+1}) - f* of the actual model
    distance: np.ndarray  # ||x_{r+1} - x*||^2
    grad_sq: np.ndarray  # ||grad f(x_r)||^2 at the start of round r
    b_hat: np.ndarray
    m_hat: np.ndarray


def measure(problem: data_lib.ConvexProblem, alg: ej.Algorithm, s) -> Curves:
    """One compiled `lax.scan` over the rounds (`ej.run` one round at a time, so that the
    auxiliary model is measured after each), run once per seed (float64)."""
    sample = batch_fn(problem, s)
    x_star = jnp.asarray(problem.x_star)
    f_star = problem.f_star
    grad_full = jax.grad(problem.full_loss)

    def body(state, _):
        x = ej.params(state)
        grad_sq = jnp.sum(jnp.square(grad_full(x)["w"]))
        new, metrics = ej.run(alg, problem.loss_fn, state, batch_fn=sample, rounds=1,
                              loop="python")
        metrics = {name: value[0] for name, value in metrics.items()}
        x_new = ej.params(new)
        return new, {
            "suboptimality": problem.full_loss(x_new) - f_star,
            "actual": problem.full_loss(ej.model(new)) - f_star,
            "distance": jnp.sum(jnp.square(x_new["w"] - x_star)),
            "grad_sq": grad_sq,
            "b_hat": metrics["consistency/b_hat"],
            "m_hat": metrics["grad_norm/max"],
        }

    @jax.jit
    def one(seed):
        base = jax.random.key(seed)
        state = alg.init({"w": jnp.zeros((s.dim,), jnp.float64)}, jax.random.fold_in(base, 1))
        return jax.lax.scan(body, state, None, length=s.rounds)[1]

    per_seed = [jax.device_get(one(jnp.asarray(seed)))
                for seed in studies.seeds(s.seed, s.num_seeds)]
    return Curves(*(np.stack([np.asarray(r[name], np.float64) for r in per_seed])
                    for name in Curves._fields))


class Row(NamedTuple):
    problem: str
    variant: Variant
    updates: int
    eta: float
    m: float
    b: float
    gamma: float | None  # k/d without error feedback
    curves: Curves
    f0_gap: float
    d0: float
    smoothness: float
    strong_convexity: float
    subopt_bound: float | None  # (L/2) * the strongly convex bound on the distance
    distance_bound: float | None
    nonconvex_bound: float | None


def strongly_convex_bound(c: float, lsmooth: float, eta: float, t, d0: float, m: float,
                          b: float):
    """`(1 - c eta)^T d0 + eta M^2 / c + eta^2 L^2 B^2 / c^2` (docs/theory.md section 3)."""
    return (1 - c * eta) ** np.asarray(t, np.float64) * d0 + eta * m**2 / c + (
        eta**2 * lsmooth**2 * b**2 / c**2)


def nonconvex_bound(f0_gap: float, lsmooth: float, m: float, b: float, t: int,
                    gamma: float | None) -> float:
    """`(f0 - f* + L M B + L M^2/2) / sqrt(T)`, two terms over `gamma` for biased compression."""
    g = 1.0 if gamma is None else gamma
    return (f0_gap / g + lsmooth * m * b + lsmooth * m**2 / (2 * g)) / math.sqrt(t)


def evaluate(name: str, problem: data_lib.ConvexProblem, v: Variant, curves: Curves,
             s) -> Row:
    t, eta = updates(s, v), learning_rate(s, v)
    m, b = float(np.max(curves.m_hat)), float(np.max(curves.b_hat))
    lsmooth, c = problem.smoothness, problem.strong_convexity
    d0 = float(np.sum(np.square(problem.x_star)))  # x_0 = 0
    f0_gap = float(problem.full_loss({"w": jnp.zeros((s.dim,), jnp.float64)})) - problem.f_star
    gamma = None
    if v.compressed and not v.error_feedback:
        gamma = max(1, math.floor(s.k_fraction * s.dim)) / s.dim
    distance_bound = subopt_bound = None
    if not (v.compressed and not v.error_feedback) and c > 0 and eta <= 1 / c:
        distance_bound = float(strongly_convex_bound(c, lsmooth, eta, t, d0, m, b))
        subopt_bound = lsmooth / 2 * distance_bound
    nc = None if s.learning_rate else nonconvex_bound(f0_gap, lsmooth, m, b, t, gamma)
    return Row(name, v, t, eta, m, b, gamma, curves, f0_gap, d0, lsmooth, c, subopt_bound,
               distance_bound, nc)


def _held(measured: float, bound: float | None) -> str:
    if bound is None:
        return "n/a"
    return "yes" if measured <= bound else "**NO**"


def sc_table(rows: list[Row]) -> list[str]:
    header = ("variant", "problem", "T (updates)", "eta", "M", "B", "f(x_T) - f*",
              "bound (L/2) RHS", "held", "f(X_T) - f*", "||x_T - x*||^2", "bound RHS", "held")
    out = []
    for r in rows:
        sub = r.curves.suboptimality[:, -1]
        dist = r.curves.distance[:, -1]
        out.append((r.variant.label, r.problem, r.updates, studies.fmt(r.eta, 3),
                    studies.fmt(r.m, 3), studies.fmt(r.b, 3), studies.fmt_mean_std(sub, 3),
                    studies.fmt(r.subopt_bound, 3), _held(float(np.mean(sub)), r.subopt_bound),
                    studies.fmt_mean_std(r.curves.actual[:, -1], 3),
                    studies.fmt_mean_std(dist, 3), studies.fmt(r.distance_bound, 3),
                    _held(float(np.mean(dist)), r.distance_bound)))
    return studies.markdown_table(header, out)


def nc_table(rows: list[Row]) -> list[str]:
    header = ("variant", "problem", "T (updates)", "gamma", "mean ||grad f(x_t)||^2",
              "bound", "held")
    out = []
    for r in rows:
        measured = float(np.mean(r.curves.grad_sq))
        out.append((r.variant.label, r.problem, r.updates,
                    "1" if r.gamma is None else studies.fmt(r.gamma, 3),
                    studies.fmt(measured, 3), studies.fmt(r.nonconvex_bound, 3),
                    _held(measured, r.nonconvex_bound)))
    return studies.markdown_table(header, out)


def summary_table(rows: list[Row]) -> list[str]:
    """Both theorems side by side: the measured left sides, the bounds, whether they held."""
    header = ("variant", "problem", "f(x_T) - f*", "strongly convex bound", "held",
              "mean ||grad f(x_t)||^2", "non-convex bound", "held")
    out = []
    for r in rows:
        sub = float(np.mean(r.curves.suboptimality[:, -1]))
        grad = float(np.mean(r.curves.grad_sq))
        out.append((r.variant.label, r.problem, studies.fmt(sub, 3),
                    studies.fmt(r.subopt_bound, 3), _held(sub, r.subopt_bound),
                    studies.fmt(grad, 3), studies.fmt(r.nonconvex_bound, 3),
                    _held(grad, r.nonconvex_bound)))
    return studies.markdown_table(header, out)


def plot(rows: list[Row], problems: list[str], path: str) -> str:
    fig, axes = studies.figure(1, len(problems), (6.5, 5.6))
    colors = {variant(n).label: f"C{i}" for i, n in enumerate(VARIANTS)}
    for ax, name in zip(axes[0], problems, strict=True):
        for r in (r for r in rows if r.problem == name):
            rounds = np.arange(1, r.curves.suboptimality.shape[1] + 1)
            ax.plot(rounds, np.mean(r.curves.suboptimality, 0), color=colors[r.variant.label],
                    label=r.variant.label)
            if r.subopt_bound is not None:
                bound = r.smoothness / 2 * strongly_convex_bound(
                    r.strong_convexity, r.smoothness, r.eta,
                    rounds * (r.updates // len(rounds)), r.d0, r.m, r.b)
                ax.plot(rounds, bound, ":", color=colors[r.variant.label], lw=1,
                        label=f"{r.variant.label}: bound")
        ax.set(yscale="log", xlabel="round", ylabel="f(x_t) - f* (mean over seeds)")
        ax.set_title(f"{name}: measured (solid), strongly convex bound (dotted)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                  frameon=False)
    return studies.save_figure(fig, path)


def measure_all(s) -> list[Row]:
    """Runs every (problem, variant) and evaluates the bounds, in float64.

    Raises:
      UsageError: before compiling, for a combination the library refuses.
    """
    if s.max_delay < s.num_workers - 1:
        raise usage("max_delay", s.max_delay, f"an integer >= num_workers - 1 = "
                    f"{s.num_workers - 1}")
    if s.num_workers > s.samples:
        raise usage("num_workers", s.num_workers, f"at most --samples={s.samples}")
    variants = [variant(n) for n in s.variants]
    progress = studies.Progress(len(s.problems) * len(variants))
    rows = []
    with jax.enable_x64(True):
        algorithms = [make_algorithm(s, v) for v in variants]  # validates; compiles nothing
        for name in s.problems:
            problem = make_problem(name, s)
            for v, alg in zip(variants, algorithms, strict=True):
                rows.append(evaluate(name, problem, v, measure(problem, alg, s), s))
                progress.step(f"{name}, {v.label}")
    return rows


def run(s, invocation=None) -> str:
    """Runs every (problem, variant) and writes the report; returns its path."""
    start = time.perf_counter()
    rows = measure_all(s)
    return write(s, rows, time.perf_counter() - start, invocation)


def write(s, rows: list[Row], seconds: float, invocation) -> str:
    lines = studies.header("Convex rates: measured suboptimality against docs/theory.md section 3",
                           MODULE, FLAGS, s, invocation, seconds)
    lines += [
        f"Problems (float64, d = {s.dim}, n = {s.samples}, seed {s.seed}; `x_0 = 0`):"]
    for name in s.problems:
        r = next(r for r in rows if r.problem == name)
        lines.append(f"- {name}: L = {r.smoothness:.4g}, c = {r.strong_convexity:.4g}, "
                     f"f(x_0) - f* = {r.f0_gap:.4g}, ||x_0 - x*||^2 = {r.d0:.4g}.")
    eta_text = ("`eta = 1/sqrt(T)`, `T` the run's number of updates" if not s.learning_rate
                else f"constant `eta = {s.learning_rate:g}`")
    lines += [
        "",
        f"P = {s.num_workers} workers, batch {s.batch_size} per worker, R = {s.rounds} "
        f"rounds, {eta_text}, async max_delay = {s.max_delay} (uniform lags), Top-k "
        f"fraction {s.k_fraction:g}, {s.num_seeds} seeds. Measured values are means over "
        "seeds (± the standard deviation); `M` and `B` are the largest `grad_norm/max` "
        "and `consistency/b_hat` over seeds and rounds.",
        "",
        "## Summary",
        "",
        "Means over seeds; the two bounds are defined in the sections below.",
        "",
        *summary_table(rows),
        "",
        "## Strongly convex bound",
        "",
        "`E||x_T - x*||^2 <= (1 - c eta)^T ||x_0 - x*||^2 + eta M^2 / c + eta^2 L^2 B^2 / "
        "c^2` (RHS), and `f(x_T) - f* <= (L/2) RHS`. `f(X_T) - f*` is the actual model "
        "(it differs from the auxiliary `x_T` under error feedback). n/a: Top-k without "
        "error feedback (its auxiliary update is `C(eta g)`, outside the theorem), or "
        "`eta > 1/c`.",
        "",
    ]
    lines += sc_table(rows)
    sc = [r for r in rows if r.subopt_bound is not None]
    held = [r for r in sc if np.mean(r.curves.suboptimality[:, -1]) <= r.subopt_bound]
    decreasing = [r for r in rows if np.mean(r.curves.suboptimality[:, -1]) < r.f0_gap]
    lines += ["", f"The suboptimality bound held in {len(held)} of {len(sc)} rows where the "
              f"theorem applies; the final suboptimality is below `f(x_0) - f*` in "
              f"{len(decreasing)} of {len(rows)} rows."]
    if sc:
        worst = max(sc, key=lambda r: np.mean(r.curves.suboptimality[:, -1]) / r.subopt_bound)
        ratio = np.mean(worst.curves.suboptimality[:, -1]) / worst.subopt_bound
        noise = worst.eta * worst.m**2 / worst.strong_convexity
        lines.append(f"The closest row is {worst.variant.label} on {worst.problem} (measured / "
                     f"bound = {ratio:.3g}); there the bound's noise term `eta M^2 / c` is "
                     f"{noise:.3g} of its RHS {worst.distance_bound:.3g}, `M` being the largest "
                     "stochastic gradient norm of the whole run.")
    lines += ["", "## Non-convex form", ""]
    if s.learning_rate:
        lines.append("n/a: the theorem takes `eta = 1/sqrt(T)`; rerun with "
                     "`--learning_rate=0`.")
    else:
        lines += [
            "`(1/T) sum_t E||grad f(x_t)||^2 <= (f(x_0) - f* + L M B + L M^2/2) / sqrt(T)`; "
            "for Top-k without error feedback the first and last terms are divided by "
            "`gamma = k/d`. The left side is averaged over the rounds' starting points "
            "(every `P`-th update for async).",
            "",
        ]
        lines += nc_table(rows)
        held_nc = [r for r in rows if np.mean(r.curves.grad_sq) <= r.nonconvex_bound]
        lines += ["", f"Held in {len(held_nc)} of {len(rows)} rows."]
    png = plot(rows, list(s.problems), os.path.join(s.workdir, "suboptimality.png"))
    lines += ["", f"![suboptimality]({os.path.basename(png)})"]
    return studies.write_report(s.workdir, lines)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
