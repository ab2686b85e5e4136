"""The launcher's flags as data, and their validation.

`FLAG_SPECS` declares every flag of `python -m experiments.train` once: its type,
default, meaning and range. `experiments.train` turns the table into absl flags;
`validate` checks a mapping of flag values against it (plus every cross-flag
constraint) and builds the algorithm, without compiling anything, so that a bad
command line fails before any work with one line of the form

    --<flag>: got <value>; expected <range>

(or, for a data file, a line that starts with its path). The library factories
raise `ValueError`s of the same form (`max_delay: got 3; expected ...`); `validate`
builds the algorithm inside the check and renames their argument to the flag.

Adding an algorithm is one entry in `experiments.registry.ALGORITHMS`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import elastic_jax as ej
from experiments.registry import (
    ALGORITHMS,
    COMPRESSORS,
    OFF_VALUES,
    SCHEDULES,
    Parts,
    make_compressor,
    make_schedule,
)

MAX_INT = 10**9  # the upper end of the open-ended integer ranges

# Exit status of `python -m experiments.train` (also in its docstring and the README).
EXIT_USAGE = 2  # a bad flag, data file or workdir: one line on stderr, nothing written
EXIT_NONFINITE = 3  # --on_nonfinite=stop met a non-finite value: one line on stderr
EXIT_SIGNAL = 128  # plus the signal number: SIGINT 130, SIGTERM 143, after a final checkpoint
EXIT_STATUS: tuple[tuple[str, str], ...] = (
    ("0", "the run finished (with --on_nonfinite=skip_round, possibly with skipped rounds; "
     "the log and nonfinite/skipped_rounds say how many)"),
    (str(EXIT_USAGE), "usage error: a bad flag or combination, a missing or corrupt data file, "
     "a workdir that holds a run (without --resume) or that another running process is "
     "using; one line on stderr, nothing written"),
    (str(EXIT_NONFINITE), "--on_nonfinite=stop met a non-finite loss, gradient norm or state; "
     "one line on stderr names the round and the quantity; the last checkpoint (all finite) "
     "is kept and --resume continues from it"),
    (f"{EXIT_SIGNAL + 2}, {EXIT_SIGNAL + 15}", "SIGINT, SIGTERM (128 + the signal number): "
     "a final checkpoint at the current round was written after the metrics up to it; "
     "--resume continues exactly"),
    ("killed (-9)", "SIGKILL or a crash: nothing more is written; --resume continues exactly "
     "from the last checkpoint"),
)


class UsageError(ValueError):
    """A bad command line: the message is one line naming the flag (or a data path)."""


class FlagSpec(NamedTuple):
    """One flag: its absl type, default, meaning and range.

    Attributes:
      name: the flag name, without `--`.
      kind: `"int"`, `"float"`, `"bool"`, `"enum"` or `"string"`.
      default: the default value.
      help: what the flag means.
      choices: the allowed values of an enum flag.
      lo, hi: the range of a number (None: unbounded).
      lo_open: whether `lo` itself is excluded.
      hi_open: whether `hi` itself is excluded.
      semantic: whether the flag changes the run's trajectory or its deterministic
        record; a resumed run must agree with the saved config on every semantic flag.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    semantic: bool = True

    @property
    def expected(self) -> str:
        """The range, as it appears in `--helpfull` and in error messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "string":
            return "a string"
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        lo = "-inf" if self.lo is None else _fmt(self.lo)
        hi = "inf" if self.hi is None else _fmt(self.hi)
        what = "an integer" if self.kind == "int" else "a finite number"
        return f"{what} in {left}{lo}, {hi}{right}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


IMAGE_DATASETS = ("digits", "mnist", "cifar10")
LOOPS = ("auto", "python", "chunks")
CHUNK = 16  # rounds per program of --loop=chunks, as ej.run's chunks
# Models whose loss convolves: on the CPU their rounds run in a Python loop.
CONV_MODELS = ("cnn", "resnet20")
CONVEX_DATASETS = ("least_squares", "logistic")


# ------------------------------------------------------------------------ flags


def _int(name, default, help_, lo, hi=MAX_INT, **kw) -> FlagSpec:
    return FlagSpec(name, "int", default, help_, lo=lo, hi=hi, **kw)


def _float(name, default, help_, lo, hi=None, **kw) -> FlagSpec:
    return FlagSpec(name, "float", default, help_, lo=lo, hi=hi, **kw)


def _enum(name, default, help_, choices, **kw) -> FlagSpec:
    return FlagSpec(name, "enum", default, help_, choices=tuple(choices), **kw)


FLAG_SPECS: tuple[FlagSpec, ...] = (
    # The algorithm.
    _enum("algorithm", "async", "The distributed SGD variant (experiments.config."
          "ALGORITHMS; message_passing, elastic_scheduling and local_sgd are registered "
          "when elastic_jax exports them).", tuple(ALGORITHMS)),
    _int("num_workers", 8, "P, the number of simulated workers.", 1, 4096),
    _int("max_delay", 8, "Largest staleness in updates (async: >= num_workers - 1) or "
         "message delay in rounds (message_passing).", 0, 100_000),
    _enum("delay", "uniform", "Delay law of stale reads / late messages (geometric: "
          "p = 0.5). async, message_passing, elastic_scheduling.",
          ("fixed", "uniform", "geometric")),
    _enum("reads", "inconsistent", "async: one lag per update (consistent) or per "
          "coordinate (inconsistent).", ("consistent", "inconsistent")),
    _enum("compressor", "top_k", "Compressor applied to each worker's update "
          "(scaled_random_k: unbiased random-k; none: uncompressed). sync, async, "
          "message_passing.", COMPRESSORS),
    _float("k_fraction", 0.01, "Fraction of entries top_k / random_k keep "
           "(k = max(1, floor(fraction d))).", 0.0, 1.0, lo_open=True),
    _int("qsgd_levels", 4, "Quantisation levels of qsgd.", 1, 65_535),
    FlagSpec("error_feedback", "bool", True, "EF14 residual memory around the compressor "
             "(around the identity when --compressor=none). Needs a contractive "
             "compressor (not qsgd, scaled_random_k)."),
    _float("ef_beta", 1.0, "Error-feedback damping beta (1: EF14).", 0.0, 1.0),
    _float("clip_norm", 0.0, "Clip each worker's gradient to this norm; 0: no clipping.",
           0.0),
    _float("drop_prob", 0.0, "message_passing: probability that a message is dropped.",
           0.0, 1.0, hi_open=True),
    FlagSpec("retransmit", "bool", True, "message_passing: resend dropped messages."),
    _int("crashes", 0, "message_passing: number of workers that crash (needs "
         "--crash_horizon).", 0, 4096),
    _int("crash_horizon", 0, "message_passing: crash rounds are drawn uniformly in "
         "[1, crash_horizon); 0: no crashes.", 0),
    _int("max_outstanding", 8, "elastic_scheduling: most updates in flight.", 1, 100_000),
    _enum("mode", "norm", "elastic_scheduling: what the scheduler bounds.",
          ("norm", "variance")),
    _int("period", 4, "local_sgd: rounds between model averages.", 1, 100_000),
    # The optimiser.
    _float("learning_rate", 0.05, "Base learning rate eta.", 0.0, lo_open=True),
    _enum("schedule", "constant", "Learning-rate schedule over --schedule_rounds "
          "(cosine, linear: from eta to eta * final_lr_fraction, then flat; exponential: "
          "eta * final_lr_fraction^(round / schedule_rounds), floored at the final value).",
          SCHEDULES),
    _int("schedule_rounds", 0, "Horizon of a decaying schedule; 0: --rounds (then a resume "
         "may not change --rounds).", 0),
    _float("final_lr_fraction", 0.1, "Final learning rate of a decaying schedule, as a "
           "fraction of --learning_rate.", 0.0, 1.0),
    _int("batch_size", 32, "Samples per worker per round.", 1, 65_536),
    _int("rounds", 500, "Total rounds of the run (a resume continues to this round).", 1,
         semantic=False),
    # The problem.
    _enum("model", "cnn", "Flax model (cnn: the 25,290-parameter SmallCNN on 8x8 digits). "
          "Ignored by the convex datasets, which train a linear model.",
          ("mlp", "cnn", "resnet20")),
    _enum("dataset", "digits", "digits is bundled; mnist and cifar10 read --data_dir; "
          "least_squares and logistic are synthetic convex problems.",
          IMAGE_DATASETS + CONVEX_DATASETS),
    FlagSpec("data_dir", "string", "", "Directory of the mnist (IDX) or cifar10 (binary) "
             "files.", semantic=False),
    _int("convex_samples", 4096, "Samples of a convex dataset.", 1, 10_000_000),
    _int("convex_dim", 64, "Dimension of a convex dataset.", 1, 100_000),
    _enum("partition", "iid", "How the training set is split among workers (dirichlet: "
          "non-IID over labels).", ("iid", "dirichlet")),
    _float("dirichlet_alpha", 0.5, "Concentration of the Dirichlet split (small: few "
           "classes per worker).", 0.0, lo_open=True),
    _int("seed", 0, "Seed of the first run of the batch; it also draws the partition and "
         "the convex problem.", 0, 2**31 - 1),
    _int("num_seeds", 1, "Seeds seed, seed+1, ... run as one vmapped batch; metrics are "
         "means over seeds, with <name>/std the standard deviation.", 1, 1024),
    # The record.
    FlagSpec("workdir", "string", "", "Directory of the run: config.json, metrics.jsonl, "
             "timing.jsonl, checkpoint.npz, *.png (required).", semantic=False),
    _int("log_every", 10, "Write a metrics line (and fetch metrics from the device) every "
         "this many rounds, and at the last round.", 1),
    _int("eval_every", 50, "Evaluate the model on the test set every this many rounds; 0: "
         "only at the last round.", 0),
    _int("checkpoint_every", 100, "Save a checkpoint every this many rounds; 0: only at "
         "the last round.", 0, semantic=False),
    FlagSpec("resume", "bool", False, "Continue the run in --workdir from its last "
             "checkpoint (from round 0 if it has none).", semantic=False),
    _enum("on_nonfinite", "stop", "What a non-finite loss, gradient norm or state (parameters, "
          "residuals) does. stop: end the run at that round with one line naming the round and "
          f"the quantity, keep the last checkpoint, exit with status {EXIT_NONFINITE}. "
          "skip_round: drop that round's update (the round counter, and with it the schedule "
          "and every random key, still advances) and count it in nonfinite/skipped_rounds.",
          ("stop", "skip_round"), semantic=False),
    _enum("worker_loop", "auto", "How each device evaluates its block of workers' "
          "gradients (ej.make_step): auto picks the fastest for the model and backend; map "
          "is bitwise independent of the placement; unroll and vmap agree with it to "
          "rounding.", ("auto", "map", "unroll", "vmap")),
    _enum("loop", "auto", "How the launcher runs the rounds. python: a Python loop over "
          f"one compiled round; chunks: up to {CHUNK} rounds in one compiled program (a "
          "while loop), ending at every logged, evaluated and checkpointed round; auto: "
          "chunks, except a Python loop for the convolutional models (cnn, resnet20) on "
          "the CPU, where XLA:CPU runs a convolution inside a loop body many times slower, "
          "and with --num_devices. The two agree to rounding; a resume must use the "
          "run's loop.", LOOPS),
    # Placement: the result is bitwise the same however the workers are placed.
    _int("num_devices", 0, "Devices the workers are split over (a 'workers' mesh over "
         "every process's devices); 0: one device. Must divide --num_workers.", 0, 65_536,
         semantic=False),
    FlagSpec("coordinator", "string", "", "host:port of process 0 for jax.distributed "
             "(multi-host runs); empty: a single process.", semantic=False),
    _int("num_processes", 1, "Processes of a multi-host run (jax.distributed).", 1, 65_536,
         semantic=False),
    _int("process_id", 0, "This process's index in [0, --num_processes).", 0, 65_535,
         semantic=False),
)
SPECS: dict[str, FlagSpec] = {s.name: s for s in FLAG_SPECS}
DEFAULTS: dict[str, Any] = {s.name: s.default for s in FLAG_SPECS}


class Config(NamedTuple):
    """A validated configuration.

    Attributes:
      flags: every flag's value (defaults filled in), as plain Python values.
      algorithm: the `ej.Algorithm` the flags describe.
      parts: the schedule, compressor, error feedback and clipping it was built from.
    """

    flags: dict[str, Any]
    algorithm: ej.Algorithm
    parts: Parts

    @property
    def convex(self) -> bool:
        return self.flags["dataset"] in CONVEX_DATASETS


# ------------------------------------------------------------------- validation


def usage(name: str, value, expected: str) -> UsageError:
    """`UsageError("--<name>: got <value>; expected <expected>")`."""
    return UsageError(f"--{name}: got {value!r}; expected {expected}")


def _check_value(spec: FlagSpec, value) -> Any:
    """Checks one flag's type and range; returns the value as a plain Python value."""
    bad = usage(spec.name, value, spec.expected)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if spec.kind in ("enum", "string"):
        if not isinstance(value, str) or (spec.kind == "enum" and value not in spec.choices):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad
    if spec.kind == "int":
        if not isinstance(value, numbers.Integral):
            raise bad
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise bad
    if spec.lo is not None and (value < spec.lo or (spec.lo_open and value == spec.lo)):
        raise bad
    if spec.hi is not None and (value > spec.hi or (spec.hi_open and value == spec.hi)):
        raise bad
    return value


# Library argument names -> the flag that sets them.
_ARGUMENT_FLAGS = {
    "fraction": "k_fraction", "k": "k_fraction", "levels": "qsgd_levels",
    "beta": "ef_beta", "error_feedback": "ef_beta", "decay_steps": "schedule_rounds",
    "transition_steps": "schedule_rounds", "alpha": "dirichlet_alpha", "kind": "partition",
    "num_samples": "convex_samples", "dim": "convex_dim",
}


def from_library_error(error: Exception) -> UsageError:
    """Renames a library `ValueError("<argument>: got ...")` to the flag that set it."""
    message = " ".join(str(error).split())
    match = re.match(r"^(\w+): ", message)
    if match:
        argument = match.group(1)
        flag = _ARGUMENT_FLAGS.get(argument, argument)
        if flag in SPECS:
            return UsageError(f"--{flag}: {message[match.end():]}")
    return UsageError(message)


def _check_combinations(f: Mapping[str, Any]) -> None:
    entry = ALGORITHMS[f["algorithm"]]
    for name, off in OFF_VALUES.items():
        if name not in entry.uses and f[name] != off:
            raise usage(name, f[name], f"{off!r}: --algorithm={f['algorithm']} does not "
                        f"use --{name}")
    if f["crashes"] > 0 and f["crash_horizon"] == 0:
        raise usage("crash_horizon", 0, f"an integer in [2, {MAX_INT}] with --crashes="
                    f"{f['crashes']} (crash rounds are drawn in [1, crash_horizon))")
    if f["dataset"] in ("mnist", "cifar10") and not f["data_dir"]:
        raise usage("data_dir", f["data_dir"], f"the directory holding the {f['dataset']} "
                    "files (only digits is bundled)")
    if f["schedule"] == "exponential" and f["final_lr_fraction"] == 0.0:
        raise usage("final_lr_fraction", 0.0, "a finite number in (0, 1] with "
                    "--schedule=exponential")
    if f["dataset"] == "least_squares" and f["partition"] == "dirichlet":
        raise usage("partition", "dirichlet", "'iid' with --dataset=least_squares (its "
                    "targets are not class labels)")
    if f["num_workers"] > f["convex_samples"] and f["dataset"] in CONVEX_DATASETS:
        raise usage("num_workers", f["num_workers"], f"at most --convex_samples="
                    f"{f['convex_samples']} (every worker needs a sample)")
    if not f["workdir"]:
        raise usage("workdir", f["workdir"], "the directory of the run (a path)")
    if f["num_processes"] > 1 and not f["coordinator"]:
        raise usage("coordinator", f["coordinator"], "host:port of process 0 with "
                    f"--num_processes={f['num_processes']}")
    if f["coordinator"] and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", f["coordinator"]):
        raise usage("coordinator", f["coordinator"], "host:port")
    if f["process_id"] >= f["num_processes"]:
        raise usage("process_id", f["process_id"], f"an integer in [0, "
                    f"{f['num_processes'] - 1}] (--num_processes={f['num_processes']})")
    if f["num_devices"] and f["num_workers"] % f["num_devices"]:
        raise usage("num_devices", f["num_devices"], f"a divisor of --num_workers="
                    f"{f['num_workers']} (each device runs num_workers / num_devices workers)")
    if f["num_devices"] and f["num_seeds"] > 1:
        raise usage("num_devices", f["num_devices"], "0 with --num_seeds > 1 (seeds are "
                    "vmapped on one device)")


def validate(values: Mapping[str, Any]) -> Config:
    """Checks flag values and builds the algorithm; compiles nothing.

    Args:
      values: flag name -> value; missing flags take their defaults.

    Returns:
      The `Config`.

    Raises:
      UsageError: one line naming the flag, for an unknown flag, a value of the
        wrong type or out of range, an inconsistent combination, or any
        `ValueError` the library factories raise for these arguments.
    """
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise usage(unknown[0], values[unknown[0]], "a flag of experiments.train "
                    "(see --helpfull)")
    f = {name: _check_value(SPECS[name], values.get(name, spec.default))
         for name, spec in SPECS.items()}
    _check_combinations(f)
    try:
        compressor = make_compressor(f)
        error_feedback = (True if f["ef_beta"] == 1.0 else f["ef_beta"]) \
            if f["error_feedback"] else False
        parts = Parts(make_schedule(f), compressor, error_feedback, f["clip_norm"] or None)
        algorithm = ALGORITHMS[f["algorithm"]].build(f, parts)
    except ValueError as e:
        raise from_library_error(e) from None
    return Config(f, algorithm, parts)


def resolve_loop(f: Mapping[str, Any], platform: str) -> str:
    """`"python"` or `"chunks"`: what `--loop` stands for on `platform`.

    `auto` mirrors `ej.run(loop="auto")`: chunks of rounds in one program, except
    a Python loop over the round on a mesh (`--num_devices`), and for a
    convolutional model on the CPU (XLA:CPU loses its fast convolution inside a
    loop body: a small CNN's round measured ~20x slower in chunks; see
    benchmarks/README.md).
    """
    if f["loop"] != "auto":
        return f["loop"]
    if f["num_devices"] or f["num_processes"] > 1:
        return "python"
    convolves = f["dataset"] not in CONVEX_DATASETS and f["model"] in CONV_MODELS
    return "python" if convolves and platform == "cpu" else "chunks"


def rounds_matter(f: Mapping[str, Any]) -> bool:
    """Whether `--rounds` changes the trajectory: a decaying schedule spans it."""
    return f["schedule"] != "constant" and f["schedule_rounds"] == 0


# Semantic flags added after configs were first saved, with the behaviour a
# config that does not record them had: before `--loop`, every run was a Python loop.
LEGACY_VALUES: dict[str, Any] = {"loop": "python"}


def with_legacy_values(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with `LEGACY_VALUES` filled in where it records no value."""
    return {**LEGACY_VALUES, **saved}


def semantic_differences(saved: Mapping[str, Any], f: Mapping[str, Any]) -> list[str]:
    """The semantic flags on which a saved config and the current flags disagree.

    `--rounds` is not semantic unless a decaying schedule spans `--rounds`
    (`--schedule_rounds=0`): then the schedule, hence the trajectory, depends on it.
    """
    names = [s.name for s in FLAG_SPECS if s.semantic]
    if rounds_matter(f):
        names.append("rounds")
    return [n for n in names if n not in saved or saved[n] != f[n]]
