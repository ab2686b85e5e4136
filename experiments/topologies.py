r"""Decentralized SGD over topologies: time to a target loss, consensus, measured B and bound.

    python -m experiments.topologies --workdir=DIR [--smoke]

Trains gossip SGD (`ej.gossip_sgd`, docs/theory.md section 10) on the bundled
digits for every topology (`--topologies`), node count (`--workers`), model
(`--models`) and split of the training set (`--partitions`: IID shards, or
Dirichlet non-IID shards over the labels), each configuration built by
`experiments.config.validate` (the launcher's `--algorithm=gossip`) and run
through `ej.run`, seeds one after another (seed `s` initialises the model with
`fold_in(key(s), 0)` and the algorithm with `fold_in(key(s), 1)`; the data split
is drawn from `--seed`). Every run is timed by a simulated clock (`ej.clock`,
docs/theory.md section 11): every node computes a gradient in `--compute_mean`
seconds, and a mixing round then costs each node `alpha + deg 32 d / beta` on
its uplink (`--latency` alpha, `--bandwidth` beta, `deg` the topology's degree,
`ej.topologies.degree`), so a topology pays for its neighbours in seconds.

Every `--eval_every` rounds it records, per seed, the training loss (mean
cross-entropy of the nodes' mean model over the first `--train_eval_size`
training samples), the test accuracy, the consensus distance
`(1/P) sum_i ||xbar - x_i||^2` (mean over the rounds since the last record), the
bits put on the wire so far and the simulated seconds (`time/elapsed`); over the
run, the largest `b_hat` against the bound, and both spectral gaps. The curves
are indexed by every axis of `AXES` (rounds, bits, simulated seconds): an axis is
one more column of `Curves.x`. The report gives means ± standard deviations over
seeds, which topology reached `--target_loss` first (in rounds, in bits and in
simulated seconds), and whether the spectral gap, or the measured consensus
distance, ordered the topologies.
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
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import problem as problem_lib
from experiments import studies
from experiments.flags import Flag, usage

MODULE = "experiments.topologies"
TOPOLOGIES = "ring,torus,exponential,one_peer_exponential,random_matching,complete"
FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md and the PNGs (created if missing; "
         "required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 6, num_seeds 2, workers 8, models "
         "mlp, partitions iid, topologies ring,random_matching, eval_every 3, batch_size 8, "
         "train_eval_size 256) unless those flags are given."),
    Flag("topologies", "names", TOPOLOGIES, "Topologies of the grid (ej.topologies.NAMES).",
         choices=ej.topologies.NAMES),
    Flag("workers", "ints", "16,64", "Node counts P of the grid.", 2, 4096),
    Flag("models", "names", "mlp,cnn", "Models on the digits.", choices=("mlp", "cnn")),
    Flag("partitions", "names", "iid,dirichlet", "Splits of the training set among the nodes.",
         choices=("iid", "dirichlet")),
    Flag("dirichlet_alpha", "float", 0.5, "Concentration of the Dirichlet split.", 0.0,
         lo_open=True),
    Flag("rounds", "int", 300, "Rounds of every run.", 1, 10_000_000),
    Flag("num_seeds", "int", 3, "Seeds per configuration (seed, seed + 1, ...).", 1, 1024),
    Flag("seed", "int", 0, "First seed; it also draws the data split.", 0, 2**31 - 1),
    Flag("learning_rate", "float", 0.1, "Learning rate eta (constant).", 0.0, 100.0,
         lo_open=True),
    Flag("batch_size", "int", 16, "Samples per node per round.", 1, 65_536),
    Flag("local_steps", "int", 1, "Rounds per mixing round.", 1, 100_000),
    Flag("eval_every", "int", 10, "Rounds between records.", 1, 1_000_000),
    Flag("target_loss", "float", 0.5, "Training loss whose first crossing is reported.", 0.0,
         lo_open=True),
    Flag("train_eval_size", "int", 2000, "Training samples the training loss is measured on "
         "(the first ones).", 1, 10_000_000),
    Flag("worker_loop", "enum", "auto", "How a round evaluates the nodes' gradients "
         "(ej.make_step's worker_loop).", choices=("auto", "map", "unroll", "vmap")),
    Flag("compute_mean", "float", 0.01, "Simulated seconds per gradient (constant, every "
         "node).", 0.0, 1e6, lo_open=True),
    Flag("latency", "float", 1e-4, "Network latency alpha, seconds per message.", 0.0, 1e6),
    Flag("bandwidth", "float", 1e8, "Network bandwidth beta, bits per second (a node's "
         "uplink; the ring's mixing round of the digits MLP then costs about half a "
         "gradient).", 0.0, lo_open=True),
)
SMOKE = {"rounds": 6, "num_seeds": 2, "workers": "8", "models": "mlp", "partitions": "iid",
         "topologies": "ring,random_matching", "eval_every": 3, "batch_size": 8,
         "train_eval_size": 256}
# The x axes of every curve: a record's round, the bits put on the wire up to it and the
# simulated seconds at its end.
AXES = {"round": "round", "bits": "bits on the wire (all nodes, cumulative)",
        "seconds": "simulated seconds (ej.clock)"}


class Point(NamedTuple):
    """One configuration of the grid."""

    model: str
    partition: str
    num_workers: int
    topology: str


def grid(s) -> list[Point]:
    return [Point(m, part, p, t) for m in s.models for part in s.partitions
            for p in s.workers for t in s.topologies]


def launcher_values(s, point: Point) -> dict[str, Any]:
    """The `experiments.train` flags of one configuration."""
    values = {"algorithm": "gossip", "topology": point.topology, "num_workers":
              point.num_workers, "local_steps": s.local_steps, "learning_rate":
              s.learning_rate, "batch_size": s.batch_size, "rounds": s.rounds, "model":
              point.model, "dataset": "digits", "partition": point.partition, "seed": s.seed,
              "workdir": s.workdir, "worker_loop": s.worker_loop, "compute": "constant",
              "compute_mean": s.compute_mean, "latency": s.latency, "bandwidth": s.bandwidth}
    if point.partition == "dirichlet":
        values["dirichlet_alpha"] = s.dirichlet_alpha
    return values


def check(s) -> list[tuple[Point, config_lib.Config]]:
    """Every configuration's launcher config, validated before anything compiles."""
    if "hypercube" in s.topologies:
        for p in s.workers:
            if p & (p - 1):
                raise usage("workers", p, "powers of two with hypercube in --topologies")
    return [(point, config_lib.validate(launcher_values(s, point))) for point in grid(s)]


class Curves(NamedTuple):
    """One configuration's records, `[seeds, records]` (`x`: the axes, `[records]`)."""

    # axis name (AXES) -> values at each record, the same for every seed (the bits every
    # round sends and the clock, one system shared by the seeds, do not depend on them)
    x: dict[str, np.ndarray]
    loss: np.ndarray  # training loss of the nodes' mean model
    accuracy: np.ndarray  # test accuracy of the nodes' mean model
    consensus: np.ndarray  # mean consensus distance since the previous record


class Outcome(NamedTuple):
    """One configuration over seeds."""

    point: Point
    curves: Curves
    max_b_hat: list[float]  # per seed, over the run
    bound: float  # B (the run's largest reported bound; inf: none)
    factor: float  # B / M, the topology's consensus constant (ej.topologies)
    spectral_gap: float
    norm_gap: float
    seconds: float


def train_loss_fn(model: str, size: int):
    """`params -> ` the mean cross-entropy over the first `size` training samples."""
    ds = data_lib.load_dataset("digits")
    module, _ = models_lib.make_model(model, ds.num_classes, ds.x_train.shape[1:])
    n = min(size, ds.y_train.shape[0])
    return lambda params: models_lib.evaluate(module, params, ds.x_train[:n], ds.y_train[:n])[0]


def run_point(point: Point, cfg: config_lib.Config, problem: problem_lib.Problem, train_loss,
              s) -> Outcome:
    """Every seed of one configuration, one after another."""
    alg = cfg.algorithm
    alg_init = jax.jit(alg.init)
    loop = config_lib.resolve_loop(cfg.flags, jax.default_backend())
    records = [r for r in range(1, s.rounds + 1) if r % s.eval_every == 0 or r == s.rounds]
    loss, accuracy, consensus, b_max, bits, elapsed = [], [], [], [], None, None
    bound = gaps = factor = None
    t0 = time.perf_counter()
    for seed in studies.seeds(s.seed, s.num_seeds):
        base = jax.random.key(seed)
        state = alg_init(problem.init_params(jax.random.fold_in(base, 0)),
                         jax.random.fold_in(base, 1))
        r, sent, seed_bits, seed_elapsed = 0, 0.0, [], []
        rows = ([], [], [], 0.0)
        for end in records:
            state, m = ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn,
                              rounds=end - r, has_aux=True, worker_loop=s.worker_loop,
                              loop=loop)
            m = jax.device_get(m)
            r = end
            sent += float(np.sum(np.asarray(m["comm/bits"], np.float64)))
            seed_bits.append(sent)
            seed_elapsed.append(float(m["time/elapsed"][-1]))
            params = ej.model(state)
            rows[0].append(train_loss(params))
            rows[1].append(problem.evaluate(params)["test/accuracy"])
            rows[2].append(float(np.mean(m["gossip/consensus_distance"])))
            rows = rows[:3] + (max(rows[3], float(np.max(m["consistency/b_hat"]))),)
            bound = max(bound or 0.0, float(np.max(m["consistency/bound"])))
            gaps = (float(m["gossip/spectral_gap"][-1]), float(m["gossip/norm_gap"][-1]))
            m_hat = float(m["grad_norm/max"][-1])
            factor = float(m["consistency/bound"][-1]) / m_hat if m_hat > 0 else None
        loss.append(rows[0])
        accuracy.append(rows[1])
        consensus.append(rows[2])
        b_max.append(rows[3])
        bits, elapsed = seed_bits, seed_elapsed
    curves = Curves({"round": np.asarray(records, np.float64), "bits": np.asarray(bits),
                     "seconds": np.asarray(elapsed)},
                    np.asarray(loss), np.asarray(accuracy), np.asarray(consensus))
    return Outcome(point, curves, b_max, bound, factor, *gaps, time.perf_counter() - t0)


def first_reached(o: Outcome, axis: str, target: float) -> list[float | None]:
    """Per seed, the first record's `axis` value with a training loss at or below `target`."""
    return studies.first_reached(o.curves.loss, o.curves.x[axis], target)


def run_grid(s) -> list[Outcome]:
    configs = check(s)
    problems, losses, outcomes = {}, {}, []
    progress = studies.Progress(len(configs))
    for point, cfg in configs:
        key = (point.model, point.partition, point.num_workers)
        if key not in problems:  # The data split does not depend on the topology.
            problems[key] = problem_lib.load_problem(cfg.flags)
        if point.model not in losses:
            losses[point.model] = train_loss_fn(point.model, s.train_eval_size)
        outcomes.append(run_point(point, cfg, problems[key], losses[point.model], s))
        progress.step(f"{point.model}, {point.partition}, P={point.num_workers}, "
                      f"{point.topology}")
    return outcomes


# ------------------------------------------------------------------ the report


def groups(outcomes: list[Outcome]) -> dict[tuple, list[Outcome]]:
    """`(model, partition, P) -> outcomes`, in grid order."""
    out: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        out.setdefault(o.point[:3], []).append(o)
    return out


# What may predict the order of the topologies: name -> (outcome -> a score where higher
# should mean ahead, the pair's wording).
PREDICTORS = {
    "spectral gap": (lambda o: o.spectral_gap, "the wider gap"),
    "consensus distance": (lambda o: -float(np.mean(o.curves.consensus)),
                           "the smaller mean consensus distance"),
}


class Ordering(NamedTuple):
    """How a predictor ranked the topologies of one group, pair by pair."""

    ordered: int  # the predicted one ahead, beyond the seeds' spread
    reversed: int  # the other one ahead, beyond the spread
    within: int  # the difference within the spread
    measure: str  # what was compared
    reversed_pairs: tuple[str, ...] = ()  # "X ahead of Y" for each reversed pair


def ordering(group: list[Outcome], target: float, predictor: str = "spectral gap") -> Ordering:
    """Every pair of topologies the predictor tells apart (by more than 1e-9 relative),
    compared on the rounds to the target when every seed of the group reached it (else on
    the final training loss): "ahead" beyond the spread when the two `mean ± std`
    intervals do not overlap."""
    predict = PREDICTORS[predictor][0]
    reached = {o.point.topology: first_reached(o, "round", target) for o in group}
    by_rounds = all(None not in v for v in reached.values())
    score = {o.point.topology: studies.mean_std(reached[o.point.topology] if by_rounds
                                                else o.curves.loss[:, -1]) for o in group}
    counts, reversed_pairs = [0, 0, 0], []
    for a, b in itertools.combinations(group, 2):
        if abs(predict(a) - predict(b)) <= 1e-9 * max(abs(predict(a)), abs(predict(b))):
            continue
        first, second = (a, b) if predict(a) > predict(b) else (b, a)
        (m1, s1), (m2, s2) = score[first.point.topology], score[second.point.topology]
        kind = 0 if m1 + s1 < m2 - s2 else 1 if m1 - s1 > m2 + s2 else 2
        counts[kind] += 1
        if kind == 1:
            reversed_pairs.append(f"{second.point.topology} ahead of {first.point.topology}")
    return Ordering(*counts, "rounds to the target" if by_rounds else "final training loss",
                    tuple(reversed_pairs))


def findings(outcomes: list[Outcome], s) -> list[str]:
    """Per group: who reached the target first (rounds, bits, simulated seconds), and the
    spectral gap's order."""
    lines = []
    for (model, partition, p), group in groups(outcomes).items():
        parts = []
        for axis, unit in (("round", "rounds"), ("bits", "bits"),
                           ("seconds", "simulated seconds")):
            first = studies.first_to_target(
                {o.point.topology: first_reached(o, axis, s.target_loss) for o in group},
                unit, "first to the target in")
            if first is None:
                parts.append(f"no topology reached the target loss {s.target_loss:g} on "
                             "every seed")
                break
            parts.append(first)
        for predictor, (_, wording) in PREDICTORS.items():
            o = ordering(group, s.target_loss, predictor)
            pairs = o.ordered + o.reversed + o.within
            verdict = (f"no two topologies differ in {predictor}" if not pairs else
                       f"the {predictor} ordered them" if o.ordered == pairs else
                       f"the {predictor} did not order them" if o.reversed else
                       f"consistent with the {predictor} where they differed" if o.ordered
                       else "no pair differed beyond the seeds' spread")
            parts.append(f"{verdict}: of {pairs} pairs, {wording} was ahead in {o.measure} "
                         f"beyond the seeds' spread in {o.ordered}, behind in {o.reversed}" + (
                             f" ({', '.join(o.reversed_pairs)})" if o.reversed else "") +
                         f", within the spread in {o.within}")
        lines.append(f"- {model}, {partition}, P = {p}: " + "; ".join(parts) + ".")
    return lines


def _ratio(o: Outcome) -> str:
    if not np.isfinite(o.bound):
        return "n/a (no bound)"
    if o.bound == 0:
        return "n/a (B = 0)"
    return studies.fmt(max(o.max_b_hat) / o.bound, 3)


def topology_table(outcomes: list[Outcome]) -> list[str]:
    seen, rows = set(), []
    for o in outcomes:
        key = (o.point.topology, o.point.num_workers)
        if key in seen:
            continue
        seen.add(key)
        rounds, seconds = o.curves.x["round"][-1], o.curves.x["seconds"][-1]
        rows.append((o.point.topology, o.point.num_workers, studies.fmt(o.spectral_gap),
                     studies.fmt(o.norm_gap), "inf" if o.factor is None or not np.isfinite(
                         o.bound) else studies.fmt(o.factor),
                     ej.topologies.degree(ej.topologies.mixing(*key)),
                     studies.fmt(seconds / rounds)))
    return studies.markdown_table(("topology", "P", "spectral gap 1 - |lambda_2|",
                                   "norm gap 1 - ||W - J||", "B* / M", "deg",
                                   "simulated s / round"), rows)


def outcome_table(outcomes: list[Outcome], target: float) -> list[str]:
    header = ("model", "partition", "P", "topology", "final train loss", "test accuracy",
              "rounds to target", "bits to target", "seconds to target",
              "mean consensus distance", "max b_hat", "bound", "max b_hat / bound")
    rows = [(o.point.model, o.point.partition, o.point.num_workers, o.point.topology,
             studies.fmt_mean_std(o.curves.loss[:, -1]),
             studies.fmt_mean_std(o.curves.accuracy[:, -1], 3),
             studies.reached_text(first_reached(o, "round", target)),
             studies.reached_text(first_reached(o, "bits", target)),
             studies.reached_text(first_reached(o, "seconds", target)),
             studies.fmt_mean_std(o.curves.consensus.mean(axis=1), 3),
             studies.fmt_mean_std(o.max_b_hat, 3), studies.fmt(o.bound), _ratio(o))
            for o in outcomes]
    return studies.markdown_table(header, rows)


def plot_curves(outcomes: list[Outcome], model: str, partition: str, what: str, s,
                path: str) -> str:
    """`what` ("loss" or "accuracy") against every axis (seconds on a log scale), a row per
    P."""
    sel = [o for o in outcomes if o.point.model == model and o.point.partition == partition]
    workers = sorted({o.point.num_workers for o in sel})
    fig, axes = studies.figure(len(workers), len(AXES), (5.5, 3.8))
    colors = {t: f"C{i}" for i, t in enumerate(s.topologies)}
    ylabel = {"loss": "training loss of the mean model", "accuracy": "test accuracy"}[what]
    for (i, p), (j, axis) in itertools.product(enumerate(workers), enumerate(AXES)):
        ax = axes[i, j]
        for o in sel:
            if o.point.num_workers != p:
                continue
            y = getattr(o.curves, what)
            x = o.curves.x[axis]
            ax.plot(x, y.mean(0), color=colors[o.point.topology],
                    label=f"{o.point.topology} (gap {o.spectral_gap:.3g})")
            ax.fill_between(x, y.min(0), y.max(0), color=colors[o.point.topology], alpha=0.12,
                            lw=0)
        if what == "loss":
            ax.axhline(s.target_loss, color="grey", lw=0.8, ls=":", label="target loss")
            ax.set_yscale("log")
        if axis == "seconds":  # a round's seconds differ by up to the degree's ratio
            ax.set_xscale("log")
        ax.set(xlabel=AXES[axis], ylabel=ylabel + "\n(mean over seeds; band: min to max)")
        ax.set_title(f"{model}, {partition}, P={p}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    return studies.save_figure(fig, path)


def plot_consistency(outcomes: list[Outcome], s, path: str) -> str:
    """Consensus distance against rounds, and measured `B` against its bound, per P."""
    workers = sorted({o.point.num_workers for o in outcomes})
    fig, axes = studies.figure(len(workers), 2, (6.0, 3.8))
    colors = {t: f"C{i}" for i, t in enumerate(s.topologies)}
    for i, p in enumerate(workers):
        sel = [o for o in outcomes if o.point.num_workers == p]
        left, right = axes[i, 0], axes[i, 1]
        styles = {key: ls for key, ls in zip(
            sorted({o.point[:2] for o in sel}), ("-", "--", ":", "-."), strict=False)}
        for o in sel:
            left.plot(o.curves.x["round"], o.curves.consensus.mean(0), styles[o.point[:2]],
                      color=colors[o.point.topology],
                      label=f"{o.point.topology}, {o.point.model}, {o.point.partition}")
        # A topology that averages exactly (complete) disagrees by rounding only (~1e-12):
        # the axis starts below the others' smallest value.
        means = np.concatenate([o.curves.consensus.mean(0) for o in sel])
        floor = means[means > 1e-9 * means.max()].min() / 3
        left.set(yscale="log", ylim=(floor, None), xlabel="round",
                 ylabel="consensus distance\n(1/P) sum_i ||xbar - x_i||^2, mean over seeds")
        left.set_title(f"P={p}: consensus distance (rounding-level curves below the axis)",
                       fontsize=10)
        left.grid(alpha=0.3)
        left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
                    frameon=False)
        names = [t for t in s.topologies if any(o.point.topology == t for o in sel)]
        x = np.arange(len(names))
        measured = [max(max(o.max_b_hat) for o in sel if o.point.topology == t) for t in names]
        bounds = [max(o.bound for o in sel if o.point.topology == t) for t in names]
        right.bar(x - 0.2, measured, 0.4, label="max b_hat (all seeds and runs)")
        right.bar(x + 0.2, [b if np.isfinite(b) else 0 for b in bounds], 0.4,
                  label="bound B (no bar: inf, or 0 for complete)")
        right.set_xticks(x, [t.replace("_", "\n") for t in names], fontsize=8)
        right.set(yscale="log", ylabel="b_hat and its bound")
        right.set_title(f"P={p}: measured B against the bound", fontsize=10)
        right.grid(alpha=0.3, axis="y")
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
                     frameon=False)
    return studies.save_figure(fig, path)


def reductions(s) -> list[str]:
    """How the settings differ from the study's reference grid."""
    return studies.reductions(FLAGS, s, {
        f.name: f.default for f in FLAGS
        if f.name in ("topologies", "workers", "models", "partitions")})


def run(s, invocation=None) -> str:
    """Runs the grid and writes the report; returns its path."""
    start = time.perf_counter()
    outcomes = run_grid(s)
    return write(s, outcomes, time.perf_counter() - start, invocation)


def write(s, outcomes: list[Outcome], seconds: float, invocation) -> str:
    lines = studies.header("Decentralized SGD over topologies", MODULE, FLAGS, s, invocation,
                           seconds)
    lines += [
        f"Gossip SGD (`ej.gossip_sgd`, docs/theory.md section 10; constant learning rate "
        f"{s.learning_rate:g}, batch {s.batch_size} per node, {s.local_steps} round(s) per "
        f"mixing round, {s.rounds} rounds) on the bundled digits; seeds "
        f"{s.seed}..{s.seed + s.num_seeds - 1} run one after another. Every "
        f"{s.eval_every} rounds: the training loss (mean cross-entropy of the nodes' mean "
        f"model over the first {s.train_eval_size} training samples), the test accuracy, "
        "the mean consensus distance since the previous record, the bits every node put "
        "on the wire (one model of 32 d bits per node per mixing round) and the "
        "simulated seconds (`time/elapsed`). The clock (`ej.clock`, docs/theory.md section "
        f"11): every node computes a gradient in {s.compute_mean:g} s, then a mixing round "
        f"costs it alpha + deg 32 d / beta on its uplink (latency alpha = {s.latency:g} s, "
        f"bandwidth beta = {s.bandwidth:g} bit/s, `deg` its topology's degree, "
        "`ej.topologies.degree`); rounds between mixing rounds compute only. Values are "
        f"mean ± standard deviation over seeds; the target loss is {s.target_loss:g}.",
        "",
    ]
    cut = reductions(s)
    if cut:
        lines += ["**A reduced grid**: " + "; ".join(cut) + ".", ""]
    lines += ["## Findings", ""] + findings(outcomes, s)
    lines += ["", "## The topologies", ""] + topology_table(outcomes)
    lines += ["", "`B* / M`: the exact consensus constant per unit gradient bound "
              "(`ej.topologies.consensus_factor`); the bound a round reports is it times "
              "the running maximum of the gradient norms. `deg`: the most neighbours a node "
              "sends its model to in a mixing round; `simulated s / round`: the clock's "
              "seconds over the run, per round.", ""]
    lines += ["## Every configuration", ""] + outcome_table(outcomes, s.target_loss)
    lines += ["", "## Plots", ""]
    for model, partition in itertools.product(s.models, s.partitions):
        for what in ("loss", "accuracy"):
            path = plot_curves(outcomes, model, partition, what, s, os.path.join(
                s.workdir, f"{what}_{model}_{partition}.png"))
            lines += [f"![{what} against rounds, bits and simulated seconds, {model}, "
                      f"{partition}]({os.path.basename(path)})", ""]
    path = plot_consistency(outcomes, s, os.path.join(s.workdir, "consistency.png"))
    lines += [f"![consensus distance and B]({os.path.basename(path)})", "",
              "## Cost", "",
              f"{len(outcomes)} configurations, {s.num_seeds} seeds each: "
              f"{sum(o.seconds for o in outcomes):.0f} s of compilation, training and "
              "evaluation."]
    return studies.write_report(s.workdir, lines)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
