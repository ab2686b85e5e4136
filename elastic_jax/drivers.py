"""The drivers: `make_step` (one round for a loss) and `run` (many rounds).

The library never calls the user's loss except here: each round, every worker
evaluates `loss_fn` and its gradient at its view (docs/design.md,
"The one abstraction").
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, parallel, rounds, validation, workers
from elastic_jax import checks as checks_lib

LOOPS = ("auto", "python", "chunks", "scan")

# Rounds per program of `run(loop="chunks")`: dispatch is amortised over the
# chunk (benchmarks/README.md).
CHUNK = 16


def check_state(alg: base.Algorithm, state) -> None:
    """Refuses a state another algorithm made (one line naming `state`)."""
    if not isinstance(state, base.State):
        validation.fail("state", validation.Text(type(state).__name__),
                        "an ej.State made by this algorithm's init")
    if state.algorithm == alg:
        return
    name = state.algorithm.info.name
    if name != alg.info.name:
        validation.fail("state", validation.Text(f"a state of {name}"),
                        f"one made by this algorithm's init ({alg.info.name})")
    params = jax.eval_shape(state.algorithm.auxiliary, state)
    expected = jax.eval_shape(alg.init, params, jax.random.key(0))
    same = jax.tree.structure(expected.shared) == jax.tree.structure(state.shared) and (
        jax.tree.structure(expected.workers) == jax.tree.structure(state.workers)) and all(
        jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state), strict=True))
    if not same:
        validation.fail("state", validation.Text(f"a state of another {name} configuration"),
                        "one made by this algorithm's init")


def check_batch(alg: base.Algorithm, batch, what: str = "batch", leading=()) -> None:
    """Refuses a batch whose leaves do not all lead with `leading + (P,)`."""
    want = tuple(leading) + (alg.num_workers,)
    got = [tuple(np.shape(x)[:len(want)]) for x in jax.tree.leaves(batch)]
    if not got or any(g != want for g in got):
        shown = ", ".join(sorted({str(g) for g in got})) or "no arrays"
        names = ["R"] * len(leading) + [f"P={alg.num_workers}"]
        validation.fail(what, validation.Text(f"leading sizes {shown}"),
                        f"[{', '.join(names)}, ...] on every leaf")


def _round(alg, loss_fn, has_aux, mesh, worker_loop):
    """`round_fn(state, batch) -> (state, metrics)`; `worker_loop` may be `"auto"`."""
    if mesh is None and worker_loop != "map":
        # One device, no bitwise promise to keep: the round without `shard_map`
        # (its message gather is a collective even on one device).
        platform = jax.devices()[0].platform

        def body(shared, worker_states, batch):
            loop = _resolve(alg, loss_fn, has_aux, worker_loop, shared, worker_states, batch,
                            platform, alg.num_workers)
            return rounds.round_body(alg, loss_fn, has_aux, shared, worker_states, batch, 0,
                                     loop)
    else:
        # With "map", one device runs the same program as a mesh: a one-device
        # mesh (docs/design.md, "Workers and devices": a plain jit let XLA fuse
        # differently, changing last bits).
        mesh = parallel.make_mesh(1) if mesh is None else mesh
        platform = mesh.devices.flat[0].platform
        block = alg.num_workers // parallel.check_mesh(mesh, alg.num_workers)

        def body(shared, worker_states, batch):
            loop = _resolve(alg, loss_fn, has_aux, worker_loop, shared, worker_states, batch,
                            platform, block)
            return parallel.sharded_round(alg, loss_fn, has_aux, mesh, loop)(
                shared, worker_states, batch)

    def round_fn(state, batch):
        check_state(alg, state)
        check_batch(alg, batch)
        shared, worker_states, metrics = body(state.shared, state.workers, batch)
        new_state = state.replace(shared=shared, workers=worker_states)
        checks_lib.assert_state_stable(state, new_state)
        return new_state, metrics

    return round_fn


def _resolve(alg, loss_fn, has_aux, worker_loop, shared, worker_states, batch, platform, block):
    """The worker loop for blocks of `block` workers (`workers.resolve`), from shapes only."""
    if worker_loop != "auto":
        return worker_loop
    convolutional = loss_convolves(alg, loss_fn, has_aux, shared, worker_states, batch)
    return workers.resolve("auto", convolutional=convolutional, block=block, platform=platform)


@functools.lru_cache(maxsize=64)
def _plan(alg, loss_fn, has_aux, loop, worker_loop, mesh, state_signature, batch_signature):
    """`choose_loops` for a configuration, from shapes only, remembered (one trace each)."""
    state, batch = _abstract(state_signature), _abstract(batch_signature)
    block = alg.num_workers if mesh is None else alg.num_workers // mesh.shape[
        base.WORKER_AXIS]
    platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
    convolutional = worker_loop == "auto" and loss_convolves(alg, loss_fn, has_aux, state.shared,
                                                             state.workers, batch)
    return choose_loops(loop, worker_loop, mesh=mesh, platform=platform,
                        convolutional=convolutional, block=block)


def loss_convolves(alg, loss_fn, has_aux, shared, worker_states, batch) -> bool:
    """Whether `loss_fn`'s value and gradient at worker 0's view, on its share of the
    round's `batch` `[P, ...]`, convolve (`workers.is_convolutional`).

    From shapes only (the state's halves and `batch` may be abstract);
    remembered per loss and shapes.
    """
    worker, one_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                     (worker_states, batch))
    view = jax.eval_shape(alg.view, jnp.int32(0), worker, shared)
    return _convolutional(loss_fn, has_aux, view, one_batch)


def round_batch(alg, state, batches=None, batch_fn=None):
    """The shapes of one round's batch `[P, ...]`: `batches[0]`'s, or what `batch_fn`
    returns at the round of `state` (traced once per function and key, remembered)."""
    if batches is not None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), batches)
    return _batch_shapes(batch_fn, alg, _signature(state.shared))


def _abstract(signature):
    treedef, leaves = signature
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, x.dtype) if hasattr(x, "dtype") else
                          (jnp.shape(x), jnp.result_type(x)) for x in leaves)


@functools.lru_cache(maxsize=64)
def _batch_shapes(batch_fn, alg, shared_signature):
    """The shapes `batch_fn` returns for a round, remembered per function (one trace)."""
    return jax.eval_shape(lambda shared: sample_batch(batch_fn, alg, shared),
                          _abstract(shared_signature))


def _convolutional(loss_fn, has_aux, view, batch) -> bool:
    """`workers.is_convolutional`, remembered per loss and argument shapes (one trace each)."""
    return _convolutional_cached(loss_fn, has_aux, _signature(view), _signature(batch))


@functools.lru_cache(maxsize=64)
def _convolutional_cached(loss_fn, has_aux, view_signature, batch_signature) -> bool:
    return workers.is_convolutional(loss_fn, has_aux, _abstract(view_signature),
                                    _abstract(batch_signature))


def make_step(
    alg: base.Algorithm,
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
    algorithm's plus `loss`, the mean over workers of the training loss at
    their views (and, with `has_aux=True` and a mapping as aux, `aux/<name>`
    means).

    Args:
      alg: the algorithm.
      loss_fn: `(params, batch) -> scalar`, or `(scalar, aux)` with `has_aux`.
      has_aux: whether `loss_fn` returns `(loss, aux)`.
      checks: static; when True every round asserts that every deterministic
        bound holds (docs/theory.md section 2, with its rounding allowance) and
        that the state and metrics are finite, raising
        `ej.checks.InvariantError` naming the round, the quantity and its
        value. Called from Python the step raises it directly; inside the
        user's own `jit` it is raised from a host callback, which JAX wraps
        in its own runtime error (`ej.run(..., checks=True)` raises it
        unwrapped).
      mesh: None (one device) or a `jax.sharding.Mesh` with a `"workers"` axis
        whose size divides `P`: each device then runs `local` for its block of
        workers under `jax.shard_map` and every device runs the same `combine`
        on the gathered messages. With `worker_loop="map"` the result is
        bitwise the same either way.
      worker_loop: how each device evaluates its block of workers
        (`ej.workers`): `"auto"` (the default), `"map"`, `"unroll"`, `"vmap"`.

    Returns:
      `step(state, batch) -> (state, metrics)`.
    """
    _check_flags(has_aux=has_aux, checks=checks)
    validation.check_choice("worker_loop", worker_loop, workers.WORKER_LOOPS)
    if mesh is not None:
        parallel.check_mesh(mesh, alg.num_workers)
    round_fn = _round(alg, loss_fn, has_aux, mesh, worker_loop)
    if not checks:
        return round_fn

    def step(state, batch):
        new_state, metrics = round_fn(state, batch)
        values = checks_lib.evaluate(alg, state, new_state, metrics)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values)):
            jax.debug.callback(checks_lib.raise_failures, values)
        else:
            checks_lib.raise_failures(values)
        return new_state, metrics

    return step


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            validation.fail(name, value, "a bool")


def choose_loops(loop: str, worker_loop: str, *, mesh, platform: str, convolutional: bool,
                 block: int) -> tuple[str, str]:
    """`run`'s rule: the loop over rounds and the worker loop `"auto"` stand for.

    The worker loop as in `ej.workers`. The loop over rounds: the Python loop
    over one compiled round when the workers' gradients are unrolled or mapped
    (XLA:CPU loses its fast convolution inside any loop body), or on a mesh;
    jitted chunks of rounds otherwise.
    """
    worker_loop = workers.resolve(worker_loop, convolutional=convolutional, block=block,
                                  platform=platform)
    if loop == "auto":
        unrolled = worker_loop in ("map", "unroll", "groups")
        loop = "python" if mesh is not None or unrolled else "chunks"
    return loop, worker_loop


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


def sample_batch(batch_fn, alg, shared):
    """`batch_fn(round, worker_keys)`, the keys derived with tag `TAG_DATA` from each
    worker's gradient count (the round, but for `ej.clock_async_sgd`)."""
    return batch_fn(shared.round, base.gradient_keys(alg, shared, base.TAG_DATA))


@functools.lru_cache(maxsize=64)
def _sampler(batch_fn, alg):
    """`batch_fn` as a program of its own, for the Python loop: the round then
    reads its batch as an input with the default layout (a batch produced inside
    the round's program may be laid out differently for different meshes,
    changing the order of the loss's reductions)."""
    return jax.jit(functools.partial(sample_batch, batch_fn, alg))


@functools.lru_cache(maxsize=64)
def _program(alg, loss_fn, has_aux, checks, mesh, worker_loop, loop, batch_fn, length,
             transformed):
    """The compiled program of one `run` configuration (the library's one cache).

    `"python"`: one round, `(state, batch) -> (state, metrics, values)` (the
    batch sampled by `_sampler` when `batch_fn` is given).
    `"chunks"`: `(state, batches, n) -> ...` for `length` rounds of which the
    first `n` run, every round the same compiled loop body, so a run split into
    calls of any lengths is bitwise the same; metrics come back as `[length]`
    arrays whose first `n` entries are the rounds'. Called directly, the rounds
    run in a `lax.while_loop` of `n` iterations. Under a transformation
    (`transformed`: reverse mode needs a transposable loop, and a `while_loop`
    with a dynamic trip count has none) they run in a fixed-length `lax.scan`
    whose iterations `i >= n` a `lax.cond` skips (the state passes through
    unchanged); the skipped iterations read valid inputs (padded with copies of
    the last round), so where the `cond` becomes a `select` (under `vmap`) they
    compute finite values and contribute zero, not NaN, to a gradient. (The
    `cond` in every iteration costs time, so the direct call does without it:
    benchmarks/README.md.) `"scan"`: `length` rounds in one `lax.scan`.
    `values` are the checks' arrays (empty without `checks`). Programs called
    directly donate the state (`run` passes only buffers it made); under a
    transformation nothing is donated.
    """
    round_fn = _round(alg, loss_fn, has_aux, mesh, worker_loop)
    donate_argnums = () if transformed else (0,)

    def one(state, batch):
        new_state, metrics = round_fn(state, batch)
        values = checks_lib.evaluate(alg, state, new_state, metrics) if checks else {}
        return new_state, (metrics, values)

    def sampled(state, batch):
        if batch is None:  # `batch_fn` given and the batch not sampled ahead.
            batch = sample_batch(batch_fn, alg, state.shared)
        return one(state, batch)

    def sample_ahead(state, batches):
        """With `batch_fn`, a chunk's batches sampled in a loop of their own before its
        rounds (faster than sampling inside the rounds' loop body, and with no need
        for a vmap rule: a host-side loader works); not for `ej.clock_async_sgd`,
        whose keys follow the state's gradient counts (each of its rounds samples
        its own), nor for `"scan"`, whose memory would grow with `R`."""
        if batch_fn is None or alg.info.gradient_count is not None:
            return batches
        rounds = state.shared.round + jnp.arange(length, dtype=state.shared.round.dtype)
        return jax.lax.map(
            lambda r: sample_batch(batch_fn, alg, state.shared._replace(round=r)), rounds)

    if loop == "python":
        def python(state, batch):
            state, (metrics, values) = one(state, batch)
            return state, metrics, values

        return jax.jit(python, donate_argnums=donate_argnums)
    if loop == "scan":
        def scan(state, batches):
            state, (metrics, values) = jax.lax.scan(sampled, state, batches, length=length)
            return state, metrics, values

        return jax.jit(scan, donate_argnums=donate_argnums)

    def chunk(state, batches, n):
        batches = sample_ahead(state, batches)
        # The round is traced once; its jaxpr serves every iteration.
        first = jax.tree.map(lambda x: x[0], batches)
        closed, shapes = jax.make_jaxpr(sampled, return_shape=True)(state, first)
        run_round = jax_core.jaxpr_as_fun(closed)

        def real(state, batch):
            return jax.tree.unflatten(jax.tree.structure(shapes),
                                      run_round(*jax.tree.leaves((state, batch))))

        if not transformed:
            def step(carry):
                i, state, outputs = carry
                batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False),
                                     batches)
                state, out = real(state, batch)
                outputs = jax.tree.map(lambda b, o: jax.lax.dynamic_update_index_in_dim(
                    b, o, i, 0), outputs, out)
                return i + 1, state, outputs

            outputs = jax.tree.map(lambda s: jnp.zeros((length,) + s.shape, s.dtype), shapes[1])
            _, state, (metrics, values) = jax.lax.while_loop(
                lambda carry: carry[0] < n, step, (jnp.int32(0), state, outputs))
            return state, metrics, values

        def skip(state, batch):
            del batch
            return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])

        def body(state, xs):
            i, batch = xs
            return jax.lax.cond(i < n, real, skip, state, batch)

        steps = jnp.arange(length, dtype=jnp.int32)
        state, (metrics, values) = jax.lax.scan(body, state, (steps, batches), length=length)
        return state, metrics, values

    return jax.jit(chunk, donate_argnums=donate_argnums)


def _pad(batches, start: int, n: int, length: int):
    """Rounds `[start, start + n)` of `batches`, padded to `length` with copies of the last."""

    def one(x):
        part = jnp.asarray(x[start:start + n])
        if n == length:
            return part
        return jnp.concatenate([part, jnp.repeat(part[-1:], length - n, axis=0)])

    return None if batches is None else jax.tree.map(one, batches)


def run(
    alg: base.Algorithm,
    loss_fn: Callable,
    state: base.State,
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
    (`ej.clock_async_sgd` keys each worker's batch by its own gradient count
    instead of the round, `derive_key(base, TAG_DATA, count_p, p)`, and takes
    `batch_fn` only: its workers' batches do not follow the rounds.)

    `loop` is one of `LOOPS`:

    - `"python"`: a Python loop over one compiled round;
    - `"chunks"`: a Python loop over one compiled program of `chunk` rounds (a
      `lax.while_loop` whose trip count is an argument, or under a
      transformation a fixed-length `lax.scan` whose tail a `lax.cond` skips:
      the last, shorter chunk reuses the program, and a run split into calls
      of any lengths is bitwise the same);
    - `"scan"`: the whole run as one `lax.scan` (compiled per `rounds`);
    - `"auto"` (the default): `choose_loops`'s rule: the Python loop when the
      workers' gradients are unrolled or mapped (a convolutional loss on the
      CPU, or `worker_loop` `"map"` or `"unroll"`) or `mesh` is given, else
      chunks.

    Every loop compiles its program once per configuration and caches it
    across calls. The loops agree to rounding, not bitwise. With `mesh` (a
    `jax.sharding.Mesh` with a `"workers"` axis) the workers are split across
    its devices (`ej.parallel`); `worker_loop` is `make_step`'s (with `"map"`
    and the Python loop the result is bitwise the same on one device and on
    any mesh).

    Differentiation: every loop is reverse-mode differentiable, so `jax.grad`
    of a function of the final state (or the metrics) with respect to a
    hyperparameter the algorithm closes over, the initial parameters or the
    batches flows through `run`; build the algorithm inside the
    differentiated function. Reverse mode keeps what the backward pass needs
    of every round (`O(R)` states: e.g. every round's residuals and ring
    buffer), so memory grows with `R`; for long runs use
    `ej.analysis.hypergradient`, which keeps `O(sqrt(R))` states (two-level
    checkpointing), or forward mode (`jax.jvp`). Under a transformation
    nothing is donated; otherwise the compiled programs donate only buffers
    `run` itself made.

    With `checks=True` the invariants of `make_step(checks=True)` are asserted
    after each program call and a failure raises `ej.checks.InvariantError`
    naming the first failing round.

    Returns:
      `(state, metrics)` with every metric stacked to shape `[R]`.
    """
    _check_flags(has_aux=has_aux, checks=checks)
    check_state(alg, state)
    if (batches is None) == (batch_fn is None):
        validation.fail("batches", validation.Text("both or neither of batches and batch_fn"),
                        "exactly one of them")
    if batches is not None and alg.info.gradient_count is not None:
        validation.fail("batches", validation.Text("stacked batches"),
                        f"batch_fn= for {alg.info.name}: each worker's batch is keyed by its "
                        "own gradient count, not by the round")
    if batches is not None:
        leading = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches)}
        available = next(iter(leading)) if len(leading) == 1 else None
        check_batch(alg, batches, "batches", leading=(available,) if available else ("R",))
        rounds = available if rounds is None else rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or not (
                0 <= rounds <= available):
            validation.fail("rounds", rounds, f"an integer in [0, {available}]")
        first_batch = round_batch(alg, state, batches=batches)
    else:
        if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 0:
            validation.fail("rounds", rounds, "an integer >= 0 with batch_fn")
        first_batch = round_batch(alg, state, batch_fn=batch_fn)
        check_batch(alg, first_batch, "batch_fn")
    rounds = int(rounds)
    validation.check_choice("loop", loop, LOOPS)
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        validation.fail("chunk", chunk, "an integer >= 1")
    validation.check_choice("worker_loop", worker_loop, workers.WORKER_LOOPS)
    if mesh is not None:
        parallel.check_mesh(mesh, alg.num_workers)
    _check_trace_rounds(alg, state, rounds)
    transformed = _under_transformation()
    # Place the state as the round returns it (so the second round does not
    # recompile for a new input sharding), then copy it, so the compiled round
    # donates only buffers `run` made, never the caller's.
    state = _fresh(parallel.shard_state(state, parallel.make_mesh(1) if mesh is None else mesh))
    if rounds == 0:
        return state, {}
    loop, worker_loop = _plan(alg, loss_fn, has_aux, loop, worker_loop, mesh,
                              _signature(state), _signature(first_batch))
    length = {"python": 1, "chunks": int(chunk), "scan": rounds}[loop]
    program = _program(alg, loss_fn, has_aux, checks, mesh, worker_loop, loop, batch_fn,
                       length, transformed)
    serialize = mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
    history = []
    for start in range(0, rounds, length):
        n = min(length, rounds - start)
        if loop == "python":
            if batches is None:
                batch = _sampler(batch_fn, alg)(state.shared)
            else:
                batch = jax.tree.map(lambda x, r=start: x[r], batches)
            state, metrics, values = program(state, batch)
        elif loop == "scan":
            state, metrics, values = program(state, _pad(batches, 0, rounds, rounds))
        else:
            state, metrics, values = program(state, _pad(batches, start, n, length),
                                             np.int32(n))
        if checks:  # On the host, the chunk's padding rounds left out.
            checks_lib.raise_failures({k: np.asarray(v)[:n] if loop == "chunks" else v
                                       for k, v in values.items()})
        if serialize:
            # XLA:CPU runs the devices' collectives on a shared thread pool; with
            # the next round dispatched while this one (or any other program on
            # the devices) still runs, the rounds were seen to deadlock on a
            # loaded machine. Nothing else is dispatched between rounds.
            jax.block_until_ready(state)
        history.append(metrics)
    if loop == "python":
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    return state, jax.tree.map(lambda *xs: jnp.concatenate(xs)[:rounds], *history)


@jax.jit
def _fresh(tree):
    """`tree` in new buffers, one program for every leaf (a program returns none of the
    buffers it was passed; `jnp.copy` per leaf costs a dispatch each)."""
    return tree


def _check_trace_rounds(alg: base.Algorithm, state: base.State, rounds: int) -> None:
    if alg.info.max_rounds is not None:
        start = base.current_round(state)
        if start + rounds > alg.info.max_rounds:
            validation.fail(
                "rounds", validation.Text(f"{rounds} rounds from round {start}"),
                f"at most {alg.info.max_rounds - start}: the schedule (a recorded delay "
                f"trace, or the system model's) covers {alg.info.max_rounds} rounds")
