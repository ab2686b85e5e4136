"""Asynchronous shared-memory SGD with stale (consistent or inconsistent) reads.

Round semantics (docs/theory.md section 5): the `P` gradients of a round are
computed in parallel from iterates that existed before the round, then applied
one after another in worker order `0..P-1`, so the model advances `P` updates
per round. The `i`-th update of round `r` is update `t = r P + i`; it reads

    consistent reads:     v_t = X_{t - l},        l in [i, max_delay]
    inconsistent reads:   (v_t)_j = (X_{t - l_j})_j, one lag per coordinate

from a ring buffer of the last `max_delay + 1` iterates (a lag reaching before
update 0 reads `X_0`), and applies `X_{t+1} = X_t - u_t`, `u_t` the writer's
chain's output. With EF14 each worker keeps its residual `e^p` and the
auxiliary model is the virtual iterate `x = X - sum_p e^p`, which follows SGD
with the uncompressed gradients.

A continuous `staleness` `s` in [0, 1] interpolates each read between the
freshest one the round model allows (lag exactly `i`, i.e. `X_{rP}`, the
iterate at the start of the round) and the delayed one:
`v_t = (1 - s) X_{rP} + s X_{t - l}` (per coordinate for inconsistent reads).
`s = 1` (the default) is the delayed read, `s = 0` the recorded schedule
`lags[r, i] = i`; in between it is a differentiable stand-in for the discrete
lag (`ej.analysis`).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import base, bounds, chain, consistency, delays, validation
from elastic_jax.algorithms import _common


class AsyncWorkers(NamedTuple):
    rule: Any  # the chain's state, stacked [P, ...]


class AsyncShared(NamedTuple):
    round: jax.Array  # [] int32: rounds applied
    key: jax.Array  # [] typed key: the base key
    updates: jax.Array  # [] int32: updates applied, t = round * P
    history: Any  # pytree [max_delay + 1, ...]: X_s stored at s mod (max_delay + 1)
    stats: consistency.ConsistencyState
    # Inconsistent reads only (else None): this round's views [P, ...] and each
    # view's mean lag [P], drawn once, at the end of the previous round (or by
    # `init`), and read by both the gradients and `combine`'s distances.
    views: Any = None
    view_lags: jax.Array | None = None


def _current(shared: AsyncShared):
    """`X_t`, the newest iterate in the ring."""
    size = jax.tree.leaves(shared.history)[0].shape[0]
    return jax.tree.map(lambda h: h[shared.updates % size], shared.history)


def async_sgd(
    learning_rate,
    num_workers: int,
    max_delay: int,
    *,
    delay="uniform",
    reads: str = "consistent",
    rule=None,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    staleness=1.0,
    optimizer_placement: str = "worker",
) -> base.Algorithm:
    """Asynchronous shared-memory SGD with lags of at most `max_delay` updates.

    Update rule for update `t = r P + i` (worker `i` of round `r`):

        v_t = X_{t - l_t}  (per coordinate for inconsistent reads),  i <= l_t <= max_delay
        X_{t+1} = X_t - u_t,   u_t the chain's output: eta_r g(v_t), C(eta_r g(v_t)), ...

    Elastic consistency (`ej.bounds.async_sgd`): `B = max_delay U + P R` with
    the chain's bounds (`max_delay M` for plain SGD, `max_delay mu` compressed
    without error feedback, `M (max_delay (1 + rho) + P rho)` with EF14).

    With `staleness = s < 1` the view is `(1 - s) X_{rP} + s X_{t - l_t}`;
    `consistency/b_hat` measures the auxiliary model against this blended view
    (the one the gradient is taken at). The bound stays valid:
    `x_t - v_t = (1 - s)(x_t - X_{rP}) + s (x_t - X_{t - l_t})`, and both
    reads are allowed ones (lags `i` and `l_t`, each at most `max_delay`), so
    the norm is at most the larger of two distances the bound already covers.
    `delay/mean` reports the blended lag `(1 - s) i + s l_t`.

    Why `reads="consistent"` is the default: it is the simplest semantics (one
    lag per update) and the only one a recorded delay trace can replay; the
    paper's Hogwild setting is `reads="inconsistent"`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      max_delay: the largest lag, in updates; at least `P - 1`, since the
        `i`-th update of a round cannot see the `i` updates before it.
      delay: the delay law (`"uniform"`, `"fixed"`, `"geometric"`, an
        `ej.delays` law, or an integer trace `[rounds, P]`).
      reads: `"consistent"` (one lag per update) or `"inconsistent"` (one lag
        per coordinate); a trace needs consistent reads.
      rule: the per-worker chain (`ej.chain(...)`); exclusive with the
        shorthands `compressor`, `error_feedback`, `clip_norm` (as in
        `ej.sync_sgd`). EF21 is defined for synchronous SGD only.
      compressor: shorthand: a bare compressor applied to each update.
      error_feedback: shorthand: False, True (`beta = 1`) or a float `beta` in [0, 1].
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      staleness: `s` in [0, 1], a float or a traced value: how far each read
        goes from the freshest allowed one (`s = 0`) to the delayed one
        (`s = 1`, the default).
      optimizer_placement: `"worker"` only (each worker runs its chain's base
        optimizer); server placement is defined for `ej.sync_sgd`.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.async_sgd(0.05, num_workers=8, max_delay=8, reads="inconsistent",
      ...                    compressor=ej.top_k(fraction=0.01), error_feedback=True)
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    max_delay = validation.check_int("max_delay", max_delay, lo=0)
    if max_delay < num_workers - 1:
        validation.fail(
            "max_delay", max_delay,
            f"an integer >= num_workers - 1 = {num_workers - 1} (the i-th update of a round "
            "lags at least i updates)",
        )
    validation.check_choice("reads", reads, ("consistent", "inconsistent"))
    law = delays.resolve(delay)
    if law.lags is not None and reads != "consistent":
        validation.fail("reads", reads, "'consistent': a recorded delay trace has one lag "
                        "per update, not per coordinate")
    delays.check_trace(law, num_workers, max_delay, min_lags=jnp.arange(num_workers)[None])
    rule = chain.resolve(rule, compressor, error_feedback, clip_norm, "async_sgd")
    _common.check_placement(optimizer_placement)
    _common.check_staleness(staleness)
    size = max_delay + 1
    rounds_back = math.ceil(max_delay / num_workers)

    def init(params, key):
        rule.validate(params)
        shared = AsyncShared(**_common.counters(params, key),
                             updates=jnp.zeros((), jnp.int32),
                             history=_common.repeated(params, size))
        return shared._replace(**draw_views(shared)), AsyncWorkers(rule.init(params, num_workers))

    def draw_views(shared):
        """`{views, view_lags}` of the round `shared` is at, for inconsistent reads.

        A per-coordinate read costs a `P x d` random draw; it is made once per
        round and kept in the state (O(P d)) instead of once for the gradients
        and again for the distances.
        """
        if reads == "consistent":
            return {}
        views, lags = jax.vmap(read, in_axes=(0, None))(jnp.arange(num_workers), shared)
        return {"views": views, "view_lags": lags}

    def read(index, shared):
        """Worker `index`'s view and its mean effective lag, blended by `staleness`."""
        view, lag = read_delayed(index, shared)
        # The freshest allowed read has lag exactly `index`: X_{t - index} = X_{rP}.
        view = _common.blend(staleness, _current(shared), view)
        s = jnp.asarray(staleness).astype(lag.dtype)
        return view, (1 - s) * jnp.asarray(index).astype(lag.dtype) + s * lag

    def read_delayed(index, shared):
        """Worker `index`'s delayed view and its mean effective lag."""
        t = shared.updates + index
        key = base.derive_key(shared.key, base.TAG_DELAY, shared.round, index)
        if reads == "consistent":
            lag = law.sample(key, shared.round, index, index, max_delay, ())
            lag = jnp.minimum(lag, t)
            position = (t - lag) % size
            view = jax.tree.map(lambda h: h[position], shared.history)
            return view, lag.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(shared.history)
        view_leaves, lag_sum, count = [], jnp.zeros((), jnp.float32), 0
        for j, h in enumerate(leaves):
            lags = law.sample(jax.random.fold_in(key, j), shared.round, index, index,
                              max_delay, h.shape[1:])
            lags = jnp.minimum(lags, t)
            position = (t - lags) % size
            view_leaves.append(jnp.take_along_axis(h, position[None], axis=0)[0])
            lag_sum = lag_sum + jnp.sum(lags.astype(jnp.float32))
            count += math.prod(h.shape[1:])
        return jax.tree.unflatten(treedef, view_leaves), lag_sum / max(count, 1)

    def view(index, worker, shared):
        del worker
        if reads == "inconsistent":
            return jax.tree.map(lambda v: v[index], shared.views)
        return read(index, shared)[0]

    def local(index, worker, grad, key, shared):
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key,
                                 view(index, worker, shared))
        return AsyncWorkers(state), sent

    def combine(shared, sent):
        eta = schedule(shared.round)
        if reads == "inconsistent":
            views, lags = shared.views, shared.view_lags
        else:
            views, lags = jax.vmap(read, in_axes=(0, None))(jnp.arange(num_workers), shared)
        current = _current(shared)
        held = sent.pending is not None
        held_sum = jax.tree.map(consistency.worker_sum, sent.pending) if held else None
        positions = (shared.updates + 1 + jnp.arange(num_workers)) % size

        def apply_one(carry, inputs):
            x, held_sum, history = carry
            update, view_i, before, after, position = inputs
            aux = _common.apply(x, held_sum) if held else x
            sq = consistency.tree_sq_norm(jax.tree.map(lambda a, v: a - v, aux, view_i))
            x = _common.apply(x, update)
            if held:
                held_sum = jax.tree.map(lambda t, o, n: t - o + n, held_sum, before, after)
                history = jax.tree.map(
                    lambda h, xi: jax.lax.dynamic_update_index_in_dim(h, xi, position, 0),
                    history, x)
                return (x, held_sum, history), sq
            return (x, held_sum, history), (x, sq)

        # With error feedback each iterate is written into the ring inside the
        # loop; without, the iterates are stacked and scattered after it. Each is
        # the faster of the two there (benchmarks/README.md). The values are the
        # same either way.
        (new_params, _, history), ys = jax.lax.scan(
            apply_one, (current, held_sum, shared.history if held else None),
            (sent.update, views, sent.pending, sent.pending_after, positions),
        )
        if held:
            sq_dists = ys
        else:
            iterates, sq_dists = ys
            history = jax.tree.map(lambda h, it: h.at[positions].set(it), shared.history,
                                   iterates)
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(current))
        dtype = stats.m_hat.dtype
        update_b, residual_b = _common.bounds(rule, stats, current)
        bound_b = bounds.async_sgd(max_delay=max_delay, num_workers=num_workers,
                                   update=update_b, residual=residual_b)
        etabar = stats.eta_max if held else consistency.window_max(schedule, shared.round,
                                                                    rounds_back)
        metrics = consistency.metrics(sq_dists.astype(dtype), eta, bound_b, etabar)
        metrics.update(_common.metrics(rule, stats, eta, sent, current, new_params,
                                       num_workers))
        metrics["delay/mean"] = jnp.mean(lags).astype(dtype)
        new_shared = AsyncShared(shared.round + 1, shared.key, shared.updates + num_workers,
                                 history, stats)
        return new_shared._replace(**draw_views(new_shared)), metrics

    def actual(state):
        return _current(state.shared)

    def auxiliary(state):
        total = _common.reduce_pending(rule, state.workers.rule, consistency.worker_sum)
        return actual(state) if total is None else _common.apply(actual(state), total)

    return base.algorithm("async_sgd", num_workers, rule.bound_kind, init=init, view=view,
                          local=local, combine=combine, auxiliary=auxiliary, actual=actual,
                          rule=rule,                           max_rounds=law.num_rounds)
