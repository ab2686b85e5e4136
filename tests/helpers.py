"""Shared problems, drivers and tolerances for the test suite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from elastic_jax import base

DIM_A, DIM_B = 12, (2, 4)  # a two-leaf model: 20 parameters


def params0(dtype=jnp.float32, scale=1.0):
    """A fixed two-leaf starting point."""
    key_a, key_b = jax.random.split(jax.random.key(42))
    return {
        "a": (scale * jax.random.normal(key_a, (DIM_A,))).astype(dtype),
        "b": (scale * jax.random.normal(key_b, DIM_B)).astype(dtype),
    }


def noisy_quadratic(params, batch):
    """0.5 ||p - 1||^2 + <noise, p>: gradient `p - 1 + noise` (noise from the batch)."""
    sq = sum(jnp.sum(jnp.square(x - 1.0)) for x in jax.tree.leaves(params))
    lin = sum(jnp.sum(n * x) for n, x in zip(jax.tree.leaves(batch), jax.tree.leaves(params),
                                              strict=True))
    return 0.5 * sq + lin


def linear(params, batch):
    """A loss with constant gradient `c` (the batch carries `c`)."""
    return sum(jnp.sum(c * x) for c, x in zip(jax.tree.leaves(batch), jax.tree.leaves(params),
                                              strict=True))


def noise_batch_fn(params, sigma=1.0):
    """A `batch_fn` giving per-worker Gaussian noise shaped like `params`."""
    leaves, treedef = jax.tree.flatten(params)

    def batch_fn(round_, keys):
        del round_

        def one(key):
            ks = jax.random.split(key, len(leaves))
            return jax.tree.unflatten(treedef, [
                (sigma * jax.random.normal(k, x.shape)).astype(x.dtype)
                for k, x in zip(ks, leaves, strict=True)
            ])

        return jax.vmap(one)(keys)

    return batch_fn


def constant_batch_fn(params, num_workers, value=1.0):
    """A `batch_fn` whose batch is the constant gradient `value` for `linear`."""

    def batch_fn(round_, keys):
        del round_, keys
        return jax.tree.map(
            lambda x: jnp.full((num_workers,) + x.shape, value, x.dtype), params)

    return batch_fn


def run_seeds(alg, loss_fn, params, batch_fn, *, seeds, rounds):
    """Runs `rounds` rounds for every seed as one vmapped, scanned program.

    Returns:
      `(final states, metrics [seeds, rounds], aux_norms [seeds, rounds])` where
      `aux_norms` are `max(||x_r||, ||x_{r+1}||)` for the rounding allowance.
    """
    step = ej.make_step(alg, loss_fn)

    def body(state, _):
        shared = state.shared
        keys = base.worker_keys(shared.key, base.TAG_DATA, shared.round, alg.num_workers)
        new_state, metrics = step(state, batch_fn(shared.round, keys))
        norm = jnp.maximum(tree_norm(ej.params(state)), tree_norm(ej.params(new_state)))
        return new_state, (metrics, norm)

    def one(seed):
        state = alg.init(params, jax.random.key(seed))
        return jax.lax.scan(body, state, None, length=rounds)

    states, (metrics, norms) = jax.jit(jax.vmap(one))(jnp.asarray(seeds))
    return states, metrics, norms


def tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def assert_bound_holds(metrics, norms):
    """`b_hat <= bound` every round, with docs/theory.md section 2's rounding allowance."""
    b_hat = np.asarray(metrics["consistency/b_hat"])
    bound = np.asarray(metrics["consistency/bound"])
    eta = np.asarray(metrics["learning_rate"])
    ok = np.asarray(ej.checks.bound_holds(b_hat, bound, np.asarray(norms), eta))
    if not ok.all():
        idx = np.argwhere(~ok)[0]
        raise AssertionError(
            f"b_hat > bound at seed/round {tuple(idx)}: {b_hat[tuple(idx)]} > "
            f"{bound[tuple(idx)]}"
        )
    assert np.all(np.isfinite(b_hat))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
