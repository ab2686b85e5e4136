r"""DiLoCo and PowerSGD against synchronous and local SGD: loss against rounds, bits, seconds.

    python -m experiments.diloco --workdir=DIR [--smoke] [--models=mlp,cnn]

Trains, on the bundled digits (`--models`: the MLP by default, the small CNN
behind the flag), every arm of `--arms` at equal numbers of inner steps (every
round each of the `--workers` workers computes one gradient): synchronous SGD
with momentum (`sync_momentum`), synchronous SGD with PowerSGD of rank 1 and 4
(`powersgd_1`, `powersgd_4`: compressed raw gradients with error feedback, the
momentum at the server, as in the PowerSGD paper), local SGD (`local_sgd`, H =
`--local_period`), DiLoCo with H = 4, 16, 64 (`diloco_4`, ...: outer optax.sgd
of `--outer_learning_rate` with Nesterov momentum `--outer_momentum`) and DiLoCo
with H = `--compressed_period` and Top-1% outer pseudo-gradients with error
feedback (`diloco_top1`) or 4-bit QSGD ones (`diloco_4bit`). Every inner
optimizer is SGD with momentum `--momentum` at rate `--learning_rate`. Each arm
is `experiments.config.validate`'s launcher configuration, run through `ej.run`
with a simulated clock (`--compute_mean` seconds a gradient, a network of
`--latency` and `--bandwidth`; docs/theory.md section 11): PowerSGD costs two
all-reduces of its factors a round, DiLoCo one all-reduce of the pseudo-gradient
every H rounds (an all-gather when sparsified or quantised).

Every `--eval_every` rounds it records, per seed, the training loss of the actual
model (mean cross-entropy over the first `--train_eval_size` training samples),
its test accuracy, the bits every worker put on the wire so far and the simulated
seconds. Seeds `--seed ..` set the model, the batches and the algorithm's draws;
values are mean ± standard deviation over seeds. The report says which arm
reached `--target_loss` first in rounds, in bits and in seconds.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

import elastic_jax as ej
from experiments import config as config_lib
from experiments import problem as problem_lib
from experiments import studies
from experiments import topologies as topologies_study
from experiments.flags import Flag

MODULE = "experiments.diloco"
ARMS = ("sync_momentum", "powersgd_1", "powersgd_4", "local_sgd", "diloco_4", "diloco_16",
        "diloco_64", "diloco_top1", "diloco_4bit")
FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md and the PNGs (created if missing; "
         "required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 8, num_seeds 2, workers 4, arms "
         "sync_momentum,powersgd_1,diloco_4, eval_every 4, batch_size 8, train_eval_size 256) "
         "unless those flags are given."),
    Flag("arms", "names", ",".join(ARMS), "Arms of the grid.", choices=ARMS),
    Flag("models", "names", "mlp", "Models on the digits (the CNN costs about 5x the MLP on "
         "the CPU).", choices=("mlp", "cnn")),
    Flag("workers", "int", 8, "Workers P.", 2, 4096),
    Flag("rounds", "int", 256, "Rounds (inner steps) of every run.", 1, 10_000_000),
    Flag("num_seeds", "int", 3, "Seeds per arm (seed, seed + 1, ...).", 1, 1024),
    Flag("seed", "int", 0, "First seed; it also draws the data split.", 0, 2**31 - 1),
    Flag("learning_rate", "float", 0.02, "Inner learning rate (constant).", 0.0, 100.0,
         lo_open=True),
    Flag("momentum", "float", 0.9, "Momentum of every inner optimizer (heavy ball).", 0.0, 1.0,
         hi_open=True),
    Flag("batch_size", "int", 16, "Samples per worker per round.", 1, 65_536),
    Flag("local_period", "int", 16, "Local SGD's rounds between averages.", 1, 100_000),
    Flag("compressed_period", "int", 16, "H of the DiLoCo arms with compressed outer "
         "pseudo-gradients.", 1, 100_000),
    Flag("outer_learning_rate", "float", 0.7, "DiLoCo's outer learning rate.", 0.0,
         lo_open=True),
    Flag("outer_momentum", "float", 0.9, "DiLoCo's outer Nesterov momentum.", 0.0, 1.0,
         hi_open=True),
    Flag("eval_every", "int", 16, "Rounds between records.", 1, 1_000_000),
    Flag("target_loss", "float", 0.3, "Training loss whose first crossing is reported.", 0.0,
         lo_open=True),
    Flag("train_eval_size", "int", 2000, "Training samples the training loss is measured on "
         "(the first ones).", 1, 10_000_000),
    Flag("compute_mean", "float", 0.01, "Simulated seconds per gradient (constant).", 0.0, 1e6,
         lo_open=True),
    Flag("latency", "float", 1e-4, "Network latency, seconds per message.", 0.0, 1e6),
    Flag("bandwidth", "float", 1e7, "Network bandwidth, bits per second.", 0.0, lo_open=True),
)
SMOKE = {"rounds": 8, "num_seeds": 2, "workers": 4, "arms": "sync_momentum,powersgd_1,diloco_4",
         "eval_every": 4, "batch_size": 8, "train_eval_size": 256}
# The x axes of every curve: rounds (inner steps), bits on the wire, simulated seconds.
AXES = {"round": "round (inner steps)", "bits": "bits on the wire (all workers, cumulative)",
        "seconds": "simulated seconds"}


class Point(NamedTuple):
    model: str
    arm: str


def grid(s) -> list[Point]:
    return [Point(m, a) for m in s.models for a in s.arms]


def launcher_values(s, point: Point) -> dict[str, Any]:
    """The `experiments.train` flags of one arm."""
    values = {"num_workers": s.workers, "learning_rate": s.learning_rate,
              "momentum": s.momentum, "batch_size": s.batch_size, "rounds": s.rounds,
              "model": point.model, "dataset": "digits", "seed": s.seed, "workdir": s.workdir,
              "compute": "constant", "compute_mean": s.compute_mean, "latency": s.latency,
              "bandwidth": s.bandwidth}
    arm = point.arm
    diloco = {"algorithm": "diloco", "outer_learning_rate": s.outer_learning_rate,
              "outer_momentum": s.outer_momentum}
    if arm == "sync_momentum":
        values.update(algorithm="sync", compressor="none", error_feedback=False,
                      optimizer_placement="server")
    elif arm.startswith("powersgd_"):
        values.update(algorithm="sync", compressor="powersgd", error_feedback=True,
                      powersgd_rank=int(arm.split("_")[1]), optimizer_placement="server")
    elif arm == "local_sgd":
        values.update(algorithm="local_sgd", period=s.local_period)
    elif arm in ("diloco_top1", "diloco_4bit"):
        values.update(diloco, period=s.compressed_period,
                      **({"outer_compressor": "top_k", "outer_k_fraction": 0.01}
                         if arm == "diloco_top1" else {"outer_compressor": "qsgd"}))
    else:
        values.update(diloco, period=int(arm.split("_")[1]))
    return values


def check(s) -> list[tuple[Point, config_lib.Config]]:
    """Every arm's launcher config, validated before anything compiles."""
    return [(point, config_lib.validate(launcher_values(s, point))) for point in grid(s)]


class Curves(NamedTuple):
    """One arm's records, `[seeds, records]`."""

    x: dict[str, np.ndarray]  # axis name (AXES) -> [seeds, records]
    loss: np.ndarray
    accuracy: np.ndarray


class Outcome(NamedTuple):
    point: Point
    description: str
    curves: Curves
    max_ratio: float | None  # the largest b_hat / bound over the runs (None: no finite bound)
    seconds: float


def run_point(point: Point, cfg: config_lib.Config, problem: problem_lib.Problem, train_loss,
              s) -> Outcome:
    """Every seed of one arm, one after another."""
    alg = cfg.algorithm
    alg_init = jax.jit(alg.init)
    loop = config_lib.resolve_loop(cfg.flags, jax.default_backend())
    records = [r for r in range(1, s.rounds + 1) if r % s.eval_every == 0 or r == s.rounds]
    rows = {name: [] for name in ("loss", "accuracy", *AXES)}
    ratio = None
    t0 = time.perf_counter()
    for seed in studies.seeds(s.seed, s.num_seeds):
        base = jax.random.key(seed)
        state = alg_init(problem.init_params(jax.random.fold_in(base, 0)),
                         jax.random.fold_in(base, 1))
        r, sent, seed_rows = 0, 0.0, {name: [] for name in rows}
        for end in records:
            state, m = ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn,
                              rounds=end - r, has_aux=True, loop=loop)
            m = jax.device_get(m)
            r = end
            sent += float(np.sum(np.asarray(m["comm/bits"], np.float64)))
            params = ej.model(state)
            seed_rows["loss"].append(train_loss(params))
            seed_rows["accuracy"].append(problem.evaluate(params)["test/accuracy"])
            seed_rows["round"].append(float(end))
            seed_rows["bits"].append(sent)
            seed_rows["seconds"].append(float(m["time/elapsed"][-1]))
            bound = np.asarray(m["consistency/bound"], np.float64)
            finite = np.isfinite(bound) & (bound > 0)
            if finite.any():
                b_hat = np.asarray(m["consistency/b_hat"], np.float64)[finite]
                ratio = max(ratio or 0.0, float(np.max(b_hat / bound[finite])))
        for name in rows:
            rows[name].append(seed_rows[name])
    curves = Curves({axis: np.asarray(rows[axis]) for axis in AXES},
                    np.asarray(rows["loss"]), np.asarray(rows["accuracy"]))
    return Outcome(point, config_lib.describe(cfg.flags), curves, ratio,
                   time.perf_counter() - t0)


def run_grid(s) -> list[Outcome]:
    configs = check(s)
    problems, losses, outcomes = {}, {}, []
    progress = studies.Progress(len(configs))
    for point, cfg in configs:
        if point.model not in problems:  # The data split does not depend on the arm.
            problems[point.model] = problem_lib.load_problem(cfg.flags)
            losses[point.model] = topologies_study.train_loss_fn(point.model,
                                                                 s.train_eval_size)
        outcomes.append(run_point(point, cfg, problems[point.model], losses[point.model], s))
        progress.step(f"{point.model}, {point.arm}")
    return outcomes


# ------------------------------------------------------------------ the report


def first_reached(o: Outcome, axis: str, target: float) -> list[float | None]:
    """Per seed, the first record's `axis` value with a training loss at or below `target`."""
    return studies.first_reached(o.curves.loss, o.curves.x[axis], target)


def findings(outcomes: list[Outcome], s) -> list[str]:
    """Per model: the first arm to the target loss in rounds, bits and seconds."""
    lines = []
    for model in s.models:
        group = [o for o in outcomes if o.point.model == model]
        parts = []
        for axis, unit in (("round", "rounds"), ("bits", "bits"), ("seconds", "seconds")):
            first = studies.first_to_target(
                {o.point.arm: first_reached(o, axis, s.target_loss) for o in group}, unit,
                "first in")
            if first is None:
                parts.append(f"no arm reached the target loss {s.target_loss:g} on every seed")
                break
            parts.append(first)
        final = {o.point.arm: float(np.mean(o.curves.loss[:, -1])) for o in group}
        best = min(final, key=final.get)
        parts.append(f"lowest final training loss: {best} ({studies.fmt(final[best])})")
        lines.append(f"- {model}: " + "; ".join(parts) + ".")
    return lines


def outcome_table(outcomes: list[Outcome], target: float) -> list[str]:
    header = ("model", "arm", "final train loss", "test accuracy", "bits sent",
              "simulated seconds", "rounds to target", "bits to target", "seconds to target",
              "max b_hat / bound")
    rows = [(o.point.model, o.point.arm, studies.fmt_mean_std(o.curves.loss[:, -1]),
             studies.fmt_mean_std(o.curves.accuracy[:, -1], 3),
             studies.fmt(float(np.mean(o.curves.x["bits"][:, -1]))),
             studies.fmt(float(np.mean(o.curves.x["seconds"][:, -1]))),
             studies.reached_text(first_reached(o, "round", target)),
             studies.reached_text(first_reached(o, "bits", target)),
             studies.reached_text(first_reached(o, "seconds", target)),
             "n/a (bound inf or 0)" if o.max_ratio is None else studies.fmt(o.max_ratio, 3))
            for o in outcomes]
    return studies.markdown_table(header, rows)


def plot_curves(outcomes: list[Outcome], model: str, what: str, s, path: str) -> str:
    """`what` ("loss" or "accuracy") against every axis."""
    sel = [o for o in outcomes if o.point.model == model]
    fig, axes = studies.figure(1, len(AXES), (5.5, 3.8))
    ylabel = {"loss": "training loss of the model", "accuracy": "test accuracy"}[what]
    for j, axis in enumerate(AXES):
        ax = axes[0, j]
        for i, o in enumerate(sel):
            y = getattr(o.curves, what)
            x = o.curves.x[axis].mean(0)
            ax.plot(x, y.mean(0), color=f"C{i}", label=o.point.arm)
            ax.fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.12, lw=0)
        if what == "loss":
            ax.axhline(s.target_loss, color="grey", lw=0.8, ls=":", label="target loss")
            ax.set_yscale("log")
        if axis == "bits":
            ax.set_xscale("symlog")
        ax.set(xlabel=AXES[axis], ylabel=ylabel + "\n(mean over seeds; band: min to max)")
        ax.set_title(f"{model}: {what} against {axis}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    return studies.save_figure(fig, path)


def reductions(s) -> list[str]:
    """How the settings differ from the study's defaults."""
    return studies.reductions(FLAGS, s, {f.name: f.default for f in FLAGS
                                         if f.name in ("arms", "rounds", "workers")})


def run(s, invocation=None) -> str:
    start = time.perf_counter()
    outcomes = run_grid(s)
    return write(s, outcomes, time.perf_counter() - start, invocation)


def write(s, outcomes: list[Outcome], seconds: float, invocation) -> str:
    lines = studies.header("DiLoCo and PowerSGD", MODULE, FLAGS, s, invocation, seconds)
    lines += [
        f"Every arm trains on the bundled digits for {s.rounds} rounds (inner steps) with "
        f"P = {s.workers} workers, batch {s.batch_size} per worker, SGD with momentum "
        f"{s.momentum:g} at rate {s.learning_rate:g} inside every arm; seeds "
        f"{s.seed}..{s.seed + s.num_seeds - 1}, one after another. The clock: "
        f"{s.compute_mean:g} s a gradient, latency {s.latency:g} s, bandwidth "
        f"{s.bandwidth:g} bit/s (docs/theory.md section 11: PowerSGD two all-reduces of "
        "its factors a round; DiLoCo one all-reduce of the pseudo-gradient every H rounds, "
        "an all-gather when compressed). Every "
        f"{s.eval_every} rounds: the training loss of the actual model (DiLoCo's global "
        f"model; the mean cross-entropy over the first {s.train_eval_size} training "
        "samples), its test accuracy, the bits and the simulated seconds so far. Values are "
        f"mean ± standard deviation over seeds; the target loss is {s.target_loss:g}.",
        "",
    ]
    cut = reductions(s)
    if cut:
        lines += ["**A reduced grid**: " + "; ".join(cut) + ".", ""]
    lines += ["## Findings", ""] + findings(outcomes, s)
    lines += ["", "## The arms", ""] + studies.markdown_table(
        ("arm", "configuration"), [(o.point.arm, o.description) for o in outcomes
                                   if o.point.model == s.models[0]])
    lines += ["", "## Every arm", ""] + outcome_table(outcomes, s.target_loss)
    lines += ["", "`max b_hat / bound`: over every round with a finite, positive bound "
              "(synchronous SGD's is 0, PowerSGD's with error feedback inf).", "",
              "## Plots", ""]
    for model, what in itertools.product(s.models, ("loss", "accuracy")):
        path = plot_curves(outcomes, model, what, s,
                           os.path.join(s.workdir, f"{what}_{model}.png"))
        lines += [f"![{what}, {model}]({os.path.basename(path)})", ""]
    lines += ["## Cost", "", f"{len(outcomes)} arms, {s.num_seeds} seeds each: "
              f"{sum(o.seconds for o in outcomes):.0f} s of compilation, training and "
              "evaluation."]
    return studies.write_report(s.workdir, lines)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
