"""Message-passing SGD: every node keeps its own view; messages are delayed, dropped, lost.

Round semantics (docs/theory.md section 5). In round `r` every live node `p`
computes its gradient at its own view and broadcasts its update `u_r^p`. A node
applies its own message at once; a message of round `s` with delay
`k in [0, max_delay]` (drawn by the delay law per sender and receiver) is
applied by its receiver before round `s + 1 + k`. Messages of round `s` are
weighted by `1 / n_s`, the nodes alive at the start of round `s`. A dropped
message is retransmitted and arrives before round `s + 1 + max_delay`, or is
lost forever (`retransmit=False`). A node crashing at round `c` takes part in
round `c`, its round-`c` message reaches each surviving node independently with
probability 1/2, and from round `c + 1` it computes and sends nothing.

The auxiliary model `x` counts every message that reached at least one other
live node (every message sent, under permanent drops). Node `q`'s view is
represented exactly as `v^q = x + L^q + pending^q`, where `pending^q` are the
counted messages of the last `max_delay + 1` rounds `q` has not applied yet and
`L^q` accumulates the counted messages `q` will never receive; so
`x - v^q = -(L^q + pending^q)` is measured without cancellation, and with no
delay and no faults every view is `x` itself (the run is `sync_sgd`'s).

A continuous `staleness` `s` in [0, 1] interpolates each view between the
freshest one (every message delivered: `x` itself, gap 0) and the delayed
one: `v^q = (1 - s) x + s (x + L^q + pending^q) = x + s (L^q + pending^q)`.
Only the point where gradients are taken changes: which messages the network
delivers, `ej.model` and the `comm/`, `delay/` and `faults/` metrics do not.

State memory: the messages of the last `max_delay + 1` rounds (`O(max_delay P d)`),
their arrival table (`O(max_delay P^2)` integers), every node's pending sum
(`O(P d)`, computed once per round), `L` (`O(P d)`, only when a message can be
lost) and residuals (`O(P d)`, error feedback).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, bounds, chain, consistency, delays, validation
from elastic_jax import clock as clock_lib
from elastic_jax.algorithms import _common

NEVER = np.iinfo(np.int32).max  # crash round of a node that never crashes
LOST = -1  # arrival of a counted message that will never reach its receiver


class MessagePassingWorkers(NamedTuple):
    lost: Any  # pytree [P, ...] or None: L^q, counted messages q will never receive
    rule: Any  # the chain's state, stacked [P, ...]


class MessagePassingShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # the auxiliary model built from the counted (compressed) messages
    messages: Any  # pytree [D + 1, P, ...]: round s's messages in slot s mod (D + 1)
    arrival: jax.Array  # [D + 1, P, P] int32: round before which (sender, receiver) applies
    slot_alive: jax.Array  # [D + 1] float: n_s, the nodes alive at the start of round s
    crash_round: jax.Array  # [P] int32: the round each node crashes at (NEVER if none)
    stats: consistency.ConsistencyState
    pending: Any  # pytree [P, ...]: pending^q of every node at this round (`pending_gaps`)


def _live(shared: MessagePassingShared):
    """`[P]` booleans: the nodes alive at the start of the current round."""
    return shared.crash_round >= shared.round


def _gap(shared: MessagePassingShared, index, lost):
    """`v^q - x = L^q + pending^q` for node `index` (its own `lost` row, or None)."""
    gap = jax.tree.map(lambda g, x: g[index].astype(x.dtype), shared.pending, shared.params)
    if lost is not None:
        gap = jax.tree.map(lambda g, lost_: g + lost_.astype(g.dtype), gap, lost)
    return gap


def _live_mean(live, tree):
    """The mean over live nodes of a `[P, ...]` pytree, as a bitwise-stable fold."""
    count = jnp.maximum(jnp.sum(live), 1)
    return jax.tree.map(lambda x: consistency.divide(
        consistency.worker_sum(jnp.where(_expand(live, x.ndim), x, 0)), count), tree)


def _expand(mask, ndim):
    return jnp.reshape(mask, mask.shape + (1,) * (ndim - mask.ndim))


def pending_gaps(round_, messages, arrival, slot_alive):
    """`pending^q` for every node `q` at `round_`, as one product per leaf.

    `pending^q = sum_{s, p} [message (s, p) not yet applied by q] u_s^p / n_s`
    (a message is pending while its arrival is after `round_`, or `LOST` until
    its slot leaves the window): a `[P, (D + 1) P] x [(D + 1) P, d]` product,
    computed once per round (at the end of the previous round's `combine`) and
    read by `view`, `local` and the metrics. A sum of messages only, so the gap
    `x - v^q` is measured without cancellation.
    """
    size, num = arrival.shape[0], arrival.shape[1]
    pending = (arrival > round_) | (arrival == LOST)  # [D + 1, P senders, P receivers]

    def one(buffer):
        inv = jnp.ones((), buffer.dtype) / slot_alive.astype(buffer.dtype)
        weights = jnp.where(pending, inv[:, None, None], 0).reshape(size * num, num)
        flat = buffer.reshape(size * num, -1)
        out = jax.lax.dot_general(weights, flat, (((0,), (0,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST)
        return out.reshape((num,) + buffer.shape[2:]).astype(buffer.dtype)

    return jax.tree.map(one, messages)


def _crash_table(crashes, crash_horizon, num_workers):
    """Validates `crashes` and returns `(count, explicit rounds [P] or None)`."""
    if crashes is None:
        return 0, None
    if isinstance(crashes, numbers.Integral) and not isinstance(crashes, bool):
        count = validation.check_int("crashes", crashes, lo=0, hi=num_workers - 1)
        if count > 0:
            if crash_horizon is None:
                validation.fail("crash_horizon", None, "an integer >= 2 when crashes is a count "
                                "(crash rounds are drawn uniformly in [1, crash_horizon))")
            validation.check_int("crash_horizon", crash_horizon, lo=2)
        return count, None
    try:
        pairs = [(int(w), int(r)) for w, r in crashes]
    except (TypeError, ValueError):
        validation.fail("crashes", crashes, "a count or a list of (worker, round) pairs")
    if len(pairs) > num_workers - 1:
        validation.fail("crashes", crashes, f"at most num_workers - 1 = {num_workers - 1} "
                        "crashes (one node must survive)")
    rounds = np.full((num_workers,), NEVER, np.int64)
    for worker, round_ in pairs:
        if not 0 <= worker < num_workers:
            validation.fail("crashes", crashes,
                            f"workers in [0, {num_workers - 1}]; got worker {worker}")
        if round_ < 0 or round_ >= NEVER:
            validation.fail("crashes", crashes, f"crash rounds in [0, {NEVER - 1}]; got {round_}")
        if rounds[worker] != NEVER:
            validation.fail("crashes", crashes, f"distinct workers; worker {worker} repeats")
        rounds[worker] = round_
    return len(pairs), rounds.astype(np.int32)


def message_passing_sgd(
    learning_rate,
    num_workers: int,
    *,
    max_delay: int = 0,
    delay="uniform",
    drop_prob: float = 0.0,
    retransmit: bool = True,
    crashes=None,
    crash_horizon: int | None = None,
    rule=None,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    staleness=1.0,
    optimizer_placement: str = "worker",
    system=None,
) -> base.Algorithm:
    """Message-passing SGD with bounded delays, drops and crash faults.

    Update rule (round `r`, node `q`, messages `u_s^p` as in `sync_sgd`):

        v^q_{r+1} = v^q_r - u_r^q / n_r - sum_{(s, p) arriving before r + 1} u_s^p / n_s
        x_{r+1}   = x_r - (1 / n_r) sum_{p counted} u_r^p

    Elastic consistency (`ej.bounds.message_passing_sgd`), with the chain's
    bounds `U` on a message and `R` on a residual:
    `B = max_delay (1 - 1/P) U + R + f U / (P - f + 1)`; none (`inf`) under
    permanent drops.

    With `staleness = s < 1` the views are `x + s (L^q + pending^q)` and
    `consistency/b_hat` measures the auxiliary model against them (the views
    `ej.views` returns): without error feedback `||x - v^q||` is exactly `s`
    times the delayed gap, with it `||s gap^q + mean_p e^p||` is at most
    `s ||gap^q|| + ||mean_p e^p||`, so the bound stays valid.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      max_delay: the largest message delay, in rounds (>= 0).
      delay: the delay law of each (sender, receiver, round) message.
      drop_prob: the probability that a message to a receiver is dropped, in [0, 1).
      retransmit: whether a dropped message is retransmitted (arriving at the
        latest allowed round) or lost forever.
      crashes: None, a count `f < P` (workers by a permutation from the key,
        rounds uniform in `[1, crash_horizon)`), or a list of `(worker, round)`.
      crash_horizon: required with a crash count.
      rule: the per-worker chain (`ej.chain(...)`); exclusive with the
        shorthands below (as in `ej.sync_sgd`; each node keeps its own chain
        state, e.g. its residual).
      compressor: shorthand: a bare compressor applied to each message.
      error_feedback: shorthand: False, True (`beta = 1`) or a float `beta` in [0, 1].
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      staleness: `s` in [0, 1], a float or a traced value: how far each view
        goes from `x` (`s = 0`, every message delivered) to the delayed view
        (`s = 1`, the default).
      optimizer_placement: `"worker"` only (each worker runs its chain's base
        optimizer); server placement is defined for `ej.sync_sgd`.
      system: None, or an `ej.clock.system(...)`: the delays then emerge from
        the clock instead of `delay` (which is not read): node `q` starts
        round `r` once it has ended round `r - 1` and every other node's
        message of rounds `<= r - 1 - max_delay` has arrived (a broadcast on
        the sender's uplink), and applies each message before the first round
        it starts after its arrival (docs/theory.md section 11); each round
        reports `time/*` and `comm/seconds`. The clock models a reliable
        network of live nodes: no drops, no crashes. The run may not go beyond
        the system's rounds.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.message_passing_sgd(0.1, 8, max_delay=4, crashes=2, crash_horizon=100)
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    max_delay = validation.check_int("max_delay", max_delay, lo=0)
    law = delays.resolve(delay)
    if law.lags is not None:
        validation.fail("delay", validation.Text("a recorded trace"),
                        "'fixed', 'uniform', 'geometric' or a DelayLaw: message delays are "
                        "drawn per sender and receiver")
    validation.check_real("drop_prob", drop_prob, lo=0.0, hi=1.0, hi_open=True)
    if not isinstance(retransmit, bool):
        validation.fail("retransmit", retransmit, "a bool")
    num_crashes, explicit_rounds = _crash_table(crashes, crash_horizon, num_workers)
    rule = chain.resolve(rule, compressor, error_feedback, clip_norm, "message_passing_sgd")
    _common.check_placement(optimizer_placement)
    if system is not None:
        if validation.concrete_number(drop_prob) != 0.0:
            validation.fail("drop_prob", drop_prob, "0 with system= (the clock models a "
                            "reliable network)")
        if num_crashes:
            validation.fail("crashes", crashes, "None with system= (the clock models live "
                            "nodes)")
    timing = _common.clock(system, num_workers, rule.bits,
                           lambda bits, size: clock_lib.message_passing(system, num_workers,
                                                                        bits, max_delay))
    _common.check_staleness(staleness)
    drop_value = validation.concrete_number(drop_prob)
    may_drop = drop_value is None or drop_value > 0.0
    permanent = may_drop and not retransmit
    may_lose = permanent or num_crashes > 0
    size = max_delay + 1

    def init(params, key):
        rule.validate(params)
        common = _common.counters(params, key)
        key = common["key"]
        dtype = jnp.result_type(*jax.tree.leaves(params))
        if explicit_rounds is not None:
            crash_round = jnp.asarray(explicit_rounds)
        elif num_crashes > 0:
            fault_key = base.derive_key(key, base.TAG_FAULT, 0, num_workers)
            order = jax.random.permutation(jax.random.fold_in(fault_key, 0), num_workers)
            rounds = jax.random.randint(jax.random.fold_in(fault_key, 1), (num_crashes,), 1,
                                        crash_horizon, jnp.int32)
            crash_round = jnp.full((num_workers,), NEVER, jnp.int32).at[
                order[:num_crashes]].set(rounds)
        else:
            crash_round = jnp.full((num_workers,), NEVER, jnp.int32)
        shared = MessagePassingShared(
            params=_common.copy_params(params),
            messages=consistency.wide_zeros(params, (size, num_workers)),
            arrival=jnp.zeros((size, num_workers, num_workers), jnp.int32),
            slot_alive=jnp.ones((size,), dtype),
            crash_round=crash_round,
            pending=consistency.wide_zeros(params, (num_workers,)),
            **common,
        )
        lost = consistency.wide_zeros(params, (num_workers,)) if may_lose else None
        return shared, MessagePassingWorkers(lost, rule.init(params, num_workers))

    def view(index, worker, shared):
        gap = _common.scale_gap(staleness, _gap(shared, index, worker.lost))
        return jax.tree.map(lambda x, g: (x + g.astype(x.dtype)).astype(x.dtype),
                            shared.params, gap)

    def local(index, worker, grad, key, shared):
        eta = schedule(shared.round)
        alive = shared.crash_round[index] >= shared.round
        gap = _common.scale_gap(staleness, _gap(shared, index, worker.lost))
        own_view = jax.tree.map(lambda x, g: (x + g.astype(x.dtype)).astype(x.dtype),
                                shared.params, gap)
        sent, state = rule.apply(grad, worker.rule, eta, key, own_view)
        # A crashed node computes and sends nothing: its chain keeps its state.
        state = jax.tree.map(lambda n, o: jnp.where(alive, n, o), state, worker.rule)
        lost = worker.lost
        if lost is not None:
            # The slot the combine is about to overwrite leaves the window: its
            # messages lost to this node move into L.
            slot = shared.round % size
            leaving = (shared.arrival[slot, :, index] == LOST)
            n_slot = shared.slot_alive[slot]

            def absorb(acc, buffer):
                kept = jnp.where(_expand(leaving, buffer.ndim - 1), buffer[slot], 0)
                return acc + consistency.divide(consistency.worker_sum(kept), n_slot).astype(
                    acc.dtype)

            lost = jax.tree.map(absorb, lost, shared.messages)
        sent = sent._replace(
            update=jax.tree.map(lambda u: jnp.where(alive, u, 0), sent.update),
            pending_after=None,
            grad_norm=jnp.where(alive, sent.grad_norm, 0),
            update_norm=jnp.where(alive, sent.update_norm, 0),
            pending_norm=jnp.where(alive, sent.pending_norm, 0),
        )
        extra = consistency.tree_sq_norm(gap) if sent.pending is None else gap
        return MessagePassingWorkers(lost, state), (sent, extra)

    def draws(shared):
        """The round's delays `[P, P]`, drops `[P, P]` and crash recipients `[P, P]`."""
        round_ = shared.round

        def per_sender(p):
            delay_key = base.derive_key(shared.key, base.TAG_DELAY, round_, p)
            fault_key = base.derive_key(shared.key, base.TAG_FAULT, round_, p)
            if timing is not None:  # The clock's delays (senders by receivers).
                k = jnp.asarray(timing(shared.params).delays)[round_, p]
            else:
                k = jax.vmap(lambda q: law.sample(jax.random.fold_in(delay_key, q), round_, p,
                                                  0, max_delay, ()))(jnp.arange(num_workers))
            dropped = jax.random.bernoulli(jax.random.fold_in(fault_key, 0), drop_prob,
                                           (num_workers,))
            reached = jax.random.bernoulli(jax.random.fold_in(fault_key, 1), 0.5, (num_workers,))
            return k.astype(jnp.int32), dropped, reached

        return jax.vmap(per_sender)(jnp.arange(num_workers))

    def combine(shared, inputs):
        sent, extra = inputs
        eta = schedule(shared.round)
        round_ = shared.round
        dtype = shared.stats.m_hat.dtype
        live = _live(shared)
        n_alive = jnp.sum(live)
        crashing = shared.crash_round == round_
        survivors = shared.crash_round > round_
        others = ~jnp.eye(num_workers, dtype=bool)
        k, dropped, reached = draws(shared)
        if not may_drop:
            dropped = jnp.zeros_like(dropped)
        receivers = survivors[None, :] & others
        # A crashing node's last message reaches each survivor with probability 1/2.
        reach = live[:, None] & receivers & jnp.where(crashing[:, None], reached, True)
        got = reach if retransmit else reach & ~dropped
        # Counted if it reached at least one other live node; a live, non-crashing
        # sender's message always counts (under permanent drops too).
        counted = live & (~crashing | jnp.any(got, axis=1))
        effective = jnp.where(dropped & retransmit, max_delay, k)
        arrival = jnp.where(
            got, round_ + 1 + effective,
            jnp.where(counted[:, None] & receivers, LOST, 0),
        ).astype(jnp.int32)
        # Own messages are applied at once: never pending.
        total = jax.tree.map(
            lambda u: consistency.worker_sum(jnp.where(_expand(counted, u.ndim), u, 0)),
            sent.update)
        params = jax.tree.map(
            lambda x, t: (x - consistency.divide(t, n_alive).astype(x.dtype)).astype(x.dtype),
            shared.params, total)
        slot = round_ % size
        messages = jax.tree.map(
            lambda buf, u: buf.at[slot].set(jnp.where(_expand(live, u.ndim), u, 0).astype(
                buf.dtype)), shared.messages, sent.update)
        new_arrival = shared.arrival.at[slot].set(arrival)
        slot_alive = shared.slot_alive.at[slot].set(n_alive.astype(shared.slot_alive.dtype))
        stats = _common.observe(shared.stats, sent, eta, live,
                                measure_update=rule.measures_update(shared.params))
        if sent.pending is None:
            sq = extra
        else:
            mean_held = _live_mean(live, sent.pending)
            sq = jax.lax.map(lambda g: consistency.tree_sq_norm(jax.tree.map(
                lambda gi, e: gi + e.astype(gi.dtype), g, mean_held)), extra)
        if permanent:
            bound_b = jnp.asarray(jnp.inf, dtype)
        else:
            update_b, residual_b = _common.bounds(rule, stats, shared.params)
            window = consistency.window_max(schedule, round_, max_delay)
            bound_b = bounds.message_terms(
                max_delay, num_workers, update_b, residual_b, num_crashes,
                stats.eta_max if rule.holds_back else window, stats.eta_max)
        metrics = consistency.metrics(sq.astype(dtype), eta, bound_b, 1.0, live=live)
        metrics.update(_common.metrics(rule, stats, eta, sent, shared.params, params, n_alive,
                                       live=live))
        delivered_now = (new_arrival == round_ + 1) & survivors[None, None, :]
        metrics["comm/messages_delivered"] = jnp.sum(delivered_now).astype(dtype)
        sent_to = live[:, None] & receivers
        metrics["comm/messages_dropped"] = jnp.sum(dropped & sent_to).astype(dtype)
        metrics["faults/alive"] = n_alive.astype(dtype)
        n_got = jnp.maximum(jnp.sum(got), 1)
        metrics["delay/mean"] = (jnp.sum(jnp.where(got, effective, 0)) / n_got).astype(dtype)
        new_shared = MessagePassingShared(
            round_ + 1, shared.key, params, messages, new_arrival, slot_alive,
            shared.crash_round, stats,
            pending_gaps(round_ + 1, messages, new_arrival, slot_alive))
        return new_shared, metrics

    def actual(state):
        """The mean of the live nodes' models."""
        shared, lost = state.shared, state.workers.lost
        gaps = jax.vmap(lambda q, row: _gap(shared, q, row))(
            jnp.arange(num_workers), lost) if lost is not None else jax.vmap(
            lambda q: _gap(shared, q, None))(jnp.arange(num_workers))
        mean_gap = _live_mean(_live(shared), gaps)
        return jax.tree.map(lambda x, g: x + g, shared.params, mean_gap)

    def auxiliary(state):
        held = rule.pending(state.workers.rule)
        if held is None:
            return state.shared.params
        return _common.apply(state.shared.params, _live_mean(_live(state.shared), held))

    kind = "none" if permanent else rule.bound_kind
    return base.algorithm("message_passing_sgd", num_workers, kind, init=init, view=view,
                          local=local, auxiliary=auxiliary, actual=actual, rule=rule,
                          combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=_common.horizon(system), clock=timing)
