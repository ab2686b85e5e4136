"""Synchronous data-parallel SGD, optionally compressed, optionally with error feedback.

Every worker computes its gradient at the current model and the round applies
the mean of the workers' updates (docs/theory.md section 5):

    x_{r+1} = x_r - (1/P) sum_p u_r^p,     u^p = eta_r g^p  or  C(eta_r g^p),

and, with error feedback, the views are the actual model `X` while the
auxiliary model is the virtual iterate `x = X - (1/P) sum_p e^p`.

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
    residual: Any  # pytree [P, ...] or None: error-feedback residuals e^p


class SyncShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key: the base key
    params: Any  # the actual model X
    stats: consistency.ConsistencyState

    def actual(self, workers: WorkerState):
        return self.params

    def auxiliary(self, workers: WorkerState):
        if workers.residual is None:
            return self.params
        mean = jax.tree.map(consistency.worker_mean, workers.residual)
        return _common.apply(self.params, mean)


def sync_sgd(
    learning_rate,
    num_workers: int,
    *,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
) -> core.Algorithm:
    """Synchronous SGD over `num_workers` workers.

    Update rule (round `r`, `P` workers, `u^p` as in `_common.worker_update`):

        X_{r+1} = X_r - (1/P) sum_p u^p

    Elastic consistency: `B = 0` without error feedback; `B = rho M` with it
    (`ej.bounds.sync_sgd`).

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      compressor: a bare compressor (`ej.top_k(...)`, ...) applied to each
        worker's update, or None.
      error_feedback: False, True (`beta = 1`) or a float `beta` in [0, 1];
        without a compressor, error feedback wraps the identity.
      clip_norm: clip each worker's gradient to this global norm (> 0); makes
        `M = clip_norm` known before the run.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.sync_sgd(0.1, num_workers=4, compressor=ej.top_k(fraction=0.1),
      ...                   error_feedback=True)
    """
    schedule = validation.as_schedule(learning_rate)
    num_workers = validation.check_int("num_workers", num_workers, lo=1)
    rule = _common.make_rule(compressor, error_feedback, clip_norm)

    def init_fn(params, key):
        rule.validate(params)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        shared = SyncShared(
            round=jnp.zeros((), jnp.int32),
            key=core.as_key(key),
            params=jax.tree.map(jnp.asarray, params),
            stats=consistency.init(dtype),
        )
        return core.State(shared, WorkerState(_common.init_residual(rule, params, num_workers)))

    def view_fn(index, worker, shared):
        del index, worker
        return shared.params

    def local_fn(index, worker, grad, key, shared):
        del index
        eta = schedule(shared.round)
        msg = _common.worker_update(rule, eta, grad, worker.residual, key)
        return WorkerState(msg.residual_new), msg

    def combine_fn(shared, msg):
        eta = schedule(shared.round)
        mean_update = jax.tree.map(consistency.worker_mean, msg.update)
        params = _common.apply(shared.params, mean_update)
        stats = consistency.observe(
            shared.stats, msg.grad_norm, eta, msg.update_norm if rule.compressed else None
        )
        dtype = stats.m_hat.dtype
        if rule.beta is None:
            # Every view is the model itself.
            sq_dists = jnp.zeros((1,), dtype)
            bound_b, etabar = jnp.zeros((), dtype), eta
        else:
            mean_residual = jax.tree.map(consistency.worker_mean, msg.residual_old)
            sq_dists = consistency.tree_sq_norm(mean_residual).astype(dtype)[None]
            bound_b = bounds.sync_sgd(
                m=_common.gradient_bound(rule, stats),
                delta=rule.delta(shared.params),
                error_feedback=rule.beta,
            )
            etabar = stats.eta_max
        metrics = consistency.metrics(sq_dists, eta, bound_b, etabar)
        metrics.update(
            _common.common_metrics(
                rule, stats, eta, msg, shared.params, params, rule.bits(shared.params),
                num_workers,
            )
        )
        new_shared = SyncShared(shared.round + 1, shared.key, params, stats)
        return new_shared, metrics

    views_fn, update_fn = core.compose_update(local_fn, combine_fn, view_fn, num_workers)
    info = core.AlgorithmInfo("sync_sgd", num_workers, rule.bound_kind())
    return core.Algorithm(init_fn, views_fn, update_fn, local_fn, combine_fn, view_fn, info)
