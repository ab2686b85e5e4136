r"""Time to accuracy on the simulated clock: what relaxed consistency buys in seconds.

    python -m experiments.time_to_accuracy --workdir=DIR [--smoke]

Each variant (`--variants`: synchronous SGD, clock-driven asynchronous SGD,
message passing, elastic scheduling with tau = 1, 2, 4, local SGD with H = 4),
uncompressed and, where it takes a compressor (sync, async, message passing),
with Top-1% and error feedback, trains the small CNN on the bundled digits
(`experiments.train`'s problem, P = `--workers`) under each system of
`--scenarios`: (a) `equal` constant speeds, (b) one `straggler` 5x slower,
(c) `exponential` and `lognormal` compute times, all of mean `--compute_mean`
seconds, on a network of `--latency` and `--bandwidth` (docs/theory.md section
11). Each configuration is `experiments.config.validate`'s, run through `ej.run`.
The training loss of the actual model (over the first `--train_eval_size`
training samples) is checked every `--eval_every` rounds, against the simulated
seconds at that round; the time to `--target_loss` is the first check at or
below it. A bandwidth sweep (`--bandwidths`; synchronous SGD, equal speeds)
finds where Top-1% + EF starts to pay off against dense updates.

Seeds `--seed ..` set the model, the batches and (with `--clock_per_seed`, the
default) the clock's draws; values are mean ± std over seeds, and "faster" or
"slower" means the two `mean ± std` intervals of the time to target do not
overlap. Synchronous and local SGD compute the same trajectory under every
system (the clock only times it), so they train once per seed and are timed
under each scenario (`ej.clock.times`); the others train once per scenario and
seed. `report.md` says what the runs show, whichever way it falls, including
whether the AAAI claim that elastic scheduling trains faster than synchronous
SGD held.
"""

from __future__ import annotations

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
from experiments.flags import Flag

MODULE = "experiments.time_to_accuracy"
VARIANTS = ("sync", "async", "message_passing", "elastic_scheduling_1", "elastic_scheduling_2",
            "elastic_scheduling_4", "local_sgd_4")
SCENARIOS = ("equal", "straggler", "exponential", "lognormal")
COMPRESSIBLE = ("sync", "async", "message_passing")
CLOCK_FREE = ("sync", "local_sgd_4")  # the clock times their trajectory, never changes it
FLAGS = (
    Flag("workdir", "path", "", "Directory for report.md and the PNGs (created if missing; "
         "required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (rounds 8, num_seeds 2, workers 4, "
         "variants sync,async, scenarios equal,straggler, no compressed runs, bandwidths "
         "1e6,1e9, the MLP, batch_size 8, eval_every 4, train_eval_size 256, one clock draw) "
         "unless those flags are given."),
    Flag("rounds", "int", 300, "Rounds of every run (executor steps for async).", 1,
         10_000_000),
    Flag("num_seeds", "int", 3, "Seeds per configuration (seed, seed + 1, ...).", 1, 1024),
    Flag("seed", "int", 0, "First seed; it also draws the data split.", 0, 2**31 - 1),
    Flag("workers", "int", 8, "Workers P.", 2, 4096),
    Flag("variants", "names", ",".join(VARIANTS), "Variants of the grid.", choices=VARIANTS),
    Flag("scenarios", "names", ",".join(SCENARIOS), "Systems of the grid.", choices=SCENARIOS),
    Flag("compression", "bool", True, "Also run Top-1% + error feedback where the variant takes "
         "a compressor."),
    Flag("compute_mean", "float", 0.05, "Mean seconds per gradient.", 0.0, 1e6, lo_open=True),
    Flag("lognormal_sigma", "float", 1.0, "Tail skew of the lognormal scenario.", 0.0, 10.0),
    Flag("latency", "float", 1e-4, "Network latency, seconds per message.", 0.0, 1e6),
    Flag("bandwidth", "float", 1e9, "Network bandwidth of the scenarios, bits per second.", 0.0,
         lo_open=True),
    Flag("bandwidths", "floats", "1e5,1e6,1e7,1e8,1e9", "Bandwidths of the sweep, bits per "
         "second.", 0.0, lo_open=True),
    Flag("max_delay", "int", 2, "Message passing's largest delay, in rounds.", 0, 100_000),
    Flag("learning_rate", "float", 0.05, "Learning rate eta (constant).", 0.0, 100.0,
         lo_open=True),
    Flag("batch_size", "int", 32, "Samples per worker per gradient.", 1, 65_536),
    Flag("model", "enum", "cnn", "Model on the digits.", choices=("cnn", "mlp")),
    Flag("target_loss", "float", 0.3, "Training loss whose first crossing is timed.", 0.0,
         lo_open=True),
    Flag("eval_every", "int", 25, "Rounds between training-loss checks.", 1, 1_000_000),
    Flag("train_eval_size", "int", 2000, "Training samples the training loss is measured on.",
         1, 10_000_000),
    Flag("clock_per_seed", "bool", True, "Draw the clock anew for every seed (one compilation "
         "per seed); otherwise every seed shares the draw of --seed."),
)
SMOKE = {"rounds": 8, "num_seeds": 2, "workers": 4, "variants": "sync,async",
         "scenarios": "equal,straggler", "compression": False, "bandwidths": "1e6,1e9",
         "model": "mlp", "batch_size": 8, "eval_every": 4, "train_eval_size": 256,
         "clock_per_seed": False}


class Config(NamedTuple):
    """One variant, compressed or not."""

    variant: str
    compressed: bool

    @property
    def label(self) -> str:
        return self.variant.replace("_", " ") + (" + Top-1% EF" if self.compressed else "")


class Outcome(NamedTuple):
    """One configuration under one system, over seeds."""

    config: Config
    scenario: str
    bandwidth: float
    eval_rounds: list[int]
    seconds: np.ndarray  # [seeds, evaluations]: simulated seconds at each check
    losses: np.ndarray  # [seeds, evaluations]: training loss of the actual model
    accuracy: list[float]  # final test accuracy per seed
    idle: list[float]  # final idle fraction per seed
    masked: list[float]  # mean masked-slot fraction per seed (async), else 0

    def to_target(self, target: float) -> list[float | None]:
        out = []
        for secs, loss in zip(self.seconds, self.losses, strict=True):
            hit = np.flatnonzero(loss <= target)
            out.append(float(secs[hit[0]]) if hit.size else None)
        return out


def launcher_values(s, config: Config, scenario: str, bandwidth: float,
                    system_seed: int) -> dict[str, Any]:
    """The `experiments.train` flags of one configuration under one system."""
    name, _, number = config.variant.rpartition("_") if config.variant[-1].isdigit() else (
        config.variant, "", "")
    algorithm = {"async": "clock_async"}.get(name, name)
    values = {"algorithm": algorithm, "num_workers": s.workers, "learning_rate": s.learning_rate,
              "batch_size": s.batch_size, "rounds": s.rounds, "model": s.model,
              "dataset": "digits", "seed": s.seed, "workdir": s.workdir,
              "compute": {"equal": "constant", "straggler": "constant"}.get(scenario, scenario),
              "compute_mean": s.compute_mean, "latency": s.latency, "bandwidth": bandwidth,
              "system_seed": system_seed}
    if scenario == "straggler":
        values.update(stragglers=1, straggler_slowdown=5.0)
    if scenario == "lognormal":
        values["compute_sigma"] = s.lognormal_sigma
    if name == "elastic_scheduling":
        values.update(max_outstanding=int(number), mode="norm")
    if name == "local_sgd":
        values["period"] = int(number)
    if name == "message_passing":
        values["max_delay"] = s.max_delay
    if config.variant in COMPRESSIBLE:
        values.update(compressor="top_k" if config.compressed else "none",
                      error_feedback=config.compressed)
        if config.compressed:
            values["k_fraction"] = 0.01
    return values


def configs(s) -> list[Config]:
    return [Config(v, c) for v in s.variants
            for c in ((False, True) if s.compression and v in COMPRESSIBLE else (False,))]


def train_loss_fn(s):
    """`params -> ` the loss over the first `--train_eval_size` training samples."""
    ds = data_lib.load_dataset("digits")
    module, _ = models_lib.make_model(s.model, ds.num_classes, ds.x_train.shape[1:])
    n = min(s.train_eval_size, ds.y_train.shape[0])
    return lambda params: models_lib.evaluate(module, params, ds.x_train[:n], ds.y_train[:n])[0]


class Trajectory(NamedTuple):
    losses: list[float]
    accuracy: float
    masked: float


def train(cfg: config_lib.Config, problem, seed: int, eval_rounds, train_loss) -> Trajectory:
    """One seed of one configuration: the training loss at every check."""
    alg = cfg.algorithm
    base = jax.random.key(seed)
    state = jax.jit(alg.init)(problem.init_params(jax.random.fold_in(base, 0)),
                              jax.random.fold_in(base, 1))
    loop = config_lib.resolve_loop(cfg.flags, jax.default_backend())
    r, losses, masked = 0, [], []
    for end in eval_rounds:
        state, metrics = ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn,
                                rounds=end - r, has_aux=True, loop=loop)
        r = end
        losses.append(train_loss(ej.model(state)))
        masked += list(np.asarray(metrics.get("updates/masked_fraction", [0.0])))
    return Trajectory(losses, problem.evaluate(ej.model(state))["test/accuracy"],
                      float(np.mean(masked)))


def run_grid(s) -> tuple[list[Outcome], list[Outcome]]:
    """The scenarios' outcomes and the bandwidth sweep's."""
    eval_rounds = [r for r in range(1, s.rounds + 1) if r % s.eval_every == 0 or r == s.rounds]
    seeds = studies.seeds(s.seed, s.num_seeds)
    clock_seed = (lambda seed: seed) if s.clock_per_seed else (lambda seed: s.seed)
    jobs = [(c, scenario, s.bandwidth) for c in configs(s) for scenario in s.scenarios]
    sweep = [(Config("sync", compressed), "equal", b) for compressed in (False, True)
             for b in s.bandwidths]
    # Validate everything before anything compiles.
    checked = {(c, sc, b, seed): config_lib.validate(launcher_values(s, c, sc, b, clock_seed(seed)))
               for c, sc, b in jobs + sweep for seed in seeds}
    problem = problem_lib.load_problem(next(iter(checked.values())).flags)
    train_loss = train_loss_fn(s)
    params = problem.init_params(jax.random.key(0))

    def clock_of(c, scenario, bandwidth, seed):
        """What decides the trajectory's algorithm: one compilation each. The clock-free
        variants train once whatever the system."""
        return (c,) if c.variant in CLOCK_FREE else (c, scenario, bandwidth, clock_seed(seed))

    progress = studies.Progress(len({clock_of(*key) + (key[3],) for key in checked}))
    trained: dict = {}
    built: dict = {}

    def outcome(c, scenario, bandwidth):
        rows = []
        for seed in seeds:
            cfg = checked[(c, scenario, bandwidth, seed)]
            alg_key = clock_of(c, scenario, bandwidth, seed)
            if alg_key + (seed,) not in trained:
                trained[alg_key + (seed,)] = train(built.setdefault(alg_key, cfg), problem,
                                                   seed, eval_rounds, train_loss)
                progress.step(f"{c.label}, {scenario}, {bandwidth:g} bit/s, seed {seed}")
            times = ej.clock.times(cfg.algorithm, params)
            rows.append((trained[alg_key + (seed,)], times))
        return Outcome(
            c, scenario, bandwidth, eval_rounds,
            np.array([[t["time/elapsed"][r - 1] for r in eval_rounds] for _, t in rows]),
            np.array([tr.losses for tr, _ in rows]), [tr.accuracy for tr, _ in rows],
            [float(t["time/idle_fraction"][-1]) for _, t in rows],
            [tr.masked for tr, _ in rows])

    return ([outcome(*job) for job in jobs], [outcome(*job) for job in sweep])


def _compare(a: list[float | None], b: list[float | None]) -> str:
    """`faster`, `slower` or `within` for times to target `a` against `b` (None: not reached)."""
    if None in a or None in b:
        if None in b and None not in a:
            return "faster"
        if None in a and None not in b:
            return "slower"
        return "neither reached"
    (ma, sa), (mb, sb) = studies.mean_std(a), studies.mean_std(b)
    if len(a) < 2:
        return "one seed"
    return "faster" if ma + sa < mb - sb else "slower" if ma - sa > mb + sb else "within"


def _time(values: list[float | None]) -> str:
    hits = [v for v in values if v is not None]
    if len(hits) < len(values):
        return f"not reached ({len(hits)}/{len(values)} seeds did)"
    return studies.fmt_mean_std(hits, 3)


def outcome_table(outcomes: list[Outcome], s) -> list[str]:
    header = ("system", "variant", "seconds to target", "simulated s / round",
              "final train loss", "test accuracy", "idle fraction", "masked slots")
    rows = [(o.scenario, o.config.label, _time(o.to_target(s.target_loss)),
             studies.fmt_mean_std(list(o.seconds[:, -1] / s.rounds), 3),
             studies.fmt_mean_std(list(o.losses[:, -1])), studies.fmt_mean_std(o.accuracy, 3),
             studies.fmt_mean_std(o.idle, 2),
             studies.fmt_mean_std(o.masked, 2) if o.config.variant == "async" else "")
            for o in outcomes]
    return studies.markdown_table(header, rows)


def findings(outcomes: list[Outcome], s) -> list[str]:
    """Each relaxed variant against synchronous SGD, per system, and the AAAI claim."""
    by = {(o.config, o.scenario): o for o in outcomes}
    lines, claim = [], []
    sync = Config("sync", False)
    for scenario in s.scenarios:
        if (sync, scenario) not in by:
            continue
        reference = by[(sync, scenario)].to_target(s.target_loss)
        verdicts = []
        for c in configs(s):
            if c == sync:
                continue
            verdict = _compare(by[(c, scenario)].to_target(s.target_loss), reference)
            verdicts.append(f"{c.label}: {verdict}")
            if c.variant.startswith("elastic_scheduling"):
                claim.append((scenario, c.label, verdict))
        lines.append(f"- {scenario}: against synchronous SGD's time to the target loss, "
                     + "; ".join(verdicts) + ".")
    if claim:
        held = [f"{label} ({scenario})" for scenario, label, v in claim if v == "faster"]
        lines += ["", "The AAAI claim that elastic scheduling trains faster than synchronous "
                  "SGD " + (f"held, beyond the seeds' spread, for {', '.join(held)}; "
                            if held else "did not hold beyond the seeds' spread in any "
                            "configuration here; ")
                  + f"{len(claim) - len(held)} of {len(claim)} elastic-scheduling "
                  "configurations were not faster beyond the spread."]
    return lines or ["No synchronous baseline in --variants: nothing to compare against."]


def sweep_lines(sweep: list[Outcome], s) -> list[str]:
    rows, pays = [], []
    for b in s.bandwidths:
        dense, top = (next(o for o in sweep if o.bandwidth == b and o.config.compressed == c)
                      for c in (False, True))
        t_dense, t_top = dense.to_target(s.target_loss), top.to_target(s.target_loss)
        verdict = _compare(t_top, t_dense)
        if verdict == "faster":
            pays.append(b)
        rows.append((f"{b:g}", _time(t_dense), _time(t_top),
                     studies.fmt_mean_std(list(dense.seconds[:, -1] / s.rounds), 3),
                     studies.fmt_mean_std(list(top.seconds[:, -1] / s.rounds), 3), verdict))
    header = ("bandwidth (bit/s)", "dense: seconds to target", "Top-1% + EF: seconds to target",
              "dense: s / round", "Top-1% + EF: s / round", "Top-1% + EF against dense")
    where = ("every bandwidth of the sweep" if len(pays) == len(s.bandwidths) else
             f"{', '.join(f'{b:g}' for b in pays)} bit/s, and not at the other bandwidths of "
             "the sweep")
    text = (f"Top-1% + EF reached the target sooner than dense updates, beyond the seeds' "
            f"spread, at {where}." if pays else
            "Top-1% + EF never reached the target sooner than dense updates beyond the seeds' "
            "spread in this sweep.")
    return studies.markdown_table(header, rows) + ["", text]


def plot(outcomes: list[Outcome], s, path: str) -> str:
    fig, axes = studies.figure(1, len(s.scenarios), (5.0, 3.8))
    for j, scenario in enumerate(s.scenarios):
        ax = axes[0, j]
        for o in outcomes:
            if o.scenario == scenario:
                ax.plot(o.seconds.mean(0), o.losses.mean(0), ".-" if o.config.compressed
                        else "-", label=o.config.label)
        ax.axhline(s.target_loss, color="grey", lw=0.8, ls=":", label="target loss")
        ax.set(yscale="log", xlabel="simulated seconds (mean over seeds)",
               ylabel="training loss of the actual model")
        ax.set_title(scenario, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    return studies.save_figure(fig, path)


def run(s, invocation=None) -> str:
    """Runs the grid and the sweep and writes the report; returns its path."""
    start = time.perf_counter()
    outcomes, sweep = run_grid(s)
    return write(s, outcomes, sweep, time.perf_counter() - start, invocation)


def write(s, outcomes: list[Outcome], sweep: list[Outcome], seconds: float,
          invocation=None) -> str:
    lines = studies.header("Time to accuracy on the simulated clock", MODULE, FLAGS, s,
                           invocation, seconds)
    lines += [
        f"P = {s.workers} workers train the {s.model} on the digits for {s.rounds} rounds "
        f"(constant learning rate {s.learning_rate:g}, batch {s.batch_size}); compute times of "
        f"mean {s.compute_mean:g} s per gradient, network latency {s.latency:g} s and "
        f"bandwidth {s.bandwidth:g} bit/s; the training loss of the actual model over "
        f"{s.train_eval_size} training samples, checked every {s.eval_every} rounds, against "
        f"the target {s.target_loss:g}. Seeds {s.seed}..{s.seed + s.num_seeds - 1}; the "
        f"clock is drawn {'anew for each seed' if s.clock_per_seed else 'once'}.", ""]
    if s.smoke:
        lines += ["**A smoke-sized run**: the sizes are too small to show anything about the "
                  "variants; it checks that the study runs end to end.", ""]
    lines += ["The time to target is read at the checks, every "
              f"{s.eval_every} rounds: seeds that cross at the same check"
              + (" (with one clock draw, at the same simulated second)" if not
                 s.clock_per_seed else "") + " have no spread, and two such configurations are "
              "then told apart by their seconds per round alone.", ""]
    lines += ["## What the runs show", ""] + findings(outcomes, s)
    lines += ["", "At one learning rate, asynchronous SGD applies every worker's update in "
              "full (up to P steps of size eta per step) where synchronous SGD applies their "
              "mean (one step of eta, with 1/P of the noise): part of asynchronous SGD's lead "
              "is that, not the waiting it avoids (compare the two under equal speeds, where "
              "neither waits)."]
    lines += ["", "## Every configuration", ""] + outcome_table(outcomes, s)
    lines += ["", "## Bandwidth sweep (synchronous SGD, equal constant speeds)", ""]
    lines += sweep_lines(sweep, s)
    figure = plot(outcomes, s, os.path.join(s.workdir, "loss_vs_seconds.png"))
    lines += ["", f"![training loss against simulated seconds]({os.path.basename(figure)})"]
    return studies.write_report(s.workdir, lines)


def main(argv: Any = None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
