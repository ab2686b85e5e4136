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
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np

from elastic_jax import consistency

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
    """A distributed SGD variant as pure functions (docs/design.md, "The one abstraction").

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


# How a device evaluates its block of workers (views, gradients, `local`):
#   "auto":   the fastest measured for the loss and backend (`resolve_worker_loop`;
#             benchmarks/README.md); the default;
#   "map":    one `lax.scan` loop body, compiled once, whatever the block size: a
#             worker's arithmetic is then identical on one device and on a mesh
#             of any size (bitwise placement independence);
#   "unroll": a Python loop inside jit (fast on XLA:CPU for small blocks; XLA
#             may fuse the copies differently for different block sizes);
#   "vmap":   batched over the block (scales to hundreds of workers).
# They agree with one another to rounding, not bitwise.
WORKER_LOOPS = ("auto", "map", "unroll", "vmap")

# XLA:CPU lowers a convolution to a fast library call only outside loop bodies
# and without a batch of per-worker weights (vmap makes it a grouped
# convolution); benchmarks/README.md has the measurements.
_CONV_PRIMITIVES = frozenset({"conv_general_dilated"})
# Above this block size an unrolled loop compiles too slowly (~0.4 s a worker);
# the workers are then unrolled in vmapped groups of `_GROUP`.
_MAX_UNROLL = 32
_GROUP = 8


def _primitives(jaxpr) -> set[str]:
    """The names of every primitive in `jaxpr` and its sub-jaxprs."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    names |= _primitives(sub)
    return names


def resolve_worker_loop(loop: str, jaxpr, block: int, platform: str) -> str:
    """The gradient loop `"auto"` stands for; any other `loop` is returned as is.

    Args:
      loop: one of `WORKER_LOOPS`.
      jaxpr: a (closed) jaxpr of one worker's value-and-gradient.
      block: the number of workers a device evaluates.
      platform: the devices' platform (`"cpu"`, `"gpu"`, `"tpu"`).

    Returns:
      `"unroll"` for a convolutional loss on CPU and a block of at most 32,
      `"groups"` (unrolled vmapped groups of 8) for larger blocks there, else
      `"vmap"`.
    """
    if loop != "auto":
        return loop
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    if platform == "cpu" and _primitives(jaxpr) & _CONV_PRIMITIVES:
        return "unroll" if block <= _MAX_UNROLL else "groups"
    return "vmap"


def map_workers(fn, indices, *trees, shared=None, loop: str = "map", vary=None):
    """`fn(index, *slices, shared)` over a block of workers, stacked on a leading axis.

    `loop` is one of `WORKER_LOOPS` (`"auto"` means `"vmap"` here: views and
    `local` have no convolution) or `"groups"`. `vary` (on a mesh) marks values
    as varying over the worker axis.
    """
    if loop == "map":
        return _loop_workers(fn, indices, trees, shared, vary or (lambda tree: tree))
    if loop in ("vmap", "auto"):
        return jax.vmap(lambda i, *xs: fn(i, *xs, shared))(indices, *trees)
    if loop == "groups":
        outs = []
        for lo in range(0, indices.shape[0], _GROUP):
            part = jax.tree.map(lambda x, lo=lo: x[lo:lo + _GROUP], (indices, trees))
            outs.append(jax.vmap(lambda i, *xs: fn(i, *xs, shared))(part[0], *part[1]))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
    outs = []
    for j in range(indices.shape[0]):
        slices = [jax.tree.map(lambda x, j=j: x[j], t) for t in trees]
        outs.append(fn(indices[j], *slices, shared))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _loop_workers(fn, indices, trees, shared, vary):
    """`fn` over the block in one `lax.scan` body of at least two iterations.

    XLA inlines a loop of one iteration (one worker per device), which compiles
    the worker's arithmetic differently; padding to two iterations, the second
    skipped by a `lax.cond`, keeps one loop body for every block size.
    """
    block = indices.shape[0]

    def one(j):
        args = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False),
                            (indices, trees))
        return vary(fn(args[0], *args[1], shared))

    # Trace the worker's function once (a loss traced twice would recompile
    # nothing, but it is a second trace): its jaxpr serves the real branch.
    closed, shapes = jax.make_jaxpr(one, return_shape=True)(jnp.int32(0))
    treedef = jax.tree.structure(shapes)
    run_one = jax_core.jaxpr_as_fun(closed)

    def real(j):
        return jax.tree.unflatten(treedef, run_one(j))

    def skip(j):
        del j
        return vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def body(carry, j):
        return carry, jax.lax.cond(j < block, real, skip, j)

    _, outs = jax.lax.scan(body, None, jnp.arange(max(block, 2), dtype=jnp.int32))
    return jax.tree.map(lambda x: x[:block], outs)


def local_half(local, shared, workers, grads, indices, loop: str = "map", vary=None):
    """`local` over a block of workers with global indices `indices`.

    Returns the new worker states and the messages, behind an optimisation
    barrier: XLA may not fuse a worker's computation into `combine`.
    """

    def one(index, worker, grad, shared):
        key = derive_key(shared.key, TAG_LOCAL, shared.round, index)
        return local(index, worker, grad, key, shared)

    workers, messages = map_workers(one, indices, workers, grads, shared=shared, loop=loop,
                                    vary=vary)
    return jax.lax.optimization_barrier((workers, messages))


def compose_update(local, combine, view, num_workers: int):
    """Builds `update` and `views` from the halves, on one device.

    `update` maps `local` over the worker axis and hands the stacked messages,
    in global worker order, to `combine` (what `ej.parallel` does per device
    and after an `all_gather` on a mesh).
    """

    def views_fn(state: State):
        state = replicated(state)
        idx = jnp.arange(num_workers)
        return jax.vmap(view, in_axes=(0, 0, None))(idx, state.workers, state.shared)

    def update_fn(state: State, grads: Grads):
        idx = jnp.arange(num_workers)
        workers, messages = local_half(local, state.shared, state.workers, grads, idx)
        shared, metrics = combine(state.shared, messages)
        return State(shared, workers), metrics

    return views_fn, update_fn


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
    return state.shared.auxiliary(state.workers)


def model(state: State) -> Params:
    """The actual model `X_t`: what the system really holds (any placement, as `params`)."""
    state = replicated(state)
    return state.shared.actual(state.workers)


def current_round(state: State) -> int:
    """The number of rounds already applied to `state` (a host integer)."""
    return int(jax.device_get(state.shared.round))


# Jaxprs of the user's functions (the loss's value-and-gradient, `batch_fn`),
# keyed by the function and the abstract values of its arguments: `run` may
# build two programs for one configuration (it traces the chunked loop to
# learn which loop the loss resolves to) and the user's code is traced once.
_TRACES: dict = {}
_MAX_TRACES = 256


def _traced(key, fn, *args):
    """`(closed_jaxpr, out_shapes)` of `fn(*args)`, traced once per `key` and argument types.

    A jaxpr that closes over a tracer of an enclosing transformation is not
    kept (it would leak that tracer into a later trace).
    """
    leaves, treedef = jax.tree.flatten(args)
    cache_key = (key, treedef, tuple(jax.typeof(x) for x in leaves))
    hit = _TRACES.get(cache_key)
    if hit is not None:
        return hit
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[cache_key] = (closed, shapes)
    return closed, shapes


def _call_traced(key, fn, *args):
    """`fn(*args)`, evaluated from its cached jaxpr (`_traced`)."""
    closed, shapes = _traced(key, fn, *args)
    out = jax_core.jaxpr_as_fun(closed)(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def _value_and_grads(loss_fn, has_aux, loop="map", platform="cpu"):
    """`grads_fn(indices, views, batch, vary, resolved=None) -> (losses, aux, grads)`.

    Over a block of workers. `loop="auto"` is resolved at trace time by
    `grads_fn.resolve(view, batch, block)` from one worker's jaxpr, the block size
    and `platform` (`resolve_worker_loop`); it returns `(loop, one)`, which
    `round_body` passes back as `resolved` (the loss is traced once).
    """
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def split(out):
        if has_aux:
            (loss, aux), grad = out
        else:
            (loss, grad), aux = out, None
        return loss, aux, grad

    def one(index, view, batch, shared):
        del index, shared
        return split(vg(view, batch))

    def resolve(view, batch, block):
        # Trace the loss once: its jaxpr decides the loop and is what the loop runs.
        closed, shapes = _traced(("value_and_grad", loss_fn, has_aux), vg, view, batch)
        treedef, run = jax.tree.structure(shapes), jax_core.jaxpr_as_fun(closed)

        def traced(index, view, batch, shared):
            del index, shared
            return split(jax.tree.unflatten(treedef, run(*jax.tree.leaves((view, batch)))))

        chosen = resolve_worker_loop(loop, closed, block, platform)
        grads_fn.resolved.append(chosen)
        return chosen, traced

    def grads_fn(indices, views, batch, vary=None, resolved=None):
        if resolved is None and loop == "auto":
            first = jax.tree.map(lambda x: x[0], (views, batch))
            resolved = resolve(*first, indices.shape[0])
        chosen, fn = resolved if resolved is not None else (loop, one)
        return map_workers(fn, indices, views, batch, loop=chosen, vary=vary)

    grads_fn.resolve = resolve
    grads_fn.resolved = []  # What `"auto"` resolved to, one entry a trace (`run` reads it).
    return grads_fn


def _identity(tree):
    return tree


def round_body(alg: Algorithm, grads_fn, shared, workers, batch, first_index, gather,
               vary=lambda tree: tree, loop: str = "map"):
    """One round for a block of workers (all `P` on one device, or a device's share).

    Evaluates each worker's gradient at its view, runs `local`, gathers the
    messages in global worker order (`gather` is the identity on one device and
    an `all_gather` on a mesh) and runs `combine` on them.

    On a mesh, `vary` marks the views as varying across devices before they are
    differentiated: a view computed from replicated state alone (synchronous
    SGD) would otherwise have its gradient summed over devices.

    Returns:
      `(shared, workers, metrics)`.
    """
    block = jax.tree.leaves(batch)[0].shape[0]
    indices = first_index + jnp.arange(block)
    resolved = None
    if loop == "auto":
        # Resolve from the first worker's view (its value is unused and dropped
        # by XLA); views and `local` follow the gradients when they are unrolled
        # (faster on the small CNN, benchmarks/README.md).
        first = jax.tree.map(lambda x: x[0], (workers, batch))
        view = vary(alg.view(indices[0], first[0], shared))
        resolved = grads_fn.resolve(view, first[1], block)
        loop = "unroll" if resolved[0] == "unroll" else "vmap"
    views = vary(map_workers(alg.view, indices, workers, shared=shared, loop=loop, vary=vary))
    losses, aux, grads = grads_fn(indices, views, batch, vary, resolved)
    workers, messages = local_half(alg.local, shared, workers, grads, indices, loop=loop,
                                   vary=vary)
    messages, losses, aux = gather((messages, losses, aux))
    shared, metrics = alg.combine(shared, messages)
    metrics = dict(metrics)
    metrics["loss"] = consistency.worker_mean(losses)
    if isinstance(aux, Mapping):
        for name, value in aux.items():
            if jnp.ndim(value) == 1:
                metrics[f"aux/{name}"] = consistency.worker_mean(value)
    return shared, workers, metrics


def make_step(
    alg: Algorithm,
    loss_fn: Callable,
    *,
    has_aux: bool = False,
    checks: bool = False,
    mesh=None,
    worker_loop: str = "auto",
):
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
        deterministic elastic consistency bound holds (docs/theory.md section 2,
        with its rounding allowance) and that the state and metrics are finite,
        failing with the round number.
      mesh: None (one device) or a `jax.sharding.Mesh` with a `"workers"` axis
        whose size divides `P`: each device then runs `local` for its block of
        workers under `jax.shard_map` and every device runs the same `combine`
        on the gathered messages. With `worker_loop="map"` the result is
        bitwise the same either way.
      worker_loop: how each device evaluates its block of workers (see
        `WORKER_LOOPS`): `"auto"` (the default) picks the fastest measured for
        the loss and backend (`resolve_worker_loop`: on CPU an unrolled loop
        for convolutional losses, else `vmap`); `"map"` compiles one loop body
        for every block size, so the result is bitwise the same on one device
        and on any mesh (the other loops agree to rounding; on XLA:CPU it is
        much slower for convolutions, which lose their fast lowering inside a
        loop); `"unroll"`; `"vmap"`.

    Returns:
      `step(state, batch) -> (state, metrics)`.
    """
    from elastic_jax import checks as checks_lib
    from elastic_jax import parallel

    if worker_loop not in WORKER_LOOPS:
        raise ValueError(f"worker_loop: got {worker_loop!r}; expected one of {WORKER_LOOPS}")
    if mesh is None and worker_loop != "map":
        # One device, no bitwise promise to keep: the round without `shard_map`
        # (its message gather is a collective even on one device).
        grads_fn = _value_and_grads(loss_fn, has_aux, worker_loop,
                                    platform=jax.devices()[0].platform)

        def body(shared, workers, batch):
            return round_body(alg, grads_fn, shared, workers, batch, 0, _identity,
                              _identity, worker_loop)
    else:
        # With "map", one device runs the same program as a mesh: a one-device
        # mesh (docs/design.md, "Workers and devices": a plain jit let XLA fuse
        # differently, changing last bits).
        mesh = parallel.make_mesh(1) if mesh is None else mesh
        grads_fn = _value_and_grads(loss_fn, has_aux, worker_loop,
                                    platform=mesh.devices.flat[0].platform)
        body = parallel.sharded_round(alg, grads_fn, mesh, worker_loop)

    def step(state: State, batch):
        shared, workers, metrics = body(state.shared, state.workers, batch)
        new_state = State(shared, workers)
        checks_lib.assert_state_stable(state, new_state)
        if checks:
            checks_lib.check_round(alg, state, new_state, metrics)
        return new_state, metrics

    step.resolved_worker_loops = grads_fn.resolved
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
def _compiled_step(alg, loss_fn, has_aux, checks, mesh, worker_loop, donate):
    step = make_step(alg, loss_fn, has_aux=has_aux, checks=checks, mesh=mesh,
                     worker_loop=worker_loop)
    return jax.jit(step, donate_argnums=0 if donate else ())


@functools.lru_cache(maxsize=64)
def _compiled_batch(batch_fn, num_workers):
    """`batch_fn` as a program of its own: the round then reads its batch as an
    input with the default layout (a batch produced inside the round's program
    may be laid out differently for different meshes, changing the order of the
    loss's reductions)."""

    def sample(round_, key):
        return _sample(batch_fn, round_, key, num_workers)

    return jax.jit(sample)


def _sample(batch_fn, round_, key, num_workers):
    """`batch_fn(round, worker_keys)` for the round, from its cached trace."""
    keys = worker_keys(key, TAG_DATA, round_, num_workers)
    return _call_traced(("batch_fn", batch_fn), batch_fn, round_, keys)


# Rounds per program of `run(loop="chunks")`: the dispatch and the sampling are
# amortised over the chunk (benchmarks/README.md); a chunk's batches are
# sampled together, so their memory is `chunk` rounds' batches.
CHUNK = 16


@functools.lru_cache(maxsize=64)
def _compiled_chunk(alg, loss_fn, has_aux, checks, batch_fn, chunk, mesh, worker_loop, donate):
    """`(program, step)`: `program(state, batches, n)` runs `n <= chunk` rounds.

    The rounds run in one `lax.scan` of fixed length `chunk` whose iterations
    `i >= n` are skipped by a `lax.cond` (the state passes through unchanged:
    no round counter, running maximum or key moves), so every round, whatever
    its place in a chunk, is the same compiled loop body, a run split into
    calls of any lengths gives bitwise the same result, and reverse-mode
    `jax.grad` flows through the loop (a `while_loop` with a dynamic trip
    count has no transpose). The skipped iterations read valid inputs (a
    shorter chunk's batches are padded with copies of its last round), so
    where the `cond` becomes a `select` (under `vmap`) the untaken branch
    computes finite values and contributes zero, not NaN, to a gradient.
    With `batch_fn` the chunk's `chunk` batches are sampled first, vectorised
    over the rounds (`batches` is then None); metrics come back as `[chunk]`
    arrays of which the first `n` entries are the rounds'.
    """
    step = make_step(alg, loss_fn, has_aux=has_aux, checks=checks, mesh=mesh,
                     worker_loop=worker_loop)

    def program(state, batches, n):
        if batch_fn is not None:
            rounds = state.shared.round + jnp.arange(chunk, dtype=state.shared.round.dtype)
            key = state.shared.key
            batches = jax.vmap(lambda r: _sample(batch_fn, r, key, alg.num_workers))(rounds)
        first = jax.tree.map(lambda x: x[0], batches)
        closed, (_, metric_shapes) = jax.make_jaxpr(step, return_shape=True)(state, first)
        run_step = jax_core.jaxpr_as_fun(closed)
        state_def = jax.tree.structure(state)
        metrics_def = jax.tree.structure(metric_shapes)

        def real(state, batch):
            out = run_step(*jax.tree.leaves((state, batch)))
            return (jax.tree.unflatten(state_def, out[:state_def.num_leaves]),
                    jax.tree.unflatten(metrics_def, out[state_def.num_leaves:]))

        def skip(state, batch):
            del batch
            return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)

        def body(state, xs):
            i, batch = xs
            return jax.lax.cond(i < n, real, skip, state, batch)

        return jax.lax.scan(body, state, (jnp.arange(chunk, dtype=jnp.int32), batches))

    return jax.jit(program, donate_argnums=0 if donate else ()), step


@functools.lru_cache(maxsize=64)
def _compiled_scan(alg, loss_fn, has_aux, checks, batch_fn, rounds, mesh, worker_loop, donate):
    step = make_step(alg, loss_fn, has_aux=has_aux, checks=checks, mesh=mesh,
                     worker_loop=worker_loop)

    def body(state, batch):
        if batch_fn is not None:
            shared = state.shared
            batch = jax.lax.optimization_barrier(
                _sample(batch_fn, shared.round, shared.key, alg.num_workers))
        return step(state, batch)

    def loop(state, batches):
        return jax.lax.scan(body, state, batches, length=rounds)

    return jax.jit(loop, donate_argnums=0 if donate else ())


def _under_transformation() -> bool:
    """Whether `run` is called inside a JAX transformation (`grad`, `vmap`, `jit`).

    Reverse mode keeps each round's inputs as residuals for the backward pass,
    so a round may then donate nothing, even when every leaf of the state is
    concrete (a state that does not depend on the differentiated value). JAX
    has no public query for this; where the internal one is missing, nothing
    is donated (always correct, at the cost of a copy per round).
    """
    try:
        from jax._src import core as jax_src_core

        return not jax_src_core.trace_state_clean()
    except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
        return True


LOOPS = ("auto", "python", "chunks", "scan")

# What `run(loop="auto")` chose per configuration (it traces the chunked
# program once to learn how the loss's gradients resolved).
_AUTO_LOOPS: dict = {}


def _auto_loop(alg, loss_fn, has_aux, checks, batch_fn, chunk, mesh, worker_loop, donate, state,
               xs):
    """`"python"` or `"chunks"` for `run(loop="auto")` (see `run`)."""
    if mesh is not None or worker_loop in ("map", "unroll"):
        return "python"
    platform = jax.devices()[0].platform
    if worker_loop != "auto":
        return "python" if platform == "cpu" else "chunks"
    program, step = _compiled_chunk(alg, loss_fn, has_aux, checks, batch_fn, chunk, mesh,
                                    worker_loop, donate)
    leaves, treedef = jax.tree.flatten((state, xs))
    key = (program, treedef, tuple(jax.typeof(x) for x in leaves))
    if key not in _AUTO_LOOPS:
        del step.resolved_worker_loops[:]
        try:
            program.trace(state, xs, jnp.int32(0))  # Cached: the call below does not retrace.
        except Exception:  # noqa: BLE001
            # E.g. a `batch_fn` that cannot be vmapped over rounds (a host
            # callback without a vmap rule): the Python loop samples one round
            # at a time, and raises again whatever is a real error.
            return "python"
        # XLA:CPU loses its fast convolution inside a loop body (docs/design.md, "Performance").
        unrolled = {"unroll", "groups"} & set(step.resolved_worker_loops)
        if len(_AUTO_LOOPS) >= _MAX_TRACES:
            _AUTO_LOOPS.pop(next(iter(_AUTO_LOOPS)))
        _AUTO_LOOPS[key] = "python" if unrolled else "chunks"
    return _AUTO_LOOPS[key]


def _chunk_batches(batches, start, n, chunk):
    """Rounds `[start, start + n)` of `batches`, padded to `chunk` rounds with its last round.

    The padding rounds are skipped (`_compiled_chunk`); they repeat a real batch
    so that any computation on them is finite.
    """

    def one(x):
        part = jnp.asarray(x[start:start + n])
        if n == chunk:
            return part
        return jnp.concatenate([part, jnp.repeat(part[-1:], chunk - n, axis=0)])

    return jax.tree.map(one, batches)


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
    loop: str = "auto",
    mesh=None,
    worker_loop: str = "auto",
    chunk: int = CHUNK,
):
    """Runs `rounds` rounds of `alg` and returns the final state and the stacked metrics.

    Either `batches` (a pytree of arrays `[R, P, b, ...]`, one batch per round
    and worker) or a jittable `batch_fn(round, worker_keys) -> batch [P, b, ...]`
    with `rounds=R`; `worker_keys[p]` is `derive_key(base, TAG_DATA, round, p)`,
    so data sampled on the device depends on nothing but the round and worker.

    `loop` is one of `LOOPS`:

    - `"python"`: a Python loop over one jitted round, the batch sampled by a
      program of its own;
    - `"chunks"`: a Python loop over one jitted program of `chunk` rounds (a
      `lax.scan` of `chunk` iterations whose tail is skipped by a `lax.cond`,
      the number of rounds an argument, so the last, shorter chunk reuses it,
      and a run split into calls of any lengths is bitwise the same); with
      `batch_fn` the chunk's batches are sampled in the same program,
      vectorised over its rounds (so `chunk` rounds' batches are in memory at
      once, and `batch_fn` must be vmappable);
    - `"scan"`: the whole run as one `lax.scan` (compiled per `rounds`);
    - `"auto"` (the default): `"chunks"` unless the loss's gradients are unrolled
      over the workers (`worker_loop="auto"` resolved to it: a convolutional loss
      on CPU, where XLA:CPU loses its fast convolution inside any loop body),
      or `worker_loop` is `"map"` or `"unroll"` (or, on CPU, any loop but
      `"auto"`: only `"auto"` inspects the loss), or `mesh` is given, or the
      chunked program cannot be traced (a `batch_fn` without a vmap rule);
      then `"python"`. benchmarks/README.md has the measurements behind it.

    Differentiation: every loop is reverse-mode differentiable, so
    `jax.grad` of a function of the final state (or the metrics) with respect
    to a hyperparameter the algorithm closes over, the initial parameters or
    the batches flows through `run`; build the algorithm inside the
    differentiated function. Reverse mode keeps what the backward pass needs
    of every round (the state and the round's intermediate values: `O(R)`
    states, e.g. every round's residuals and ring buffer), so memory grows
    with `R`; for long runs use `ej.analysis.hypergradient`, which
    rematerialises each round, or forward mode (`jax.jvp`). Under a
    transformation nothing is donated.

    Every loop compiles its program once per configuration and caches it
    across calls. The loops agree to rounding, not bitwise (the batch is
    produced in a different program). With `mesh` (a `jax.sharding.Mesh` with
    a `"workers"` axis) the workers are split across its devices
    (`ej.parallel`); `worker_loop` is `make_step`'s (with `"map"` and the
    Python loop the result is bitwise the same on one device and on any mesh).

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
    from elastic_jax import parallel

    if loop not in LOOPS:
        raise ValueError(f"loop: got {loop!r}; expected one of {LOOPS}")
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk: got {chunk!r}; expected an integer >= 1")
    chunk = int(chunk)
    if worker_loop not in WORKER_LOOPS:
        raise ValueError(f"worker_loop: got {worker_loop!r}; expected one of {WORKER_LOOPS}")
    if mesh is not None:
        parallel.check_mesh(mesh, alg.num_workers)
    _validate_rounds(alg, state, rounds)
    # Place the state as the round returns it (so the second round does not
    # retrace for a new input sharding); this copies, and the compiled round
    # donates its input, never the caller's buffers. Under a transformation
    # (`jax.grad`, `jax.vmap` of `run`) nothing is donated: a concrete leaf of
    # a traced state may be a constant the caller still holds.
    donate = not _under_transformation()
    state = parallel.shard_state(jax.tree.map(jnp.copy, state),
                                 parallel.make_mesh(1) if mesh is None else mesh)
    if rounds == 0:
        return state, {}
    if loop == "auto":
        probe = None if batches is None else _chunk_batches(batches, 0, min(chunk, rounds), chunk)
        loop = _auto_loop(alg, loss_fn, has_aux, checks, batch_fn, chunk, mesh, worker_loop,
                          donate, state, probe)
    if loop == "chunks":
        return _run_chunks(alg, loss_fn, has_aux, checks, batch_fn, batches, chunk, mesh,
                           worker_loop, donate, state, rounds)
    if loop == "scan":
        fn = _compiled_scan(alg, loss_fn, has_aux, checks, batch_fn, rounds, mesh, worker_loop,
                            donate)
        xs = None if batches is None else jax.tree.map(lambda x: x[:rounds], batches)
        return fn(state, xs)
    fn = _compiled_step(alg, loss_fn, has_aux, checks, mesh, worker_loop, donate)
    sample = None if batch_fn is None else _compiled_batch(batch_fn, alg.num_workers)
    serialize = mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
    history = []
    for r in range(rounds):
        if batch_fn is None:
            batch = jax.tree.map(lambda x, r=r: x[r], batches)
        else:
            batch = sample(state.shared.round, state.shared.key)
        state, metrics = fn(state, batch)
        if serialize:
            # XLA:CPU runs the devices' collectives on a shared thread pool; with
            # the next round dispatched while this one still waits in an
            # all-gather, the rounds were seen to deadlock on a loaded machine.
            jax.block_until_ready(state)
        history.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)


def _run_chunks(alg, loss_fn, has_aux, checks, batch_fn, batches, chunk, mesh, worker_loop,
                donate, state, rounds):
    program, _ = _compiled_chunk(alg, loss_fn, has_aux, checks, batch_fn, chunk, mesh,
                                 worker_loop, donate)
    history = []
    for start in range(0, rounds, chunk):
        n = min(chunk, rounds - start)
        xs = None if batches is None else _chunk_batches(batches, start, n, chunk)
        state, metrics = program(state, xs, jnp.int32(n))
        history.append(metrics)
        if mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
            jax.block_until_ready(state)  # As the Python loop: no overlapping collectives.
    metrics = jax.tree.map(lambda *xs: jnp.concatenate(xs)[:rounds], *history)
    return state, metrics
