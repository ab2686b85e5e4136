"""The flags of `python -m experiments.train` (one table) and the algorithm they build.

`validate` checks the flags given (`experiments.flags`), every cross-flag constraint,
and builds the algorithm with the library's factories (which compile nothing),
renaming their arguments in their errors to the flags (`--max_delay: got 3; ...`).
Adding an algorithm is one entry in `ALGORITHMS` and the `when` of its flags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import optax

import elastic_jax as ej
from experiments import flags
from experiments.flags import Flag, UsageError, usage

MAX_INT = 10**9  # the upper end of the open-ended integer ranges
CHUNK = 16  # rounds per ej.run call at most: the loop looks at signals between calls
EXIT_NONFINITE = 3
EXIT_SIGNAL = 128  # plus the signal number
EXIT_STATUS = (  # (status, meaning), for docs/arguments.md
    ("0", "the run finished (with --on_nonfinite=skip_round, possibly with skipped rounds: "
     "nonfinite/skipped_rounds)"),
    ("2", "usage error: a bad flag or combination, a missing or corrupt data file, a workdir "
     "that cannot be created or written (the line names the path and the OS reason), holds a "
     "run (without --resume) or is in use; one line on stderr, nothing compiled"),
    (str(EXIT_NONFINITE), "--on_nonfinite=stop met a non-finite loss, gradient norm or state: "
     "one line names the round and the quantity; the last checkpoint (all finite) is kept"),
    (str(flags.EXIT_IO), "a write into the workdir failed during the run (no space left, a "
     "read-only file system, ...): one line names the file and the OS reason; the last "
     "checkpoint is intact"),
    (f"{EXIT_SIGNAL + 2}, {EXIT_SIGNAL + 15}", "SIGINT, SIGTERM (128 + the signal number): "
     "a final checkpoint at the current round was written after the metrics up to it"),
    ("killed (-9)", "SIGKILL or a crash: nothing more is written; after any of these, --resume "
     "continues exactly from the last checkpoint"),
)

UPDATE_RULE = ("sync", "async", "message_passing", "clock_async")  # with a compressor and EF
STALE = ("async", "message_passing")
COMPRESSORS = ("none", "identity", "top_k", "random_k", "scaled_random_k", "qsgd",
               "scaled_sign", "powersgd")
# DiLoCo's outer compressors: Top-k with error feedback, 4-bit QSGD (7 levels), PowerSGD.
OUTER_COMPRESSORS = ("none", "top_k", "qsgd", "powersgd")
OUTER_QSGD_LEVELS = 7  # a sign and 3 bits an entry
SCHEDULES = ("constant", "cosine", "linear", "exponential")
LAWS = ("constant", "exponential", "lognormal", "pareto")  # simulated compute times (ej.clock)
IMAGE_DATASETS = ("digits", "mnist", "cifar10")
CONVEX_DATASETS = ("least_squares", "logistic")
CONV_MODELS = ("cnn", "resnet20")  # their loss convolves: a Python loop on the CPU
GOSSIP_COMPRESSORS = ("none", "identity", "top_k", "random_k", "scaled_sign")  # CHOCO's

ALGORITHMS = {  # name -> (flags, learning rate, shared keyword arguments) -> ej.Algorithm
    "sync": lambda f, lr, kw: ej.sync_sgd(lr, f["num_workers"],
                                          optimizer_placement=f["optimizer_placement"], **kw),
    "async": lambda f, lr, kw: ej.async_sgd(lr, f["num_workers"], f["max_delay"],
                                            reads=f["reads"], delay=f["delay"], **kw),
    "message_passing": lambda f, lr, kw: ej.message_passing_sgd(
        lr, f["num_workers"], max_delay=f["max_delay"], delay=f["delay"],
        drop_prob=f["drop_prob"], retransmit=f["retransmit"], crashes=f["crashes"] or None,
        crash_horizon=f["crash_horizon"] or None, **kw),
    "elastic_scheduling": lambda f, lr, kw: ej.elastic_scheduling(
        lr, f["num_workers"], f["max_outstanding"], delay=f["delay"], mode=f["mode"], **kw),
    "local_sgd": lambda f, lr, kw: ej.local_sgd(lr, f["num_workers"], f["period"], **kw),
    "gossip": lambda f, lr, kw: ej.gossip_sgd(
        lr, f["num_workers"], topology=f["topology"], local_steps=f["local_steps"],
        gossip_compressor=make_gossip_compressor(f),
        gamma=f["gossip_gamma"] if f["gossip_compressor"] != "none" else 1.0, **kw),
    "clock_async": lambda f, lr, kw: ej.clock_async_sgd(
        lr, f["num_workers"], staleness_policy=f["staleness_policy"],
        max_delay=(f["staleness_cap"] or None) if f["staleness_policy"] == "drop" else None,
        slots=f["slots"] or None, **kw),
    "diloco": lambda f, lr, kw: ej.diloco(
        lr, f["num_workers"], f["period"],
        outer_optimizer=optax.sgd(f["outer_learning_rate"], momentum=f["outer_momentum"],
                                  nesterov=f["outer_nesterov"]),
        outer_compressor=make_outer_compressor(f), fragments=f["fragments"], **kw),
}


def _on(name: str, *values) -> tuple:
    return ((name, values),)


FLAGS: tuple[Flag, ...] = (
    # The algorithm.
    Flag("algorithm", "enum", "async", "The distributed SGD variant.", choices=tuple(ALGORITHMS)),
    Flag("num_workers", "int", 8, "P, the number of simulated workers.", 1, 4096),
    Flag("max_delay", "int", 8, "Largest staleness in updates (async: >= num_workers - 1) or "
         "message delay in rounds (message_passing).", 0, 100_000, when=_on("algorithm", *STALE)),
    Flag("delay", "enum", "uniform", "Delay law of stale reads, late messages or outstanding "
         "updates (geometric: p = 0.5); with a --compute law the clock sets the delays.",
         choices=("fixed", "uniform", "geometric"),
         when=_on("algorithm", *STALE, "elastic_scheduling") + _on("compute", "none")),
    Flag("reads", "enum", "inconsistent", "One lag per update (consistent) or per coordinate "
         "(inconsistent). The launcher's default is the paper's Hogwild setting of its "
         "showcase run; ej.async_sgd's default is 'consistent', the simplest semantics and "
         "the one recorded delay traces need.", choices=("consistent", "inconsistent"),
         when=_on("algorithm", "async")),
    Flag("compressor", "enum", "top_k", "Compressor of each worker's update (scaled_random_k: "
         "unbiased random-k; none: uncompressed).", choices=COMPRESSORS,
         when=_on("algorithm", *UPDATE_RULE)),
    Flag("k_fraction", "float", 0.01, "Fraction of entries top_k / random_k keep "
         "(k = max(1, floor(fraction d))).", 0.0, 1.0, lo_open=True,
         when=_on("compressor", "top_k", "random_k", "scaled_random_k")),
    Flag("qsgd_levels", "int", 4, "Quantisation levels of qsgd.", 1, 65_535,
         when=_on("compressor", "qsgd")),
    Flag("powersgd_rank", "int", 4, "Rank r of powersgd (sync only: a collective compressor of "
         "each matrix-shaped leaf, one power iteration a round with warm-started Q; its error "
         "feedback is --error_feedback).", 1, 4096, when=_on("compressor", "powersgd")),
    Flag("error_feedback", "bool", True, "EF14 residual memory around the compressor (around "
         "the identity with --compressor=none; powersgd's own residuals with "
         "--compressor=powersgd). Needs a contractive compressor (not qsgd, scaled_random_k).",
         when=_on("algorithm", *UPDATE_RULE)),
    Flag("ef_beta", "float", 1.0, "Error-feedback damping beta (1: EF14).", 0.0, 1.0,
         when=_on("error_feedback", True)),
    Flag("clip_norm", "float", 0.0, "Clip each worker's gradient to this norm; 0: no clipping.",
         0.0),
    Flag("drop_prob", "float", 0.0, "Probability that a message is dropped.", 0.0, 1.0,
         hi_open=True, when=_on("algorithm", "message_passing")),
    Flag("retransmit", "bool", True, "Resend dropped messages (within max_delay).",
         when=(("drop_prob", ">0"),)),
    Flag("crashes", "int", 0, "Number of workers that crash (needs --crash_horizon).", 0, 4096,
         when=_on("algorithm", "message_passing")),
    Flag("crash_horizon", "int", 0, "Crash rounds are drawn uniformly in [1, crash_horizon).",
         0, MAX_INT, when=(("crashes", ">0"),)),
    Flag("max_outstanding", "int", 8, "Most updates in flight.", 1, 100_000,
         when=_on("algorithm", "elastic_scheduling")),
    Flag("mode", "enum", "norm", "What the scheduler bounds.", choices=("norm", "variance"),
         when=_on("algorithm", "elastic_scheduling")),
    Flag("period", "int", 4, "Rounds between model averages (diloco: inner steps H per outer "
         "step).", 1, 100_000, when=_on("algorithm", "local_sgd", "diloco")),
    Flag("outer_learning_rate", "float", 0.7, "DiLoCo's outer optimizer optax.sgd("
         "outer_learning_rate, momentum=outer_momentum, nesterov=outer_nesterov) on the "
         "pseudo-gradient x - mean_p v^p (the inner optimizer is --optimizer's).", 0.0,
         lo_open=True, when=_on("algorithm", "diloco")),
    Flag("outer_momentum", "float", 0.9, "Momentum of DiLoCo's outer optimizer.", 0.0, 1.0,
         hi_open=True, when=_on("algorithm", "diloco")),
    Flag("outer_nesterov", "bool", True, "Nesterov's form of the outer momentum.",
         when=(("outer_momentum", ">0"),)),
    Flag("fragments", "int", 1, "Streaming DiLoCo: the model's leaves in F contiguous groups, "
         "each synchronised once per --period at its own round (a divisor of --period, at "
         "most the number of leaves).", 1, 100_000, when=_on("algorithm", "diloco")),
    Flag("outer_compressor", "enum", "none", "Compressor of each node's pseudo-gradient: top_k "
         "with error feedback, qsgd with 7 levels (4 bits an entry, no error feedback), "
         "powersgd (its own error feedback).", choices=OUTER_COMPRESSORS,
         when=_on("algorithm", "diloco")),
    Flag("outer_k_fraction", "float", 0.01, "Fraction of entries the outer top_k keeps.", 0.0,
         1.0, lo_open=True, when=_on("outer_compressor", "top_k")),
    Flag("outer_powersgd_rank", "int", 4, "Rank of the outer powersgd.", 1, 4096,
         when=_on("outer_compressor", "powersgd")),
    Flag("topology", "enum", "ring", "Who averages with whom (docs/theory.md section 10): "
         "lazy ring (1/3 each), 2-D torus (1/5), hypercube (P a power of two), static "
         "exponential graph, one-peer exponential graph (exact averaging every log2 P rounds "
         "for P a power of two), a random matching per round, a star, the complete graph.",
         choices=ej.topologies.NAMES, when=_on("algorithm", "gossip")),
    Flag("local_steps", "int", 1, "Rounds per mixing round (local steps between mixings).",
         1, 100_000, when=_on("algorithm", "gossip")),
    Flag("gossip_compressor", "enum", "none", "CHOCO-SGD: each node sends C(model - public "
         "copy) instead of its model (none: plain gossip).", choices=GOSSIP_COMPRESSORS,
         when=_on("algorithm", "gossip")),
    Flag("gossip_k_fraction", "float", 0.1, "Fraction of entries CHOCO's top_k / random_k "
         "keep.", 0.0, 1.0, lo_open=True, when=_on("gossip_compressor", "top_k", "random_k")),
    Flag("gossip_gamma", "float", 0.5, "CHOCO's mixing step gamma.", 0.0, 1.0, lo_open=True,
         when=_on("gossip_compressor", *GOSSIP_COMPRESSORS[1:])),
    Flag("staleness_policy", "enum", "none", "Clock-driven async: apply every update (none) or "
         "drop one staler than --staleness_cap writes (drop).", choices=("none", "drop"),
         when=_on("algorithm", "clock_async")),
    Flag("staleness_cap", "int", 0, "The cap of --staleness_policy=drop, in writes (>= "
         "num_workers - 1); 0: num_workers - 1.", 0, 100_000,
         when=_on("staleness_policy", "drop")),
    Flag("slots", "int", 0, "Clock-driven async: the most writes one step applies; 0: "
         "num_workers.", 0, 4096, when=_on("algorithm", "clock_async")),
    # The simulated system (ej.clock): each round's seconds, and what they decide.
    Flag("compute", "enum", "none", "Simulated compute time per gradient (ej.clock); none: no "
         "clock. With a law every round reports time/elapsed, time/round, time/idle_fraction "
         "and comm/seconds; message passing and elastic scheduling then take their delays from "
         "the clock (not --delay), and clock_async (which needs a law) its writes.",
         choices=("none",) + LAWS),
    Flag("compute_mean", "float", 0.05, "Mean seconds per gradient (exponential: of its "
         "exponential part).", 0.0, 1e6, lo_open=True, when=_on("compute", *LAWS)),
    Flag("compute_shift", "float", 0.0, "Seconds added to every exponential compute time.",
         0.0, 1e6, when=_on("compute", "exponential")),
    Flag("compute_sigma", "float", 0.5, "Tail skew of the lognormal compute times.", 0.0, 10.0,
         when=_on("compute", "lognormal")),
    Flag("pareto_shape", "float", 2.5, "Tail index of the Pareto compute times.", 1.0, 100.0,
         lo_open=True, when=_on("compute", "pareto")),
    Flag("stragglers", "int", 0, "Workers (the last ones) whose compute times are "
         "--straggler_slowdown times longer.", 0, 4096, when=_on("compute", *LAWS)),
    Flag("straggler_slowdown", "float", 5.0, "How many times slower a straggler computes.", 1.0,
         1e6, when=(("stragglers", ">0"),)),
    Flag("latency", "float", 0.0, "Network latency alpha per message, seconds.", 0.0, 1e6,
         when=_on("compute", *LAWS)),
    Flag("bandwidth", "float", 0.0, "Network bandwidth beta, bits per second; 0: unlimited "
         "(transfers take no time).", 0.0, when=_on("compute", *LAWS)),
    Flag("jitter", "float", 0.0, "Mean seconds of an exponential delay added to each message.",
         0.0, 1e6, when=_on("compute", *LAWS)),
    Flag("system_seed", "int", 0, "Seed of the clock's own draws (shared by the seeds of a "
         "--num_seeds batch).", 0, 2**31 - 1, when=_on("compute", *LAWS)),
    # The optimiser.
    Flag("optimizer", "enum", "sgd", "The base optimizer of every worker's chain, in optax's "
         "terms: sgd (optax.sgd: --momentum, --nesterov) or adamw (optax.adamw with b1 0.9, "
         "b2 0.999, eps 1e-8; --weight_decay is its weight_decay). Bounds with adamw use the "
         "measured update norm u_hat.", choices=("sgd", "adamw")),
    Flag("momentum", "float", 0.0, "Momentum mu of sgd: m <- mu m + g, update eta m (0: plain "
         "SGD). Every bound then uses M / (1 - mu).", 0.0, 1.0, hi_open=True,
         when=_on("optimizer", "sgd")),
    Flag("nesterov", "bool", False, "Nesterov's form of the momentum (optax's): update "
         "eta (g + mu m).", when=(("momentum", ">0"),)),
    Flag("weight_decay", "float", 0.0, "Decoupled weight decay wd: with sgd, g <- g + wd v at "
         "the worker's view v before the optimizer (optax.add_decayed_weights); with adamw, "
         "its weight_decay (optax.adamw's own default is 1e-4). 0: none.", 0.0),
    Flag("optimizer_placement", "enum", "worker", "Where the base optimizer runs: worker (each "
         "worker keeps its optimizer state; the compressor and error feedback act on its "
         "output) or server (the workers compress their raw gradients, error feedback "
         "included, and the server runs the optimizer once on their mean, as PowerSGD and "
         "DDP do).", choices=("worker", "server"), when=_on("algorithm", "sync")),
    Flag("learning_rate", "float", 0.05, "Base learning rate eta.", 0.0, lo_open=True),
    Flag("schedule", "enum", "constant", "Learning-rate schedule over --schedule_rounds "
         "(cosine, linear: from eta to eta * final_lr_fraction, then flat; exponential: "
         "eta * final_lr_fraction^(round / schedule_rounds), floored at the final value).",
         choices=SCHEDULES),
    Flag("schedule_rounds", "int", 0, "Horizon of the schedule; 0: --rounds (then a resume "
         "may not change --rounds).", 0, MAX_INT, when=_on("schedule", *SCHEDULES[1:])),
    Flag("final_lr_fraction", "float", 0.1, "Final learning rate of the schedule, as a "
         "fraction of --learning_rate.", 0.0, 1.0, when=_on("schedule", *SCHEDULES[1:])),
    Flag("batch_size", "int", 32, "Samples per worker per round.", 1, 65_536),
    Flag("rounds", "int", 500, "Total rounds of the run (a resume continues to this round).",
         1, MAX_INT, semantic=False),
    # The problem.
    Flag("model", "enum", "cnn", "Flax model (cnn: the 25,290-parameter SmallCNN on 8x8 "
         "digits); the convex datasets train a linear model.",
         choices=("mlp", "cnn", "resnet20"), when=_on("dataset", *IMAGE_DATASETS)),
    Flag("dataset", "enum", "digits", "digits is bundled; mnist and cifar10 read --data_dir; "
         "least_squares and logistic are synthetic convex problems.",
         choices=IMAGE_DATASETS + CONVEX_DATASETS),
    Flag("data_dir", "str", "", "Directory of the mnist (IDX) or cifar10 (binary) files.",
         when=_on("dataset", "mnist", "cifar10"), semantic=False),
    Flag("convex_samples", "int", 4096, "Samples of the convex dataset.", 1, 10_000_000,
         when=_on("dataset", *CONVEX_DATASETS)),
    Flag("convex_dim", "int", 64, "Dimension of the convex dataset.", 1, 100_000,
         when=_on("dataset", *CONVEX_DATASETS)),
    Flag("partition", "enum", "iid", "How the training set is split among workers (dirichlet: "
         "non-IID over labels).", choices=("iid", "dirichlet"),
         when=_on("dataset", *IMAGE_DATASETS, "logistic")),
    Flag("dirichlet_alpha", "float", 0.5, "Concentration of the Dirichlet split (small: few "
         "classes per worker).", 0.0, lo_open=True, when=_on("partition", "dirichlet")),
    Flag("seed", "int", 0, "Seed of the first run of the batch; it also draws the partition "
         "and the convex problem.", 0, 2**31 - 1),
    Flag("num_seeds", "int", 1, "Seeds seed, seed+1, ... run as one vmapped batch; metrics are "
         "means over seeds, with <name>/std the standard deviation.", 1, 1024),
    # The record.
    Flag("target_loss", "float", 0.0, "Report the first logged round (and simulated second) "
         "whose training loss at the views is at most this; 0: none.", 0.0,
         semantic=False),
    Flag("target_accuracy", "float", 0.0, "Report the first evaluated round (and simulated "
         "second) whose test accuracy is at least this; 0: none.", 0.0, 1.0,
         when=_on("dataset", *IMAGE_DATASETS), semantic=False),
    Flag("workdir", "path", "", "Directory of the run: config.json, metrics.jsonl, "
         "timing.jsonl, checkpoint.npz, *.png (required).", semantic=False),
    Flag("log_every", "int", 10, "Write a metrics line every this many rounds, and at the last "
         "round; each line has the peak of b_hat and of b_hat / bound since the previous one.",
         1, MAX_INT),
    Flag("eval_every", "int", 50, "Evaluate the model on the test set every this many rounds; "
         "0: only at the last round.", 0, MAX_INT),
    Flag("checkpoint_every", "int", 100, "Save a checkpoint every this many rounds; 0: only "
         "at the last round.", 0, MAX_INT, semantic=False),
    Flag("resume", "bool", False, "Continue the run in --workdir from its last checkpoint "
         "(from round 0 if it has none).", semantic=False),
    Flag("on_nonfinite", "enum", "stop", "What a non-finite loss, gradient norm or state does. "
         "stop: end the run at that round with one line naming the round and the quantity, "
         f"keep the last checkpoint, exit with status {EXIT_NONFINITE}. skip_round: drop that "
         "round's update (the round counter, and with it the schedule and every random key, "
         "still advances) and count it in nonfinite/skipped_rounds.",
         choices=("stop", "skip_round"), semantic=False),
    Flag("worker_loop", "enum", "auto", "How each device evaluates its block of workers' "
         "gradients (ej.make_step): auto picks the fastest for the model and backend; map is "
         "bitwise independent of the placement; unroll and vmap agree with it to rounding.",
         choices=("auto", "map", "unroll", "vmap")),
    Flag("loop", "enum", "auto", "ej.run's loop over rounds. python: one compiled round at a "
         f"time; chunks: up to {CHUNK} rounds in one compiled program; auto: chunks, except a "
         "Python loop for the convolutional models (cnn, resnet20) on the CPU, where XLA:CPU "
         "runs a convolution inside a loop body many times slower, and with --num_devices. "
         "The two agree to rounding; a resume must use the run's loop.",
         choices=("auto", "python", "chunks")),
    # Placement: the result is bitwise the same however the workers are placed.
    Flag("num_devices", "int", 0, "Devices the workers are split over (a 'workers' mesh over "
         "every process's devices); 0: one device. Must divide --num_workers.", 0, 65_536,
         semantic=False),
    Flag("num_processes", "int", 1, "Processes of a multi-host run (jax.distributed).", 1,
         65_536, semantic=False),
    Flag("coordinator", "str", "", "host:port of process 0 for jax.distributed.",
         when=(("num_processes", ">1"),), semantic=False),
    Flag("process_id", "int", 0, "This process's index in [0, --num_processes).", 0, 65_535,
         when=(("num_processes", ">1"),), semantic=False),
)
TABLE = flags.by_name(FLAGS)
DEFAULTS = {f.name: f.default for f in FLAGS}


class Config(NamedTuple):
    """Every flag's value (defaults filled in; those that do not apply unused) and the
    `ej.Algorithm` they describe."""

    flags: dict[str, Any]
    algorithm: ej.Algorithm

    @property
    def saved(self) -> dict[str, Any]:
        """The effective configuration, as `config.json` holds it: the flags that apply."""
        return flags.effective(FLAGS, self.flags)


# Library argument names -> the flag that sets them.
_ARGUMENT_FLAGS = {
    "fraction": "k_fraction", "k": "k_fraction", "levels": "qsgd_levels",
    "beta": "ef_beta", "decay_steps": "schedule_rounds", "transition_steps": "schedule_rounds",
    "alpha": "dirichlet_alpha", "kind": "partition", "num_samples": "convex_samples",
    "dim": "convex_dim", "gamma": "gossip_gamma", "sigma": "compute_sigma",
    "shape": "pareto_shape", "mean": "compute_mean", "shift": "compute_shift",
}


def from_library_error(error: Exception) -> UsageError:
    """A library `ValueError("<argument>: got ...")`, renamed to the flag that set it."""
    message = " ".join(str(error).split())
    match = re.match(r"^(\w+): ", message)
    flag = match and _ARGUMENT_FLAGS.get(match.group(1), match.group(1))
    if flag in TABLE:
        if flag == "compressor" and "error feedback" in message:
            message += " (or --noerror_feedback)"
        return UsageError(f"--{flag}: {message[match.end():]}")
    return UsageError(message)


def _check_combinations(f: Mapping[str, Any]) -> None:
    if f["algorithm"] == "message_passing" and f["crashes"] and f["crash_horizon"] < 2:
        raise usage("crash_horizon", f["crash_horizon"], f"an integer in [2, {MAX_INT}] with "
                    f"--crashes={f['crashes']} (crash rounds are drawn in [1, crash_horizon))")
    if f["dataset"] in ("mnist", "cifar10") and not f["data_dir"]:
        raise usage("data_dir", f["data_dir"], f"the directory holding the {f['dataset']} "
                    "files (only digits is bundled)")
    if f["schedule"] == "exponential" and f["final_lr_fraction"] == 0.0:
        raise usage("final_lr_fraction", 0.0, "a finite number in (0, 1] with "
                    "--schedule=exponential")
    if f["dataset"] in CONVEX_DATASETS and f["num_workers"] > f["convex_samples"]:
        raise usage("num_workers", f["num_workers"], f"at most --convex_samples="
                    f"{f['convex_samples']} (every worker needs a sample)")
    if f["num_processes"] > 1 and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", f["coordinator"]):
        raise usage("coordinator", f["coordinator"], "host:port of process 0 with "
                    f"--num_processes={f['num_processes']}")
    if f["process_id"] >= f["num_processes"] > 1:
        raise usage("process_id", f["process_id"], f"an integer in [0, "
                    f"{f['num_processes'] - 1}] (--num_processes={f['num_processes']})")
    if f["num_devices"] and f["num_workers"] % f["num_devices"]:
        raise usage("num_devices", f["num_devices"], f"a divisor of --num_workers="
                    f"{f['num_workers']} (each device runs num_workers / num_devices workers)")
    if f["algorithm"] == "async" and f["compute"] != "none":
        raise usage("compute", f["compute"], "'none' with --algorithm=async (its lags are drawn "
                    "per round; --algorithm=clock_async runs asynchronous SGD on the clock)")
    if (f["algorithm"] == "clock_async" and f["staleness_policy"] == "drop"
            and 0 < f["staleness_cap"] < f["num_workers"] - 1):
        raise usage("staleness_cap", f["staleness_cap"], f"0 or an integer >= num_workers - 1 "
                    f"= {f['num_workers'] - 1}")
    if f["algorithm"] == "message_passing" and f["compute"] != "none":
        for name, value in (("drop_prob", f["drop_prob"]), ("crashes", f["crashes"])):
            if value:
                raise usage(name, value, f"0 with --compute={f['compute']} (the clock models a "
                            "reliable network of live nodes)")
    if f["algorithm"] == "clock_async" and f["compute"] == "none":
        raise usage("compute", "none", "a compute-time law (" + ", ".join(LAWS) + ") with "
                    "--algorithm=clock_async: its writes follow the clock")
    if f["compute"] != "none" and f["stragglers"] > f["num_workers"]:
        raise usage("stragglers", f["stragglers"], f"at most --num_workers={f['num_workers']}")
    if (f["algorithm"] in UPDATE_RULE and f["compressor"] == "powersgd" and f["error_feedback"]
            and f["ef_beta"] != 1.0):
        raise usage("ef_beta", f["ef_beta"], "1.0 with --compressor=powersgd (its error "
                    "feedback keeps the whole residual)")
    if f["num_devices"] and f["num_seeds"] > 1:
        raise usage("num_devices", f["num_devices"], "0 with --num_seeds > 1 (seeds are "
                    "vmapped on one device)")


def validate(given: Mapping[str, Any]) -> Config:
    """Checks the flags given (Python values or command-line text) and builds the algorithm.

    Compiles nothing. Raises `UsageError` (one line naming the flag) for an unknown
    flag, a bad value, a flag given that does not apply, an inconsistent
    combination, or a `ValueError` the library factories raise for these arguments.
    """
    f = flags.validate(FLAGS, given)
    _check_combinations(f)
    try:
        algorithm = make_algorithm(f)
    except ValueError as e:
        raise from_library_error(e) from None
    return Config(f, algorithm)


# The hyperparameters `make_algorithm` takes in place of a flag (the library's argument
# names: the arguments of ej.sweep's grids and of ej.analysis.hypergradient).
HPARAM_FLAGS = {"learning_rate": "learning_rate", "beta": "ef_beta", "momentum": "momentum"}


def make_algorithm(f: Mapping[str, Any], **hparams) -> ej.Algorithm:
    """The algorithm the flags describe, with `hparams` in place of the flags they name.

    The function `ej.sweep` rebuilds at every point of a grid
    (`functools.partial(make_algorithm, f)`): `learning_rate` replaces
    `--learning_rate` (the schedule's base rate), `beta` replaces `--ef_beta` (the
    error-feedback damping, 0: none) and `momentum` replaces `--momentum`; each may
    be traced. The chain is `make_rule`'s over the flags so replaced.

    Args:
      f: every flag's value, as `validate` returns them (`Config.flags`).
      **hparams: keys of `HPARAM_FLAGS`, each for a flag that applies to `f`.

    Returns:
      The `ej.Algorithm`; the library's factories check the values.

    Raises:
      ValueError: `hparams: got '<name>'; expected ...` for a name that is not a key of
        `HPARAM_FLAGS` or whose flag does not apply to `f`, or the factory's own line for
        a bad value.

    Example:
      >>> make = functools.partial(make_algorithm, validate({"algorithm": "sync",
      ...                                                    "workdir": "/tmp/r"}).flags)
      >>> ej.sweep(make, loss_fn, params, {"beta": [0.0, 1.0], "momentum": [0.5, 0.9]}, ...)
    """
    for name in hparams:
        if name not in HPARAM_FLAGS:
            raise ValueError(f"hparams: got {name!r}; expected one of "
                             f"{', '.join(map(repr, HPARAM_FLAGS))}")
        why = flags.refusal(TABLE, f, HPARAM_FLAGS[name])
        if why:
            raise ValueError(f"hparams: got {name!r}; expected {why}")
    f = {**f, **{HPARAM_FLAGS[name]: value for name, value in hparams.items()}}
    kw = {"rule": make_rule(f)}
    if f["algorithm"] in UPDATE_RULE and f["compressor"] == "powersgd":
        kw["compressor"] = make_compressor(f)  # collective: not a link of the chain
    if f["compute"] != "none":  # (not with --algorithm=async: refused by validate)
        kw["system"] = make_system(f)
    return ALGORITHMS[f["algorithm"]](f, make_schedule(f), kw)


def make_rule(f: Mapping[str, Any]) -> ej.Rule:
    """Every worker's chain: [clip] + [weight decay] + the base optimizer + [compression].

    With sgd, weight decay is a gradient link before it (optax.add_decayed_weights,
    then optax.sgd); with adamw it is AdamW's own. Compression, with or without
    error feedback, applies to the algorithms with a compressor (`UPDATE_RULE`).
    """
    links = [ej.clip(f["clip_norm"])] if f["clip_norm"] else []
    if f["optimizer"] == "adamw":
        links.append(ej.adamw(weight_decay=f["weight_decay"]))
    else:
        links += [ej.weight_decay(f["weight_decay"])] if f["weight_decay"] else []
        links.append(ej.sgd(momentum=f["momentum"], nesterov=f["nesterov"]))
    if f["algorithm"] in UPDATE_RULE and f["compressor"] != "powersgd":
        compressor = make_compressor(f)
        if f["error_feedback"]:
            links.append(ej.error_feedback(compressor or ej.identity(), beta=f["ef_beta"]))
        elif compressor is not None:
            links.append(compressor)
    return ej.chain(*links)


def make_schedule(f: Mapping[str, Any]):
    """The learning rate: a number, or an optax schedule of the round (see `--schedule`)."""
    eta, kind, fraction = f["learning_rate"], f["schedule"], f["final_lr_fraction"]
    horizon = f["schedule_rounds"] or f["rounds"]
    if kind == "cosine":
        return optax.cosine_decay_schedule(eta, horizon, alpha=fraction)
    if kind == "linear":
        return optax.linear_schedule(eta, eta * fraction, horizon)
    if kind == "exponential":
        return optax.exponential_decay(eta, horizon, fraction, end_value=eta * fraction)
    return eta  # a number, so that the factory checks it too


def make_gossip_compressor(f: Mapping[str, Any]):
    """CHOCO's compressor `--gossip_compressor` names, or None (plain gossip)."""
    name = f["gossip_compressor"]
    if name in ("top_k", "random_k"):
        return getattr(ej, name)(fraction=f["gossip_k_fraction"])
    return {"none": lambda: None, "identity": ej.identity,
            "scaled_sign": ej.scaled_sign}[name]()


def make_system(f: Mapping[str, Any]):
    """The `ej.clock.system` the flags describe (its schedule covers `--rounds`), or None."""
    name = f["compute"]
    if name == "none":
        return None
    mean = f["compute_mean"]
    law = {"constant": lambda: ej.clock.constant(mean),
           "exponential": lambda: ej.clock.exponential(mean, f["compute_shift"]),
           "lognormal": lambda: ej.clock.lognormal(mean, f["compute_sigma"]),
           "pareto": lambda: ej.clock.pareto(mean, f["pareto_shape"])}[name]()
    p, k = f["num_workers"], f["stragglers"]
    slowdown = [1.0] * (p - k) + [f["straggler_slowdown"]] * k if k else None
    network = ej.clock.network(f["latency"], f["bandwidth"] or math.inf, f["jitter"])
    return ej.clock.system(law, rounds=f["rounds"], network=network, slowdown=slowdown,
                           seed=f["system_seed"])


def describe_system(f: Mapping[str, Any]) -> str:
    """The simulated system in a few words, or `""`."""
    if f["compute"] == "none":
        return ""
    law = f["compute"] + f" {f['compute_mean']:g} s"
    if f["compute"] == "exponential" and f["compute_shift"]:
        law += f" + {f['compute_shift']:g} s"
    law += {"lognormal": f" (sigma {f['compute_sigma']:g})",
            "pareto": f" (shape {f['pareto_shape']:g})"}.get(f["compute"], "")
    parts = [f"clock: {law}"]
    if f["stragglers"]:
        parts.append(f"{f['stragglers']} straggler(s) x{f['straggler_slowdown']:g}")
    if f["latency"] or f["bandwidth"]:
        parts.append(f"network {f['latency']:g} s + bits / "
                     + (f"{f['bandwidth']:g} bit/s" if f["bandwidth"] else "inf"))
    if f["jitter"]:
        parts.append(f"jitter {f['jitter']:g} s")
    return ", ".join(parts)


def rounds_shape_the_algorithm(f: Mapping[str, Any]) -> bool:
    """Whether `--rounds` enters the algorithm: a decaying schedule, or the clock's horizon."""
    return rounds_matter(f) or f["compute"] != "none"


def make_compressor(f: Mapping[str, Any]):
    """The compressor `--compressor` names, or None."""
    name = f["compressor"]
    if name in ("random_k", "scaled_random_k"):
        return ej.random_k(fraction=f["k_fraction"], scaled=name == "scaled_random_k")
    return {"none": lambda: None, "identity": ej.identity, "scaled_sign": ej.scaled_sign,
            "top_k": lambda: ej.top_k(fraction=f["k_fraction"]),
            "qsgd": lambda: ej.qsgd(f["qsgd_levels"]),
            "powersgd": lambda: ej.powersgd(f["powersgd_rank"],
                                            error_feedback=f["error_feedback"])}[name]()


def make_outer_compressor(f: Mapping[str, Any]):
    """DiLoCo's outer compressor `--outer_compressor` names, or None."""
    return {"none": lambda: None,
            "top_k": lambda: ej.error_feedback(ej.top_k(fraction=f["outer_k_fraction"])),
            "qsgd": lambda: ej.qsgd(OUTER_QSGD_LEVELS),
            "powersgd": lambda: ej.powersgd(f["outer_powersgd_rank"])}[f["outer_compressor"]]()


def describe(f: Mapping[str, Any]) -> str:
    """The configuration in a few words (algorithm, P, reads, delays, faults, compressor,
    error feedback), for plot titles and the log."""
    name = f["algorithm"]
    parts = [f"{name.replace('_', ' ')} P={f['num_workers']}"]
    if name == "async":
        parts.append(f"{f['reads']} reads")
    if name in STALE:
        parts.append(f"{f['delay']} delays <= {f['max_delay']}")
    if name == "message_passing":
        faults = [f"drops {f['drop_prob']:g} " + ("retransmitted" if f["retransmit"] else
                                                   "lost")] if f["drop_prob"] else []
        faults += [f"{f['crashes']} crash(es) before round {f['crash_horizon']}"] * bool(
            f["crashes"])
        parts.append(", ".join(faults) or "no faults")
    if name == "elastic_scheduling":
        parts.append(f"{f['mode']}-bounded, <= {f['max_outstanding']} outstanding, "
                     f"{f['delay']} delays")
    if name == "local_sgd":
        parts.append(f"period {f['period']}")
    if name == "diloco":
        momentum = (f"{'Nesterov' if f['outer_nesterov'] else 'momentum'} "
                    f"{f['outer_momentum']:g}" if f["outer_momentum"] else "no momentum")
        parts.append(f"H {f['period']}, outer SGD {f['outer_learning_rate']:g} ({momentum})")
        if f["fragments"] > 1:
            parts.append(f"{f['fragments']} fragments")
        if f["outer_compressor"] != "none":
            parts.append({"top_k": f"outer Top-{100 * f['outer_k_fraction']:.3g}% + EF",
                          "qsgd": "outer 4-bit QSGD",
                          "powersgd": f"outer PowerSGD rank {f['outer_powersgd_rank']}"}[
                              f["outer_compressor"]])
    if name == "gossip":
        parts.append(f"{f['topology'].replace('_', ' ')}" + (
            f", {f['local_steps']} local steps" if f["local_steps"] > 1 else ""))
        if f["gossip_compressor"] != "none":
            what = f["gossip_compressor"].replace("_", " ")
            if f["gossip_compressor"] in ("top_k", "random_k"):
                what += f" {100 * f['gossip_k_fraction']:.3g}%"
            parts.append(f"CHOCO {what}, gamma {f['gossip_gamma']:g}")
    if name == "clock_async":
        parts.append("writes drop beyond lag " + str(f["staleness_cap"] or f["num_workers"] - 1)
                     if f["staleness_policy"] == "drop" else "every write applied")
    if name in UPDATE_RULE:
        k = f"{100 * f['k_fraction']:.3g}%"
        compressor = {"none": "uncompressed", "top_k": f"Top-{k}", "random_k": f"random-{k}",
                      "scaled_random_k": f"scaled random-{k}", "qsgd":
                      f"QSGD {f['qsgd_levels']} levels",
                      "powersgd": f"PowerSGD rank {f['powersgd_rank']}"}.get(f["compressor"],
                                                             f["compressor"].replace("_", " "))
        beta = f" (beta {f['ef_beta']:g})" if f["ef_beta"] < 1 else ""
        parts.append(compressor + (f" + EF{beta}" if f["error_feedback"] else ", no EF"))
    if f["clip_norm"]:
        parts.append(f"clip {f['clip_norm']:g}")
    if f["optimizer"] == "adamw" or f["momentum"] or f["weight_decay"]:
        optimizer = ("AdamW" if f["optimizer"] == "adamw" else
                     f"{'Nesterov' if f['nesterov'] else 'momentum'} {f['momentum']:g}"
                     if f["momentum"] else "SGD")
        decay = f" + weight decay {f['weight_decay']:g}" if f["weight_decay"] else ""
        where = " at the server" if name == "sync" and f["optimizer_placement"] == "server" \
            else ""
        parts.append(optimizer + where + decay)
    if f["compute"] != "none":
        parts.append(describe_system(f))
    data = f["dataset"] + (f" ({f['model']})" if f["dataset"] in IMAGE_DATASETS else "")
    seeds = f", {f['num_seeds']} seeds" if f["num_seeds"] > 1 else ""
    return ", ".join(parts) + f" on {data}{seeds}"


def resolve_loop(f: Mapping[str, Any], platform: str) -> str:
    """`"python"` or `"chunks"`: what `--loop` stands for on `platform` (see `--loop`)."""
    if f["loop"] != "auto":
        return f["loop"]
    if f["num_devices"] or f["num_processes"] > 1:
        return "python"
    convolves = f["dataset"] not in CONVEX_DATASETS and f["model"] in CONV_MODELS
    return "python" if convolves and platform == "cpu" else "chunks"


def rounds_matter(f: Mapping[str, Any]) -> bool:
    """Whether `--rounds` changes the trajectory: a decaying schedule spans it."""
    return f["schedule"] != "constant" and f["schedule_rounds"] == 0


# Semantic flags added after configs were first saved, with the behaviour a config
# that does not record them had where it is not the flag's default: before `--loop`,
# every run was a Python loop. (Before --optimizer and its flags, every run was plain
# SGD at the workers, and before --compute no run had a clock: their defaults.)
LEGACY_VALUES: dict[str, Any] = {"loop": "python"}


def semantic_differences(saved: Mapping[str, Any], f: Mapping[str, Any]) -> list[tuple]:
    """`(flag, saved value, current value)` for each semantic flag on which they differ.

    Both are compared as effective configurations (None: the flag does not apply):
    a flag the saved config does not record (one added since, or one that did not
    apply) takes its `LEGACY_VALUES` value or its default, and a config saved with
    every flag (as before only the applying ones were saved) is reduced to those
    that apply to it. `--rounds` counts when a decaying schedule spans it.
    """
    saved = flags.effective(FLAGS, {**DEFAULTS, **LEGACY_VALUES,
                                    **{n: v for n, v in saved.items() if n in TABLE}})
    current = flags.effective(FLAGS, f)
    names = [s.name for s in FLAGS if s.semantic] + ["rounds"] * rounds_matter(f)
    return [(n, saved.get(n), current.get(n)) for n in names if saved.get(n) != current.get(n)]
