"""Clock-driven asynchronous SGD: the order of writes and every lag emerge from the clock.

Semantics (docs/theory.md section 11). Each worker `p` reads the shared model,
computes a gradient at exactly the iterate it read, pushes its update and
reads again, never waiting: its `g`-th gradient takes the system's compute
time, its pull and push the network's. Writes are applied in arrival order
(ties go to the lower worker index; a worker reads immediately after its own
write, before later writes at the same instant), so which worker writes each
update, and how stale each read is, follow from the speeds: a worker 3x faster
writes about 3x as many updates. Write `t` makes version `t + 1`,

    X_{t+1} = X_t - u_t,    u_t the writer's chain output at its read X_{read(t)},

with lag `l_t = t - read(t)`. With the staleness policy `"drop"` and a cap
`max_delay`, an update whose lag exceeds the cap is discarded and its worker
reads afresh (as Ringmaster ASGD does).

Execution. The schedule does not depend on the parameters, so it is computed
first (`ej.clock`, float64 on the host) and executed exactly in *steps*: a
step is a group of consecutive writes of at most `slots` distinct writers whose
reads precede the group. The drivers evaluate all `P` workers' gradients at
their snapshots (the worker axis, as in every variant); the step applies its
writers' updates in order and masks the others (`updates/masked_fraction`), so
each round has a fixed trip count and `jax.grad` flows through a run. A round
is a step; `updates` counts the writes. State: the model and each worker's
read snapshot (`O(P d)`, replicated, as async SGD's ring of iterates), and the
chain's state (EF14's per-writer residuals).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
  A. Koloskova, S. U. Stich, M. Jaggi, "Sharper Convergence Guarantees for
  Asynchronous SGD for Distributed and Federated Learning", arXiv:2206.08307.
  R. Islamov, M. Safaryan, D. Alistarh, "AsGrad: A Sharp Unified Analysis of
  Asynchronous-SGD Algorithms", arXiv:2310.20452.
  A. Maranjyan, A. Tyurin, P. Richtarik, "Ringmaster ASGD: The First
  Asynchronous SGD with Optimal Time Complexity", arXiv:2501.16168.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import base, bounds, chain, consistency, validation
from elastic_jax import clock as clock_lib
from elastic_jax.algorithms import _common

POLICIES = ("none", "drop")


class ClockWorkers(NamedTuple):
    rule: Any  # the chain's state, stacked [P, ...]


class ClockShared(NamedTuple):
    round: jax.Array  # [] int32: executor steps applied
    key: jax.Array  # [] typed key: the base key
    params: Any  # the actual model X (the shared memory)
    snapshots: Any  # pytree [P, ...]: the model each worker read last
    stats: consistency.ConsistencyState


def clock_async_sgd(
    learning_rate,
    num_workers: int,
    *,
    system,
    staleness_policy: str = "none",
    max_delay: int | None = None,
    slots: int | None = None,
    rule=None,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    optimizer_placement: str = "worker",
) -> base.Algorithm:
    """Asynchronous SGD whose writers and lags emerge from a simulated clock.

    Update rule for write `t` (module docstring), in steps of at most `slots`
    writes:

        X_{t+1} = X_t - u_t,    u_t = the chain's output for g(X_{t - l_t}),

    the lags `l_t` and writers given by the clock. Elastic consistency
    (`ej.bounds.async_sgd`): `B = L U + P R` with the chain's bounds (`U =
    M / (1 - mu)` under momentum, docs/theory.md section 9), `L` the
    cap `max_delay` under `"drop"`, or under `"none"` the largest lag of the
    run so far (reported as `delay/max`: the bound holds for the lags seen,
    not for lags to come). The bound's `etabar` is the largest learning rate so
    far.

    Each worker's batch (`ej.run(batch_fn=...)`; stacked batches are refused)
    and chain draws are keyed by its own gradient count, `derive_key(base,
    TAG_DATA, count, p)`, so a gradient is the same whatever the step it is
    applied in. The learning rate is the schedule's at the step. Metrics, besides
    async SGD's: `updates` (writes applied so far), `updates/dropped`,
    `updates/masked_fraction` (the share of the step's `P` gradient evaluations
    that are not applied), `delay/max`, and the clock's `time/*`, `comm/seconds`
    (a step ends at its last write).

    Args:
      learning_rate: a non-negative float or an optax schedule of the step.
      num_workers: `P >= 1`.
      system: an `ej.clock.system(...)` (the writes are simulated: a pull of
        `32 d` bits, the gradient, a push of the chain's bits), or
        `ej.clock.replay(events)`, a recorded run replayed exactly.
      staleness_policy: `"none"` (every update is applied) or `"drop"` (an
        update staler than `max_delay` is discarded; drops are counted).
      max_delay: the cap, an integer `>= P - 1`, with `"drop"` only (default
        `P - 1`).
      slots: the most writes one step applies, in `[1, P]`; default `P`.
      rule: the per-worker chain (`ej.chain(...)`); exclusive with the
        shorthands `compressor`, `error_feedback`, `clip_norm` (as in
        `ej.sync_sgd`). EF21 is defined for synchronous SGD only.
      compressor: shorthand: a bare compressor applied to each update.
      error_feedback: shorthand: False, True (`beta = 1`) or a float `beta` in [0, 1].
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      optimizer_placement: `"worker"` only (each worker runs its chain's base
        optimizer, its state advancing with the worker's own writes); server
        placement is defined for `ej.sync_sgd`.

    Returns:
      An `ej.Algorithm`; a run may not go beyond the system's rounds (a
      record's: the steps its writes make).

    Example:
      >>> system = ej.clock.system(ej.clock.exponential(0.01), rounds=200,
      ...                          slowdown=[1, 1, 1, 3])
      >>> alg = ej.clock_async_sgd(0.05, 4, system=system, staleness_policy="drop",
      ...                          max_delay=8, compressor=ej.top_k(fraction=0.1),
      ...                          error_feedback=True)
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    validation.check_choice("staleness_policy", staleness_policy, POLICIES)
    drop = staleness_policy == "drop"
    if drop:
        max_delay = num_workers - 1 if max_delay is None else validation.check_int(
            "max_delay", max_delay, lo=0)
        if max_delay < num_workers - 1:
            validation.fail("max_delay", max_delay, f"an integer >= num_workers - 1 = "
                            f"{num_workers - 1} with staleness_policy='drop' (a step of P "
                            "writes lags up to P - 1)")
    elif max_delay is not None:
        validation.fail("max_delay", max_delay, "None with staleness_policy='none' (the cap "
                        "applies to 'drop')")
    if slots is None:
        slots = num_workers
    elif validation.check_int("slots", slots, lo=1) > num_workers:
        validation.fail("slots", slots, f"at most num_workers = {num_workers}")
    if not isinstance(system, clock_lib.System | clock_lib.Record):
        validation.fail("system", system, "an ej.clock.system(...) or ej.clock.replay(events)")
    rule = chain.resolve(rule, compressor, error_feedback, clip_norm, "clock_async_sgd")
    _common.check_placement(optimizer_placement)
    if isinstance(system, clock_lib.Record):
        if drop:
            validation.fail("staleness_policy", staleness_policy,
                            "'none' with a recorded run (its writes are given)")
        recorded = clock_lib.recorded_writes(system.events, num_workers)
        rounds = clock_lib.steps(recorded.writer, recorded.read, slots).size - 1

        def timeline(bits, size):
            del bits, size
            return clock_lib.asynchronous(recorded, num_workers, rounds, slots)
    else:
        clock_lib.check(system, num_workers)
        rounds = system.rounds

        def timeline(bits, size):
            writes = clock_lib.simulate_writes(
                system, num_workers, writes=rounds * slots + 1, push_bits=bits,
                pull_bits=32 * size, max_delay=max_delay if drop else None)
            return clock_lib.asynchronous(writes, num_workers, rounds, slots)

    timing = _common.clock(system, num_workers, rule.bits, timeline, replays=True)

    def table(shared, name):
        return jnp.asarray(timing(shared.params).tables[name])[shared.round]

    def init(params, key):
        rule.validate(params)
        shared = ClockShared(**_common.counters(params, key),
                             params=_common.copy_params(params),
                             snapshots=_common.repeated(params, num_workers))
        return shared, ClockWorkers(rule.init(params, num_workers))

    def view(index, worker, shared):
        del worker
        return jax.tree.map(lambda s: s[index], shared.snapshots)

    def local(index, worker, grad, key, shared):
        writes = table(shared, "writes")[index]
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key,
                                 view(index, worker, shared))
        # A worker that does not write in this step keeps its chain's state.
        state = jax.tree.map(lambda n, o: jnp.where(writes, n, o), state, worker.rule)
        return ClockWorkers(state), sent

    def combine(shared, sent):
        eta = schedule(shared.round)
        order, live = table(shared, "order"), table(shared, "live")
        writes, snapshot = table(shared, "writes"), table(shared, "snapshot")
        held = sent.pending is not None
        by_slot = lambda tree: None if tree is None else jax.tree.map(  # noqa: E731
            lambda x: x[order], tree)
        held_sum = jax.tree.map(consistency.worker_sum, sent.pending) if held else None

        def apply_one(carry, inputs):
            x, held_sum = carry
            update, view_j, before, after, on = inputs
            aux = _common.apply(x, held_sum) if held else x
            sq = consistency.tree_sq_norm(jax.tree.map(lambda a, v: a - v, aux, view_j))
            x = jax.tree.map(lambda new, old: jnp.where(on, new, old), _common.apply(x, update),
                             x)
            if held:
                held_sum = jax.tree.map(lambda h, o, n: jnp.where(on, h - o + n, h), held_sum,
                                        before, after)
            return (x, held_sum), (x, sq)

        (new_params, _), (iterates, sq_dists) = jax.lax.scan(
            apply_one, (shared.params, held_sum),
            (by_slot(sent.update), by_slot(shared.snapshots), by_slot(sent.pending),
             by_slot(sent.pending_after), live))
        # A worker reads the model after the `snapshot`-th write of the step.
        models = jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs]), shared.params,
                              iterates)
        position = jnp.maximum(snapshot, 0)
        snapshots = jax.tree.map(
            lambda old, xs: jnp.where(
                jnp.reshape(snapshot >= 0, (-1,) + (1,) * (old.ndim - 1)), xs[position], old),
            shared.snapshots, models)
        stats = _common.observe(shared.stats, sent, eta, live=writes,
                                measure_update=rule.measures_update(shared.params))
        dtype = stats.m_hat.dtype
        update_b, residual_b = _common.bounds(rule, stats, shared.params)
        lag_bound = max_delay if drop else table(shared, "lag_bound")
        bound_b = bounds.async_sgd(max_delay=jnp.asarray(lag_bound, dtype),
                                   num_workers=num_workers, update=update_b,
                                   residual=residual_b)
        metrics = consistency.metrics(sq_dists.astype(dtype), eta, bound_b, stats.eta_max,
                                      live=live)
        metrics.update(_common.metrics(rule, stats, eta, sent, shared.params, new_params,
                                       jnp.sum(live), live=writes))
        new_shared = shared._replace(round=shared.round + 1, params=new_params,
                                     snapshots=snapshots, stats=stats)
        return new_shared, metrics

    def actual(state):
        return state.shared.params

    def auxiliary(state):
        total = _common.reduce_pending(rule, state.workers.rule, consistency.worker_sum)
        return actual(state) if total is None else _common.apply(actual(state), total)

    def gradient_count(shared, index):
        return table(shared, "counts")[index]

    return base.algorithm("clock_async_sgd", num_workers, rule.bound_kind, init=init,
                          view=view, local=local, auxiliary=auxiliary, actual=actual,
                          rule=rule, combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=rounds, clock=timing, gradient_count=gradient_count)
