"""What a run trains: the data on the device, the model, the initial state, the round.

`load_problem` turns the flags into a `Problem` (a loss, an on-device batch
sampler over the workers' shards, a parameter initialiser and an evaluator),
`make_init` builds the initial state (stacked over seeds), and `make_round` the
jittable round, which samples each worker's batch inside the compiled program
with the keys `ej.run(..., batch_fn=...)` uses. `session` caches all three per
trajectory-relevant config, so a process compiles each configuration once.
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import safety
from experiments.config import Config, UsageError

# The purpose tag of per-worker batch sampling: elastic_jax.base.TAG_DATA, which
# the public API does not export; `ej.run(batch_fn=...)` derives the same keys.
DATA_TAG = 3


class Problem(NamedTuple):
    """What the loop needs from the data and the model."""

    loss_fn: Callable  # (params, batch) -> loss, or (loss, aux) with has_aux
    has_aux: bool
    batch_fn: Callable  # (round, worker_keys [P]) -> batch [P, b, ...]
    init_params: Callable  # key -> params
    evaluate: Callable  # params -> {name: float}
    title: str


def _data_error(error: Exception) -> UsageError:
    if isinstance(error, data_lib.DataError):  # Its message starts with the path.
        return UsageError(" ".join(str(error).split()))
    return config_lib.from_library_error(error)


def load_problem(f: Mapping[str, Any]) -> Problem:
    """Loads the dataset, partitions it and builds the model; compiles nothing.

    Raises:
      UsageError: a missing or corrupt data file (the line starts with its path),
        or a partition the data cannot give (e.g. more workers than samples).
    """
    num_workers, seed = f["num_workers"], f["seed"]
    try:
        if f["dataset"] in config_lib.CONVEX_DATASETS:
            make = (data_lib.least_squares if f["dataset"] == "least_squares"
                    else data_lib.logistic_regression)
            problem = make(f["convex_samples"], f["convex_dim"], seed=seed)
            x, y = problem.a.astype(np.float32), problem.b.astype(np.float32)
            labels = (problem.b > 0).astype(np.int32)
        else:
            dataset = data_lib.load_dataset(f["dataset"], f["data_dir"] or None)
            x, y, labels = dataset.x_train, dataset.y_train, dataset.y_train
        shards = data_lib.partition(labels, num_workers, kind=f["partition"],
                                    alpha=f["dirichlet_alpha"], seed=seed)
        batch_fn = data_lib.make_batch_fn(x, y, *shards, batch_size=f["batch_size"])
    except ValueError as e:
        raise _data_error(e) from None
    title = f"{f['algorithm']} P={num_workers} on {f['dataset']}"

    if f["dataset"] in config_lib.CONVEX_DATASETS:
        dim, f_star = f["convex_dim"], problem.f_star
        full_loss = jax.jit(problem.full_loss)

        def evaluate_convex(params) -> dict[str, float]:
            value = float(full_loss(params))
            return {"full/loss": value, "full/suboptimality": value - f_star}

        def init_linear(key):
            del key  # The linear model starts at zero.
            return {"w": jnp.zeros((dim,), jnp.float32)}

        return Problem(problem.loss_fn, False, batch_fn, init_linear, evaluate_convex, title)

    module, init_params = _model(f["model"], dataset.num_classes,
                                 tuple(dataset.x_train.shape[1:]))

    def evaluate_images(params) -> dict[str, float]:
        loss, accuracy = models_lib.evaluate(module, params, dataset.x_test, dataset.y_test)
        return {"test/loss": loss, "test/accuracy": accuracy}

    return Problem(models_lib.classification_loss(module), True, batch_fn, init_params,
                   evaluate_images, f"{title}, {f['model']}")


def make_init(cfg: Config, problem: Problem) -> Callable[[], Any]:
    """`() -> state`: the initial state, stacked over seeds when `--num_seeds > 1`.

    Seed `s` initialises the model with `fold_in(key(s), 0)` and the algorithm with
    `fold_in(key(s), 1)`. The model initialiser is compiled once per model and
    process (`_model`); `alg.init` is jitted (one compilation, not one per operation).
    """
    alg, f = cfg.algorithm, cfg.flags
    seeds = range(f["seed"], f["seed"] + f["num_seeds"])
    alg_init = jax.jit(alg.init if len(seeds) == 1 else jax.vmap(alg.init))

    def init():
        bases = [jax.random.key(s) for s in seeds]
        params = [problem.init_params(jax.random.fold_in(b, 0)) for b in bases]
        keys = [jax.random.fold_in(b, 1) for b in bases]
        if len(seeds) == 1:
            return alg_init(params[0], keys[0])
        return alg_init(jax.tree.map(lambda *xs: jnp.stack(xs), *params), jnp.stack(keys))

    return init


@functools.lru_cache(maxsize=8)
def _model(name: str, num_classes: int, input_shape: tuple[int, ...]):
    """`models.make_model`, cached: one module and one compiled initialiser per process."""
    return models_lib.make_model(name, num_classes, input_shape)


def make_round(cfg: Config, problem: Problem, mesh=None, *,
               on_nonfinite: str | None = None) -> tuple[Callable, Callable]:
    """`(sample, step)`: a round is `step(state, sample(state))`.

    `sample(state)` draws every worker's batch on the device with the keys
    `ej.run(alg, loss_fn, state, batch_fn=...)` uses, as a program of its own (as
    `ej.run` does: the round then reads its batch as an input), and `step` is
    `ej.make_step`'s round, on `mesh` when given. Both are `vmap`ped over the
    leading seed axis when `--num_seeds > 1`.

    With `on_nonfinite` (`"stop"` or `"skip_round"`) the step is guarded
    (`safety.guard_step`): `step(state, batch, guard) -> (state, metrics, guard)`.
    """
    alg = cfg.algorithm
    step = ej.make_step(alg, problem.loss_fn, has_aux=problem.has_aux, mesh=mesh,
                       worker_loop=cfg.flags["worker_loop"])
    if on_nonfinite is not None:
        step = safety.guard_step(step, on_nonfinite)
    workers = jnp.arange(alg.num_workers)
    poison_round = safety.nonfinite_hook_round()

    def sample(state):
        shared = state.shared
        keys = jax.vmap(lambda p: ej.derive_key(shared.key, DATA_TAG, shared.round, p))(workers)
        batch = problem.batch_fn(shared.round, keys)
        if poison_round is not None:  # The test hook: round `poison_round` reads NaN data.
            batch = safety.poison(batch, shared.round, poison_round)
        return batch

    if cfg.flags["num_seeds"] > 1:
        return jax.vmap(sample), jax.vmap(step)
    return sample, step


def make_chunk(cfg: Config, problem: Problem, mesh=None, *, on_nonfinite: str) -> Callable:
    """`program(state, guard, n) -> (state, metrics, guard)`: `n` guarded rounds in one program.

    The rounds of `make_round` (batch sampled, then the guarded step) run in one
    `lax.while_loop` whose trip count `n` is an argument: every round is the same
    compiled loop body whatever its place in a chunk, so a run split at any
    round (a resume, a chunk cut short by a log or checkpoint round) is bitwise
    the uninterrupted run. Only the last round's metrics come back (the
    launcher logs only the rounds that end a chunk); with `n = 0` they are zeros.
    """
    sample, step = make_round(cfg, problem, mesh, on_nonfinite=on_nonfinite)

    def round_(state, guard):
        return step(state, sample(state), guard)

    def program(state, guard, n):
        _, metric_shapes, _ = jax.eval_shape(round_, state, guard)
        metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)

        def body(carry):
            i, state, _, guard = carry
            state, metrics, guard = round_(state, guard)
            return i + 1, state, metrics, guard

        _, state, metrics, guard = jax.lax.while_loop(
            lambda carry: carry[0] < n, body, (jnp.zeros((), jnp.int32), state, metrics, guard))
        return state, metrics, guard

    return program


# Flags that shape only the record, not the trajectory.
_RECORD_FLAGS = frozenset({"workdir", "resume", "log_every", "eval_every", "checkpoint_every"})
_SESSIONS: collections.OrderedDict = collections.OrderedDict()
_MAX_SESSIONS = 2


class Session(NamedTuple):
    """A loaded problem, the jitted initialiser and the compiled round (once compiled)."""

    problem: Problem
    init: Callable
    compiled: list  # [] or [the AOT-compiled round, or chunk of rounds]


def session(cfg: Config) -> Session:
    """The problem, initialiser and round of `cfg`, reused across `train` calls in a process.

    Two configs that differ only in flags that cannot change the trajectory (the
    workdir, the logging grid, and `--rounds` under a constant schedule or a fixed
    `--schedule_rounds`) share one compiled round: a resume in the same process,
    or a sweep over `--rounds`, compiles once. The last `_MAX_SESSIONS` are kept
    (each holds its dataset on the device).
    """
    f = cfg.flags
    names = [n for n in sorted(f) if n not in _RECORD_FLAGS]
    if not config_lib.rounds_matter(f):
        names.remove("rounds")
    hook = {safety.NONFINITE_HOOK: safety.nonfinite_hook_round()}  # the test hook
    key = json.dumps({**{n: f[n] for n in names}, **hook})
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    problem = load_problem(f)
    found = Session(problem, make_init(cfg, problem), [])
    _SESSIONS[key] = found
    while len(_SESSIONS) > _MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return found
