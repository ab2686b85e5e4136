"""The benchmarked configurations: models, data, and every algorithm variant.

Models are the experiments' MLP (one hidden layer of 128: 9,610 parameters) and
SmallCNN (25,290 parameters) on scikit-learn's 8x8 digits, plus a sparse linear
model whose size `d` is free (for the scaling curves up to `d = 10^7`). Every
configuration samples its batches on the device inside the compiled round, with
`experiments.data.make_batch_fn`, as `experiments.train` does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej

LEARNING_RATE = 0.05
FRACTION = 0.01  # Top-1%
CHUNK = inspect.signature(ej.run).parameters["chunk"].default  # rounds per chunk of `ej.run`


class Problem(NamedTuple):
    """A model, its loss and its on-device sampler for `num_workers` workers."""

    name: str
    params: Any  # the initial parameters
    loss_fn: Callable  # (params, batch) -> (loss, aux): use has_aux=True
    batch_fn: Callable  # (round, worker_keys [P]) -> batch [P, b, ...]
    num_workers: int
    batch_size: int
    d: int  # number of parameters
    data: Any  # (x, y, indices, counts) on the host, for the PyTorch simulation


@functools.lru_cache(maxsize=1)
def _digits():
    from experiments import data

    return data.load_digits()


def make_problem(name: str, num_workers: int, batch_size: int = 32, *, seed: int = 0,
                 d: int | None = None) -> Problem:
    """`"mlp"` or `"cnn"` on the digits, or `"linear"` with `d` parameters."""
    if name == "linear":
        return _linear_problem(num_workers, batch_size, d or 10**4, seed)
    from experiments import data, models

    ds = _digits()
    module, init_params = models.make_model(name, ds.num_classes, ds.x_train.shape[1:])
    params = init_params(jax.random.key(seed))
    part = data.partition(ds.y_train, num_workers, seed=seed)
    batch_fn = data.make_batch_fn(ds.x_train, ds.y_train, part.indices, part.counts, batch_size)
    loss_fn = models.classification_loss(module)
    return Problem(name, params, loss_fn, batch_fn, num_workers, batch_size,
                   models.num_params(params), (ds.x_train, ds.y_train, part.indices, part.counts))


# A sparse linear regression: each example touches `ACTIVE` coordinates of `w`, so
# a gradient costs O(b ACTIVE) flops plus one dense O(d) scatter, and the round's
# cost at large `d` is the algorithm's own O(d) (or O(max_delay d)) work.
ACTIVE = 16


def _sparse_linear_loss(params, batch):
    w = params["w"]
    pred = jnp.sum(w[batch["idx"]] * batch["val"], axis=-1)
    loss = 0.5 * jnp.mean(jnp.square(pred - batch["y"]))
    return loss, {}


def _linear_problem(num_workers, batch_size, d, seed):
    d = int(d)

    def batch_fn(round_, keys):
        del round_

        def one(key):
            k_idx, k_val, k_y = jax.random.split(key, 3)
            return {
                "idx": jax.random.randint(k_idx, (batch_size, ACTIVE), 0, d),
                "val": jax.random.normal(k_val, (batch_size, ACTIVE)),
                "y": jax.random.normal(k_y, (batch_size,)),
            }

        return jax.vmap(one)(keys)

    params = {"w": jnp.zeros((d,), jnp.float32)}
    return Problem("linear", params, _sparse_linear_loss, batch_fn, num_workers, batch_size, d,
                   None)


# ---------------------------------------------------------------------- variants


class Variant(NamedTuple):
    """One algorithm configuration of the suite."""

    name: str
    make: Callable[..., ej.Algorithm]  # (num_workers, max_delay, fraction) -> Algorithm
    compressed: bool  # Top-k (the 1.3x target) or not (the 1.15x target)
    shared_view: bool  # every worker's view is the same array (sync SGD)
    description: str


def _async(reads, compress=False, ef=False):
    def make(num_workers, max_delay, fraction=FRACTION):
        return ej.async_sgd(
            LEARNING_RATE, num_workers, max(max_delay, num_workers - 1), reads=reads,
            compressor=ej.top_k(fraction=fraction) if compress else None, error_feedback=ef)

    return make


def _sync(compress=False, ef=False):
    def make(num_workers, max_delay, fraction=FRACTION):
        del max_delay
        return ej.sync_sgd(LEARNING_RATE, num_workers,
                           compressor=ej.top_k(fraction=fraction) if compress else None,
                           error_feedback=ef)

    return make


def _message_passing(num_workers, max_delay, fraction=FRACTION):
    del fraction
    return ej.message_passing_sgd(LEARNING_RATE, num_workers, max_delay=max_delay)


def _elastic(num_workers, max_delay, fraction=FRACTION):
    del fraction
    return ej.elastic_scheduling(LEARNING_RATE, num_workers, max_outstanding=max_delay)


def _local(num_workers, max_delay, fraction=FRACTION):
    del fraction
    return ej.local_sgd(LEARNING_RATE, num_workers, period=max(max_delay, 1))


VARIANTS = {
    v.name: v
    for v in [
        Variant("sync", _sync(), False, True, "sync_sgd"),
        Variant("sync_topk", _sync(True), True, True, "sync_sgd, Top-1%"),
        Variant("sync_topk_ef", _sync(True, True), True, True, "sync_sgd, Top-1%, error feedback"),
        Variant("async_consistent", _async("consistent"), False, False,
                "async_sgd, consistent reads, uniform lags <= max_delay"),
        Variant("async_inconsistent", _async("inconsistent"), False, False,
                "async_sgd, inconsistent (per-coordinate) reads"),
        Variant("async_topk", _async("inconsistent", True), True, False,
                "async_sgd, inconsistent reads, Top-1%"),
        Variant("async_topk_ef", _async("inconsistent", True, True), True, False,
                "async_sgd, inconsistent reads, Top-1%, error feedback"),
        Variant("message_passing", _message_passing, False, False,
                "message_passing_sgd, uniform message delays <= max_delay"),
        Variant("elastic_scheduling", _elastic, False, False,
                "elastic_scheduling, norm mode, max_outstanding = max_delay"),
        Variant("local_sgd", _local, False, False, "local_sgd, period = max_delay"),
    ]
}


def data_keys(state: ej.State, num_workers: int):
    """The keys `ej.run(batch_fn=...)` hands to `batch_fn` for the state's round."""
    shared = state.shared
    return jax.vmap(lambda p: ej.derive_key(shared.key, DATA_TAG, shared.round, p))(
        jnp.arange(num_workers))


DATA_TAG = 3  # elastic_jax.base.TAG_DATA: per-worker batch sampling in `run(batch_fn=...)`


def sample_views_and_batch(alg: ej.Algorithm, problem: Problem, rounds: int = 3, seed: int = 0):
    """A state after a few rounds, its views `[P, ...]` and one batch: the floor's inputs."""
    state = alg.init(problem.params, jax.random.key(seed))
    if rounds:
        state, _ = ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn, rounds=rounds,
                          has_aux=True)
    views = jax.jit(functools.partial(ej.views, alg))(state)
    batch = jax.jit(problem.batch_fn)(0, data_keys(state, problem.num_workers))
    return state, views, batch


def num_params(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
