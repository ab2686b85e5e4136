"""A simulated clock: compute-time laws, a network model and each variant's time semantics.

The system model says how long things take; it never changes what is computed,
except where the variant's semantics let the times decide (the delays of
message passing and elastic scheduling, and the order of writes in
`ej.clock_async_sgd`). It has three parts (docs/theory.md section 11):

- **compute time per gradient, per worker**: a law (`constant`, `exponential`
  with an optional shift, `lognormal` by its mean and tail skew, `pareto`, or a
  recorded `trace` of seconds `[gradients, P]` indexed by the worker's own
  gradient count), times a per-worker `slowdown` (a heterogeneous fleet, a
  straggler);
- **the network** (`network`): latency `alpha`, bandwidth `beta` in bits per
  second and an optional per-message jitter, applied to the bits each node
  sends (`comm/bits` is the round's total over nodes, docs/theory.md section
  7) through one rule per communication pattern (`COLLECTIVES`);
- **the time semantics of each variant** (`sync`, `local`, `gossip`, `elastic`,
  `message_passing`, `asynchronous`): when each worker starts and ends each
  gradient, what it waits for, and when a round ends.

A `System` bundles the first two with its own seed and the number of rounds
its schedule covers. Every draw is `derive_key(key(seed), TAG_CLOCK, g, p)` for
worker `p`'s `g`-th gradient, so it depends on nothing but the seed, the
worker and its gradient count: not on the placement, the horizon, or the other
workers. The schedule does not depend on the parameters, so it is computed
first, on the host in float64 NumPy (never float32 absolute times: float32's
spacing at 1e5 s is 7.8 ms), and the run then executes it exactly. A round's
times reach the metrics through `algorithms/_common.timed`, rounded once to the
metrics' dtype; `times(alg, params)` returns them in float64.

Example:
  >>> system = ej.clock.system(ej.clock.exponential(0.05), rounds=500,
  ...                          network=ej.clock.network(latency=1e-4, bandwidth=1e9),
  ...                          slowdown=[1.0] * 7 + [5.0])
  >>> alg = ej.sync_sgd(0.1, 8, compressor=ej.top_k(fraction=0.01), system=system)

References:
  F. Lai, Y. Dai, S. S. V. Singapuram, J. Liu, X. Zhu, H. V. Madhyastha,
  M. Chowdhury, "FedScale: Benchmarking Model and System Performance of Federated
  Learning at Scale", arXiv:2105.11367 (per-device compute times, bytes over
  bandwidth, a virtual clock).
  R. Thakur, R. Rabenseifner, W. Gropp, "Optimization of Collective Communication
  Operations in MPICH", IJHPCA 19(1), 2005 (the ring all-reduce and all-gather).
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918 (the variants timed here).
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, validation

# The metrics every clocked variant reports (docs/theory.md section 11).
TIME_METRICS = ("time/elapsed", "time/round", "time/idle_fraction", "comm/seconds")
_WORDS = 8  # uint32 words per draw: two uniforms for the compute time, two for jitters
_BLOCK = 256  # gradients per worker drawn at a time
_GROUP = 8  # workers drawn at a time


# ------------------------------------------------------------------ laws


class Compute(NamedTuple):
    """A law of compute seconds per gradient (build it with `constant`, `exponential`, ...).

    Attributes:
      name: the law's name.
      sample: `(u1, u2) -> seconds`, NumPy float64 arrays of uniforms in (0, 1).
      mean: the mean seconds (None for a trace).
      seconds: a recorded trace `[gradients, P]`, else None.
    """

    name: str
    sample: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
    mean: float | None
    seconds: np.ndarray | None = None

    def __repr__(self) -> str:
        if self.seconds is not None:
            return f"ej.clock.trace(<{self.seconds.shape[0]} x {self.seconds.shape[1]}>)"
        return f"ej.clock.{self.name}"


def _seconds(name: str, value, *, positive: bool = False) -> float:
    """A finite number of seconds, `>= 0` (or `> 0`), as a Python float."""
    validation.check_real(name, value, lo=0.0, lo_open=positive)
    return float(value)


def constant(seconds) -> Compute:
    """Every gradient takes `seconds`: `c = seconds`.

    Args:
      seconds: a finite number `>= 0`.

    Returns:
      A compute-time law for `ej.clock.system`.

    Example:
      >>> law = ej.clock.constant(0.01)
    """
    c = _seconds("seconds", seconds)
    return Compute(f"constant({c!r})", lambda u1, u2: np.full(np.shape(u1), c), c)


def exponential(mean, shift=0.0) -> Compute:
    """A shifted exponential: `c = shift + E`, `E` exponential with mean `mean`.

    The mean is `shift + mean`. `shift = 0` is the memoryless law of the
    classical analyses of stragglers (with `P` workers, the slowest of a round
    takes `mean H_P`, `H_P` the `P`-th harmonic number).

    Args:
      mean: the mean of the exponential part, `> 0` seconds.
      shift: the deterministic part, `>= 0` seconds.

    Returns:
      A compute-time law.

    Example:
      >>> law = ej.clock.exponential(1.0)  # rate 1
    """
    m = _seconds("mean", mean, positive=True)
    s = _seconds("shift", shift)
    return Compute(f"exponential({m!r}, shift={s!r})", lambda u1, u2: s - m * np.log(u1), s + m)


def lognormal(mean, sigma) -> Compute:
    """A lognormal law of mean `mean`: `c = mean exp(sigma Z - sigma^2 / 2)`, `Z` standard normal.

    `sigma` is the tail skew: the median is `mean exp(-sigma^2 / 2)`, and the
    tail grows heavier with it (FedScale's per-device compute-time model).

    Args:
      mean: `> 0` seconds.
      sigma: `>= 0`; 0 is `constant(mean)`.

    Returns:
      A compute-time law.

    Example:
      >>> law = ej.clock.lognormal(0.05, sigma=0.5)
    """
    m = _seconds("mean", mean, positive=True)
    s = float(validation.check_real("sigma", sigma, lo=0.0))

    def sample(u1, u2):
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
        return m * np.exp(s * z - 0.5 * s * s)

    return Compute(f"lognormal({m!r}, sigma={s!r})", sample, m)


def pareto(mean, shape) -> Compute:
    """A Pareto law of mean `mean`: `c = x_m U^(-1 / shape)`, `x_m = mean (shape - 1) / shape`.

    A heavy tail: `P(c > x) = (x_m / x)^shape` for `x >= x_m`.

    Args:
      mean: `> 0` seconds.
      shape: the tail index, `> 1` (the mean is finite).

    Returns:
      A compute-time law.

    Example:
      >>> law = ej.clock.pareto(0.05, shape=2.5)
    """
    m = _seconds("mean", mean, positive=True)
    a = float(validation.check_real("shape", shape, lo=1.0, lo_open=True))
    scale = m * (a - 1.0) / a
    return Compute(f"pareto({m!r}, shape={a!r})", lambda u1, u2: scale * u1 ** (-1.0 / a), m)


def trace(seconds) -> Compute:
    """A recorded trace: worker `p`'s `g`-th gradient takes `seconds[g, p]`.

    Indexed by the worker's own gradient count (in `ej.clock_async_sgd` a fast
    worker uses more rows than a slow one). A run needing a gradient beyond the
    trace is refused with one line when its schedule is computed.

    Args:
      seconds: a finite, non-negative array `[gradients >= 1, P]`.

    Returns:
      A compute-time law.

    Example:
      >>> law = ej.clock.trace(np.full((100, 4), 0.01))
    """
    arr = np.asarray(seconds, np.float64) if _numeric(seconds) else None
    if arr is None or arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        shape = np.shape(seconds) if arr is not None else type(seconds).__name__
        validation.fail("seconds", validation.Text(f"an array of shape {shape}"),
                        "a trace of seconds of shape [gradients >= 1, num_workers]")
    bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        g, p = bad[0]
        validation.fail("seconds", validation.Text(f"a trace with {float(arr[g, p])!r} at gradient "
                                                   f"{g}, worker {p}"),
                        "finite seconds >= 0")
    arr = arr.copy()
    arr.setflags(write=False)
    return Compute("trace", None, None, arr)


def _numeric(value) -> bool:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return False
    return arr.dtype.kind in "iuf"


# ---------------------------------------------------------------- network


class Network(NamedTuple):
    """Latency `alpha` (seconds), bandwidth `beta` (bits per second), per-message jitter."""

    latency: float = 0.0
    bandwidth: float = math.inf
    jitter: float = 0.0


def network(latency=0.0, bandwidth=math.inf, jitter=0.0) -> Network:
    """The network: a message of `b` bits takes `alpha + b / beta` seconds, plus jitter.

    Collectives follow `COLLECTIVES` (docs/theory.md section 11): a ring
    all-reduce `2 (P - 1)(alpha + b / (P beta))`, a ring all-gather
    `(P - 1)(alpha + b / beta)`, a broadcast `alpha + (P - 1) b / beta` on the
    sender's uplink, a point-to-point send `alpha + b / beta`.

    Args:
      latency: `alpha`, finite seconds `>= 0`.
      bandwidth: `beta`, bits per second in `(0, inf]` (`inf`: transfers take
        no time).
      jitter: the mean of an exponential delay added to each message (a
        collective waits for its slowest node's), finite seconds `>= 0`.

    Returns:
      A `Network`.

    Example:
      >>> net = ej.clock.network(latency=5e-5, bandwidth=10e9)  # 10 Gbit/s
    """
    alpha = _seconds("latency", latency)
    number = validation.concrete_number(bandwidth)
    if (number is None or isinstance(number, bool) or not isinstance(number, numbers.Real)
            or math.isnan(number) or number <= 0):
        validation.fail("bandwidth", bandwidth, "a number in (0, inf] (bits per second)")
    return Network(alpha, float(number), _seconds("jitter", jitter))


def _ring_all_reduce(net: Network, peers: int, bits: float) -> float:
    return 2.0 * peers * (net.latency + bits / ((peers + 1) * net.bandwidth))


def _ring_all_gather(net: Network, peers: int, bits: float) -> float:
    return peers * (net.latency + bits / net.bandwidth)


def _broadcast(net: Network, peers: int, bits: float) -> float:
    return net.latency + peers * bits / net.bandwidth


def _send(net: Network, peers: int, bits: float) -> float:
    del peers
    return net.latency + bits / net.bandwidth


# The communication patterns: `(network, peers, bits) -> seconds` for `bits` per
# node and `peers` other nodes (0 peers: no communication, 0 seconds). A new
# pattern is one entry; gossip's mixing round (each node sends to its `deg`
# neighbours on its uplink after its compute) is the broadcast with peers = deg.
COLLECTIVES: dict[str, Callable[[Network, int, float], float]] = {
    "all_reduce": _ring_all_reduce,  # dense synchronous updates and averages
    "all_gather": _ring_all_gather,  # sparse or quantised synchronous updates
    "broadcast": _broadcast,  # message passing, gossip: one sender, `peers` receivers
    "send": _send,  # point to point: a push or a pull of asynchronous SGD
}


def seconds(pattern: str, net: Network, peers: int, bits) -> float:
    """The seconds of one `pattern` (a key of `COLLECTIVES`) of `bits` per node, no jitter.

    E.g. the ring all-gather: `peers (alpha + bits / beta)`; 0 without peers.

    Args:
      pattern: `"all_reduce"`, `"all_gather"`, `"broadcast"` or `"send"`.
      net: the network.
      peers: the other nodes taking part (`P - 1` for a collective of `P`).
      bits: one node's message.

    Returns:
      Seconds (a float).

    Example:
      >>> ej.clock.seconds("all_gather", ej.clock.network(1e-4, 1e9), peers=7, bits=82_908)
    """
    validation.check_choice("pattern", pattern, tuple(COLLECTIVES))
    if peers <= 0:
        return 0.0
    return float(COLLECTIVES[pattern](net, int(peers), float(bits)))


# ----------------------------------------------------------------- system


class System(NamedTuple):
    """A system model: compute law, network, per-worker slowdown, horizon and seed."""

    compute: Compute
    network: Network
    slowdown: tuple[float, ...] | None
    rounds: int
    seed: int

    def __repr__(self) -> str:
        return (f"ej.clock.system({self.compute!r}, rounds={self.rounds}, seed={self.seed}, "
                f"network={self.network!r}, slowdown={self.slowdown!r})")


def system(compute, *, rounds, network=None, slowdown=None, seed=0) -> System:
    """A system model for the factories' `system=` argument.

    Worker `p`'s `g`-th gradient takes `slowdown[p] * c`, `c` drawn from
    `compute` with the key `derive_key(key(seed), TAG_CLOCK, g, p)`; messages
    take the network's time (`network`, `COLLECTIVES`). The variant's time
    semantics (docs/theory.md section 11) turn these into each round's
    `time/elapsed`, `time/round`, `time/idle_fraction` and `comm/seconds`.

    Args:
      compute: a compute-time law (`ej.clock.constant(...)`, ...).
      rounds: the rounds the schedule covers (executor steps for
        `ej.clock_async_sgd`), `>= 1`; a run beyond them is refused.
      network: an `ej.clock.network(...)`, or None (no network time).
      slowdown: None, or one factor `> 0` per worker multiplying its compute
        times (`[1] * (P - 1) + [5]`: one worker 5x slower).
      seed: the clock's seed, `>= 0`: its draws are its own, shared by every run
        of the algorithm (draw another system to vary them).

    Returns:
      A `System`.

    Example:
      >>> system = ej.clock.system(ej.clock.lognormal(0.05, 0.5), rounds=1000,
      ...                          network=ej.clock.network(1e-4, 1e9))
    """
    if not isinstance(compute, Compute):
        validation.fail("compute", compute, "a compute-time law such as ej.clock.constant(0.01)")
    rounds = validation.check_int("rounds", rounds, lo=1)
    if network is None:
        network = Network()
    if not isinstance(network, Network):
        validation.fail("network", network, "None or ej.clock.network(...)")
    if slowdown is not None:
        factors = np.asarray(slowdown, np.float64) if _numeric(slowdown) else None
        if factors is None or factors.ndim != 1 or factors.size < 1 or not np.all(
                np.isfinite(factors) & (factors > 0)):
            validation.fail("slowdown", slowdown, "None or one finite factor > 0 per worker")
        slowdown = tuple(float(x) for x in factors)
    seed = validation.check_int("seed", seed, lo=0, hi=2**31 - 1)
    return System(compute, network, slowdown, rounds, seed)


def check(system_, num_workers: int) -> System:
    """Refuses a system that does not fit `num_workers` workers (one line naming it)."""
    if isinstance(system_, Record):
        validation.fail("system", system_, "an ej.clock.system(...): a recorded run replays "
                        "through ej.clock_async_sgd")
    if not isinstance(system_, System):
        validation.fail("system", system_, "None or an ej.clock.system(...)")
    if system_.slowdown is not None and len(system_.slowdown) != num_workers:
        validation.fail("slowdown", validation.Text(f"{len(system_.slowdown)} factors"),
                        f"one per worker ({num_workers})")
    trace_ = system_.compute.seconds
    if trace_ is not None and trace_.shape[1] != num_workers:
        validation.fail("seconds", validation.Text(f"a trace of shape {trace_.shape}"),
                        f"shape [gradients, {num_workers}] (one column per worker)")
    return system_


# ------------------------------------------------------------------ draws


@jax.jit
def _block(key, g0, p0):
    """`bits(derive_key(key, TAG_CLOCK, g, p), (8,))` for `_BLOCK` gradients from `g0` and
    `_GROUP` workers from `p0` (one compiled program, whatever the number of workers)."""

    def one(g, p):
        return jax.random.bits(base.derive_key(key, base.TAG_CLOCK, g, p), (_WORDS,),
                               jnp.uint32)

    gs = g0 + jnp.arange(_BLOCK, dtype=jnp.int32)
    ps = p0 + jnp.arange(_GROUP, dtype=jnp.int32)
    return jax.vmap(lambda g: jax.vmap(lambda p: one(g, p))(ps))(gs)


def _words(key, start: int, count: int, num_workers: int) -> np.ndarray:
    """`[count, P, 8]` words for gradients `start ..` (`count` a multiple of `_BLOCK`)."""
    rows = []
    with jax.ensure_compile_time_eval():  # On the host, even while a program is traced.
        for g0 in range(start, start + count, _BLOCK):
            rows.append(np.concatenate([
                np.asarray(jax.device_get(_block(key, jnp.int32(g0), jnp.int32(p0))))
                for p0 in range(0, num_workers, _GROUP)], axis=1)[:, :num_workers])
    return np.concatenate(rows)


def _uniforms(words: np.ndarray) -> np.ndarray:
    """53-bit uniforms in (0, 1) from pairs of uint32 words: `[..., 2k] -> [..., k]`."""
    w = words.astype(np.uint64)
    high, low = w[..., 0::2] >> np.uint64(5), w[..., 1::2] >> np.uint64(6)
    return ((high * np.uint64(1 << 26) + low).astype(np.float64) + 0.5) / float(1 << 53)


class Draws:
    """Each worker's compute seconds and message jitters, by gradient count, in float64.

    `compute[g, p]` and `jitter[g, p, i]` (`i` = 0, 1: a gradient's two
    messages) are drawn from `derive_key(key(seed), TAG_CLOCK, g, p)`; more
    gradients are drawn when asked for (a prefix never changes).
    """

    def __init__(self, system_: System, num_workers: int):
        self.system, self.num_workers = system_, num_workers
        self.compute = np.zeros((0, num_workers))
        self.jitter = np.zeros((0, num_workers, 2))

    def upto(self, gradients: int) -> Draws:
        """Makes sure gradients `0 .. gradients - 1` of every worker are drawn."""
        law, net = self.system.compute, self.system.network
        if law.seconds is not None and gradients > law.seconds.shape[0]:
            validation.fail("seconds", validation.Text(
                f"a trace of {law.seconds.shape[0]} gradients per worker"),
                f"at least {gradients} (the schedule of {self.system.rounds} rounds needs "
                f"gradient {gradients - 1})")
        have = self.compute.shape[0]
        if gradients <= have:
            return self
        # Whole blocks of `_BLOCK` gradients: one compiled draw per number of workers.
        count = -(-max(gradients - have, have) // _BLOCK) * _BLOCK
        with jax.ensure_compile_time_eval():
            key = jax.random.key(self.system.seed)
        u = _uniforms(_words(key, have, count, self.num_workers))
        if law.seconds is not None:
            rows = law.seconds[have:have + count]
            compute = np.concatenate([rows, np.zeros((count - rows.shape[0], self.num_workers))])
        else:
            compute = law.sample(u[..., 0], u[..., 1])
        if self.system.slowdown is not None:
            compute = compute * np.asarray(self.system.slowdown)
        jitter = -net.jitter * np.log(u[..., 2:4]) if net.jitter > 0 else np.zeros(
            u[..., 2:4].shape)
        self.compute = np.concatenate([self.compute, compute])
        self.jitter = np.concatenate([self.jitter, jitter])
        return self


def draws(system_: System, num_workers: int, gradients: int) -> tuple[np.ndarray, np.ndarray]:
    """`(compute [gradients, P], jitter [gradients, P, 2])` seconds, float64 (see `Draws`)."""
    d = Draws(check(system_, num_workers), num_workers).upto(gradients)
    return d.compute[:gradients], d.jitter[:gradients]


# --------------------------------------------------------------- timelines


class Timeline:
    """A variant's schedule under a system model, float64 on the host.

    Attributes:
      metrics: `{name: [rounds] float64}`: `time/elapsed` (seconds from the
        start to the end of each round), `time/round`, `time/idle_fraction`
        (the share of worker-seconds up to the round's end spent not computing
        a gradient), `comm/seconds` (docs/theory.md section 11), and variant
        specific tables (`ej.clock_async_sgd`'s counts).
      delays: the delays the clock makes, in rounds, or None: message passing
        `[rounds, P senders, P receivers]`, elastic scheduling `[rounds, P]`.
      tables: further integer tables the variant executes (`ej.clock_async_sgd`).
    """

    def __init__(self, metrics, delays=None, tables=None):
        self.metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        self.delays = delays
        self.tables = tables or {}


def _busy(starts: np.ndarray, ends: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Worker-seconds spent computing in `[0, T]` for each `T` in `at`.

    `starts[g, p] <= ends[g, p] <= starts[g + 1, p]`: each worker's gradients, in
    order (NaN past a worker's last).
    """
    total = np.zeros(at.shape)
    for p in range(starts.shape[1]):
        s, e = starts[:, p], ends[:, p]
        s, e = s[np.isfinite(s)], e[np.isfinite(s)]
        if not s.size:
            continue
        done = np.concatenate([[0.0], np.cumsum(e - s)])
        k = np.searchsorted(e, at, side="right")  # gradients finished by T
        partial = np.where(k < s.size, np.clip(at - s[np.minimum(k, s.size - 1)], 0.0,
                                               (e - s)[np.minimum(k, s.size - 1)]), 0.0)
        total += done[k] + partial
    return total


def _summary(starts, ends, round_end, comm, num_workers: int) -> dict[str, np.ndarray]:
    """The four time metrics from every gradient's `[start, end]` and each round's end."""
    elapsed = np.asarray(round_end, np.float64)
    busy = _busy(starts, ends, elapsed)
    with np.errstate(invalid="ignore", divide="ignore"):
        idle = np.where(elapsed > 0, 1.0 - busy / (num_workers * elapsed), 0.0)
    idle = np.where(np.abs(idle) < 1e-12, 0.0, idle)  # no waiting, up to the sums' rounding
    return {"time/elapsed": elapsed, "time/round": np.diff(elapsed, prepend=0.0),
            "time/idle_fraction": np.clip(idle, 0.0, 1.0),
            "comm/seconds": np.asarray(comm, np.float64)}


def _slowest_jitter(jitter_row: np.ndarray) -> float:
    return float(np.max(jitter_row)) if jitter_row.size else 0.0


def sync(system_: System, num_workers: int, bits: int, pattern: str) -> Timeline:
    """Synchronous rounds: a round ends when the slowest gradient and the collective are done.

    `T_{r+1} = T_r + max_p c[r, p] + collective(bits) + max_p jitter[r, p]`
    (the collective waits for its slowest link). `pattern` is `"all_reduce"`
    for dense updates, `"all_gather"` for sparse or quantised ones.
    """
    return periodic(system_, num_workers, 1, {0: ((pattern, bits),)})


def local(system_: System, num_workers: int, bits: int, period: int) -> Timeline:
    """Local SGD: `H` local steps one after another, then the all-reduce of the models.

    Node `q` starts round `r + 1` when it ends round `r`, except after an
    averaging round (`(r + 1) % H == 0`), which ends for everyone when the
    slowest node and the all-reduce are done.
    """
    return periodic(system_, num_workers, period, {0: (("all_reduce", bits),)})


def gossip(system_: System, num_workers: int, bits: int, degree: int, period: int) -> Timeline:
    """Gossip SGD: `H` local steps one after another, then a mixing round with neighbours.

    As local SGD, with the all-reduce replaced by each node sending its `bits`
    to its `deg` neighbours on its uplink after its compute, the broadcast rule
    with `deg` peers: a mixing round (`(r + 1) % H == 0`) ends for everyone at

        T_r = max_q F[r, q] + alpha + deg bits / beta + max_q jitter[r, q],

    and all nodes start the next round then (docs/theory.md section 11).

    Args:
      system_: the system model.
      num_workers: `P`, the nodes.
      bits: one node's message: its model (`32 d`) or CHOCO's compressed
        difference.
      degree: `deg`, the most neighbours a node sends to in one mixing round
        (`ej.topologies.degree`).
      period: `H`, rounds per mixing round.

    Returns:
      The `Timeline`.

    Example:
      >>> system = ej.clock.system(ej.clock.constant(0.01), rounds=8,
      ...                          network=ej.clock.network(1e-4, 1e9))
      >>> ej.clock.gossip(system, 8, bits=32 * 1000, degree=2, period=2)

    References:
      X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu, "Can
      Decentralized Algorithms Outperform Centralized Algorithms?",
      arXiv:1705.09056 (a node's communication grows with its degree, not `P`).
    """
    return periodic(system_, num_workers, period, {0: (("broadcast", bits),)}, peers=degree)


def periodic(system_: System, num_workers: int, period: int, collectives, *,
             peers: int | None = None) -> Timeline:
    """Lockstep rounds whose communication repeats every `period` rounds.

    Round `r` ends with the collectives `collectives[(r + 1) % period]` (absent:
    none), `(pattern, bits)` pairs of `COLLECTIVES` among `peers` other nodes
    (default `P - 1`), run one after another once the slowest node's gradient
    is done, each waiting for its slowest link's jitter (the `k`-th collective of
    a round draws the jitter of column `k mod 2`); then every node starts the
    next round. A round without collectives lets each node start its next
    gradient as soon as its own is done. Synchronous SGD is one collective every
    round, local SGD one all-reduce every `H` rounds, PowerSGD two all-reduces
    (the `P` factors, then the `Q` factors) and DiLoCo one collective per
    fragment at its own offset (docs/theory.md section 11).

    Args:
      system_: the system model.
      num_workers: `P`.
      period: the rounds of one repetition.
      collectives: `{(r + 1) % period: ((pattern, bits), ...)}`; `bits` is one
        node's message.
      peers: the other nodes a collective involves (gossip: the degree).

    Returns:
      The `Timeline`.

    Example:
      >>> system = ej.clock.system(ej.clock.constant(0.01), rounds=8,
      ...                          network=ej.clock.network(1e-4, 1e9))
      >>> ej.clock.periodic(system, 8, 1, {0: (("all_reduce", 4096), ("all_reduce", 2048))})
    """
    rounds, net = system_.rounds, system_.network
    peers = num_workers - 1 if peers is None else peers
    compute, jitter = draws(system_, num_workers, rounds)
    starts, ends = np.zeros((rounds, num_workers)), np.zeros((rounds, num_workers))
    round_end, comm = np.zeros(rounds), np.zeros(rounds)
    ready = np.zeros(num_workers)  # when each node may start its next gradient
    for r in range(rounds):
        starts[r], ends[r] = ready, ready + compute[r]
        steps = collectives.get((r + 1) % period, ())
        if steps:
            for k, (pattern, bits) in enumerate(steps):
                comm[r] += seconds(pattern, net, peers, bits)
                if peers > 0:
                    comm[r] += _slowest_jitter(jitter[r, :, k % 2])
            round_end[r] = np.max(ends[r]) + comm[r]
            ready = np.full(num_workers, round_end[r])
        else:
            round_end[r], ready = np.max(ends[r]), ends[r].copy()
    return Timeline(_summary(starts, ends, round_end, comm, num_workers))


def _first_at_or_after(starts_q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The first round whose start (non-decreasing `starts_q`) is `>= t`, for each `t`."""
    return np.searchsorted(starts_q, t, side="left")


def elastic(system_: System, num_workers: int, bits: int, tau: int) -> Timeline:
    """Elastic scheduling: a node proceeds while at most `tau` averages are outstanding.

    Round `r`'s average is ready at `A_r = max_p F[r, p] + all_reduce(bits)`;
    node `q` starts round `r + 1` at `max(F[r, q], A_{r - tau})`. The average of
    round `r` reaches `q` before round `r + 1 + k`, `k` the first with
    `A_r <= S[r + 1 + k, q]` (so `k <= tau`: the `delays` table). A round ends
    when its average is ready.
    """
    rounds, net = system_.rounds, system_.network
    total = rounds + tau + 1  # the starts the last rounds' delays look at
    compute, jitter = draws(system_, num_workers, total)
    starts, ends = np.zeros((total, num_workers)), np.zeros((total, num_workers))
    average, comm = np.zeros(total), np.zeros(total)
    finish = np.zeros(num_workers)
    for r in range(total):
        gate = average[r - 1 - tau] if r - 1 - tau >= 0 else 0.0
        starts[r] = np.maximum(finish, gate)
        ends[r] = starts[r] + compute[r]
        finish = ends[r]
        comm[r] = seconds("all_reduce", net, num_workers - 1, bits)
        if num_workers > 1:
            comm[r] += _slowest_jitter(jitter[r, :, 0])
        average[r] = np.max(ends[r]) + comm[r]
    delays = np.zeros((rounds, num_workers), np.int32)
    for q in range(num_workers):
        first = _first_at_or_after(starts[:, q], average[:rounds])
        delays[:, q] = np.clip(first - np.arange(rounds) - 1, 0, tau)
    return Timeline(_summary(starts, ends, average[:rounds], comm[:rounds], num_workers),
                    delays=delays)


def message_passing(system_: System, num_workers: int, bits: int, max_delay: int) -> Timeline:
    """Message passing in lockstep rounds, with delays that emerge from the clock.

    Node `q` ends round `r` at `F[r, q] = S[r, q] + c[r, q]` and broadcasts its
    message, which reaches every other node at `A[r, q] = F[r, q] +
    broadcast(bits) + jitter`. It starts round `r` at `max(F[r - 1, q],
    A[s, p] for every p != q and s <= r - 1 - max_delay)`. A message of round
    `s` is applied before the first round `s + 1 + k` that starts at or after
    its arrival (so `k <= max_delay`: the `delays` table). A round ends when
    every node has ended it.
    """
    rounds, net = system_.rounds, system_.network
    total = rounds + max_delay + 1
    compute, jitter = draws(system_, num_workers, total)
    starts, ends = np.zeros((total, num_workers)), np.zeros((total, num_workers))
    arrive = np.zeros((total, num_workers))
    comm = np.zeros(total)
    send = seconds("broadcast", net, num_workers - 1, bits)
    finish = np.zeros(num_workers)
    for r in range(total):
        s = r - 1 - max_delay
        if s >= 0 and num_workers > 1:
            # The latest arrival from the other nodes (a node never waits for itself).
            first, second = np.sort(arrive[s])[[-1, -2]]
            others = np.where(arrive[s] == first, second, first)
            starts[r] = np.maximum(finish, others)
        else:
            starts[r] = finish
        ends[r] = starts[r] + compute[r]
        finish = ends[r]
        arrive[r] = ends[r] + send + (jitter[r, :, 0] if num_workers > 1 else 0.0)
        comm[r] = num_workers * send + (np.sum(jitter[r, :, 0]) if num_workers > 1 else 0.0)
    delays = np.zeros((rounds, num_workers, num_workers), np.int32)
    for q in range(num_workers):
        first = _first_at_or_after(starts[:, q], arrive[:rounds].reshape(-1)).reshape(
            rounds, num_workers)
        delays[:, :, q] = np.clip(first - np.arange(rounds)[:, None] - 1, 0, max_delay)
        delays[:, q, q] = 0  # a node applies its own message at once
    if num_workers == 1:
        comm[:] = 0.0
    return Timeline(_summary(starts, ends, np.max(ends[:rounds], axis=1), comm[:rounds],
                             num_workers), delays=delays)


# ---------------------------------------------------------- asynchronous


class Writes(NamedTuple):
    """The applied writes of an asynchronous run, in the order they were applied.

    Attributes (NumPy, one entry per applied write `t = 0, 1, ...`; write `t`
    makes version `t + 1` of the model):
      writer: the worker who wrote it.
      read: the version its gradient was taken at (`<= t`).
      count: the writer's gradient count (its data and its chain's draws are keyed by it).
      time: when it was applied, seconds.
      comm: its messages' seconds (pull and push).
      drops: `[versions]`: the version at which each discarded update was dropped.
      starts, ends: every gradient's compute interval `[gradients, P]` (NaN past
        a worker's last), for the idle fraction.
    """

    writer: np.ndarray
    read: np.ndarray
    count: np.ndarray
    time: np.ndarray
    comm: np.ndarray
    drops: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


def simulate_writes(system_: System, num_workers: int, *, writes: int, push_bits: int,
                    pull_bits: int, max_delay: int | None) -> Writes:
    """Clock-driven asynchronous SGD's events, up to `writes` applied writes.

    Worker `p` reads the current model (a pull of `pull_bits`), computes its
    `g`-th gradient for `c[g, p]`, and pushes its update (`push_bits`); the
    write is applied when the push arrives, in arrival order. Ties in time go
    to the lower worker index, and a worker reads immediately after its own
    write, before later writes at the same instant. With a cap `max_delay`, an
    update whose lag (writes applied since its read) exceeds it is discarded
    and its worker reads afresh at that instant.
    """
    net = system_.network
    pull = seconds("send", net, 1, pull_bits)
    push = seconds("send", net, 1, push_bits)
    d = Draws(check(system_, num_workers), num_workers).upto(writes // num_workers + 2)
    read_v = [0] * num_workers
    grads = [0] * num_workers
    starts = [[] for _ in range(num_workers)]
    ends = [[] for _ in range(num_workers)]
    messages = [0.0] * num_workers
    heap = []

    def begin(p, now):
        g = grads[p]
        d.upto(g + 1)
        jit = d.jitter[g, p]
        start = now + pull + jit[0]
        end = start + d.compute[g, p]
        starts[p].append(start)
        ends[p].append(end)
        messages[p] = pull + push + jit[0] + jit[1]
        heapq.heappush(heap, (end + push + jit[1], p))

    for p in range(num_workers):
        begin(p, 0.0)
    writer, read, count, when, comm, drops = [], [], [], [], [], []
    version = 0
    while version < writes:
        now, p = heapq.heappop(heap)
        if max_delay is not None and version - read_v[p] > max_delay:
            drops.append(version)
        else:
            writer.append(p)
            read.append(read_v[p])
            count.append(grads[p])
            when.append(now)
            comm.append(messages[p])
            version += 1
        read_v[p] = version
        grads[p] += 1
        begin(p, now)
    most = max(len(s) for s in starts)
    pad = lambda rows: np.array([r + [np.nan] * (most - len(r)) for r in rows]).T  # noqa: E731
    return Writes(np.asarray(writer, np.int32), np.asarray(read, np.int64),
                  np.asarray(count, np.int32), np.asarray(when), np.asarray(comm),
                  np.asarray(drops, np.int64), pad(starts), pad(ends))


class Record(NamedTuple):
    """A recorded asynchronous run, for `ej.clock_async_sgd(system=...)` (see `replay`)."""

    events: tuple

    def __repr__(self) -> str:
        return f"ej.clock.replay(<{len(self.events)} writes>)"


def replay(events) -> Record:
    """A recorded asynchronous run, replayed exactly by `ej.clock_async_sgd(system=...)`.

    Each event is one applied write, in the order the writes were applied: a
    mapping with `writer` (the worker), `count` (its gradient count: the
    replay keys the worker's batch and chain draws by it), `read` (the version
    of the model its gradient was taken at), `written` (the version it made:
    1, 2, ... in order), and the seconds since the start at which the worker
    read (`read_s`), had its gradient (`computed_s`) and the write was applied
    (`written_s`). `python -m experiments.record_async` records such runs.
    The events are checked (one line naming `events`) when the algorithm is
    built: a worker reads after its own previous write, counts increase, and
    every read precedes its write.

    Args:
      events: a non-empty sequence of such mappings.

    Returns:
      A `Record`.

    Example:
      >>> alg = ej.clock_async_sgd(0.05, 4, system=ej.clock.replay(events))
    """
    if isinstance(events, Mapping) or not isinstance(events, Sequence) or not events:
        validation.fail("events", validation.Text(type(events).__name__),
                        "a non-empty sequence of recorded writes")
    return Record(tuple(events))


def recorded_writes(events: Sequence[Mapping[str, Any]], num_workers: int) -> Writes:
    """`Writes` from a recorded asynchronous run (see `replay`), validated."""
    if isinstance(events, Mapping) or not isinstance(events, Sequence) or not events:
        validation.fail("events", validation.Text(type(events).__name__),
                        "a non-empty sequence of recorded writes")
    fields = ("writer", "count", "read", "written", "read_s", "computed_s", "written_s")
    try:
        table = {f: np.asarray([e[f] for e in events], np.float64) for f in fields}
    except (KeyError, TypeError, ValueError):
        return validation.fail("events", validation.Text("events without the fields "
                                                         + ", ".join(fields)),
                               "one mapping per write with those fields")
    n = len(events)
    writer = table["writer"].astype(np.int64)
    problems = [
        (np.any(~np.isfinite(np.stack(list(table.values())))), "finite fields"),
        (np.any((writer < 0) | (writer >= num_workers)),
         f"writers in [0, {num_workers - 1}]"),
        (np.any(table["written"] != np.arange(1, n + 1)),
         "versions written 1, 2, ..., in order"),
        (np.any((table["read"] < 0) | (table["read"] > np.arange(n))),
         "each write's read version below the version it writes"),
        (np.any(np.diff(table["written_s"]) < 0), "non-decreasing write times"),
        (np.any(table["computed_s"] < table["read_s"]) or np.any(
            table["written_s"] < table["computed_s"]), "read_s <= computed_s <= written_s"),
    ]
    for p in range(num_workers):
        mine = np.flatnonzero(writer == p)
        if mine.size:
            # A worker reads after its own previous write, and counts its gradients.
            problems.append((np.any(table["read"][mine[1:]] < mine[:-1] + 1),
                             f"worker {p} reading after its own previous write"))
            problems.append((np.any(np.diff(table["count"][mine]) < 1) or
                             table["count"][mine[0]] < 0,
                             f"worker {p}'s gradient counts increasing from >= 0"))
    for bad, expected in problems:
        if bad:
            validation.fail("events", validation.Text(f"{n} recorded writes"), expected)
    most = max(int(np.sum(writer == p)) for p in range(num_workers)) or 1
    starts, ends = np.full((most, num_workers), np.nan), np.full((most, num_workers), np.nan)
    for p in range(num_workers):
        mine = np.flatnonzero(writer == p)
        starts[:mine.size, p], ends[:mine.size, p] = table["read_s"][mine], table[
            "computed_s"][mine]
    return Writes(writer.astype(np.int32), table["read"].astype(np.int64),
                  table["count"].astype(np.int32), table["written_s"],
                  table["written_s"] - table["computed_s"], np.zeros(0, np.int64), starts,
                  ends)


def steps(writer: np.ndarray, read: np.ndarray, slots: int) -> np.ndarray:
    """The executor's steps: `[steps + 1]` boundaries of greedy groups of writes.

    A step applies consecutive writes `t0 .. t1 - 1` of at most `slots` distinct
    writers whose reads precede the group (`read[t] <= t0`): every gradient of
    the step can be taken at a model that exists when the step begins.
    """
    bounds, t, n = [0], 0, writer.size
    while t < n:
        t0, seen = t, set()
        while t < n and len(seen) < slots and writer[t] not in seen and read[t] <= t0:
            seen.add(int(writer[t]))
            t += 1
        bounds.append(t)
    return np.asarray(bounds, np.int64)


def asynchronous(w: Writes, num_workers: int, rounds: int, slots: int) -> Timeline:
    """The executor's tables and time metrics for the first `rounds` steps of `w`.

    Tables (`[rounds, P]` int32 unless said): `order` (the writer of each slot
    of the step, in write order; padding 0), `live` (bool: a slot holds a
    write), `writes` (bool: worker `p` writes in the step), `snapshot` (the
    position `k` in `1..P` after whose write worker `p` reads its next model in
    the step, else -1), `counts` (the gradient count of the gradient worker `p`
    computes in the step), `lags` (each slot's lag, in writes), `lag_bound`
    (`[rounds]`: the largest lag so far). Metrics
    (`[rounds]`): the four time metrics (a step ends at its last write;
    `comm/seconds` sums its writes' pulls and pushes), `updates` (applied so
    far), `updates/dropped` (so far), `updates/masked_fraction` (the share of
    the step's `P` gradients not applied), `delay/mean` and `delay/max` (the
    largest lag so far).
    """
    bounds = steps(w.writer, w.read, slots)
    if bounds.size - 1 < rounds:
        raise ValueError(f"rounds: got {rounds}; expected at most {bounds.size - 1} "
                         "(the steps the recorded writes make)")
    order = np.zeros((rounds, num_workers), np.int32)
    live = np.zeros((rounds, num_workers), bool)
    writes = np.zeros((rounds, num_workers), bool)
    snapshot = np.full((rounds, num_workers), -1, np.int32)
    counts = np.zeros((rounds, num_workers), np.int32)
    lags = np.zeros((rounds, num_workers), np.int32)
    step_of = np.searchsorted(bounds, np.arange(w.writer.size), side="right") - 1
    for t in range(int(bounds[rounds])):  # the reads the steps' writes need
        v = int(w.read[t])
        if v > 0 and step_of[v - 1] < rounds:
            s = step_of[v - 1]
            snapshot[s, w.writer[t]] = v - bounds[s]
    for s in range(rounds):
        t0, t1 = int(bounds[s]), int(bounds[s + 1])
        order[s, :t1 - t0] = w.writer[t0:t1]
        live[s, :t1 - t0] = True
        writes[s, w.writer[t0:t1]] = True
        lags[s, :t1 - t0] = np.arange(t0, t1) - w.read[t0:t1]
    for p in range(num_workers):
        # The gradient worker p computes in a step is that of its next write.
        mine = np.flatnonzero(w.writer == p)
        after = np.searchsorted(mine, bounds[:rounds], side="left")
        beyond = (int(w.count[mine[-1]]) + 1) if mine.size else 0
        counts[:, p] = np.where(after < mine.size,
                                w.count[mine[np.minimum(after, max(mine.size - 1, 0))]]
                                if mine.size else 0, beyond)
    n_step = live.sum(axis=1)
    ends_at = bounds[1:rounds + 1]
    elapsed = w.time[ends_at - 1]
    comm = np.add.reduceat(w.comm[:int(bounds[rounds])], bounds[:rounds]) if rounds else []
    metrics = _summary(w.starts, w.ends, elapsed, comm, num_workers)
    applied_lags = np.where(live, lags, 0)
    dropped = np.searchsorted(w.drops, ends_at - 1, side="right") if w.drops.size else (
        np.zeros(rounds))
    metrics.update({
        "updates": ends_at.astype(np.float64),
        "updates/dropped": np.asarray(dropped, np.float64),
        "updates/masked_fraction": 1.0 - n_step / num_workers,
        "delay/mean": applied_lags.sum(axis=1) / n_step,
        "delay/max": np.maximum.accumulate(applied_lags.max(axis=1)).astype(np.float64),
    })
    return Timeline(metrics, tables={
        "order": order, "live": live, "writes": writes, "snapshot": snapshot, "counts": counts,
        "lags": lags, "lag_bound": metrics["delay/max"].astype(np.int32)})


# ----------------------------------------------------------------- access


def times(alg, params) -> dict[str, np.ndarray]:
    """The float64 per-round metrics of a clocked algorithm's schedule, for `params`' shapes.

    `time/elapsed` (`T_r`, the end of round `r`), `time/round` (`T_r - T_{r-1}`),
    `time/idle_fraction`, `comm/seconds` (and `ej.clock_async_sgd`'s `updates`
    counts and lags), `[rounds]` each: what the run reports, before rounding to
    the metrics' dtype (docs/theory.md section 11).

    Args:
      alg: an algorithm built with `system=`.
      params: the parameters, or arrays of their shapes (only shapes are read).

    Returns:
      `{name: float64 array [rounds]}`.

    Example:
      >>> ej.clock.times(alg, params)["time/elapsed"][-1]
    """
    if getattr(alg.info, "clock", None) is None:
        validation.fail("alg", validation.Text(f"{alg.info.name} without system="),
                        "an algorithm built with system=")
    return dict(alg.info.clock(params).metrics)


def batch_keys(key, counts) -> jax.Array:
    """The keys `ej.run` hands `batch_fn` for workers at gradient counts `counts` (`[P]`).

    `derive_key(key, TAG_DATA, counts[p], p)`: what `ej.clock_async_sgd` keys
    worker `p`'s batch by, so that a run outside the library (a real
    asynchronous run to replay, `experiments.record_async`) draws the same
    batches.

    Args:
      key: the algorithm's base key (`state.shared.key`, or the key given to `init`).
      counts: `[P]` gradient counts, one per worker.

    Returns:
      Typed keys `[P]`.

    Example:
      >>> keys = ej.clock.batch_keys(state.shared.key, jnp.array([3, 0, 1, 1]))
      >>> batch_of_worker_2 = jax.tree.map(lambda x: x[2], batch_fn(0, keys))
    """
    key = base.as_key(key)
    counts = jnp.asarray(counts, jnp.int32)
    return jax.vmap(lambda c, p: base.derive_key(key, base.TAG_DATA, c, p))(
        counts, jnp.arange(counts.shape[0]))


def measure(loss_fn, params, batch, *, repeats: int = 10, has_aux: bool = False) -> float:
    """This machine's seconds per gradient of `loss_fn`, to calibrate simulated seconds.

    The median over `repeats` calls of the jitted gradient at `params` on
    `batch` (one worker's), each waited for with `block_until_ready`, after one
    compiling call.

    Args:
      loss_fn: `(params, batch) -> loss` (or `(loss, aux)` with `has_aux`).
      params: the parameters.
      batch: one worker's batch.
      repeats: timed calls, `>= 1`.
      has_aux: whether `loss_fn` returns `(loss, aux)`.

    Returns:
      Seconds, e.g. for `ej.clock.constant(seconds)`.

    Example:
      >>> law = ej.clock.lognormal(ej.clock.measure(loss, params, batch), sigma=0.3)
    """
    repeats = validation.check_int("repeats", repeats, lo=1)
    grad = jax.jit(jax.grad(loss_fn, has_aux=has_aux))
    jax.block_until_ready(grad(params, batch))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params, batch))
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


__all__ = ["COLLECTIVES", "Compute", "Network", "Record", "System", "Timeline", "Writes",
           "batch_keys", "constant", "exponential", "lognormal", "measure", "network",
           "pareto", "replay", "seconds", "system", "times", "trace"]
