"""Every invariant elastic_jax asserts, in one place (chex, and host-side checks).

Static checks (tree structure, shapes, dtypes) cost nothing at run time and are
always on. Value checks (`b_hat <= bound` with docs/theory.md section 2's rounding
allowance, finiteness) run only with `checks=True`, a static argument of
`make_step` and `run`: they add one host callback per round.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import consistency, core

# docs/theory.md section 2: b_hat <= bound * (1 + REL) + ULPS * eps * ||x|| / eta.
REL = 1e-5
ULPS = 4.0


class InvariantError(AssertionError):
    """An invariant of the run failed (raised on the host with the round number)."""


def assert_state_stable(old: core.State, new: core.State) -> None:
    """Tree structure, shapes and dtypes are identical before and after `update`."""
    chex.assert_trees_all_equal_structs(old, new)
    old_leaves, new_leaves = jax.tree.leaves(old), jax.tree.leaves(new)
    for a, b in zip(old_leaves, new_leaves, strict=True):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise AssertionError(
                f"state changed across update: {jnp.shape(a)} {jnp.result_type(a)} -> "
                f"{jnp.shape(b)} {jnp.result_type(b)}"
            )


def allowance(x_norm, eta, dtype):
    """The rounding allowance `4 eps ||x|| / eta` of docs/theory.md section 2 (0 when eta = 0)."""
    eps = jnp.finfo(dtype).eps
    return consistency.per_eta(ULPS * eps * jnp.asarray(x_norm, dtype), jnp.asarray(eta, dtype))


def bound_holds(b_hat, bound, x_norm, eta):
    """`b_hat <= bound * (1 + 1e-5) + 4 eps ||x|| / eta`, elementwise (NumPy or JAX)."""
    dtype = jnp.result_type(b_hat)
    return b_hat <= bound * (1 + REL) + allowance(x_norm, eta, dtype)


def _finite(tree):
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _raise_on_host(round_, ok_bound, b_hat, bound, finite_state, finite_metrics):
    round_, b_hat, bound = np.asarray(round_), np.asarray(b_hat), np.asarray(bound)
    if not np.all(finite_state):
        raise InvariantError(f"round {round_}: the state is not finite")
    if not np.all(finite_metrics):
        raise InvariantError(f"round {round_}: a metric is not finite")
    if not np.all(ok_bound):
        raise InvariantError(
            f"round {round_}: consistency/b_hat = {b_hat} exceeds consistency/bound = {bound}"
        )


def check_round(alg: core.Algorithm, old: core.State, new: core.State, metrics) -> None:
    """Asserts one round's invariants on the host (used by `make_step(checks=True)`)."""
    b_hat = metrics["consistency/b_hat"]
    bound = metrics["consistency/bound"]
    if alg.info.bound_kind == "deterministic":
        eta = metrics["learning_rate"]
        x_norm = jnp.maximum(
            consistency.tree_norm(core.params(old)), consistency.tree_norm(core.params(new))
        )
        ok = bound_holds(b_hat, bound, x_norm, eta)
    else:
        ok = jnp.asarray(True)
    finite_metrics = _finite({k: v for k, v in metrics.items() if k != "consistency/bound"})
    jax.debug.callback(
        _raise_on_host, old.shared.round, ok, b_hat, bound, _finite(new), finite_metrics
    )
