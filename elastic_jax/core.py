"""The one abstraction: `Algorithm`, its state conventions, and the drivers.

Every distributed SGD variant of Nadiradze et al., "Elastic Consistency"
(arXiv:2001.05918) is one value of one type, a `NamedTuple` of pure functions in
the optax manner. The library never calls the user's loss: the caller evaluates
gradients where `views` says and hands them back to `update`. `make_step` and
`run` are the drivers that do this for a `loss_fn(params, batch)`.

State is `State(shared, workers)`: `shared` holds replicated arrays (the model,
ring buffers, counters, the base key, running maxima) and `workers` holds
per-worker arrays stacked on a leading worker axis of size `P` (residuals,
local models). Shapes, dtypes and structure never change across `update`.
"""

from __future__ import annotations

import functools
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

# Purpose tags for `derive_key` (DESIGN.md, "Randomness").
TAG_LOCAL = 1  # a worker's own draws in `local` (compressor randomness)
TAG_DELAY = 2  # lags of stale reads and message delays
TAG_DATA = 3  # per-worker batch sampling in `run(batch_fn=...)`
TAG_FAULT = 4  # drops, crashes, partial deliveries


class State(NamedTuple):
    """The state of a distributed SGD run.

    `shared` is replicated on every device and implements
    `auxiliary(workers)` (the auxiliary model `x_t`) and `actual(workers)` (the
    actual model `X_t`); it always has `round` (int32) and `key` (typed key).
    `workers` is a pytree with a leading worker axis `[P, ...]` (possibly empty).
    """

    shared: Any
    workers: Any


class AlgorithmInfo(NamedTuple):
    """Static facts about an algorithm (hashable; never traced).

    Attributes:
      name: the factory's name, e.g. `"async_sgd"`.
      num_workers: `P`.
      bound_kind: `"deterministic"` (`b_hat <= bound` on every realisation),
        `"expectation"` (the bound holds only in expectation) or `"none"`
        (no finite bound; `consistency/bound` is `inf`).
      max_rounds: the number of rounds a recorded delay trace covers, else None.
    """

    name: str
    num_workers: int
    bound_kind: str
    max_rounds: int | None = None


class Algorithm(NamedTuple):
    """A distributed SGD variant as pure functions (DESIGN.md, "The one abstraction").

    Attributes:
      init: `(params, key) -> State`.
      views: `State -> Params` with a leading worker axis `[P, ...]`: the views
        `v_t^p` at which the caller evaluates the round's gradients.
      update: `(State, grads [P, ...]) -> (State, Metrics)`: one round, the
        composition of `local` mapped over workers and `combine`.
      local: `(index, worker_state, grad, key, shared) -> (worker_state, message)`,
        one worker's half of a round; `index` is the global worker index and
        `key` the worker's key for the round (tag `TAG_LOCAL`).
      combine: `(shared, messages) -> (shared, metrics)`, replicated, over the
        messages of all `P` workers stacked in global worker order.
      view: `(index, worker_state, shared) -> Params`, one worker's view
        (`views` is this mapped over workers).
      info: static facts (`AlgorithmInfo`).
    """

    init: Callable[[Params, PRNGKey], State]
    views: Callable[[State], Params]
    update: Callable[[State, Grads], tuple[State, Metrics]]
    local: Callable[..., tuple[Any, Any]]
    combine: Callable[[Any, Any], tuple[Any, Metrics]]
    view: Callable[[jax.Array, Any, Any], Params]
    info: AlgorithmInfo

    @property
    def num_workers(self) -> int:
        return self.info.num_workers


def derive_key(base: PRNGKey, tag: int, round_: jax.typing.ArrayLike, worker) -> PRNGKey:
    """`fold_in(fold_in(fold_in(base, tag), round), worker)`: placement independent."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, tag), round_), worker)


def worker_keys(base: PRNGKey, tag: int, round_: jax.typing.ArrayLike, num_workers: int):
    """The keys `derive_key(base, tag, round, p)` for `p = 0..P-1`, shape `[P]`."""
    return jax.vmap(lambda p: derive_key(base, tag, round_, p))(jnp.arange(num_workers))


def as_key(key) -> PRNGKey:
    """Accepts a typed key, a legacy `uint32[2]` key or an int seed; returns a typed key."""
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key: got an array of dtype {key.dtype}; expected a jax.random.key")


def compose_update(local, combine, view, num_workers: int):
    """Builds `update` and `views` from the halves, on one device.

    `update` maps `local` over the worker axis with `vmap` and hands the stacked
    messages, in global worker order, to `combine`.
    """

    def views_fn(state: State):
        idx = jnp.arange(num_workers)
        return jax.vmap(view, in_axes=(0, 0, None))(idx, state.workers, state.shared)

    def update_fn(state: State, grads: Grads):
        shared = state.shared
        idx = jnp.arange(num_workers)
        keys = worker_keys(shared.key, TAG_LOCAL, shared.round, num_workers)
        workers, messages = jax.vmap(local, in_axes=(0, 0, 0, 0, None))(
            idx, state.workers, grads, keys, shared
        )
        shared, metrics = combine(shared, messages)
        return State(shared, workers), metrics

    return views_fn, update_fn


def params(state: State) -> Params:
    """The auxiliary model `x_t` (THEORY.md section 1): what sequential SGD would hold."""
    return state.shared.auxiliary(state.workers)


def model(state: State) -> Params:
    """The actual model `X_t`: what the system really holds."""
    return state.shared.actual(state.workers)


def current_round(state: State) -> int:
    """The number of rounds already applied to `state` (a host integer)."""
    return int(jax.device_get(state.shared.round))


def _value_and_grads(loss_fn, has_aux):
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def one(view, batch):
        if has_aux:
            (loss, aux), grad = vg(view, batch)
        else:
            (loss, grad), aux = vg(view, batch), None
        return loss, aux, grad

    return jax.vmap(one)


def make_step(alg: Algorithm, loss_fn: Callable, *, has_aux: bool = False, checks: bool = False):
    """The round of `alg` for `loss_fn`, as a jittable `(state, batch) -> (state, metrics)`.

    `batch` has a leading worker axis `[P, ...]`: worker `p` evaluates
    `loss_fn(view_p, batch[p])` and its gradient. The metrics are the
    algorithm's plus `loss`, the mean over workers of the loss at their views
    (and, with `has_aux=True` and a mapping as aux, `aux/<name>` means).

    Args:
      alg: the algorithm.
      loss_fn: `(params, batch) -> scalar`, or `(scalar, aux)` with `has_aux`.
      has_aux: whether `loss_fn` returns `(loss, aux)`.
      checks: static; when True the step asserts, on the host, that every
        deterministic elastic consistency bound holds (THEORY.md section 2,
        with its rounding allowance) and that the state and metrics are finite,
        failing with the round number.

    Returns:
      `step(state, batch) -> (state, metrics)`.
    """
    from elastic_jax import checks as checks_lib

    grads_fn = _value_and_grads(loss_fn, has_aux)

    def step(state: State, batch):
        views = alg.views(state)
        losses, aux, grads = grads_fn(views, batch)
        new_state, metrics = alg.update(state, grads)
        checks_lib.assert_state_stable(state, new_state)
        metrics = dict(metrics)
        metrics["loss"] = jnp.mean(losses)
        if isinstance(aux, Mapping):
            for name, value in aux.items():
                if jnp.ndim(value) == 1:
                    metrics[f"aux/{name}"] = jnp.mean(value)
        if checks:
            checks_lib.check_round(alg, state, new_state, metrics)
        return new_state, metrics

    return step


def _validate_rounds(alg: Algorithm, state: State, rounds: int) -> None:
    if alg.info.max_rounds is not None:
        start = current_round(state)
        if start + rounds > alg.info.max_rounds:
            raise ValueError(
                f"rounds: got {rounds} rounds from round {start}; expected at most "
                f"{alg.info.max_rounds - start}: the delay trace covers {alg.info.max_rounds} "
                "rounds"
            )


@functools.lru_cache(maxsize=64)
def _compiled_step(alg, loss_fn, has_aux, checks, batch_fn):
    step = make_step(alg, loss_fn, has_aux=has_aux, checks=checks)
    if batch_fn is None:
        return jax.jit(step, donate_argnums=0)

    def sampled_step(state):
        shared = state.shared
        keys = worker_keys(shared.key, TAG_DATA, shared.round, alg.num_workers)
        return step(state, batch_fn(shared.round, keys))

    return jax.jit(sampled_step, donate_argnums=0)


@functools.lru_cache(maxsize=64)
def _compiled_scan(alg, loss_fn, has_aux, checks, batch_fn, rounds):
    step = make_step(alg, loss_fn, has_aux=has_aux, checks=checks)

    def body(state, batch):
        if batch_fn is not None:
            shared = state.shared
            keys = worker_keys(shared.key, TAG_DATA, shared.round, alg.num_workers)
            batch = batch_fn(shared.round, keys)
        return step(state, batch)

    def loop(state, batches):
        return jax.lax.scan(body, state, batches, length=rounds)

    return jax.jit(loop, donate_argnums=0)


def run(
    alg: Algorithm,
    loss_fn: Callable,
    state: State,
    batches=None,
    *,
    batch_fn: Callable | None = None,
    rounds: int | None = None,
    has_aux: bool = False,
    checks: bool = False,
    loop: str = "python",
):
    """Runs `rounds` rounds of `alg` and returns the final state and the stacked metrics.

    Either `batches` (a pytree of arrays `[R, P, b, ...]`, one batch per round
    and worker) or a jittable `batch_fn(round, worker_keys) -> batch [P, b, ...]`
    with `rounds=R`; `worker_keys[p]` is `derive_key(base, TAG_DATA, round, p)`,
    so data sampled on the device depends on nothing but the round and worker.

    The loop is a Python loop over one jitted round (`loop="python"`, the
    default: on XLA:CPU a `lax.scan` over rounds of a small CNN measured several
    times slower, see DESIGN.md) or one `lax.scan` (`loop="scan"`). Either way
    the round is compiled once per configuration and cached across calls.

    Returns:
      `(state, metrics)` with every metric stacked to shape `[R]`.
    """
    if (batches is None) == (batch_fn is None):
        raise ValueError("batches: expected exactly one of batches or batch_fn")
    if batches is not None:
        leading = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches)}
        if len(leading) != 1 or None in leading:
            raise ValueError(
                "batches: got leaves with leading sizes "
                f"{sorted(map(str, leading))}; expected one round axis shared by every leaf"
            )
        (available,) = leading
        rounds = available if rounds is None else rounds
        if not 0 <= rounds <= available:
            raise ValueError(f"rounds: got {rounds}; expected 0 <= rounds <= {available}")
    elif rounds is None or isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds: got {rounds}; expected an integer >= 0 with batch_fn")
    rounds = int(rounds)
    if loop not in ("python", "scan"):
        raise ValueError(f"loop: got {loop!r}; expected 'python' or 'scan'")
    _validate_rounds(alg, state, rounds)
    # The compiled round donates its input; never donate the caller's buffers.
    state = jax.tree.map(jnp.copy, state)
    if rounds == 0:
        return state, {}
    if loop == "scan":
        fn = _compiled_scan(alg, loss_fn, has_aux, checks, batch_fn, rounds)
        xs = None if batches is None else jax.tree.map(lambda x: x[:rounds], batches)
        return fn(state, xs)
    fn = _compiled_step(alg, loss_fn, has_aux, checks, batch_fn)
    history = []
    for r in range(rounds):
        if batch_fn is None:
            state, metrics = fn(state, jax.tree.map(lambda x, r=r: x[r], batches))
        else:
            state, metrics = fn(state)
        history.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)
