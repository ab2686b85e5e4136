"""Local SGD: nodes take independent SGD steps and average every `period` rounds.

Each node `p` keeps its own model `v^p` and steps `v^p <- v^p - eta g^p`; after
every round `r` with `(r + 1) % H == 0` all nodes take the average. The
auxiliary model is the average of the local models, `x = mean_p v^p`, tracked
as `x <- x - eta mean_p g^p` (equal in exact arithmetic); at a synchronisation
every node takes `x` (docs/theory.md section 5).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import bounds, consistency, core, validation
from elastic_jax.algorithms import _common


class WorkerState(NamedTuple):
    model: Any  # pytree [P, ...]: local models (stale right after a synchronisation)


class LocalShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # x: the average of the local models
    stats: consistency.ConsistencyState

    def auxiliary(self, workers: WorkerState):
        return self.params

    def actual(self, workers: WorkerState):
        return self.params


def local_sgd(learning_rate, num_workers: int, period: int, *, clip_norm=None) -> core.Algorithm:
    """Local SGD with `num_workers` nodes averaging every `period` rounds.

    Update rule: `v^p <- v^p - eta g^p`; after round `r` with `(r + 1) % H == 0`,
    `v^p <- mean_q v^q`. Elastic consistency (`ej.bounds.local_sgd`):
    `B = 2 (H - 1) M (1 - 1/P)`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      period: `H >= 1`; 1 is synchronous SGD.
      clip_norm: clip each gradient to this global norm (> 0).

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.local_sgd(0.1, num_workers=8, period=4)
    """
    schedule = validation.as_schedule(learning_rate)
    num_workers = validation.check_int("num_workers", num_workers, lo=1)
    period = validation.check_int("period", period, lo=1)
    rule = _common.make_rule(None, False, clip_norm)

    def init_fn(params, key):
        dtype = jnp.result_type(*jax.tree.leaves(params))
        shared = LocalShared(jnp.zeros((), jnp.int32), core.as_key(key),
                             jax.tree.map(jnp.asarray, params), consistency.init(dtype))
        model = jax.tree.map(
            lambda x: jnp.broadcast_to(jnp.asarray(x), (num_workers,) + jnp.shape(x)).copy(),
            params)
        return core.State(shared, WorkerState(model))

    def view_fn(index, worker, shared):
        del index
        synced = shared.round % period == 0
        return jax.tree.map(lambda x, v: jnp.where(synced, x, v), shared.params, worker.model)

    def local_fn(index, worker, grad, key, shared):
        eta = schedule(shared.round)
        view = view_fn(index, worker, shared)
        sq = consistency.tree_sq_norm(jax.tree.map(lambda x, v: x - v, shared.params, view))
        msg = _common.worker_update(rule, eta, grad, None, key)
        return WorkerState(_common.apply(view, msg.update)), (msg, sq)

    def combine_fn(shared, inputs):
        msg, sq = inputs
        eta = schedule(shared.round)
        mean_update = jax.tree.map(consistency.worker_mean, msg.update)
        params = _common.apply(shared.params, mean_update)
        stats = consistency.observe(shared.stats, msg.grad_norm, eta)
        dtype = stats.m_hat.dtype
        bound_b = bounds.local_sgd(period=period, num_workers=num_workers,
                                   m=_common.gradient_bound(rule, stats))
        etabar = consistency.window_max(schedule, shared.round, period - 1)
        metrics = consistency.metrics(sq.astype(dtype), eta, bound_b, etabar)
        metrics.update(_common.common_metrics(
            rule, stats, eta, msg, shared.params, params, rule.bits(shared.params),
            num_workers))
        # Only the averaging round communicates (docs/theory.md section 7).
        synced = (shared.round + 1) % period == 0
        metrics["comm/bits"] = jnp.where(synced, metrics["comm/bits"], 0)
        return LocalShared(shared.round + 1, shared.key, params, stats), metrics

    views_fn, update_fn = core.compose_update(local_fn, combine_fn, view_fn, num_workers)
    info = core.AlgorithmInfo("local_sgd", num_workers, "deterministic")
    return core.Algorithm(init_fn, views_fn, update_fn, local_fn, combine_fn, view_fn, info)
