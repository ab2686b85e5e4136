"""Local SGD: nodes take independent SGD steps and average every `period` rounds.

Each node `p` keeps its own model `v^p` and steps `v^p <- v^p - u^p`, `u^p`
its chain's output (`eta g^p` for plain SGD); after every round `r` with
`(r + 1) % H == 0` all nodes take the average. The auxiliary model is the
average of the local models, `x = mean_p v^p`, tracked as
`x <- x - mean_p u^p` (equal in exact arithmetic); at a synchronisation every
node takes `x` (docs/theory.md section 5). Only the averaging rounds
communicate (`comm/bits`, docs/theory.md section 7).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import base, bounds, chain, consistency, validation
from elastic_jax import clock as clock_lib
from elastic_jax.algorithms import _common


class LocalWorkers(NamedTuple):
    model: Any  # pytree [P, ...]: local models (stale right after a synchronisation)
    rule: Any  # the chain's state, stacked [P, ...]


class LocalShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # x: the average of the local models
    stats: consistency.ConsistencyState


def local_sgd(learning_rate, num_workers: int, period: int, *, rule=None,
              clip_norm=None, optimizer_placement: str = "worker",
              system=None) -> base.Algorithm:
    """Local SGD with `num_workers` nodes averaging every `period` rounds.

    Update rule: `v^p <- v^p - u^p`; after round `r` with `(r + 1) % H == 0`,
    `v^p <- mean_q v^q`. Elastic consistency (`ej.bounds.local_sgd`), with the
    chain's bound `U` on an update: `B = 2 (H - 1) U (1 - 1/P)`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      period: `H >= 1`; 1 is synchronous SGD.
      rule: the per-worker chain (`ej.chain(...)`, without compression: the
        local models are averaged dense); exclusive with `clip_norm`.
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      optimizer_placement: `"worker"` only (each worker runs its chain's base
        optimizer); server placement is defined for `ej.sync_sgd`.
      system: None, or an `ej.clock.system(...)`: each node takes its `H`
        local steps one after another and every averaging round ends when the
        slowest node and the all-reduce of the models are done
        (docs/theory.md section 11); each round reports `time/*` and
        `comm/seconds`. The run may not go beyond the system's rounds.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.local_sgd(0.1, num_workers=8, period=4)
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    period = validation.check_int("period", period, lo=1)
    rule = chain.resolve(rule, None, False, clip_norm, "local_sgd", compression=False)
    _common.check_placement(optimizer_placement)
    timing = _common.clock(system, num_workers, rule.bits,
                           lambda bits, size: clock_lib.local(system, num_workers, bits, period))

    def init(params, key):
        shared = LocalShared(params=_common.copy_params(params),
                             **_common.counters(params, key))
        workers = LocalWorkers(_common.repeated(params, num_workers),
                               rule.init(params, num_workers))
        return shared, workers

    def view(index, worker, shared):
        del index
        synced = shared.round % period == 0
        return jax.tree.map(lambda x, v: jnp.where(synced, x, v), shared.params, worker.model)

    def local(index, worker, grad, key, shared):
        own_view = view(index, worker, shared)
        sq = consistency.tree_sq_norm(jax.tree.map(lambda x, v: x - v, shared.params, own_view))
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key, own_view)
        return LocalWorkers(_common.apply(own_view, sent.update), state), (sent, sq)

    def combine(shared, inputs):
        sent, sq = inputs
        eta = schedule(shared.round)
        params = _common.apply(shared.params, jax.tree.map(consistency.worker_mean, sent.update))
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(shared.params))
        dtype = stats.m_hat.dtype
        update_b, _ = _common.bounds(rule, stats, shared.params)
        bound_b = bounds.local_sgd(period=period, num_workers=num_workers, update=update_b)
        etabar = consistency.window_max(schedule, shared.round, period - 1)
        metrics = consistency.metrics(sq.astype(dtype), eta, bound_b, etabar)
        # Only the averaging round communicates (docs/theory.md section 7).
        synced = (shared.round + 1) % period == 0
        metrics.update(_common.metrics(rule, stats, eta, sent, shared.params, params,
                                       jnp.where(synced, num_workers, 0)))
        return shared._replace(round=shared.round + 1, params=params, stats=stats), metrics

    def params_of(state):
        return state.shared.params

    return base.algorithm("local_sgd", num_workers, "deterministic", init=init, view=view,
                          local=local, auxiliary=params_of, actual=params_of, rule=rule,
                          combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=_common.horizon(system), clock=timing)
