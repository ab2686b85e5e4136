"""Asynchronous shared-memory SGD with stale (consistent or inconsistent) reads.

Round semantics (docs/theory.md section 5): the `P` gradients of a round are
computed in parallel from iterates that existed before the round, then applied
one after another in worker order `0..P-1`, so the model advances `P` updates
per round. The `i`-th update of round `r` is update `t = r P + i`; it reads

    consistent reads:     v_t = X_{t - l},        l in [i, max_delay]
    inconsistent reads:   (v_t)_j = (X_{t - l_j})_j, one lag per coordinate

from a ring buffer of the last `max_delay + 1` iterates (a lag reaching before
update 0 reads `X_0`), and applies `X_{t+1} = X_t - u_t`. With error feedback
each worker keeps its residual `e^p` and the auxiliary model is the virtual
iterate `x = X - sum_p e^p`, which follows SGD with the uncompressed gradients.

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

from elastic_jax import bounds, consistency, core, delays, validation
from elastic_jax.algorithms import _common


class WorkerState(NamedTuple):
    residual: Any  # pytree [P, ...] or None: error-feedback residuals e^p


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

    def actual(self, workers: WorkerState):
        size = jax.tree.leaves(self.history)[0].shape[0]
        return jax.tree.map(lambda h: h[self.updates % size], self.history)

    def auxiliary(self, workers: WorkerState):
        current = self.actual(workers)
        if workers.residual is None:
            return current
        total = jax.tree.map(consistency.worker_sum, workers.residual)
        return _common.apply(current, total)


def async_sgd(
    learning_rate,
    num_workers: int,
    max_delay: int,
    *,
    delay="uniform",
    reads: str = "consistent",
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    staleness=1.0,
) -> core.Algorithm:
    """Asynchronous shared-memory SGD with lags of at most `max_delay` updates.

    Update rule for update `t = r P + i` (worker `i` of round `r`):

        v_t = X_{t - l_t}  (per coordinate for inconsistent reads),  i <= l_t <= max_delay
        X_{t+1} = X_t - u_t,   u_t = eta_r g(v_t), C(eta_r g(v_t)) or EF14's C(e + eta_r g)

    Elastic consistency (`ej.bounds.async_sgd`): `B = max_delay M`, or
    `max_delay mu` compressed without error feedback, or
    `M (max_delay (1 + rho) + P rho)` with error feedback.

    With `staleness = s < 1` the view is `(1 - s) X_{rP} + s X_{t - l_t}`;
    `consistency/b_hat` measures the auxiliary model against this blended view
    (the one the gradient is taken at, `alg.views`). The bound stays valid:
    `x_t - v_t = (1 - s)(x_t - X_{rP}) + s (x_t - X_{t - l_t})`, and both
    reads are allowed ones (lags `i` and `l_t`, each at most `max_delay`), so
    the norm is at most the larger of two distances the bound already covers.
    `delay/mean` reports the blended lag `(1 - s) i + s l_t`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`.
      max_delay: the largest lag, in updates; at least `P - 1`, since the
        `i`-th update of a round cannot see the `i` updates before it.
      delay: the delay law (`"uniform"`, `"fixed"`, `"geometric"`, an
        `ej.delays` law, or an integer trace `[rounds, P]`).
      reads: `"consistent"` (one lag per update) or `"inconsistent"` (one lag
        per coordinate); a trace needs consistent reads.
      compressor: a bare compressor applied to each update, or None.
      error_feedback: False, True (`beta = 1`) or a float `beta` in [0, 1].
      clip_norm: clip each gradient to this global norm (> 0).
      staleness: `s` in [0, 1], a float or a traced value: how far each read
        goes from the freshest allowed one (`s = 0`) to the delayed one
        (`s = 1`, the default; the Python float 1.0 runs the unblended code).

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.async_sgd(0.05, num_workers=8, max_delay=8, reads="inconsistent",
      ...                    compressor=ej.top_k(fraction=0.01), error_feedback=True)
    """
    schedule = validation.as_schedule(learning_rate)
    num_workers = validation.check_int("num_workers", num_workers, lo=1)
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
    rule = _common.make_rule(compressor, error_feedback, clip_norm)
    _common.check_staleness(staleness)
    blended = not _common.is_literal_one(staleness)
    size = max_delay + 1
    rounds_back = math.ceil(max_delay / num_workers)

    def init_fn(params, key):
        rule.validate(params)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        history = jax.tree.map(
            lambda x: jnp.broadcast_to(jnp.asarray(x), (size,) + jnp.shape(x)).copy(), params
        )
        shared = AsyncShared(
            round=jnp.zeros((), jnp.int32),
            key=core.as_key(key),
            updates=jnp.zeros((), jnp.int32),
            history=history,
            stats=consistency.init(dtype),
        )
        return core.State(shared._replace(**draw_views(shared)),
                          WorkerState(_common.init_residual(rule, params, num_workers)))

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
        """Worker `index`'s view and its mean effective lag (blended when `s != 1`)."""
        view, lag = read_delayed(index, shared)
        if not blended:
            return view, lag
        # The freshest allowed read has lag exactly `index`: X_{t - index} = X_{rP}.
        view = _common.blend(staleness, shared.actual(None), view)
        s = jnp.asarray(staleness).astype(lag.dtype)
        return view, (1 - s) * jnp.asarray(index).astype(lag.dtype) + s * lag

    def read_delayed(index, shared):
        """Worker `index`'s delayed view and its mean effective lag."""
        t = shared.updates + index
        key = core.derive_key(shared.key, core.TAG_DELAY, shared.round, index)
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

    def view_fn(index, worker, shared):
        del worker
        if reads == "inconsistent":
            return jax.tree.map(lambda v: v[index], shared.views)
        return read(index, shared)[0]

    def local_fn(index, worker, grad, key, shared):
        del index
        eta = schedule(shared.round)
        msg = _common.worker_update(rule, eta, grad, worker.residual, key)
        return WorkerState(msg.residual_new), msg

    def combine_fn(shared, msg):
        eta = schedule(shared.round)
        if reads == "inconsistent":
            views, lags = shared.views, shared.view_lags
        else:
            views, lags = jax.vmap(read, in_axes=(0, None))(jnp.arange(num_workers), shared)
        current = shared.actual(None)
        ef = rule.beta is not None
        residual = jax.tree.map(consistency.worker_sum, msg.residual_old) if ef else None

        positions = (shared.updates + 1 + jnp.arange(num_workers)) % size

        def apply_one(carry, inputs):
            x, s, history = carry
            update, view, e_old, e_new, position = inputs
            aux = _common.apply(x, s) if ef else x
            sq = consistency.tree_sq_norm(jax.tree.map(lambda a, v: a - v, aux, view))
            x = _common.apply(x, update)
            if ef:
                s = jax.tree.map(lambda s_, o, n: s_ - o + n, s, e_old, e_new)
                history = jax.tree.map(
                    lambda h, xi: jax.lax.dynamic_update_index_in_dim(h, xi, position, 0),
                    history, x)
                return (x, s, history), sq
            return (x, s, history), (x, sq)

        # With error feedback each iterate is written into the ring inside the
        # loop; without, the iterates are stacked and scattered after it. Each is
        # the faster of the two there (benchmarks/README.md). The values are the
        # same either way.
        (new_params, _, history), ys = jax.lax.scan(
            apply_one, (current, residual, shared.history if ef else None),
            (msg.update, views, msg.residual_old, msg.residual_new, positions),
        )
        if ef:
            sq_dists = ys
        else:
            iterates, sq_dists = ys
            history = jax.tree.map(lambda h, it: h.at[positions].set(it), shared.history,
                                   iterates)
        stats = consistency.observe(
            shared.stats, msg.grad_norm, eta, msg.update_norm if rule.compressed else None
        )
        dtype = stats.m_hat.dtype
        m = _common.gradient_bound(rule, stats)
        if ef:
            bound_b = bounds.async_sgd(
                max_delay=max_delay, num_workers=num_workers, m=m,
                delta=rule.delta(current), error_feedback=rule.beta,
            )
            etabar = stats.eta_max
        else:
            bound_b = bounds.async_sgd(
                max_delay=max_delay, num_workers=num_workers, m=m,
                mu=stats.mu_hat if rule.compressed else None,
            )
            etabar = consistency.window_max(schedule, shared.round, rounds_back)
        metrics = consistency.metrics(sq_dists.astype(dtype), eta, bound_b, etabar)
        metrics.update(
            _common.common_metrics(
                rule, stats, eta, msg, current, new_params, rule.bits(current), num_workers
            )
        )
        metrics["delay/mean"] = jnp.mean(lags).astype(dtype)
        new_shared = AsyncShared(
            shared.round + 1, shared.key, shared.updates + num_workers, history, stats
        )
        return new_shared._replace(**draw_views(new_shared)), metrics

    views_fn, update_fn = core.compose_update(local_fn, combine_fn, view_fn, num_workers)
    info = core.AlgorithmInfo("async_sgd", num_workers, rule.bound_kind(), law.num_rounds)
    return core.Algorithm(init_fn, views_fn, update_fn, local_fn, combine_fn, view_fn, info)
