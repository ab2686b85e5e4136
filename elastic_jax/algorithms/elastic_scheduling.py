"""Elastic scheduling: nodes proceed while at most `tau` round averages are in flight.

The synchronization-avoiding scheme of the paper (docs/theory.md section 5). Every
round each node computes its gradient at its view and the round's average
`gbar_r = mean_p g_r^p` is broadcast; node `q` receives round `r`'s average
after a delay drawn per (round, node) by the delay law in `[0, tau]` rounds
(`tau = max_outstanding`), so at most `tau` averages are ever outstanding. The
auxiliary model is `x_{r+1} = x_r - eta_r gbar_r`; a node's view is

    norm mode:       v^q = x + sum_{s outstanding at q} eta_s gbar_s
                     (it proceeds on its stale view)
    variance mode:   v^q = x + sum_{s outstanding at q} eta_s (gbar_s - g_s^q)
                     (it applies its own gradient in place of each missing
                     average and corrects when the average arrives).

A continuous `staleness` `s` in [0, 1] interpolates each view between the
freshest one (nothing outstanding: `x`) and the scheduled one:
`v^q = (1 - s) x + s (x + gap^q) = x + s gap^q`, so `||x - v^q||` is exactly
`s` times the scheduled gap and the bounds hold unchanged. Only the point
where gradients are taken changes (`ej.model`, `delay/mean` do not).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import bounds, consistency, core, delays, validation
from elastic_jax.algorithms import _common


class WorkerState(NamedTuple):
    own: Any  # pytree [P, tau + 1, ...] or None: eta_s g_s^q by slot (variance mode)


class ElasticShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # the auxiliary model x
    averages: Any  # pytree [tau + 1, ...]: eta_s gbar_s in slot s mod (tau + 1)
    arrival: jax.Array  # [tau + 1, P] int32: round before which node q has average s
    stats: consistency.ConsistencyState
    outstanding: Any  # pytree [P, ...]: every node's outstanding averages this round

    def gap(self, index, own):
        """`v^q - x` for node `index` (`own` its slots in variance mode, else None)."""
        if own is None:
            return jax.tree.map(lambda g, x: g[index].astype(x.dtype), self.outstanding,
                                self.params)
        mask = self.arrival[:, index] > self.round

        def one(g, x, mine):
            kept = jnp.where(jnp.reshape(mask, mask.shape + (1,) * (mine.ndim - 1)), mine, 0)
            return (g[index] - consistency.worker_sum(kept)).astype(x.dtype)

        return jax.tree.map(one, self.outstanding, self.params, own)

    def actual(self, workers: WorkerState):
        """The mean of the nodes' views."""
        num = self.arrival.shape[1]
        idx = jnp.arange(num)
        gaps = (jax.vmap(self.gap)(idx, workers.own) if workers.own is not None
                else jax.vmap(lambda q: self.gap(q, None))(idx))
        return jax.tree.map(lambda x, g: x + consistency.worker_mean(g), self.params, gaps)

    def auxiliary(self, workers: WorkerState):
        return self.params


def outstanding_sums(round_, averages, arrival):
    """`sum_{s outstanding at q} eta_s gbar_s` for every node `q`: one product per leaf.

    A `[P, tau + 1] x [tau + 1, d]` product computed once per round (at the end
    of the previous round's `combine`) and read by `view`, `local` and the
    metrics, instead of a masked sum over the slots per node and per use.
    """
    weights = (arrival > round_).astype(jax.tree.leaves(averages)[0].dtype)  # [tau + 1, P]

    def one(avg):
        flat = avg.reshape(avg.shape[0], -1)
        out = jax.lax.dot_general(weights.astype(avg.dtype), flat, (((0,), (0,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST)
        return out.reshape((weights.shape[1],) + avg.shape[1:])

    return jax.tree.map(one, averages)


def elastic_scheduling(
    learning_rate,
    num_workers: int,
    max_outstanding: int,
    *,
    delay="uniform",
    mode: str = "norm",
    clip_norm=None,
    staleness=1.0,
) -> core.Algorithm:
    """Elastic scheduling with at most `max_outstanding` averages in flight per node.

    Update rule (round `r`): `x_{r+1} = x_r - eta_r gbar_r`, views as in the
    module docstring. Elastic consistency (`ej.bounds.elastic_scheduling`):
    `B = tau M` (norm mode), `2 tau M (1 - 1/P)` (variance mode). With
    `staleness = s`, views and `consistency/b_hat` use `x + s gap^q`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      max_outstanding: `tau >= 0`; 0 is synchronous SGD.
      delay: the law of the rounds until a node receives an average, in `[0, tau]`.
      mode: `"norm"` or `"variance"`.
      clip_norm: clip each gradient to this global norm (> 0).
      staleness: `s` in [0, 1], a float or a traced value: how far each view
        goes from `x` (`s = 0`) to the scheduled view (`s = 1`, the default;
        the Python float 1.0 runs the unblended code).

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.elastic_scheduling(0.1, 8, max_outstanding=2, mode="variance")
    """
    schedule = validation.as_schedule(learning_rate)
    num_workers = validation.check_int("num_workers", num_workers, lo=1)
    tau = validation.check_int("max_outstanding", max_outstanding, lo=0)
    validation.check_choice("mode", mode, ("norm", "variance"))
    law = delays.resolve(delay)
    if law.lags is not None:
        validation.fail("delay", validation.Text("a recorded trace"),
                        "'fixed', 'uniform', 'geometric' or a DelayLaw")
    rule = _common.make_rule(None, False, clip_norm)
    _common.check_staleness(staleness)
    size = tau + 1
    variance = mode == "variance"

    def init_fn(params, key):
        dtype = jnp.result_type(*jax.tree.leaves(params))
        shared = ElasticShared(
            round=jnp.zeros((), jnp.int32),
            key=core.as_key(key),
            params=jax.tree.map(jnp.asarray, params),
            averages=jax.tree.map(lambda x: jnp.zeros((size,) + jnp.shape(x), x.dtype), params),
            arrival=jnp.zeros((size, num_workers), jnp.int32),
            stats=consistency.init(dtype),
            outstanding=jax.tree.map(
                lambda x: jnp.zeros((num_workers,) + jnp.shape(x), x.dtype), params),
        )
        own = None
        if variance:
            own = jax.tree.map(
                lambda x: jnp.zeros((num_workers, size) + jnp.shape(x), x.dtype), params)
        return core.State(shared, WorkerState(own))

    def view_fn(index, worker, shared):
        gap = _common.scale_gap(staleness, shared.gap(index, worker.own))
        return jax.tree.map(lambda x, g: x + g, shared.params, gap)

    def local_fn(index, worker, grad, key, shared):
        eta = schedule(shared.round)
        sq = consistency.tree_sq_norm(_common.scale_gap(staleness, shared.gap(index, worker.own)))
        msg = _common.worker_update(rule, eta, grad, None, key)
        own = worker.own
        if own is not None:
            slot = shared.round % size
            own = jax.tree.map(lambda o, u: o.at[slot].set(u), own, msg.update)
        return WorkerState(own), (msg, sq)

    def combine_fn(shared, inputs):
        msg, sq = inputs
        eta = schedule(shared.round)
        round_ = shared.round
        mean_update = jax.tree.map(consistency.worker_mean, msg.update)
        params = _common.apply(shared.params, mean_update)
        slot = round_ % size
        averages = jax.tree.map(lambda a, u: a.at[slot].set(u), shared.averages, mean_update)
        lags = jax.vmap(lambda q: law.sample(
            core.derive_key(shared.key, core.TAG_DELAY, round_, q), round_, q, 0, tau, ()))(
            jnp.arange(num_workers)).astype(jnp.int32)
        arrival = shared.arrival.at[slot].set(round_ + 1 + lags)
        stats = consistency.observe(shared.stats, msg.grad_norm, eta)
        dtype = stats.m_hat.dtype
        bound_b = bounds.elastic_scheduling(
            max_outstanding=tau, num_workers=num_workers,
            m=_common.gradient_bound(rule, stats), mode=mode)
        etabar = consistency.window_max(schedule, round_, tau)
        metrics = consistency.metrics(sq.astype(dtype), eta, bound_b, etabar)
        metrics.update(_common.common_metrics(
            rule, stats, eta, msg, shared.params, params, rule.bits(shared.params),
            num_workers))
        metrics["delay/mean"] = jnp.mean(lags.astype(dtype))
        new_shared = ElasticShared(round_ + 1, shared.key, params, averages, arrival, stats,
                                   outstanding_sums(round_ + 1, averages, arrival))
        return new_shared, metrics

    views_fn, update_fn = core.compose_update(local_fn, combine_fn, view_fn, num_workers)
    info = core.AlgorithmInfo("elastic_scheduling", num_workers, "deterministic")
    return core.Algorithm(init_fn, views_fn, update_fn, local_fn, combine_fn, view_fn, info)
