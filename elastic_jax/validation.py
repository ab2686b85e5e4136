"""Argument validation with one message form: `<argument>: got <value>; expected <range>`.

Only concrete Python or NumPy values are checked; JAX tracers pass through, so
factories can be built inside a differentiated function (docs/design.md, "The one abstraction").

`FACTORY_ARGUMENTS` lists every argument of every public factory with its valid
values, worded as the messages word them; `python -m experiments.arguments`
prints it as the reference table `docs/arguments.md`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value) -> bool:
    """True for values only known at run time (tracers)."""
    return isinstance(value, jax.core.Tracer)


def concrete_number(value):
    """The value as a Python number when concrete and scalar, else None."""
    if is_traced(value) or callable(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Number):
        return value
    if isinstance(value, np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return None


class Text(str):
    """A description of a value, shown without quotes in error messages."""

    def __repr__(self) -> str:
        return str(self)


def fail(name: str, value, expected: str):
    """Raises `ValueError("<name>: got <value>; expected <expected>")`."""
    raise ValueError(f"{name}: got {value!r}; expected {expected}")


def range_text(kind: str, lo=None, hi=None, *, lo_open: bool = False,
               hi_open: bool = False) -> str:
    """The `<range>` of a message: `an integer in [1, inf]`, `a finite number in (0.0, 1.0]`.

    `check_int`, `check_real` and the reference table `FACTORY_ARGUMENTS` all
    word their ranges with it, so an error message and the table agree.
    """
    lo_s = "-inf" if lo is None else str(lo)
    hi_s = "inf" if hi is None else str(hi)
    if kind == "int":
        return f"an integer in [{lo_s}, {hi_s}]"
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"a finite number in {left}{lo_s}, {hi_s}{right}"


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """Checks that `value` is an integer in `[lo, hi]` and returns it."""
    expected = range_text("int", lo, hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, expected)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(name, value, expected)
    return int(value)


def check_real(
    name: str,
    value,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
):
    """Checks a real number in a range when concrete (finite); tracers pass through."""
    expected = range_text("real", lo, hi, lo_open=lo_open, hi_open=hi_open)
    if is_traced(value):
        return value
    number = concrete_number(value)
    if number is None or isinstance(number, bool) or not isinstance(number, numbers.Real):
        fail(name, value, expected)
    if not math.isfinite(number):
        fail(name, value, expected)
    if lo is not None and (number < lo or (lo_open and number == lo)):
        fail(name, value, expected)
    if hi is not None and (number > hi or (hi_open and number == hi)):
        fail(name, value, expected)
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def as_schedule(learning_rate) -> Callable[[jax.Array], jax.Array]:
    """A learning rate (float, array or tracer) or an optax schedule, as a schedule.

    Negative or non-finite concrete rates are refused; a schedule is a callable
    of the round number and is not inspected.
    """
    if callable(learning_rate):
        return learning_rate
    check_real("learning_rate", learning_rate, lo=0.0)
    if not is_traced(learning_rate) and np.ndim(learning_rate) != 0:
        fail("learning_rate", learning_rate, "a scalar or an optax schedule")

    def constant(count):
        del count
        return jnp.asarray(learning_rate)

    return constant


def check_clip_norm(clip_norm):
    if clip_norm is not None:
        check_real("clip_norm", clip_norm, lo=0.0, lo_open=True)
    return clip_norm


def check_beta(error_feedback):
    """`error_feedback` as a damping `beta` in [0, 1], or None (no error feedback)."""
    if error_feedback is None or error_feedback is False:
        return None
    if error_feedback is True:
        return 1.0
    if is_traced(error_feedback):
        return error_feedback
    number = concrete_number(error_feedback)
    if number is None or not 0.0 <= number <= 1.0 or not math.isfinite(number):
        fail("error_feedback", error_feedback, "a bool or a float beta in [0, 1]")
    return error_feedback


# ----------------------------------------------------------- reference table


class ArgumentSpec(NamedTuple):
    """One argument of a public factory and its valid values, for the reference table.

    Attributes:
      name: the argument's name in the factory's signature.
      kind: `"int"` or `"real"` (a range, `lo`..`hi`), `"choice"` (one of
        `choices`) or `"text"` (`note` says it all).
      lo, hi, lo_open, hi_open: the range of a number (None: unbounded).
      choices: the strings a `"choice"` argument accepts.
      note: what else holds (cross-argument constraints, other accepted types);
        for `"text"`, the whole description.
      reported_as: the name the error message uses, when it is not `name`.
    """

    name: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    note: str = ""
    reported_as: str = ""

    @property
    def expected(self) -> str:
        """The valid values, worded as in the error messages."""
        if self.kind in ("int", "real"):
            text = range_text(self.kind, self.lo, self.hi, lo_open=self.lo_open,
                              hi_open=self.hi_open)
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            return self.note
        if not self.note:
            return text
        joiner = " " if self.note.startswith(("or ", "and ")) else "; "
        return f"{text}{joiner}{self.note}"


def _text(name: str, note: str, **kw) -> ArgumentSpec:
    return ArgumentSpec(name, "text", note=note, **kw)


_LEARNING_RATE = ArgumentSpec("learning_rate", "real", lo=0.0,
                              note="or an optax schedule (a callable of the round)")
_NUM_WORKERS = ArgumentSpec("num_workers", "int", lo=1, note="the number of workers P")
_COMPRESSOR = _text("compressor", "None (send the update as is) or a bare compressor: "
                    "ej.identity(), ej.top_k(...), ej.random_k(...), ej.qsgd(...), "
                    "ej.scaled_sign(); with error feedback, a contractive one (not ej.qsgd, "
                    "not ej.random_k(scaled=True)); never one wrapped by ej.error_feedback")
_ERROR_FEEDBACK = _text("error_feedback", "False, True (beta = 1) or a float beta in [0, 1] "
                        "(a tracer passes)")
_RULE = _text("rule", "None or a chain built by ej.chain(...): exactly one base optimizer "
              "(ej.sgd(...), ej.adamw(...), ej.from_optax(tx)), gradient links (ej.clip, "
              "ej.weight_decay, ej.ef21) before it, update links (a compressor, "
              "ej.error_feedback) after it, at most one that compresses; exclusive with "
              "compressor, error_feedback and clip_norm; ej.ef21 with sync_sgd only")
_UNCOMPRESSED_RULE = _text("rule", "None or a chain built by ej.chain(...) without a link "
                           "that compresses or holds back (the updates are sent dense); "
                           "exclusive with clip_norm")
_CLIP_NORM = ArgumentSpec("clip_norm", "real", lo=0.0, lo_open=True,
                          note="or None (no clipping)")
_STALENESS = ArgumentSpec("staleness", "real", lo=0.0, hi=1.0,
                          note="0: the freshest reads, 1: the configured system (a tracer "
                          "passes)")
_DELAY_LAW = _text("delay", "'uniform', 'fixed', 'geometric' or an ej.delays law (not a trace)")
_K = _text("k", "None or an integer in [1, d], d the entries the compressor sees (checked at "
           "init); exactly one of k and fraction")
_FRACTION = ArgumentSpec("fraction", "real", lo=0.0, hi=1.0, lo_open=True,
                         note="or None; keeps k = max(1, floor(fraction d))")
_WORKER_PLACEMENT = ArgumentSpec("optimizer_placement", "choice", choices=("worker",),
                                 note="server placement is defined for sync_sgd only")
_UNIT_DECAY = {"lo": 0.0, "hi": 1.0, "hi_open": True}
_KEY = _text("key", "an int seed or a jax.random key (standalone use; algorithms pass their "
             "own keys)")
_SYSTEM = _text("system", "None, or an ej.clock.system(...) with one slowdown factor and one "
                "trace column per worker: each round also reports time/elapsed, time/round, "
                "time/idle_fraction and comm/seconds, and the run may not go beyond its rounds")
_SECONDS = ArgumentSpec("seconds", "real", lo=0.0)
_MEAN = ArgumentSpec("mean", "real", lo=0.0, lo_open=True, note="seconds")

# Every argument of every public factory (`ej.<factory>`), in signature order.
# tests/test_reliability.py checks it against the signatures and probes every
# range, and `python -m experiments.arguments` prints it (docs/arguments.md).
FACTORY_ARGUMENTS: dict[str, tuple[ArgumentSpec, ...]] = {
    "sync_sgd": (_LEARNING_RATE, _NUM_WORKERS, _RULE,
                 _COMPRESSOR._replace(note=_COMPRESSOR.note + "; or ej.powersgd(rank), "
                                      "applied in combine to the workers' chain outputs "
                                      "(with rule=, a chain that does not compress; "
                                      "error_feedback False)"),
                 _ERROR_FEEDBACK,
                 _CLIP_NORM,
                 ArgumentSpec("optimizer_placement", "choice", choices=("worker", "server"),
                              note="worker: each worker runs the chain's base optimizer; "
                              "server: the workers send their chain's output on the raw "
                              "gradient and the server runs the base optimizer once, on the "
                              "mean"),
                 _SYSTEM),
    "async_sgd": (
        _LEARNING_RATE, _NUM_WORKERS,
        ArgumentSpec("max_delay", "int", lo=0, note="and >= num_workers - 1 (the i-th update "
                     "of a round cannot see the i updates before it)"),
        _text("delay", "'uniform', 'fixed', 'geometric', an ej.delays law, or an integer trace "
              "[rounds, num_workers] with worker p's lags in [p, max_delay]"),
        ArgumentSpec("reads", "choice", choices=("consistent", "inconsistent"),
                     note="a trace needs 'consistent'"),
        _RULE, _COMPRESSOR, _ERROR_FEEDBACK, _CLIP_NORM, _STALENESS, _WORKER_PLACEMENT,
    ),
    "message_passing_sgd": (
        _LEARNING_RATE, _NUM_WORKERS,
        ArgumentSpec("max_delay", "int", lo=0, note="message delay in rounds"),
        _DELAY_LAW,
        ArgumentSpec("drop_prob", "real", lo=0.0, hi=1.0, hi_open=True),
        _text("retransmit", "a bool"),
        _text("crashes", "None, a count in [0, num_workers - 1] (with crash_horizon), or a list "
              "of (worker, round) pairs: distinct workers in [0, num_workers - 1], at most "
              "num_workers - 1 of them, rounds >= 0"),
        _text("crash_horizon", "None, or an integer in [2, inf] (required with a crash count: "
              "crash rounds are drawn in [1, crash_horizon))"),
        _RULE, _COMPRESSOR, _ERROR_FEEDBACK, _CLIP_NORM, _STALENESS, _WORKER_PLACEMENT,
        _SYSTEM._replace(note=_SYSTEM.note + "; the delays then emerge from the clock (delay "
                         "is not read); no drops or crashes with it"),
    ),
    "elastic_scheduling": (
        _LEARNING_RATE, _NUM_WORKERS,
        ArgumentSpec("max_outstanding", "int", lo=0, note="tau; 0 is synchronous SGD"),
        _DELAY_LAW,
        ArgumentSpec("mode", "choice", choices=("norm", "variance")),
        _UNCOMPRESSED_RULE, _CLIP_NORM, _STALENESS, _WORKER_PLACEMENT,
        _SYSTEM._replace(note=_SYSTEM.note + "; the delays then emerge from the clock (delay "
                         "is not read)"),
    ),
    "local_sgd": (_LEARNING_RATE, _NUM_WORKERS,
                  ArgumentSpec("period", "int", lo=1, note="H; 1 is synchronous SGD"),
                  _UNCOMPRESSED_RULE, _CLIP_NORM, _WORKER_PLACEMENT, _SYSTEM),
    "gossip_sgd": (
        _LEARNING_RATE, _NUM_WORKERS,
        _text("topology", "one of 'ring', 'torus', 'hypercube' (num_workers a power of two), "
              "'exponential', 'one_peer_exponential', 'random_matching', 'star', 'complete'; "
              "or a doubly stochastic matrix [P, P] or a sequence of them [T, P, P] "
              "(non-negative, rows and columns summing to 1 within 1e-9), P = num_workers"),
        ArgumentSpec("local_steps", "int", lo=1, note="H, rounds per mixing round; 1: mix "
                     "every round"),
        _RULE, _COMPRESSOR, _ERROR_FEEDBACK, _CLIP_NORM,
        _text("gossip_compressor", "None (nodes send their models) or a bare compressor for "
              "CHOCO-SGD: ej.identity(), ej.top_k(...), ej.random_k(...), ej.qsgd(...), "
              "ej.scaled_sign(); never one wrapped by ej.error_feedback"),
        ArgumentSpec("gamma", "real", lo=0.0, hi=1.0, lo_open=True,
                     note="CHOCO's mixing step; 1.0 without gossip_compressor (a tracer "
                     "passes)"),
        _WORKER_PLACEMENT,
        _SYSTEM._replace(note=_SYSTEM.note + "; a mixing round costs each node alpha + deg "
                         "bits / beta, deg = ej.topologies.degree"),
    ),
    "clock_async_sgd": (
        _LEARNING_RATE, _NUM_WORKERS,
        _text("system", "an ej.clock.system(...) (the writes are simulated) or "
              "ej.clock.replay(events) (a recorded run, replayed exactly)"),
        ArgumentSpec("staleness_policy", "choice", choices=("none", "drop"),
                     note="'drop' discards an update staler than max_delay"),
        _text("max_delay", "None with 'none'; with 'drop', None (num_workers - 1) or an integer "
              ">= num_workers - 1: the cap"),
        ArgumentSpec("slots", "int", lo=1, note="or None (num_workers); at most num_workers: "
                     "the most writes one step applies"),
        _RULE, _COMPRESSOR, _ERROR_FEEDBACK, _CLIP_NORM, _WORKER_PLACEMENT,
    ),
    "diloco": (
        _LEARNING_RATE._replace(note=_LEARNING_RATE.note + "; the inner rate"), _NUM_WORKERS,
        ArgumentSpec("period", "int", lo=1, note="H, inner steps per outer step; with outer "
                     "SGD of rate 1, 1 is synchronous SGD"),
        _text("outer_optimizer", "None (optax.sgd(0.7, momentum=0.9, nesterov=True)) or an "
              "optax GradientTransformation applied to the pseudo-gradient (not a "
              "compressor)"),
        _text("outer_compressor", "None, a bare compressor (ej.qsgd(7), ej.top_k(...), ...), "
              "one wrapped by ej.error_feedback (a contractive one: not ej.qsgd) or "
              "ej.powersgd(rank)"),
        ArgumentSpec("fragments", "int", lo=1, note="F, a divisor of period and at most the "
                     "model's number of leaves (checked at init)"),
        _UNCOMPRESSED_RULE, _CLIP_NORM, _WORKER_PLACEMENT,
        _SYSTEM._replace(note=_SYSTEM.note + "; a synchronisation costs its fragment's "
                         "collective"),
    ),
    "powersgd": (
        ArgumentSpec("rank", "int", lo=1, note="r"),
        ArgumentSpec("min_compression_rate", "real", lo=0.0, note="a leaf n x m (kernels "
                     "reshaped to (prod(shape[:-1]), shape[-1])) is compressed when r <= "
                     "min(n, m) and n m > min_compression_rate r (n + m), else sent dense"),
        _text("error_feedback", "a bool (True: each worker keeps its residual; the variants "
              "then report bound = inf)"),
    ),
    "clip": (ArgumentSpec("max_norm", "real", lo=0.0, lo_open=True,
                          note="the global norm C gradients are clipped to"),),
    "sgd": (ArgumentSpec("momentum", "real", **_UNIT_DECAY,
                         note="mu; 0: plain SGD (a tracer passes)"),
            _text("nesterov", "a bool (True: Nesterov's form, optax's)")),
    "weight_decay": (ArgumentSpec("decay", "real", lo=0.0,
                                  note="g <- g + decay v at the worker's view v (a tracer "
                                  "passes)"),),
    "adamw": (ArgumentSpec("b1", "real", **_UNIT_DECAY), ArgumentSpec("b2", "real", **_UNIT_DECAY),
              ArgumentSpec("eps", "real", lo=0.0, lo_open=True),
              ArgumentSpec("weight_decay", "real", lo=0.0)),
    "from_optax": (_text("tx", "a rate-free optax GradientTransformation (optax.scale_by_adam(), "
                         "a chain with optax.add_decayed_weights(...), ...; not a compressor)"),),
    "ef21": (_text("compressor", "a bare contractive compressor: ej.identity(), ej.top_k(...), "
                   "ej.random_k(..., scaled=False), ej.scaled_sign()"),),
    "identity": (),
    "top_k": (_K, _FRACTION, ArgumentSpec("scope", "choice", choices=("global", "per_leaf"))),
    "random_k": (_K, _FRACTION, _text("scaled", "a bool (True: unbiased, not contractive)"),
                 _KEY),
    "qsgd": (_text("levels", "an integer >= 1 (a tracer passes)"), _KEY),
    "scaled_sign": (),
    "error_feedback": (
        _text("compressor", "a bare contractive compressor: ej.identity(), ej.top_k(...), "
              "ej.random_k(..., scaled=False), ej.scaled_sign()"),
        ArgumentSpec("beta", "real", lo=0.0, hi=1.0,
                     note="1: EF14, 0: no error feedback (a tracer passes)"),
    ),
    "delays.fixed": (),
    "delays.uniform": (),
    "delays.geometric": (ArgumentSpec("p", "real", lo=0.0, hi=1.0, lo_open=True,
                                      note="success probability; mean extra lag (1 - p) / p"),),
    "delays.trace": (_text("lags", "an integer array [rounds >= 1, num_workers]; the algorithm "
                           "checks the lags' range when it is built", reported_as="delay"),),
    "clock.constant": (_SECONDS._replace(note="every gradient's compute time"),),
    "clock.exponential": (_MEAN._replace(note="seconds, the exponential part's"),
                          ArgumentSpec("shift", "real", lo=0.0, note="seconds added to each")),
    "clock.lognormal": (_MEAN, ArgumentSpec("sigma", "real", lo=0.0, note="the tail skew")),
    "clock.pareto": (_MEAN, ArgumentSpec("shape", "real", lo=1.0, lo_open=True,
                                         note="the tail index")),
    "clock.trace": (_text("seconds", "a finite array of seconds >= 0 of shape [gradients >= 1, "
                          "num_workers] (the algorithm checks the columns)"),),
    "clock.network": (
        ArgumentSpec("latency", "real", lo=0.0, note="alpha, seconds per message"),
        _text("bandwidth", "a number in (0, inf] (bits per second; inf: no transfer time)"),
        ArgumentSpec("jitter", "real", lo=0.0, note="the mean seconds of an exponential delay "
                     "added to each message"),
    ),
    "clock.system": (
        _text("compute", "a compute-time law: ej.clock.constant(...), exponential, lognormal, "
              "pareto or trace"),
        ArgumentSpec("rounds", "int", lo=1, note="the rounds (executor steps) the schedule "
                     "covers"),
        _text("network", "None (no network time) or ej.clock.network(...)"),
        _text("slowdown", "None or one finite factor > 0 per worker multiplying its compute "
              "times"),
        ArgumentSpec("seed", "int", lo=0, hi=2**31 - 1, note="the clock's own draws"),
    ),
    "clock.replay": (_text("events", "a non-empty sequence of recorded writes (writer, count, "
                           "read, written, read_s, computed_s, written_s), checked when the "
                           "algorithm is built"),),
}
