"""Every invariant elastic_jax asserts, in one place (chex, and host-side checks).

Static checks (tree structure, shapes, dtypes) cost nothing at run time and are
always on. Value checks run only with `checks=True`, a static argument of
`make_step` and `run`: every deterministic bound holds with docs/theory.md
section 2's rounding allowance (`consistency/b_hat <= consistency/bound`, and
a link's own pairs such as `ef21/tracking_error <= ef21/tracking_bound`), and
the state and metrics are finite. A failure raises `InvariantError` naming
the round, the quantity and its value.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, consistency

# docs/theory.md section 2: b_hat <= bound * (1 + REL) + ULPS * eps * ||x|| / eta.
REL = 1e-5
ULPS = 4.0

# measured metric -> the metric bounding it (checked when both are reported).
BOUNDED = {
    "consistency/b_hat": "consistency/bound",
    "ef21/tracking_error": "ef21/tracking_bound",
}


class InvariantError(AssertionError):
    """An invariant of the run failed (raised on the host, naming the round and quantity)."""


def assert_state_stable(old: base.State, new: base.State) -> None:
    """Tree structure, shapes and dtypes are identical before and after a round."""
    chex.assert_trees_all_equal_structs(old, new)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
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


def finite(tree) -> jax.Array:
    """Whether every inexact leaf of `tree` is finite."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def evaluate(alg: base.Algorithm, old: base.State, new: base.State, metrics) -> dict:
    """The round's invariants as arrays (`raise_failures` reads them on the host)."""
    values = {"round": old.shared.round, "finite/state": finite(new),
              "finite/metrics": finite({k: v for k, v in metrics.items()
                                        if k not in BOUNDED.values()})}
    if alg.info.bound_kind != "deterministic":
        return values
    eta = metrics["learning_rate"]
    dtype = jnp.result_type(metrics["consistency/b_hat"])
    x_norm = jnp.maximum(consistency.tree_norm(base.params(old)),
                         consistency.tree_norm(base.params(new)))
    for measured, limit in BOUNDED.items():
        if measured not in metrics:
            continue
        if measured == "consistency/b_hat":
            ok = bound_holds(metrics[measured], metrics[limit], x_norm, eta)
        else:  # A gradient-sized quantity: its allowance scales with the gradients.
            scale_ = metrics["grad_norm/max"] + metrics[limit]
            ok = metrics[measured] <= (metrics[limit] * (1 + REL)
                                       + ULPS * jnp.finfo(dtype).eps * scale_)
        values[measured] = metrics[measured]
        values[limit] = metrics[limit]
        values[f"ok/{measured}"] = ok
    return values


def raise_failures(values) -> None:
    """Raises `InvariantError` for the first failed invariant (host side, NumPy values).

    `values` is `evaluate`'s dict, for one round or stacked over rounds.
    """
    values = {k: np.asarray(v) for k, v in values.items()}
    rounds = np.atleast_1d(values["round"])
    for i, round_ in enumerate(rounds):
        def at(name, i=i):
            return np.atleast_1d(values[name])[i]

        if not at("finite/state"):
            raise InvariantError(f"round {round_}: the state is not finite")
        if not at("finite/metrics"):
            raise InvariantError(f"round {round_}: a metric is not finite")
        for measured, limit in BOUNDED.items():
            if f"ok/{measured}" in values and not at(f"ok/{measured}"):
                raise InvariantError(
                    f"round {round_}: {measured} = {at(measured)} exceeds {limit} = {at(limit)}")
