"""Elastic scheduling: nodes proceed while at most `tau` round averages are in flight.

The synchronization-avoiding scheme of the paper (docs/theory.md section 5). Every
round each node computes its gradient at its view and the round's average
`ubar_r = mean_p u_r^p` (the workers' chain outputs, `eta_r g_r^p` for plain SGD)
is broadcast; node `q` receives round `r`'s average
after a delay drawn per (round, node) by the delay law in `[0, tau]` rounds
(`tau = max_outstanding`), so at most `tau` averages are ever outstanding. The
auxiliary model is `x_{r+1} = x_r - ubar_r`; a node's view is

    norm mode:       v^q = x + sum_{s outstanding at q} ubar_s
                     (it proceeds on its stale view)
    variance mode:   v^q = x + sum_{s outstanding at q} (ubar_s - u_s^q)
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

from elastic_jax import base, bounds, chain, consistency, delays, validation
from elastic_jax import clock as clock_lib
from elastic_jax.algorithms import _common


class ElasticWorkers(NamedTuple):
    own: Any  # pytree [P, tau + 1, ...] or None: u_s^q by slot (variance mode)
    rule: Any  # the chain's state, stacked [P, ...]


class ElasticShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # the auxiliary model x
    averages: Any  # pytree [tau + 1, ...]: ubar_s in slot s mod (tau + 1)
    arrival: jax.Array  # [tau + 1, P] int32: round before which node q has average s
    stats: consistency.ConsistencyState
    outstanding: Any  # pytree [P, ...]: every node's outstanding averages this round


def _gap(shared: ElasticShared, index, own):
    """`v^q - x` for node `index` (`own` its slots in variance mode, else None)."""
    if own is None:
        return jax.tree.map(lambda g, x: g[index].astype(x.dtype), shared.outstanding,
                            shared.params)
    mask = shared.arrival[:, index] > shared.round

    def one(g, x, mine):
        kept = jnp.where(jnp.reshape(mask, mask.shape + (1,) * (mine.ndim - 1)), mine, 0)
        return (g[index] - consistency.worker_sum(kept)).astype(x.dtype)

    return jax.tree.map(one, shared.outstanding, shared.params, own)


def outstanding_sums(round_, averages, arrival):
    """`sum_{s outstanding at q} ubar_s` for every node `q`: one product per leaf.

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
    rule=None,
    clip_norm=None,
    staleness=1.0,
    optimizer_placement: str = "worker",
    system=None,
) -> base.Algorithm:
    """Elastic scheduling with at most `max_outstanding` averages in flight per node.

    Update rule (round `r`): `x_{r+1} = x_r - ubar_r`, views as in the module
    docstring. Elastic consistency (`ej.bounds.elastic_scheduling`), with the
    chain's bound `U` on an update: `B = tau U` (norm mode),
    `2 tau U (1 - 1/P)` (variance mode). With `staleness = s`, views and
    `consistency/b_hat` use `x + s gap^q`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      max_outstanding: `tau >= 0`; 0 is synchronous SGD.
      delay: the law of the rounds until a node receives an average, in `[0, tau]`.
      mode: `"norm"` or `"variance"`.
      rule: the per-worker chain (`ej.chain(...)`, without compression: the
        averages are sent dense); exclusive with `clip_norm`.
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      staleness: `s` in [0, 1], a float or a traced value: how far each view
        goes from `x` (`s = 0`) to the scheduled view (`s = 1`, the default).
      optimizer_placement: `"worker"` only (each worker runs its chain's base
        optimizer); server placement is defined for `ej.sync_sgd`.
      system: None, or an `ej.clock.system(...)`: the delays then emerge from
        the clock instead of `delay` (which is not read): a node proceeds while
        at most `tau` averages are outstanding and waits otherwise, and
        receives a round's average before the first round it starts after
        the all-reduce is done (docs/theory.md section 11); each round reports
        `time/*` and `comm/seconds`. The run may not go beyond the system's
        rounds.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.elastic_scheduling(0.1, 8, max_outstanding=2, mode="variance")
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    tau = validation.check_int("max_outstanding", max_outstanding, lo=0)
    validation.check_choice("mode", mode, ("norm", "variance"))
    law = delays.resolve(delay)
    if law.lags is not None:
        validation.fail("delay", validation.Text("a recorded trace"),
                        "'fixed', 'uniform', 'geometric' or a DelayLaw")
    rule = chain.resolve(rule, None, False, clip_norm, "elastic_scheduling", compression=False)
    _common.check_placement(optimizer_placement)
    timing = _common.clock(system, num_workers, rule.bits,
                           lambda bits, size: clock_lib.elastic(system, num_workers, bits, tau))
    _common.check_staleness(staleness)
    size = tau + 1
    variance = mode == "variance"

    def init(params, key):
        shared = ElasticShared(
            params=_common.copy_params(params),
            averages=_common.stacked(params, size),
            arrival=jnp.zeros((size, num_workers), jnp.int32),
            outstanding=_common.stacked(params, num_workers),
            **_common.counters(params, key),
        )
        own = _common.stacked(params, num_workers * size) if variance else None
        own = None if own is None else jax.tree.map(
            lambda x: x.reshape((num_workers, size) + x.shape[1:]), own)
        return shared, ElasticWorkers(own, rule.init(params, num_workers))

    def view(index, worker, shared):
        gap = _common.scale_gap(staleness, _gap(shared, index, worker.own))
        return jax.tree.map(lambda x, g: x + g, shared.params, gap)

    def local(index, worker, grad, key, shared):
        gap = _common.scale_gap(staleness, _gap(shared, index, worker.own))
        own_view = jax.tree.map(lambda x, g: x + g, shared.params, gap)
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key, own_view)
        own = worker.own
        if own is not None:
            slot = shared.round % size
            own = jax.tree.map(lambda o, u: o.at[slot].set(u), own, sent.update)
        return ElasticWorkers(own, state), (sent, consistency.tree_sq_norm(gap))

    def combine(shared, inputs):
        sent, sq = inputs
        eta = schedule(shared.round)
        round_ = shared.round
        mean_update = jax.tree.map(consistency.worker_mean, sent.update)
        params = _common.apply(shared.params, mean_update)
        slot = round_ % size
        averages = jax.tree.map(lambda a, u: a.at[slot].set(u), shared.averages, mean_update)
        if timing is not None:  # The clock's delays.
            lags = jnp.asarray(timing(shared.params).delays)[round_]
        else:
            lags = jax.vmap(lambda q: law.sample(
                base.derive_key(shared.key, base.TAG_DELAY, round_, q), round_, q, 0, tau, ()))(
                jnp.arange(num_workers)).astype(jnp.int32)
        arrival = shared.arrival.at[slot].set(round_ + 1 + lags)
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(shared.params))
        dtype = stats.m_hat.dtype
        update_b, _ = _common.bounds(rule, stats, shared.params)
        bound_b = bounds.elastic_scheduling(max_outstanding=tau, num_workers=num_workers,
                                            update=update_b, mode=mode)
        etabar = consistency.window_max(schedule, round_, tau)
        metrics = consistency.metrics(sq.astype(dtype), eta, bound_b, etabar)
        metrics.update(_common.metrics(rule, stats, eta, sent, shared.params, params,
                                       num_workers))
        metrics["delay/mean"] = jnp.mean(lags.astype(dtype))
        new_shared = shared._replace(
            round=round_ + 1, params=params, averages=averages, arrival=arrival, stats=stats,
            outstanding=outstanding_sums(round_ + 1, averages, arrival))
        return new_shared, metrics

    def actual(state):
        """The mean of the nodes' views."""
        shared, own = state.shared, state.workers.own
        idx = jnp.arange(num_workers)
        gaps = (jax.vmap(lambda q, o: _gap(shared, q, o))(idx, own) if own is not None
                else jax.vmap(lambda q: _gap(shared, q, None))(idx))
        return jax.tree.map(lambda x, g: x + consistency.worker_mean(g), shared.params, gaps)

    def auxiliary(state):
        return state.shared.params

    return base.algorithm("elastic_scheduling", num_workers, "deterministic", init=init,
                          view=view, local=local, auxiliary=auxiliary, actual=actual,
                          combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=_common.horizon(system), clock=timing)
