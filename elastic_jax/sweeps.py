"""Grids of runs: float hyperparameters x seeds, as one batched program or one run at a time.

A sweep runs the same number of rounds for every configuration of a grid of
float hyperparameters (the keyword arguments of `make_algorithm`: the learning
rate, `beta`, `staleness`, a clipping norm, a schedule's parameters, ...) and
every seed. The algorithm of each configuration is `make_algorithm(**point)`,
and every factory accepts traced values
(docs/design.md, "The one abstraction"), so the whole grid can run as one
`vmap`ped program in which each configuration and seed is one row of a batch;
or one `ej.run` after another.
Which is faster depends on the backend and the model (`choose_execution`); the
two agree to rounding, and the sequential sweep is bitwise the runs made one
by one with `ej.run`.

Integer arguments (`num_workers`, `max_delay`, Top-k's `k`, periods) set
shapes and loops: they are not hyperparameters of a sweep (run one sweep per
value). Nor, batched, is a value that changes what the state holds:
`ej.sgd(momentum=0)` keeps no state and any other momentum its trace, so a
grid over the momentum that includes 0 runs with `execution="sequential"` (or
as two sweeps); a grid of non-zero momenta runs batched.

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, drivers, validation
from elastic_jax import checks as checks_lib

EXECUTIONS = ("auto", "batched", "sequential")


def choose_execution(execution: str, *, platform: str, convolutional: bool) -> str:
    """The execution `"auto"` stands for: the rule, measured per backend and model.

    `"sequential"` for a convolutional loss on the CPU (XLA:CPU lowers a
    convolution to its fast library call only without a batch of weights, and
    a batch of configurations and seeds is one: the launcher's vmapped CNN seeds
    took 30.1 ms per seed and round against 20.7 one after another), else
    `"batched"` (`benchmarks/sweep.py` measures both). Any other value is
    returned as it is.
    """
    if execution != "auto":
        return execution
    return "sequential" if platform == "cpu" and convolutional else "batched"


class Sweep(NamedTuple):
    """What `sweep` returns: the grid, each configuration's final states and the metrics.

    Attributes:
      hparams: the grid's axes, `{name: values}`, in the order given.
      seeds: the seeds.
      points: every configuration, `{name: value}`, in grid order (the last
        axis varies fastest).
      states: each point's final states, stacked over seeds (leading axis
        `S`), with the point's algorithm `make_algorithm(**point)`.
      metrics: every metric, shaped `grid shape + (S, R)`.
      execution: `"batched"` or `"sequential"`: how the rounds ran.
    """

    hparams: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    points: tuple[dict[str, float], ...]
    states: tuple[base.State, ...]
    metrics: dict[str, jax.Array]
    execution: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's shape: one axis per hyperparameter."""
        return tuple(len(values) for values in self.hparams.values())

    def report(self, name: str = "loss") -> str:
        """A Markdown table: one row per point, `name` at the last round, mean ± std over seeds."""
        if name not in self.metrics:
            validation.fail("name", name, "one of " + ", ".join(map(repr, sorted(self.metrics))))
        final = np.asarray(self.metrics[name])[..., -1].reshape(len(self.points), -1)
        lines = ["| " + " | ".join([*self.hparams, f"{name} (mean ± std over "
                                    f"{len(self.seeds)} seeds)"]) + " |",
                 "|" + "---|" * (len(self.hparams) + 1)]
        for point, values in zip(self.points, final, strict=True):
            cells = [f"{v:g}" for v in point.values()]
            lines.append("| " + " | ".join([*cells, f"{values.mean():.6g} ± "
                                            f"{values.std():.2g}"]) + " |")
        return "\n".join(lines)


def seed_keys(seed: int):
    """`(params key, algorithm key)` of a seed: `fold_in(key(seed), 0)`, `fold_in(key(seed), 1)`."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def _check_grid(hparams) -> dict[str, tuple[float, ...]]:
    if not isinstance(hparams, Mapping):
        validation.fail("hparams", hparams, "a dict {name: sequence of floats}")
    grid = {}
    for name, values in hparams.items():
        if not isinstance(name, str) or not name.isidentifier():
            validation.fail("hparams", validation.Text(f"a key {name!r}"),
                            "keyword argument names of make_algorithm")
        if isinstance(values, str | Mapping) or np.ndim(values) != 1 or len(values) == 0:
            validation.fail(f"hparams[{name!r}]", values, "a non-empty sequence of floats")
        for value in values:
            validation.check_real(f"hparams[{name!r}]", value)
        grid[name] = tuple(float(validation.concrete_number(v)) for v in values)
    return grid


def _check_seeds(seeds) -> tuple[int, ...]:
    if isinstance(seeds, str | Mapping) or np.ndim(seeds) != 1 or len(seeds) == 0:
        validation.fail("seeds", seeds, "a non-empty sequence of integers")
    return tuple(validation.check_int("seeds", s, lo=0, hi=2**32 - 1) for s in seeds)


@functools.lru_cache(maxsize=256)
def _algorithm(make_algorithm, point: tuple[tuple[str, float], ...]) -> base.Algorithm:
    """`make_algorithm(**point)`, built once per configuration: `ej.run`'s programs are
    cached per algorithm, so a sweep continued in later calls compiles nothing new."""
    alg = make_algorithm(**dict(point))
    if not isinstance(alg, base.Algorithm):
        validation.fail("make_algorithm", make_algorithm, "a callable returning an ej.Algorithm")
    return alg


def _describe(point: Mapping[str, float], seed: int) -> str:
    return ", ".join([f"{name}={value:g}" for name, value in point.items()] + [f"seed {seed}"])


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.lru_cache(maxsize=32)
def _batched(make_algorithm, loss_fn, has_aux, checks, worker_loop, batch_fn, rounds):
    """The jitted `(hp [N], shared [N, ...], workers [N, ...], batches) -> ...` of a grid.

    Each of the `N` rows rebuilds its algorithm from its traced hyperparameters
    and runs `rounds` rounds of `ej.make_step` in one `lax.scan` (the batch
    sampled in the loop body with `batch_fn`, else `batches [R, P, ...]`,
    shared by every row). Returns the rows' final `shared` and `workers`, their
    metrics `[N, R]` and the checks' values (empty without `checks`).
    """

    def one(hp, shared, worker_states, batches):
        alg = make_algorithm(**hp)
        step = drivers.make_step(alg, loss_fn, has_aux=has_aux, worker_loop=worker_loop)

        def body(state, batch):
            if batch_fn is not None:
                batch = drivers.sample_batch(batch_fn, alg, state.shared)
            new_state, metrics = step(state, batch)
            values = checks_lib.evaluate(alg, state, new_state, metrics) if checks else {}
            return new_state, (metrics, values)

        state = base.State(shared, worker_states, alg)
        state, (metrics, values) = jax.lax.scan(body, state, batches, length=rounds)
        return state.shared, state.workers, metrics, values

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))


def sweep(
    make_algorithm: Callable[..., base.Algorithm],
    loss_fn: Callable,
    params,
    hparams: Mapping[str, Sequence[float]],
    *,
    seeds: Sequence[int] = (0,),
    batches=None,
    batch_fn: Callable | None = None,
    rounds: int | None = None,
    has_aux: bool = False,
    checks: bool = False,
    execution: str = "auto",
    loop: str = "auto",
    worker_loop: str = "auto",
) -> Sweep:
    """Runs `rounds` rounds of every configuration of a grid of hyperparameters, for every seed.

    For every point `h` of the grid `hparams[a_1] x hparams[a_2] x ...` and
    every seed `s`, with `alg_h = make_algorithm(**h)`,

        state_0 = alg_h.init(params_s, k_s),   state_{r+1} = round of alg_h (state_r, batch_r)

    as `ej.run` runs it (`init` jitted, as the launcher's), where
    `(params key, k_s) = seed_keys(s) = (fold_in(key(s), 0), fold_in(key(s), 1))`
    and `params_s` is `params` itself, or `params(params key)` when `params` is
    a callable. The batches
    are `batches [R, P, ...]` (the same for every point and seed) or
    `batch_fn(round, worker_keys)`, whose keys derive from `k_s` (docs/design.md,
    "Randomness"), as in `ej.run`.

    Execution (`choose_execution`): `"batched"` runs the grid as one program,
    each configuration and seed one row of a `vmap` over a `lax.scan` of the
    rounds (compiled once per `make_algorithm`, loss, `rounds` and grid size);
    `"sequential"` calls `ej.run(alg_h, loss_fn, state, ...)` for each point
    and seed, bitwise the runs made one by one; `"auto"`: sequential for a
    convolutional loss on the CPU, else batched. The two agree to rounding.

    Args:
      make_algorithm: `(**point) -> ej.Algorithm`, hashable (a function). It
        is called with each point's concrete values (so a bad value fails as
        the factory's one-line error before anything compiles), and, batched,
        with traced ones: the factory must accept traced values for these
        arguments (every library factory does for its float arguments).
      loss_fn: `(params, batch) -> scalar`, or `(scalar, aux)` with `has_aux`.
      params: the initial parameters (a pytree), a callable `key -> params`
        evaluated per seed, or a `Sweep` over the same grid and seeds, whose
        final states the rounds continue from.
      hparams: `{name: non-empty sequence of floats}`, the keyword arguments
        of `make_algorithm`; `{}` runs the seeds of `make_algorithm()`.
      seeds: non-empty sequence of integers in [0, 2^32 - 1].
      batches: a pytree of arrays `[R, P, ...]`, or None with `batch_fn`.
      batch_fn: a jittable `(round, worker_keys) -> batch [P, ...]`, with `rounds`.
      rounds: the number of rounds (default: all of `batches`).
      has_aux: whether `loss_fn` returns `(loss, aux)`.
      checks: assert every round's invariants (`ej.run(checks=True)`); a
        failure raises `ej.checks.InvariantError` naming the point, the seed
        and the round.
      execution: one of `EXECUTIONS`.
      loop: `ej.run`'s loop over rounds, sequential only (batched: one scan).
      worker_loop: `ej.make_step`'s worker loop.

    Returns:
      A `Sweep`: the grid, each point's final states (stacked over seeds)
      and every metric shaped `grid shape + (len(seeds), R)`.

    Raises:
      ValueError: `<argument>: got ...; expected ...` for a bad argument (or
        the factory's own line for a bad hyperparameter value), before
        anything compiles.

    Example:
      >>> def make(learning_rate, beta):
      ...     return ej.async_sgd(learning_rate, 8, 8, compressor=ej.top_k(fraction=0.01),
      ...                         error_feedback=beta)
      >>> result = ej.sweep(make, loss_fn, params, {"learning_rate": [0.02, 0.05, 0.1],
      ...                   "beta": [0.0, 1.0]}, seeds=[0, 1, 2], batch_fn=batch_fn,
      ...                   rounds=200)
      >>> result.metrics["loss"].shape  # (3, 2, 3, 200)
      >>> print(result.report("loss"))
    """
    if not callable(make_algorithm):
        validation.fail("make_algorithm", make_algorithm, "a callable (**hparams) -> Algorithm")
    if not callable(loss_fn):
        validation.fail("loss_fn", loss_fn, "a callable (params, batch) -> scalar")
    for name, flag in (("has_aux", has_aux), ("checks", checks)):
        if not isinstance(flag, bool):
            validation.fail(name, flag, "a bool")
    validation.check_choice("execution", execution, EXECUTIONS)
    grid, seeds = _check_grid(hparams), _check_seeds(seeds)
    names = tuple(grid)
    points = tuple(dict(zip(names, values, strict=True))
                   for values in itertools.product(*grid.values()))
    try:
        algs = [_algorithm(make_algorithm, tuple(point.items())) for point in points]
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        validation.fail("make_algorithm", make_algorithm, "a hashable callable (a function)")
    initial = _initial(params, grid, seeds)
    abstract = _abstract_states(params, initial, algs, seeds)
    alg, first = algs[0], abstract[0]
    if (batches is None) == (batch_fn is None):
        validation.fail("batches", validation.Text("both or neither of batches and batch_fn"),
                        "exactly one of them")
    if batches is not None:
        available = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches)}
        available = next(iter(available)) if len(available) == 1 else None
        drivers.check_batch(alg, batches, "batches", leading=(available or "R",))
        rounds = available if rounds is None else rounds
        top = available
    else:
        top = None
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1 or (
            top is not None and rounds > top):
        validation.fail("rounds", rounds, f"an integer in [1, {top}]" if top is not None
                        else "an integer >= 1 with batch_fn")
    rounds = int(rounds)
    batch = drivers.round_batch(alg, first, batches=batches, batch_fn=batch_fn)
    if batch_fn is not None:
        drivers.check_batch(alg, batch, "batch_fn")
    platform = jax.devices()[0].platform
    execution = choose_execution(
        execution, platform=platform,
        convolutional=drivers.loss_convolves(alg, loss_fn, has_aux, first.shared,
                                             first.workers, batch))
    if execution == "batched":
        _check_same_structure(abstract)
        states, metrics = _run_batched(make_algorithm, loss_fn, has_aux, checks, worker_loop,
                                       batches, batch_fn, rounds, params, initial, algs, points,
                                       seeds)
    else:
        states, metrics = _run_sequential(algs, loss_fn, has_aux, checks, loop, worker_loop,
                                          batches, batch_fn, rounds, params, initial, points,
                                          seeds)
    shape = tuple(len(v) for v in grid.values()) + (len(seeds), rounds)
    metrics = {k: jnp.reshape(v, shape) for k, v in metrics.items()}
    return Sweep(grid, seeds, points, states, metrics, execution)


def _initial(params, grid, seeds):
    """Each seed's initial parameters, or None to continue from a `Sweep`."""
    if isinstance(params, Sweep):
        if params.hparams != grid or params.seeds != seeds:
            validation.fail("params", validation.Text("a Sweep over another grid or seeds"),
                            "a Sweep over the same hparams and seeds, to continue from")
        return None
    initial = [params(seed_keys(seed)[0]) if callable(params) else params for seed in seeds]
    leaves = jax.tree.leaves(initial[0])
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        validation.fail("params", validation.Text("a pytree with non-float or no leaves"),
                        "a pytree of float arrays, a callable key -> params, or a Sweep")
    return initial


def _abstract_states(params, initial, algs, seeds):
    """Each point's state for one seed, as shapes (nothing runs)."""
    if initial is None:
        return [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
                for state in params.states]
    return [jax.eval_shape(alg.init, initial[0], seed_keys(seeds[0])[1]) for alg in algs]


@functools.lru_cache(maxsize=256)
def _init(alg: base.Algorithm):
    """`alg.init`, jitted (one compilation per algorithm, as the launcher's)."""
    return jax.jit(alg.init)


@functools.lru_cache(maxsize=32)
def _batched_init(make_algorithm):
    """`(hp [N], params [N, ...], keys [N]) -> (shared, workers) [N, ...]`, jitted."""

    def one(hp, params, key):
        state = make_algorithm(**hp).init(params, key)
        return state.shared, state.workers

    return jax.jit(jax.vmap(one))


def _check_same_structure(abstract) -> None:
    def signature(state):
        leaves, treedef = jax.tree.flatten((state.shared, state.workers))
        return treedef, [(x.shape, x.dtype) for x in leaves]

    first = signature(abstract[0])
    if any(signature(state) != first for state in abstract):
        validation.fail("hparams", validation.Text("points whose states differ in structure or "
                                                   "shapes"),
                        "float hyperparameters that change no shape (one sweep per shape), "
                        "or execution='sequential'")


def _run_sequential(algs, loss_fn, has_aux, checks, loop, worker_loop, batches, batch_fn,
                    rounds, previous, initial, points, seeds):
    """`ej.run` for each point and seed: `(states per point [S, ...], metrics [N, R])`."""
    states, metrics = [], []
    for i, (alg, point) in enumerate(zip(algs, points, strict=True)):
        finals = []
        for j, seed in enumerate(seeds):
            if initial is None:
                state = jax.tree.map(lambda x, j=j: x[j], previous.states[i]).replace(
                    algorithm=alg)
            else:
                state = _init(alg)(initial[j], seed_keys(seed)[1])
            try:
                state, m = drivers.run(alg, loss_fn, state, batches, batch_fn=batch_fn,
                                       rounds=rounds, has_aux=has_aux, checks=checks,
                                       loop=loop, worker_loop=worker_loop)
            except checks_lib.InvariantError as e:
                raise checks_lib.InvariantError(f"{_describe(point, seed)}: {e}") from None
            finals.append(state)
            metrics.append(m)
        states.append(_stack(finals))
    if any(set(m) != set(metrics[0]) for m in metrics):
        validation.fail("make_algorithm", validation.Text("points reporting different metrics"),
                        "algorithms reporting the same metrics at every point")
    return tuple(states), _stack(metrics)


def _run_batched(make_algorithm, loss_fn, has_aux, checks, worker_loop, batches, batch_fn,
                 rounds, previous, initial, algs, points, seeds):
    """The grid as one program: `(states per point [S, ...], metrics [N, R])`."""
    dtype = jnp.result_type(float)
    hp = {name: jnp.asarray([point[name] for point in points for _ in seeds], dtype)
          for name in points[0]}
    if initial is None:
        shared, worker_states = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[
            (state.shared, state.workers) for state in previous.states])
    else:
        keys = jnp.stack([seed_keys(seed)[1] for seed in seeds] * len(points))
        shared, worker_states = _batched_init(make_algorithm)(
            hp, _stack(initial * len(points)), keys)
    if batches is not None:
        batches = jax.tree.map(lambda x: jnp.asarray(x)[:rounds], batches)
    program = _batched(make_algorithm, loss_fn, has_aux, checks, worker_loop, batch_fn, rounds)
    shared, worker_states, metrics, values = program(hp, shared, worker_states, batches)
    if checks:
        values = jax.tree.map(np.asarray, values)
        for n, (point, seed) in enumerate(itertools.product(points, seeds)):
            try:
                checks_lib.raise_failures({k: v[n] for k, v in values.items()})
            except checks_lib.InvariantError as e:
                raise checks_lib.InvariantError(f"{_describe(point, seed)}: {e}") from None
    by_point = jax.tree.map(lambda x: jnp.reshape(x, (len(points), len(seeds)) + x.shape[1:]),
                            (shared, worker_states))
    states = tuple(base.State(jax.tree.map(lambda x, i=i: x[i], by_point[0]),
                              jax.tree.map(lambda x, i=i: x[i], by_point[1]), alg)
                   for i, alg in enumerate(algs))
    return states, metrics
