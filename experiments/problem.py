"""What a run trains: the data on the device, the model, the initial state, the evaluation.

`load_problem` turns the flags into a `Problem` (a loss, an on-device batch sampler
`batch_fn(round, worker_keys)` for `ej.run`, a parameter initialiser, an evaluator),
`make_init` the initial state (stacked over seeds); `session` caches both, and the
algorithm, per trajectory-relevant config.
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

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import safety
from experiments.config import Config, UsageError


class Problem(NamedTuple):
    """What the loop needs from the data and the model."""

    loss_fn: Callable  # (params, batch) -> loss, or (loss, aux) with has_aux
    has_aux: bool
    batch_fn: Callable  # (round, worker_keys [P]) -> batch [P, b, ...]
    init_params: Callable  # key -> params
    evaluate: Callable  # params -> {name: float}


def load_problem(f: Mapping[str, Any]) -> Problem:
    """Loads the dataset, partitions it and builds the model; compiles nothing.

    Raises:
      UsageError: a missing or corrupt data file (the line starts with its path),
        or a partition the data cannot give (e.g. more workers than samples).
    """
    convex = f["dataset"] in config_lib.CONVEX_DATASETS
    try:
        if convex:
            make = (data_lib.least_squares if f["dataset"] == "least_squares"
                    else data_lib.logistic_regression)
            problem = make(f["convex_samples"], f["convex_dim"], seed=f["seed"])
            x, y = problem.a.astype(np.float32), problem.b.astype(np.float32)
            labels = (problem.b > 0).astype(np.int32)
        else:
            dataset = data_lib.load_dataset(f["dataset"], f["data_dir"] or None)
            x, y, labels = dataset.x_train, dataset.y_train, dataset.y_train
        shards = data_lib.partition(labels, f["num_workers"], kind=f["partition"],
                                    alpha=f["dirichlet_alpha"], seed=f["seed"])
        batch_fn = data_lib.make_batch_fn(x, y, *shards, batch_size=f["batch_size"])
    except data_lib.DataError as e:  # Its message starts with the path.
        raise UsageError(" ".join(str(e).split())) from None
    except ValueError as e:
        raise config_lib.from_library_error(e) from None
    poison_round = safety.nonfinite_hook_round()
    if poison_round is not None:  # The test hook: round `poison_round` reads NaN data.
        clean = batch_fn
        batch_fn = lambda r, keys: safety.poison(clean(r, keys), r, poison_round)  # noqa: E731

    if convex:
        dim, f_star = f["convex_dim"], problem.f_star
        full_loss = jax.jit(problem.full_loss)

        def evaluate_convex(params) -> dict[str, float]:
            value = float(full_loss(params))
            return {"full/loss": value, "full/suboptimality": value - f_star}

        return Problem(problem.loss_fn, False, batch_fn,
                       lambda key: {"w": jnp.zeros((dim,), jnp.float32)}, evaluate_convex)

    module, init_params = _model(f["model"], dataset.num_classes,
                                 tuple(dataset.x_train.shape[1:]))

    def evaluate_images(params) -> dict[str, float]:
        loss, accuracy = models_lib.evaluate(module, params, dataset.x_test, dataset.y_test)
        return {"test/loss": loss, "test/accuracy": accuracy}

    return Problem(models_lib.classification_loss(module), True, batch_fn, init_params,
                   evaluate_images)


def make_init(cfg: Config, problem: Problem) -> Callable[[], Any]:
    """`() -> state`: the initial state, stacked over seeds when `--num_seeds > 1`.

    Seed `s` initialises the model with `fold_in(key(s), 0)` and the algorithm with
    `fold_in(key(s), 1)`; `alg.init` is jitted (one compilation, not one per operation).
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


# Flags that shape only the record, not the trajectory.
_RECORD_FLAGS = frozenset({"workdir", "resume", "log_every", "eval_every", "checkpoint_every",
                           "on_nonfinite"})
_SESSIONS: collections.OrderedDict = collections.OrderedDict()
_MAX_SESSIONS = 2


class Session(NamedTuple):
    problem: Problem
    init: Callable  # () -> the initial state
    algorithm: Any  # the first equal config's: ej.run caches its programs per algorithm


def session(cfg: Config) -> Session:
    """The problem, initialiser and algorithm of `cfg`, reused across `train` calls.

    Two configs that differ only in flags that cannot change the trajectory (the
    workdir, the logging grid, and `--rounds` unless a decaying schedule spans
    it) share them, and with them `ej.run`'s compiled programs: a resume in the
    same process, or a sweep over `--rounds`, compiles once. The last
    `_MAX_SESSIONS` are kept (each holds its dataset on the device).
    """
    f = cfg.flags
    names = [n for n in sorted(f) if n not in _RECORD_FLAGS]
    if not config_lib.rounds_shape_the_algorithm(f):
        names.remove("rounds")
    hook = {safety.NONFINITE_HOOK: safety.nonfinite_hook_round()}
    key = json.dumps({**{n: f[n] for n in names}, **hook})
    if key not in _SESSIONS:
        problem = load_problem(f)
        _SESSIONS[key] = Session(problem, make_init(cfg, problem), cfg.algorithm)
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
    _SESSIONS.move_to_end(key)
    return _SESSIONS[key]
