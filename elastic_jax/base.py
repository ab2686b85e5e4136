"""The bottom layer: types, the state protocol and key derivation.

Every distributed SGD variant of Nadiradze et al., "Elastic Consistency"
(arXiv:2001.05918) is one value of one type, `Algorithm`, a `NamedTuple` of
pure functions in the optax manner (docs/design.md, "The one abstraction").
The library never calls the user's loss: the caller evaluates gradients at the
views and hands them back.

State is `State(shared, workers)`: `shared` holds replicated arrays (the model,
ring buffers, counters, the base key, running maxima) and `workers` holds
per-worker arrays stacked on a leading worker axis of size `P` (chain states,
local models). Shapes, dtypes and structure never change across rounds. A
state also remembers, as static pytree metadata (never traced), the algorithm
whose `init` made it, so `ej.params(state)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays
Grads = Any  # a pytree like `Params`, with a leading worker axis [P, ...]
PRNGKey = jax.Array
Metrics = Mapping[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]

# The name of the (only) mesh axis the worker axis is ever split over.
WORKER_AXIS = "workers"

# Purpose tags for `derive_key` (docs/design.md, "Randomness").
TAG_LOCAL = 1  # a worker's own draws in `local` (compressor randomness)
TAG_DELAY = 2  # lags of stale reads and message delays
TAG_DATA = 3  # per-worker batch sampling in `run(batch_fn=...)`
TAG_FAULT = 4  # drops, crashes, partial deliveries
TAG_TOPOLOGY = 5  # a round's random mixing matrix (gossip's random matching)
TAG_CLOCK = 6  # the system model's compute times and message jitters (elastic_jax.clock)
TAG_FACTORS = 7  # a collective compressor's initial factors (PowerSGD's Q_0)
TAG_OUTER = 8  # DiLoCo's outer compressor: a worker's draws at a synchronisation


class AlgorithmInfo(NamedTuple):
    """Static facts about an algorithm (hashable; never traced).

    Attributes:
      name: the factory's name, e.g. `"async_sgd"`.
      num_workers: `P`.
      bound_kind: `"deterministic"` (`b_hat <= bound` on every realisation),
        `"expectation"` (the bound holds only in expectation) or `"none"`
        (no finite bound; `consistency/bound` is `inf`).
      max_rounds: the number of rounds a recorded delay trace or a system
        model's schedule covers, else None.
      rule: the per-worker chain (`ej.chain`) the algorithm applies.
      clock: with a system model (`system=`), `params -> ej.clock.Timeline`:
        the schedule for parameters of these shapes (float64, on the host).
      gradient_count: `(shared, index) -> int32`, how many gradients worker
        `index` computed before this round's (its batch and its chain's draws
        are keyed by it), where that is not the round; None: the round.
    """

    name: str
    num_workers: int
    bound_kind: str
    max_rounds: int | None = None
    rule: Any = None
    clock: Any = None
    gradient_count: Any = None


class Algorithm(NamedTuple):
    """A distributed SGD variant as pure functions (docs/design.md, "The one abstraction").

    The drivers (`ej.make_step`, `ej.run`) and the library functions
    `ej.views`, `ej.update`, `ej.params`, `ej.model` call these fields and
    nothing else.

    Attributes:
      init: `(params, key) -> State`.
      view: `(index, worker_state, shared) -> Params`: worker `index`'s view
        `v_t^p`, where it evaluates its gradient this round.
      local: `(index, worker_state, grad, key, shared) -> (worker_state, message)`,
        one worker's half of a round; `index` is the global worker index and
        `key` the worker's key for the round (tag `TAG_LOCAL`).
      combine: `(shared, messages) -> (shared, metrics)`, replicated, over the
        messages of all `P` workers stacked in global worker order.
      auxiliary: `State -> Params`: the auxiliary model `x_t`.
      actual: `State -> Params`: the actual model `X_t`.
      info: static facts (`AlgorithmInfo`).
    """

    init: Callable[[Params, PRNGKey], State]
    view: Callable[[jax.Array, Any, Any], Params]
    local: Callable[..., tuple[Any, Any]]
    combine: Callable[[Any, Any], tuple[Any, Metrics]]
    auxiliary: Callable[[State], Params]
    actual: Callable[[State], Params]
    info: AlgorithmInfo

    @property
    def num_workers(self) -> int:
        return self.info.num_workers

    def __repr__(self) -> str:
        # Stable across processes (no function addresses): a state's tree structure
        # prints it, and checkpoints compare printed structures.
        info = self.info
        return f"Algorithm({info.name}, P={info.num_workers}, rule={info.rule!r})"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The state of a distributed SGD run.

    Attributes:
      shared: replicated arrays; always has `round` (int32) and `key` (typed key).
      workers: a pytree with a leading worker axis `[P, ...]` (possibly empty).
      algorithm: the `Algorithm` whose `init` made the state (static metadata,
        part of the tree structure, never traced).
    """

    shared: Any
    workers: Any
    algorithm: Algorithm = dataclasses.field(metadata=dict(static=True))

    def replace(self, **changes) -> State:
        return dataclasses.replace(self, **changes)


def algorithm(name: str, num_workers: int, bound_kind: str, *, init, view, local, combine,
              auxiliary, actual, rule=None, max_rounds: int | None = None, clock=None,
              gradient_count=None) -> Algorithm:
    """Assembles an `Algorithm`; `init` returns `(shared, workers)` and is wrapped to a `State`."""

    def init_fn(params, key) -> State:
        if clock is not None:
            clock(params)  # The schedule (shapes only): its errors come before any compilation.
        shared, workers = init(params, key)
        return State(shared, workers, alg)

    alg = Algorithm(init_fn, view, local, combine, auxiliary, actual,
                    AlgorithmInfo(name, num_workers, bound_kind, max_rounds, rule, clock,
                                  gradient_count))
    return alg


def gradient_count(alg: Algorithm, shared, index) -> jax.Array:
    """The count worker `index`'s draws are keyed by this round: the round, or its own count.

    Every lockstep variant computes one gradient per worker per round, so the
    count is the round; `ej.clock_async_sgd` keys each worker's batch and chain
    draws by its own gradient count (`AlgorithmInfo.gradient_count`).
    """
    if alg.info.gradient_count is None:
        return shared.round
    return alg.info.gradient_count(shared, index)


def gradient_keys(alg: Algorithm, shared, tag: int) -> jax.Array:
    """`derive_key(base, tag, count_p, p)` for every worker `p` (`gradient_count`), `[P]`."""
    return jax.vmap(lambda p: derive_key(shared.key, tag, gradient_count(alg, shared, p), p))(
        jnp.arange(alg.num_workers))


def derive_key(base: PRNGKey, tag: int, round_: jax.typing.ArrayLike, worker) -> PRNGKey:
    """`fold_in(fold_in(fold_in(base, tag), round), worker)`: placement independent."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, tag), round_), worker)


def worker_keys(base: PRNGKey, tag: int, round_: jax.typing.ArrayLike, num_workers: int):
    """The keys `derive_key(base, tag, round, p)` for `p = 0..P-1`, shape `[P]`."""
    return jax.vmap(lambda p: derive_key(base, tag, round_, p))(jnp.arange(num_workers))


def as_key(key) -> PRNGKey:
    """Accepts a typed key, a legacy `uint32[2]` key or an int seed; returns a typed key."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key: got an array of dtype {key.dtype}; expected a jax.random.key")


def replicated(tree):
    """`tree` with every leaf whose type is split over an explicit mesh axis replicated.

    A state returned by a run on a mesh built with explicit axes (the default
    of `jax.make_mesh`) carries its worker split in its type, and slicing or
    mapping over a split axis outside `shard_map` is a sharding type error.
    The accessors gather such leaves first (`jax.sharding.reshard`, eagerly or
    inside `jit`); other leaves, on one device or an auto mesh, are returned as
    they are. The values do not change.
    """

    def one(x):
        sharding = getattr(jax.typeof(x), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is not None and any(axis is not None for axis in spec):
            whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return jax.sharding.reshard(x, whole)
        return x

    return jax.tree.map(one, tree)


def params(state: State) -> Params:
    """The auxiliary model `x_t` (docs/theory.md section 1): what sequential SGD would hold.

    Works on every state the library returns: on one device, split over a
    mesh, or traced inside `jit`.
    """
    state = replicated(state)
    return state.algorithm.auxiliary(state)


def model(state: State) -> Params:
    """The actual model `X_t`: what the system really holds (any placement, as `params`)."""
    state = replicated(state)
    return state.algorithm.actual(state)


def current_round(state: State) -> int:
    """The number of rounds already applied to `state` (a host integer)."""
    return int(jax.device_get(state.shared.round))
