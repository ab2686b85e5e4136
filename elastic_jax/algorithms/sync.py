"""Synchronous data-parallel SGD with any per-worker chain; its optimizer at workers or server.

Every worker computes its gradient at the current model and the round applies
the mean of the workers' updates (docs/theory.md section 5):

    X_{r+1} = X_r - (1/P) sum_p u_r^p,     u^p = the chain's output for g^p,

e.g. `eta g^p`, `C(eta g^p)`, EF14's `C(e^p + eta g^p)` or EF21's `eta g^p_est`.
The views are the model `X`; the auxiliary model is `X` minus the mean of what
the chains hold back (EF14's virtual iterate `x = X - (1/P) sum_p e^p`).

With `optimizer_placement="server"` the workers' chains run with the raw
gradient in place of their base optimizer and the server applies that
optimizer, with one state, to the mean of what they send (docs/theory.md
section 9):

    c^p = the chain's output for g^p (in gradient units),
    X_{r+1} = X_r - opt_r((1/P) sum_p c^p),    e.g. opt: m <- mu m + cbar, eta_r m,

and the auxiliary model is `x = X - eta_r (1/P) sum_p e^p`.

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import base, bounds, chain, consistency, optimizers, validation
from elastic_jax import clock as clock_lib
from elastic_jax import powersgd as powersgd_lib
from elastic_jax.algorithms import _common
from elastic_jax.links import Context


class SyncWorkers(NamedTuple):
    rule: Any  # the chain's state, stacked [P, ...]


class SyncShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key: the base key
    params: Any  # the actual model X
    stats: consistency.ConsistencyState
    optimizer: Any = ()  # the base optimizer's state under server placement (one copy)
    collective: Any = ()  # a collective compressor's state (PowerSGD: its Q, the residuals)


def sync_sgd(
    learning_rate,
    num_workers: int,
    *,
    rule=None,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    optimizer_placement: str = "worker",
    system=None,
) -> base.Algorithm:
    """Synchronous SGD over `num_workers` workers.

    Update rule (round `r`, `P` workers, `u^p` the chain's output):

        worker placement:  X_{r+1} = X_r - (1/P) sum_p u^p
        server placement:  X_{r+1} = X_r - opt_r((1/P) sum_p c^p),

    `c^p` the output of the chain with the raw gradient in place of its base
    optimizer `opt` (e.g. `c^p = C(e^p + g^p)` under EF14), `opt` applied once,
    at the server, with one state (`m <- mu m + cbar`, `eta_r m` for momentum).

    Elastic consistency (`ej.bounds.sync_sgd`): `B = R`, the bound on the mean
    of what the chains hold back: 0 without error feedback (compressed or not,
    EF21 included), `rho M` with EF14 (around the momentum's output under
    worker placement, around the raw gradient under server placement, where
    the auxiliary model is `X - eta_r (1/P) sum_p e^p`; docs/theory.md
    section 9).

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      rule: the per-worker chain (`ej.chain(...)`); exclusive with the three
        shorthands below. Default: `ej.chain(ej.sgd())`.
      compressor: shorthand: a bare compressor (`ej.top_k(...)`, ...) applied
        to each worker's update; or `ej.powersgd(rank)`, a collective compressor
        that `combine` applies to the workers' chain outputs (two all-reduces
        per round; with its error feedback, `bound = inf`: docs/theory.md
        section 13); it goes with `rule=` (a chain that does not compress).
      error_feedback: shorthand: False, True (`beta = 1`) or a float `beta` in
        [0, 1]; without a compressor, error feedback wraps the identity.
      clip_norm: shorthand: clip each worker's gradient to this global norm
        (> 0); makes `M = clip_norm` known before the run.
      optimizer_placement: `"worker"` (each worker runs its chain's base
        optimizer, the default) or `"server"` (the server runs it once on the
        mean of the workers' outputs: error feedback before momentum).
      system: None, or an `ej.clock.system(...)`: each round then also reports
        `time/elapsed`, `time/round`, `time/idle_fraction` and `comm/seconds`:
        a round ends when the slowest gradient and the collective (a ring
        all-reduce of dense updates, a ring all-gather of compressed ones) are
        done (docs/theory.md section 11). The run may not go beyond its rounds.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.sync_sgd(0.1, num_workers=4, compressor=ej.top_k(fraction=0.1),
      ...                   error_feedback=True)
      >>> rule = ej.chain(ej.sgd(momentum=0.9), ej.error_feedback(ej.top_k(fraction=0.1)))
      >>> alg = ej.sync_sgd(0.1, 4, rule=rule, optimizer_placement="server")
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    collective = compressor if powersgd_lib.is_powersgd(compressor) else None
    if collective is not None:
        if error_feedback is not False:
            validation.fail("error_feedback", error_feedback, "False with ej.powersgd (its own "
                            "error_feedback= keeps the residuals)")
        compressor = None
    rule = chain.resolve(rule, compressor, error_feedback, clip_norm, "sync_sgd")
    if collective is not None and (rule.compressor is not None or rule.holds_back):
        validation.fail("rule", rule, "a chain without a link that compresses or holds back "
                        "with compressor=ej.powersgd(...)")
    placement = _common.check_placement(optimizer_placement, ("worker", "server"))
    workers_rule, server = rule.placed(placement)
    if collective is None:
        # What goes on the wire is the workers' chain's output.
        pattern = "all_reduce" if _common.dense(workers_rule) else "all_gather"
        timing = _common.clock(system, num_workers, workers_rule.bits,
                               lambda bits, size: clock_lib.sync(system, num_workers, bits,
                                                                 pattern))
        bound_kind = rule.bound_kind
    else:  # Two all-reduces a round: the P factors (and the dense leaves), the Q factors.
        timing = _common.clock(system, num_workers, collective.phase_bits,
                               lambda bits, size: clock_lib.periodic(
                                   system, num_workers, 1,
                                   {0: tuple(("all_reduce", b) for b in bits if b)}))
        bound_kind = "none" if collective.error_feedback else rule.bound_kind

    def owed(eta, tree):
        """What the model owes for `tree` held back: in gradient units at the server."""
        return tree if server is None else optimizers.scale(eta, tree)

    def init(params, key):
        rule.validate(params)
        shared = SyncShared(**_common.counters(params, key), params=_common.copy_params(params),
                            optimizer=() if server is None else server.init(params),
                            collective=() if collective is None else collective.init(
                                params, num_workers, base.derive_key(
                                    base.as_key(key), base.TAG_FACTORS, 0, 0)))
        return shared, SyncWorkers(workers_rule.init(params, num_workers))

    def view(index, worker, shared):
        del index, worker
        return shared.params

    def local(index, worker, grad, key, shared):
        del index
        sent, state = workers_rule.apply(grad, worker.rule, schedule(shared.round), key,
                                         shared.params)
        return SyncWorkers(state), sent

    def combine(shared, sent):
        eta = schedule(shared.round)
        if collective is None:
            step, compressed = jax.tree.map(consistency.worker_mean, sent.update), ()
        else:
            step, compressed = collective.reduce(sent.update, shared.collective)
        optimizer = shared.optimizer
        if server is not None:
            step, optimizer, _ = server.update(step, optimizer, Context(eta, None, shared.params))
            # u_hat folds in the update applied, not the workers' gradient-sized messages.
            sent = sent._replace(update_norm=consistency.tree_norm(step)[None])
        params = _common.apply(shared.params, step)
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(shared.params))
        dtype = stats.m_hat.dtype
        owed_mean = None if collective is None else collective.mean_residual(shared.collective)
        if owed_mean is not None:
            # PowerSGD's mean residual: a projection's remainder, not bounded (theory 13).
            sq_dists = consistency.tree_sq_norm(owed(eta, owed_mean)).astype(dtype)[None]
            bound_b, etabar = jnp.asarray(jnp.inf, dtype), eta
        elif sent.pending is None:
            # Every view is the model itself.
            sq_dists, bound_b, etabar = jnp.zeros((1,), dtype), jnp.zeros((), dtype), eta
        else:
            mean_pending = owed(eta, jax.tree.map(consistency.worker_mean, sent.pending))
            sq_dists = consistency.tree_sq_norm(mean_pending).astype(dtype)[None]
            _, residual = _common.bounds(workers_rule, stats, shared.params)
            # A residual in gradient units is owed at the current rate; one in
            # update units carries the rates of the rounds it was formed in.
            bound_b = bounds.sync_sgd(residual=residual)
            etabar = stats.eta_max if server is None else eta
        metrics = consistency.metrics(sq_dists, eta, bound_b, etabar)
        metrics.update(_common.metrics(
            workers_rule, stats, eta, sent, shared.params, params, num_workers,
            bits=None if collective is None else collective.bits(shared.params)))
        if owed_mean is not None:
            metrics["ef/residual_norm"] = jnp.max(jax.vmap(consistency.tree_norm)(
                compressed.residual)).astype(dtype)
        new_shared = shared._replace(round=shared.round + 1, params=params, stats=stats,
                                     optimizer=optimizer, collective=compressed)
        return new_shared, metrics

    def actual(state):
        return state.shared.params

    def auxiliary(state):
        if collective is not None:
            mean = collective.mean_residual(state.shared.collective)
        else:
            mean = _common.reduce_pending(workers_rule, state.workers.rule,
                                          consistency.worker_mean)
        if mean is None:
            return actual(state)
        return _common.apply(actual(state), owed(schedule(state.shared.round), mean))

    return base.algorithm("sync_sgd", num_workers, bound_kind, init=init, view=view,
                          local=local, auxiliary=auxiliary, actual=actual, rule=rule,
                          combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=_common.horizon(system), clock=timing)
