r"""Does error feedback help sparsified asynchronous SGD? Top-k async SGD with and without EF.

    python -m experiments.error_feedback_study --workdir=DIR [--smoke]

Nadiradze et al. (arXiv:2001.05918) report that error feedback "may not
necessarily help" Top-k sparsified *asynchronous* SGD: it removes the
compressor's bias but raises the elastic consistency constant `B` by a term of
order `(d/k) M` (docs/theory.md section 3). For every Top-k fraction
(`--k_fractions`), worker count `P` (`--workers`), largest staleness
(`--delays`, in updates, in terms of `P`: `P-1`, `2P`) and momentum
(`--momenta`: heavy ball at the workers, so error feedback acts on the
momentum) this trains asynchronous SGD (otherwise `experiments.train`'s
defaults) with EF14 and without, the small CNN on the bundled digits (and
ResNet-20 on CIFAR-10 when `--data_dir` holds `cifar-10-batches-bin`). Since
the question is asked with momentum in practice, a synchronous panel
(`--sync_panel`) compares EF14 with EF21 for every `k`, `P` and momentum, the
momentum at the server (error feedback before momentum, docs/theory.md section
9). An arm with momentum `mu` runs at the learning rate `(1 - mu) eta`, so
that its effective rate `eta / (1 - mu)` is the plain arms' `eta`. Each
configuration is `experiments.config.validate`'s on the launcher's problem (the
EF21 arm's algorithm is built from the same flags). An asynchronous
configuration's two arms and every seed are one `ej.sweep` over the
error-feedback damping `beta` in {0, 1} (`beta = 0` is no error feedback: the
residual stays zero and the update is `C(u)` exactly, docs/theory.md section
4); a synchronous arm's seeds are one `ej.sweep` of their own (EF14 and EF21
differ in their chains, not in a float). Each sweep runs as one batched program
or one run after another by the library's rule (the CNN on the CPU: one after
another); seed `s` initialises the model with `fold_in(key(s), 0)` and the
algorithm with `fold_in(key(s), 1)`, the data split is drawn from `--seed`.

Measured, as mean ± std over seeds: the final training loss of the actual model
(over at most `--train_eval_size` training samples), the test accuracy, the
rounds to `--target_loss` (checked every `--eval_every` rounds) and the largest
`b_hat`. EF's final loss is "lower" ("higher") when the two `mean ± std`
intervals do not overlap. `report.md` and PNG plots go to `--workdir`.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from matplotlib.patches import Patch

import elastic_jax as ej
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import problem as problem_lib
from experiments import studies
from experiments.flags import Flag, usage

MODULE = "experiments.error_feedback_study"
# The reference grid of the study: a run on another grid reports how it differs.
REFERENCE_GRID = {"k_fractions": "0.001,0.01,0.1", "workers": "4,8", "delays": "P-1,2P",
                  "momenta": "0,0.9", "sync_panel": "true"}
FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md and the PNGs (created if missing; "
         "required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 12, num_seeds 2, k_fractions "
         "0.01, workers 2, delays P-1, momenta 0.9, batch_size 8, eval_every 4, model mlp) "
         "unless those flags are given."),
    Flag("rounds", "int", 250, "Rounds of every run.", 1, 10_000_000),
    Flag("num_seeds", "int", 3, "Seeds per configuration (seed, seed + 1, ...).", 1, 1024),
    Flag("seed", "int", 0, "First seed; it also draws the data split.", 0, 2**31 - 1),
    Flag("k_fractions", "floats", "0.001,0.01,0.1", "Top-k fractions of the grid.", 0.0, 1.0,
         lo_open=True),
    Flag("workers", "ints", "4,8", "Worker counts P of the grid.", 1, 4096),
    Flag("delays", "delays", "P-1,2P", "Largest staleness in updates, per P (async needs "
         ">= P - 1 for every P of the grid)."),
    Flag("momenta", "floats", "0,0.9", "Heavy-ball momenta mu of the grid: at the workers in "
         "the async arms, at the server in the sync panel; an arm with momentum mu runs at "
         "the learning rate (1 - mu) --learning_rate (the same effective rate).", 0.0, 1.0,
         hi_open=True),
    Flag("sync_panel", "bool", True, "Also run synchronous Top-k SGD with EF14 and with EF21 "
         "for every k, P and momentum (momentum at the server)."),
    Flag("learning_rate", "float", 0.05, "Learning rate eta (constant) of the arms without "
         "momentum.", 0.0, 100.0, lo_open=True),
    Flag("batch_size", "int", 32, "Samples per worker per round.", 1, 65_536),
    Flag("reads", "enum", "inconsistent", "Stale reads: one lag per update (consistent) or per "
         "coordinate (inconsistent, experiments.train's default).",
         choices=("consistent", "inconsistent")),
    Flag("delay", "enum", "uniform", "Delay law of the lags (experiments.train's default: "
         "uniform).", choices=("fixed", "uniform", "geometric")),
    Flag("model", "enum", "cnn", "Model on the digits (CIFAR-10 always uses resnet20).",
         choices=("cnn", "mlp")),
    Flag("target_loss", "float", 0.1, "Training loss whose first crossing is reported.", 0.0,
         lo_open=True),
    Flag("eval_every", "int", 10, "Rounds between training-loss evaluations.", 1, 1_000_000),
    Flag("train_eval_size", "int", 10_000, "Training samples the training loss is measured on "
         "(the first ones).", 1, 10_000_000),
    Flag("data_dir", "str", "", "A directory; when it holds cifar-10-batches-bin the grid also "
         "runs CIFAR-10 with ResNet-20."),
    Flag("compare_seed_batching", "bool", False, "Also time the largest asynchronous "
         "configuration's sweep (both arms, every seed) run one after another against one "
         "batched program (extra compilations)."),
    Flag("worker_loop", "enum", "auto", "How a round evaluates the workers' gradients "
         "(ej.make_step's worker_loop; auto: the library picks the fastest for the model and "
         "backend).", choices=("auto", "map", "unroll", "vmap")),
)
SMOKE = {"rounds": 12, "num_seeds": 2, "k_fractions": "0.01", "workers": "2",
         "delays": "P-1", "momenta": "0.9", "batch_size": 8, "eval_every": 4, "model": "mlp"}


FEEDBACK = {"async": ("none", "EF14"), "sync": ("EF14", "EF21")}  # the arms compared


class Point(NamedTuple):
    """One configuration of the grid."""

    dataset: str
    model: str
    algorithm: str  # "async" (momentum at the workers) or "sync" (momentum at the server)
    k: float
    num_workers: int
    max_delay: int  # 0 for sync
    momentum: float
    feedback: str  # one of FEEDBACK[algorithm]


def datasets(s) -> list[tuple[str, str]]:
    """`(dataset, model)` pairs: digits, and CIFAR-10 where `--data_dir` holds it."""
    out = [("digits", s.model)]
    if s.data_dir and os.path.isdir(os.path.join(s.data_dir, "cifar-10-batches-bin")):
        out.append(("cifar10", "resnet20"))
    return out


def grid(s) -> list[Point]:
    """The async arms, then (with `--sync_panel`) the sync panel's."""
    points = [Point(dataset, model, "async", k, p, delay(p), mu, feedback)
              for dataset, model in datasets(s) for k in s.k_fractions for p in s.workers
              for delay in s.delays for mu in s.momenta for feedback in FEEDBACK["async"]]
    if s.sync_panel:
        points += [Point(dataset, model, "sync", k, p, 0, mu, feedback)
                   for dataset, model in datasets(s) for k in s.k_fractions
                   for p in s.workers for mu in s.momenta for feedback in FEEDBACK["sync"]]
    return points


def launcher_values(s, point: Point) -> dict[str, Any]:
    """The `experiments.train` flags of one configuration (the EF21 arm: its EF14 arm's)."""
    values = {"algorithm": point.algorithm, "num_workers": point.num_workers,
              "compressor": "top_k", "k_fraction": point.k,
              "error_feedback": point.feedback != "none", "momentum": point.momentum,
              "learning_rate": s.learning_rate * (1.0 - point.momentum),
              "batch_size": s.batch_size, "rounds": s.rounds, "model": point.model,
              "dataset": point.dataset, "seed": s.seed, "workdir": s.workdir,
              "worker_loop": s.worker_loop}
    if point.algorithm == "async":
        values.update(max_delay=point.max_delay, delay=s.delay, reads=s.reads)
    else:
        values["optimizer_placement"] = "server"
    return values if point.dataset == "digits" else {**values, "data_dir": s.data_dir}


def make_algorithm(point: Point, f: Mapping[str, Any], **hparams) -> ej.Algorithm:
    """One arm's algorithm from its launcher flags `f`, the `make_algorithm` of its sweep.

    `experiments.config.make_algorithm(f, **hparams)` (a swept `beta` in place of
    `--ef_beta`); the EF21 arm, which the launcher does not build, is synchronous SGD
    with the chain `ej.chain(ej.ef21(top_k), ej.sgd(momentum))` and the momentum at
    the server, at `--learning_rate`, and takes no `hparams`.
    """
    if point.feedback != "EF21":
        return config_lib.make_algorithm(f, **hparams)
    if hparams:
        raise ValueError(f"hparams: got {sorted(hparams)}; expected none for the EF21 arm")
    rule = ej.chain(ej.ef21(ej.top_k(fraction=point.k)), ej.sgd(momentum=f["momentum"]))
    return ej.sync_sgd(f["learning_rate"], f["num_workers"], rule=rule,
                       optimizer_placement="server")


def configure(s, point: Point) -> config_lib.Config:
    """The launcher's config of one configuration; EF21's algorithm is built from its flags."""
    cfg = config_lib.validate(launcher_values(s, point))
    if point.feedback != "EF21":
        return cfg
    return cfg._replace(algorithm=make_algorithm(point, cfg.flags))


def check(s) -> list[tuple[Point, config_lib.Config]]:
    """Every configuration's launcher config, validated before anything compiles."""
    for delay in s.delays:
        for p in s.workers:
            if delay(p) < p - 1:
                raise usage("delays", str(delay), f"delays >= P - 1 for every P in --workers "
                            f"(P = {p} gives {delay(p)})")
    return [(point, configure(s, point)) for point in grid(s)]


class Outcome(NamedTuple):
    """One configuration over seeds."""

    point: Point
    final_loss: list[float]  # training loss of the actual model, per seed
    test_accuracy: list[float]
    rounds_to_target: list[int | None]
    max_b_hat: list[float]
    eval_rounds: list[int]
    curves: np.ndarray  # [seeds, evaluations] training loss
    seconds: float  # every seed, compilation included (its share of its arms' sweep)
    execution: str  # how the sweep ran: "batched" or "sequential"


def train_loss_fn(dataset: str, model: str, s):
    """`params -> ` the loss over the first `--train_eval_size` training samples."""
    ds = data_lib.load_dataset(dataset, s.data_dir or None)
    module, _ = models_lib.make_model(model, ds.num_classes, ds.x_train.shape[1:])
    n = min(s.train_eval_size, ds.y_train.shape[0])
    return lambda params: models_lib.evaluate(module, params, ds.x_train[:n], ds.y_train[:n])[0]


BETAS = (0.0, 1.0)  # the error-feedback damping of the async arms: none, EF14
Arms = tuple[tuple[Point, ...], config_lib.Config, dict]  # points, config, hparams of a sweep


def sweeps(configs: list[tuple[Point, config_lib.Config]]) -> list[Arms]:
    """The grid as sweeps, in grid order: `(the arms' points, config, hparams)`.

    An asynchronous configuration's two arms are one sweep over `beta` in `BETAS` on its
    EF14 arm's config (`beta = 0`: no error feedback); each synchronous arm's seeds are
    a sweep of their own (`{}`: EF14 and EF21 differ in their chains, not in a float).
    """
    out, rest = [], list(configs)
    while rest:
        point, cfg = rest.pop(0)
        if point.algorithm == "async":
            on, cfg = rest.pop(0)  # the EF14 arm follows the one without EF
            out.append(((point, on), cfg, {"beta": BETAS}))
        else:
            out.append(((point,), cfg, {}))
    return out


def _sweep(cfg: config_lib.Config, problem: problem_lib.Problem, s, make, hparams, start,
           rounds: int, execution: str = "auto") -> ej.Sweep:
    """`rounds` rounds of every point of `hparams` and every seed, from `start` (the
    model's initialiser, or the previous sweep)."""
    return ej.sweep(make, problem.loss_fn, start, hparams,
                    seeds=studies.seeds(s.seed, s.num_seeds), batch_fn=problem.batch_fn,
                    rounds=rounds, has_aux=True, execution=execution,
                    loop=config_lib.resolve_loop(cfg.flags, jax.default_backend()),
                    worker_loop=s.worker_loop)


def _seed(state: ej.State, j: int) -> ej.State:
    return jax.tree.map(lambda x: x[j], state)


def run_arms(points: tuple[Point, ...], cfg: config_lib.Config, hparams: dict,
             problem: problem_lib.Problem, train_loss, s) -> list[Outcome]:
    """The arms of one sweep (`sweeps`), every seed: one sweep, continued between
    evaluations; the sweep's points are the arms, in order."""
    make = functools.partial(make_algorithm, points[-1], cfg.flags)
    eval_rounds = [r for r in range(1, s.rounds + 1) if r % s.eval_every == 0 or r == s.rounds]
    t0 = time.perf_counter()
    result, r, curves = problem.init_params, 0, []
    b_hat = np.zeros((len(points), s.num_seeds))
    for end in eval_rounds:
        result = _sweep(cfg, problem, s, make, hparams, result, end - r)
        r = end
        b_hat = np.maximum(b_hat, np.asarray(result.metrics["consistency/b_hat"]).max(-1)
                           .reshape(b_hat.shape))
        curves.append([[train_loss(ej.model(_seed(state, j))) for j in range(s.num_seeds)]
                       for state in result.states])
    curves = np.asarray(curves).transpose(1, 2, 0)  # [arm, seed, evaluation]
    seconds = (time.perf_counter() - t0) / len(points)  # (the arms share the sweep)
    outcomes = []
    for arm, (point, state) in enumerate(zip(points, result.states, strict=True)):
        accuracy = [problem.evaluate(ej.model(_seed(state, j)))["test/accuracy"]
                    for j in range(s.num_seeds)]
        reached = []
        for curve in curves[arm]:
            hit = [t for t, loss in zip(eval_rounds, curve, strict=True) if loss <= s.target_loss]
            reached.append(hit[0] if hit else None)
        outcomes.append(Outcome(point, [float(x) for x in curves[arm, :, -1]], accuracy,
                                reached, b_hat[arm].tolist(), eval_rounds, curves[arm],
                                seconds, result.execution))
    return outcomes


class Batching(NamedTuple):
    """The configuration's sweep one run after another against one batched program: the
    first call's seconds (compilation included) and the milliseconds per seed and round
    (both arms) of a second call."""

    point: Point
    rounds: int
    sequential_compile_s: float
    sequential_ms: float
    batched_compile_s: float
    batched_ms: float


def seed_batching(point: Point, cfg: config_lib.Config, problem: problem_lib.Problem, s,
                  rounds: int = 20) -> Batching:
    """Times `rounds` rounds of an async configuration's sweep both ways (after a first
    call each)."""
    timings = []
    for execution in ("sequential", "batched"):
        make = functools.partial(make_algorithm, point, cfg.flags)
        hparams = {"beta": BETAS}
        t0 = time.perf_counter()
        result = _sweep(cfg, problem, s, make, hparams, problem.init_params, rounds, execution)
        jax.block_until_ready(result.metrics)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(_sweep(cfg, problem, s, make, hparams, result, rounds,
                                     execution).metrics)
        runs = len(BETAS) * s.num_seeds
        timings += [compile_s, 1000 * (time.perf_counter() - t0) / (rounds * runs)]
    return Batching(point, rounds, *timings)


def _executions(outcomes: list[Outcome]) -> str:
    words = {"batched": "as one batched program", "sequential": "one run after another"}
    return " or ".join(words[e] for e in sorted({o.execution for o in outcomes}))


def run_grid(s) -> list[Outcome]:
    groups = sweeps(check(s))
    problems, losses, outcomes = {}, {}, []
    progress = studies.Progress(len(groups))
    for points, cfg, hparams in groups:
        point = points[-1]
        key = (point.dataset, point.model, point.num_workers)
        if key not in problems:  # The data split depends on P only, not on the algorithm.
            problems[key] = problem_lib.load_problem(cfg.flags)
        if key[:2] not in losses:
            losses[key[:2]] = train_loss_fn(point.dataset, point.model, s)
        outcomes += run_arms(points, cfg, hparams, problems[key], losses[key[:2]], s)
        delay = f", max_delay={point.max_delay}" if point.algorithm == "async" else ""
        arms = " and ".join(p.feedback for p in points)
        progress.step(f"{point.dataset}, {point.algorithm}, k={point.k:g}, P={point.num_workers}"
                      f"{delay}, momentum {point.momentum:g}, {arms}")
    return outcomes


class Comparison(NamedTuple):
    """Two arms of one configuration: `with_ef` (EF14; EF21 in the sync panel) against
    `without` (no EF; EF14 in the sync panel)."""

    dataset: str
    k: float
    num_workers: int
    max_delay: int
    momentum: float
    without: Outcome
    with_ef: Outcome
    verdict: str  # "lower", "higher" or "within"


def verdict(on: Outcome, off: Outcome) -> str:
    """`on`'s final training loss against `off`'s.

    `lower` (`higher`): `on`'s `mean + std` is below the other's `mean - std` (its
    `mean - std` above the other's `mean + std`); otherwise `within` the spread;
    `one seed` when there is no spread to compare against.
    """
    m_on, s_on = studies.mean_std(on.final_loss)
    m_off, s_off = studies.mean_std(off.final_loss)
    if min(len(on.final_loss), len(off.final_loss)) < 2:
        return "one seed"  # no spread to compare against
    if m_on + s_on < m_off - s_off:
        return "lower"
    if m_on - s_on > m_off + s_off:
        return "higher"
    return "within"


def compare(outcomes: list[Outcome], algorithm: str = "async") -> list[Comparison]:
    """Pairs the two arms of every configuration of `algorithm`: async EF14 against no EF,
    sync EF21 against EF14; the verdict on the second arm's final training loss."""
    off_arm, on_arm = FEEDBACK[algorithm]
    out = []
    for on in outcomes:
        if on.point.algorithm != algorithm or on.point.feedback != on_arm:
            continue
        off = next(o for o in outcomes if o.point == on.point._replace(feedback=off_arm))
        p = on.point
        out.append(Comparison(p.dataset, p.k, p.num_workers, p.max_delay, p.momentum, off, on,
                              verdict(on, off)))
    return out


def _reached(o: Outcome) -> str:
    hits = [r for r in o.rounds_to_target if r is not None]
    if len(hits) < len(o.rounds_to_target):
        return f"not reached ({len(hits)}/{len(o.rounds_to_target)} seeds did)"
    return studies.fmt_mean_std(hits, 3)


def outcome_table(outcomes: list[Outcome]) -> list[str]:
    header = ("dataset", "algorithm", "k", "P", "max_delay", "momentum", "feedback",
              "final train loss", "test accuracy", "rounds to target", "max b_hat")
    rows = [(o.point.dataset, o.point.algorithm, f"{o.point.k:g}", o.point.num_workers,
             o.point.max_delay if o.point.algorithm == "async" else "-",
             f"{o.point.momentum:g}", o.point.feedback, studies.fmt_mean_std(o.final_loss),
             studies.fmt_mean_std(o.test_accuracy, 3), _reached(o),
             studies.fmt_mean_std(o.max_b_hat, 3)) for o in outcomes]
    return studies.markdown_table(header, rows)


# The comparison table's last four columns, per algorithm.
COLUMNS = {"async": ("loss without EF", "loss with EF", "EF - no EF", "EF's loss vs the spread"),
           "sync": ("loss with EF14", "loss with EF21", "EF21 - EF14",
                    "EF21's loss vs the spread")}


def comparison_table(comparisons: list[Comparison], algorithm: str = "async") -> list[str]:
    delay = ("max_delay",) if algorithm == "async" else ()
    header = ("dataset", "k", "P", *delay, "momentum", *COLUMNS[algorithm])
    rows = []
    for c in comparisons:
        diff = np.mean(c.with_ef.final_loss) - np.mean(c.without.final_loss)
        rows.append((c.dataset, f"{c.k:g}", c.num_workers,
                     *((c.max_delay,) if algorithm == "async" else ()), f"{c.momentum:g}",
                     studies.fmt_mean_std(c.without.final_loss),
                     studies.fmt_mean_std(c.with_ef.final_loss), f"{diff:+.4g}", c.verdict))
    return studies.markdown_table(header, rows)


def finding(comparisons: list[Comparison]) -> list[str]:
    """What was measured about the paper's finding, from the verdicts alone."""
    n = len(comparisons)
    if any(c.verdict == "one seed" for c in comparisons):
        return ["One seed per configuration: there is no spread to judge the differences "
                "against (rerun with --num_seeds >= 2); see the table for the values."]
    count = {v: sum(c.verdict == v for c in comparisons) for v in ("lower", "within", "higher")}
    lines = [f"Error feedback's final training loss was lower than without it beyond the "
             f"seeds' spread in {count['lower']} of {n} configurations, higher beyond the "
             f"spread in {count['higher']}, and within the spread in {count['within']}."]
    groups = [("k", k, [c.verdict for c in comparisons if c.k == k])
              for k in sorted({c.k for c in comparisons})]
    momenta = sorted({c.momentum for c in comparisons})
    groups += [("momentum", mu, [c.verdict for c in comparisons if c.momentum == mu])
               for mu in momenta if len(momenta) > 1]
    for name, value, sel in groups:
        lines.append(f"- {name} = {value:g}: EF lower in {sel.count('lower')}, within the "
                     f"spread in {sel.count('within')}, higher in {sel.count('higher')} of "
                     f"{len(sel)}.")
    faster = slower = 0
    for c in comparisons:
        on, off = c.with_ef.rounds_to_target, c.without.rounds_to_target
        on_all, off_all = None not in on, None not in off
        faster += on_all and (not off_all or np.mean(on) < np.mean(off))
        slower += off_all and (not on_all or np.mean(off) < np.mean(on))
    ratios = [np.mean(c.with_ef.max_b_hat) / np.mean(c.without.max_b_hat) for c in comparisons]
    lines += [f"- Rounds to the target loss (every seed must reach it; fewer on average wins): "
              f"EF faster in {faster}, slower in {slower}, tied or neither reached it in "
              f"{n - faster - slower} of {n}.",
              f"- Measured `B` (max `b_hat`, mean over seeds): higher with EF in "
              f"{sum(r > 1 for r in ratios)} of {n} configurations (EF / no EF from "
              f"{min(ratios):.2g} to {max(ratios):.2g}); docs/theory.md section 5 prices error "
              "feedback at `M (max_delay (1 + rho) + P rho)` against `max_delay mu` without it.",
              ""]
    rest = [c for c in comparisons if c.verdict != "lower"]
    ks = ", ".join(f"{k:g}" for k in sorted({c.k for c in rest}))
    paper = "the paper's finding that error feedback need not help sparsified asynchronous SGD"
    if not rest:
        return lines + ["In this run error feedback lowered the final training loss beyond the "
                        f"seeds' spread in every configuration: it does not reproduce {paper}."]
    if count["higher"] or not count["lower"]:
        return lines + [f"In this run error feedback lowered the final training loss beyond the "
                        f"seeds' spread in {count['lower']} of {n} configurations and raised "
                        f"it beyond the spread in {count['higher']}: consistent with {paper}."]
    mean_lower = sum(np.mean(c.with_ef.final_loss) < np.mean(c.without.final_loss) for c in rest)
    return lines + [f"In this run error feedback lowered the final training loss beyond the "
                    f"seeds' spread in {count['lower']} of {n} configurations and never raised "
                    f"it beyond the spread; in the other {len(rest)} (k = {ks}) the difference "
                    f"was within the spread (EF's mean lower in {mean_lower} of them). "
                    f"T{paper[1:]} shows here only as the vanishing of its advantage at "
                    f"k = {ks}, not as a configuration where it hurt."]


def panel_finding(comparisons: list[Comparison], outcomes: list[Outcome]) -> list[str]:
    """The sync panel in words: EF21 against EF14, and momentum at the server against none."""
    if not comparisons:
        return []
    count = {v: sum(c.verdict == v for c in comparisons) for v in ("lower", "within", "higher")}
    lines = [f"EF21's final training loss against EF14's (synchronous Top-k SGD, momentum at "
             f"the server): lower beyond the seeds' spread in {count['lower']} of "
             f"{len(comparisons)} configurations, higher in {count['higher']}, within the "
             f"spread in {count['within']}."]
    sync = [o for o in outcomes if o.point.algorithm == "sync"]
    for feedback in FEEDBACK["sync"]:
        pairs = [(o, next(b for b in sync if b.point == o.point._replace(momentum=0.0)))
                 for o in sync if o.point.feedback == feedback and o.point.momentum > 0
                 and any(b.point == o.point._replace(momentum=0.0) for b in sync)]
        if pairs:
            sel = [verdict(on, off) for on, off in pairs]
            lines.append(f"- {feedback} with momentum at the server against without: lower "
                         f"in {sel.count('lower')}, within the spread in "
                         f"{sel.count('within')}, higher in {sel.count('higher')} of "
                         f"{len(sel)}.")
    return lines


def _style(point: Point) -> tuple[str, str]:
    """A curve's line style and label suffix: EF solid, no EF dashed; momentum dotted."""
    ef = point.feedback != "none"
    if point.momentum:
        return ("-." if ef else ":"), f"{'EF' if ef else 'no EF'}, mu={point.momentum:g}"
    return ("-" if ef else "--"), ("EF" if ef else "no EF")


def plot_curves(outcomes: list[Outcome], dataset: str, s, path: str) -> str:
    sel = [o for o in outcomes if o.point.dataset == dataset and o.point.algorithm == "async"]
    workers = sorted({o.point.num_workers for o in sel})
    fig, axes = studies.figure(len(workers), len(s.delays), (6.0, 4.2))
    colors = {k: f"C{i}" for i, k in enumerate(s.k_fractions)}
    for (i, p), (j, delay) in itertools.product(enumerate(workers), enumerate(s.delays)):
        ax = axes[i, j]
        for o in sel:
            if o.point.num_workers == p and o.point.max_delay == delay(p):
                style, arm = _style(o.point)
                ax.plot(o.eval_rounds, o.curves.mean(0), style, color=colors[o.point.k],
                        label=f"k={o.point.k:g}, {arm}")
                ax.fill_between(o.eval_rounds, o.curves.min(0), o.curves.max(0),
                                color=colors[o.point.k], alpha=0.12, lw=0,
                                label="shaded: min to max over seeds")
        ax.axhline(s.target_loss, color="grey", lw=0.8, ls=":", label="target loss")
        ax.set(yscale="log", xlabel="round",
               ylabel="training loss of the actual model\n(mean over seeds)")
        ax.set_title(f"{dataset}: P={p}, max_delay={delay(p)} ({delay})", fontsize=10)
        ax.grid(alpha=0.3)
    labels = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels()), strict=True))
    labels["shaded: min to max over seeds"] = Patch(color="grey", alpha=0.3)
    fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=4, fontsize=9,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    return studies.save_figure(fig, path)


def plot_final(comparisons: list[Comparison], dataset: str, path: str,
               algorithm: str = "async") -> str:
    sel = [c for c in comparisons if c.dataset == dataset]
    fig, axes = studies.figure(1, 1, (max(6.0, 0.7 * len(sel) + 2), 4.0))
    ax = axes[0, 0]
    x = np.arange(len(sel))
    off, on = ("no EF", "EF") if algorithm == "async" else FEEDBACK["sync"]
    for offset, attr, label in ((-0.2, "without", off), (0.2, "with_ef", on)):
        means = [np.mean(getattr(c, attr).final_loss) for c in sel]
        stds = [np.std(getattr(c, attr).final_loss) for c in sel]
        ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3,
               label=f"{label} (bar: mean over seeds; line: ± 1 std)")
    delay = (lambda c: f"\nD={c.max_delay}") if algorithm == "async" else (lambda c: "")
    ax.set_xticks(x, [f"k={c.k:g}\nP={c.num_workers}{delay(c)}\nmu={c.momentum:g}"
                      for c in sel], fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("final training loss (mean ± std)")
    ax.set_title(f"{dataset}: async Top-k SGD with and without error feedback"
                 if algorithm == "async" else
                 f"{dataset}: sync Top-k SGD, EF14 and EF21, momentum at the server")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return studies.save_figure(fig, path)


def reductions(s) -> list[str]:
    """How the settings differ from the reference grid."""
    return studies.reductions(FLAGS, s, REFERENCE_GRID)


def run(s, invocation=None) -> str:
    """Runs the grid (and the seed-batching timing) and writes the report; returns its path."""
    start = time.perf_counter()
    outcomes = run_grid(s)
    batching = None
    if s.compare_seed_batching:
        # The largest P and max_delay of the async arms, with error feedback.
        point, cfg = [(p, c) for p, c in check(s) if p.algorithm == "async"][-1]
        batching = seed_batching(point, cfg, problem_lib.load_problem(cfg.flags), s)
    seconds = time.perf_counter() - start
    return write(s, outcomes, seconds, invocation, batching)


def write(s, outcomes: list[Outcome], seconds: float, invocation,
          batching: Batching | None = None) -> str:
    comparisons = compare(outcomes)
    panel = compare(outcomes, "sync")
    lines = studies.header("Error feedback in sparsified asynchronous SGD", MODULE, FLAGS, s,
                           invocation, seconds)
    names = ", ".join(f"{d} ({m})" for d, m in datasets(s))
    momenta = ", ".join(f"{mu:g}" for mu in s.momenta)
    lines += [
        f"Asynchronous Top-k SGD (`ej.async_sgd`: {s.reads} reads, {s.delay} lags up to "
        f"max_delay updates, batch {s.batch_size} per worker, {s.rounds} rounds) with EF14 "
        f"error feedback (`beta = 1`) and without (`beta = 0`), with heavy-ball momentum mu "
        f"in {{{momenta}}} at the workers (`ej.sgd(momentum=mu)`: error feedback acts on the "
        f"momentum), on {names}"
        + ("; and a synchronous panel (`ej.sync_sgd`) of Top-k SGD with EF14 and with EF21 "
           "(`ej.chain(ej.ef21(top_k), ej.sgd(momentum=mu))`), the momentum at the server "
           "(`optimizer_placement=\"server\"`: error feedback before momentum)"
           if s.sync_panel else "") +
        f". Every arm runs at the constant learning rate `(1 - mu) * {s.learning_rate:g}`: "
        f"the same effective rate `eta / (1 - mu) = {s.learning_rate:g}` (docs/theory.md "
        f"section 9). Both async arms and seeds {s.seed}..{s.seed + s.num_seeds - 1} of a "
        "configuration are one `ej.sweep` over `beta`"
        + ("; each sync arm's seeds are one `ej.sweep` of their own" if s.sync_panel else "")
        + f"; they ran {_executions(outcomes)} by the library's rule for the model and backend "
        f"(worker loop `{s.worker_loop}`). The training loss is the mean cross-entropy "
        f"of the actual model over the first {s.train_eval_size} training samples "
        f"(all of them if fewer), checked every {s.eval_every} rounds; the target loss is "
        f"{s.target_loss:g}. Values are mean ± standard deviation over seeds.",
        "",
    ]
    if s.data_dir and len(datasets(s)) == 1:
        lines += [f"CIFAR-10 not run: `{s.data_dir}` holds no `cifar-10-batches-bin`.", ""]
    cut = reductions(s)
    if cut:
        lines += ["Differs from the reference grid: " + "; ".join(cut) + ".", ""]
    lines += ["## The paper's finding, measured", ""] + finding(comparisons)
    lines += ["", "## EF against no EF", ""] + comparison_table(comparisons)
    if panel:
        lines += ["", "## Synchronous panel: EF14 and EF21, momentum at the server", ""]
        lines += panel_finding(panel, outcomes) + [""] + comparison_table(panel, "sync")
    lines += ["", "## Every configuration", ""] + outcome_table(outcomes)
    lines += ["", "## Plots", ""]
    for dataset, _ in datasets(s):
        curves = plot_curves(outcomes, dataset, s, os.path.join(s.workdir,
                                                                f"loss_{dataset}.png"))
        final = plot_final(comparisons, dataset, os.path.join(s.workdir,
                                                              f"final_loss_{dataset}.png"))
        lines += [f"![training loss, {dataset}]({os.path.basename(curves)})", "",
                  f"![final loss, {dataset}]({os.path.basename(final)})", ""]
        if panel:
            sync = plot_final(panel, dataset, os.path.join(
                s.workdir, f"final_loss_sync_{dataset}.png"), "sync")
            lines += [f"![final loss, sync panel, {dataset}]({os.path.basename(sync)})", ""]
    lines += [
        "## Cost",
        "",
        f"{len(outcomes)} configurations, {s.num_seeds} seeds each: "
        f"{sum(o.seconds for o in outcomes):.0f} s of compilation, training and evaluation.",
    ]
    if batching is not None:
        b = batching.point
        lines += [
            "",
            f"Sweep execution, timed on k = {b.k:g}, P = {b.num_workers}, max_delay = "
            f"{b.max_delay}, momentum {b.momentum:g} (both async arms, {s.num_seeds} seeds, "
            f"{batching.rounds} rounds after a first call whose time, compilation included, "
            "is given apart): "
            f"one run after another {batching.sequential_ms:.1f} ms per seed and round "
            f"(first call {batching.sequential_compile_s:.1f} s); one batched program "
            f"{batching.batched_ms:.1f} ms per seed and round (first call "
            f"{batching.batched_compile_s:.1f} s).",
        ]
    return studies.write_report(s.workdir, lines)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
