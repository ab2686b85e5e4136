"""Measured elastic consistency: the bookkeeping shared by every algorithm.

docs/theory.md section 2: at every round `r`,

    b_hat_r  = max_p ||x_t - v_t^p|| / eta_r
    b_rms_r  = sqrt(mean_p ||x_t - v_t^p||^2) / eta_r
    m_hat_r  = running max of ||g|| (including round r's gradients)
    u_hat_r  = running max of ||u|| / eta over every update sent so far
    bound_r  = B(U, R, system) * etabar_r / eta_r   (U, R from m_hat_r or u_hat_r)

A round with `eta_r = 0` reports `b_hat = bound = 0`.

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ConsistencyState(NamedTuple):
    """Running maxima carried in the shared state (all scalars of the param dtype)."""

    m_hat: jax.Array  # [] max ||g|| over every gradient seen
    u_hat: jax.Array  # [] max ||u|| / eta over every update sent (0 where no bound reads it)
    eta_max: jax.Array  # [] max learning rate of every round so far


def init(dtype) -> ConsistencyState:
    zero = jnp.zeros((), dtype)
    return ConsistencyState(zero, zero, zero)


# Sums over the worker axis are written as elementwise adds in a fixed order:
# their value cannot depend on how XLA lays out or vectorises a reduction, which
# differs between programs for different meshes. Up to this many entries the
# order is a left fold (`P - 1` adds in the program); above it, pairwise halving
# (`ceil(log2 P)` adds of slices), which keeps the program small at 1,024 workers.
FOLD_WORKERS = 64


def worker_sum(x, axis: int = 0):
    """`sum(x, axis)` in a fixed order of elementwise adds (bitwise stable).

    Up to `FOLD_WORKERS` entries a left fold, `((x_0 + x_1) + x_2) + ...`;
    above, pairwise halving: `x[:h] + x[h:2h]` with `h = floor(n / 2)`, the
    odd last entry carried, until one entry is left.
    """
    x = jnp.asarray(x)
    size = x.shape[axis]
    if size == 0:
        return jnp.sum(x, axis=axis)
    if size > FOLD_WORKERS:
        while x.shape[axis] > 1:
            n = x.shape[axis]
            half = n // 2
            paired = (jax.lax.slice_in_dim(x, 0, half, axis=axis)
                      + jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))
            x = paired if n % 2 == 0 else jnp.concatenate(
                [paired, jax.lax.slice_in_dim(x, 2 * half, n, axis=axis)], axis=axis)
        return jax.lax.index_in_dim(x, 0, axis, keepdims=False)
    parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(size)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def divide(x, count):
    """`x / count` for an array `x` and a scalar `count`, as `x * (1 / count)`.

    The reciprocal is one scalar division; the elementwise product is exact
    IEEE arithmetic on every backend (an elementwise division by a scalar may
    be vectorised with an approximate reciprocal, differently per program).
    """
    x = jnp.asarray(x)
    return x * (jnp.ones((), x.dtype) / jnp.asarray(count).astype(x.dtype))


def worker_mean(x, axis: int = 0):
    """`mean(x, axis)` as a bitwise-stable fold times the reciprocal of the count."""
    x = jnp.asarray(x)
    return divide(worker_sum(x, axis), x.shape[axis])


def tree_sq_norm(tree) -> jax.Array:
    """Squared Euclidean norm of a whole pytree (accumulated in at least float32)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(())
    # Each leaf is flattened first: a 1-D reduction has one layout, so its order
    # does not depend on the layout XLA picks for an intermediate.
    return sum(jnp.sum(jnp.square(jnp.ravel(_wide(x)))) for x in leaves)


@jax.custom_jvp
def sqrt(x):
    """`jnp.sqrt`, with derivative 0 (not inf) at 0.

    The value is `jnp.sqrt(x)` itself. Norms of residuals, gaps and distances
    are exactly 0 in many runs (no error feedback, `staleness = 0`, no delay);
    reverse mode multiplies their (zero) cotangent by `1 / (2 sqrt(0)) = inf`,
    which would turn every hypergradient into NaN (`ej.analysis`).
    """
    return jnp.sqrt(x)


@sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jnp.sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, t * (0.5 / jnp.where(positive, y, 1)), jnp.zeros_like(t))


def tree_norm(tree) -> jax.Array:
    return sqrt(tree_sq_norm(tree))


def _wide(x):
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def wide_dtype(dtype):
    """Residuals and accumulators of 16-bit parameters are kept in float32."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def wide_zeros(params, leading: tuple[int, ...] = ()):
    """Zeros shaped `leading + leaf.shape` for each leaf, in `wide_dtype` of its dtype."""
    return jax.tree.map(
        lambda x: jnp.zeros(leading + jnp.shape(x), wide_dtype(jnp.result_type(x))), params)


def per_eta(value, eta):
    """`value / eta`, and 0 where `eta == 0` (docs/theory.md section 2)."""
    safe = jnp.where(eta > 0, eta, 1)
    return jnp.where(eta > 0, value / safe, jnp.zeros_like(value))


def observe(state: ConsistencyState, grad_norms, eta, update_norms) -> ConsistencyState:
    """Folds one round into the running maxima.

    Args:
      state: the running maxima before the round.
      grad_norms: `[P]` norms of the round's gradients.
      eta: the round's learning rate.
      update_norms: `[P]` norms `||u||` of the updates sent, or None: `u_hat` is
        then left as it was (no bound reads it).
    """
    dtype = state.m_hat.dtype
    m_hat = jnp.maximum(state.m_hat, jnp.max(grad_norms).astype(dtype))
    u_hat = state.u_hat if update_norms is None else jnp.maximum(
        state.u_hat, jnp.max(per_eta(update_norms, eta)).astype(dtype))
    eta_max = jnp.maximum(state.eta_max, jnp.asarray(eta, dtype))
    return ConsistencyState(m_hat, u_hat, eta_max)


def window_max(schedule, round_, rounds_back: int):
    """`max_{0 <= j <= rounds_back, round - j >= 0} eta_{round - j}` (etabar of a window)."""
    js = jnp.arange(rounds_back + 1)
    rounds = round_ - js
    etas = jax.vmap(lambda r: jnp.asarray(schedule(jnp.maximum(r, 0))))(rounds)
    return jnp.max(jnp.where(rounds >= 0, etas, jnp.zeros_like(etas)))


def metrics(sq_dists, eta, bound_b, etabar, live=None) -> dict[str, jax.Array]:
    """`consistency/b_hat`, `b_rms` and `bound` from the round's squared distances.

    Args:
      sq_dists: `[n]` values `||x_t - v_t^p||^2` over workers and updates.
      eta: the round's learning rate.
      bound_b: the system constant `B` (may be `inf`).
      etabar: the largest learning rate the bound's argument involves (pass 1
        when `bound_b` already is a sum of terms times their own rates).
      live: optional `[n]` booleans: only these entries count (crashed nodes).
    """
    dtype = sq_dists.dtype
    if live is None:
        live = jnp.ones(sq_dists.shape, bool)
    sq_dists = jnp.where(live, sq_dists, 0)
    count = jnp.maximum(jnp.sum(live), 1).astype(dtype)
    b_hat = per_eta(sqrt(jnp.max(sq_dists)), eta)
    b_rms = per_eta(jnp.sqrt(worker_sum(sq_dists) / count), eta)
    bound_b = jnp.asarray(bound_b, dtype)
    scaled = bound_b * per_eta(jnp.asarray(etabar, dtype), eta)
    # 0 * inf would be nan: a round with eta = 0 reports bound = 0.
    bound = jnp.where(eta > 0, jnp.where(bound_b == 0, 0.0, scaled), 0.0).astype(dtype)
    return {
        "consistency/b_hat": b_hat,
        "consistency/b_rms": b_rms,
        "consistency/bound": bound,
    }
