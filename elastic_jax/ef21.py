"""EF21 error feedback (Richtarik, Sokolov, Fatkhullin 2021), a gradient link of the chain.

Each worker `p` keeps an estimate `g_p` of its gradient (zero at the start:
the library never evaluates the loss at `init`) and, at every round, sends only
the compressed correction

    c_p = C(grad_p - g_p),     g_p <- g_p + c_p,

and the model moves by `eta * mean_p g_p`, recomputed from the estimates (the
link outputs `g_p`; the base optimizer scales it). Defined for synchronous SGD
only: `ej.async_sgd` and the other variants refuse it.

Consistency (docs/theory.md section 4): the views are the model itself, so
with the auxiliary model equal to the model `B = 0`. Against the plain SGD
virtual iterate no finite `B` exists: with `d = 2`, Top-1 and gradients
alternating `(1, 0)` and `(0, 0.9)` the two drift apart linearly. What EF21
bounds instead is the tracking error: for a contraction with
`||a - C(a)|| <= q ||a||` and gradients of norm at most `M`,

    ||g_p - grad_p|| = ||(grad_p - g_p^old) - C(grad_p - g_p^old)||
                    <= q (||grad_p - grad_p^old|| + ||grad_p^old - g_p^old||)
                    <= q (2 M + e),       so  e <= 2 M q / (1 - q),

reported every round as `ef21/tracking_error` (measured after the update, the
largest over workers) next to `ef21/tracking_bound`.

References:
  P. Richtarik, I. Sokolov, I. Fatkhullin, "EF21: A New, Simpler, Theoretically
  Better, and Practically Faster Error Feedback", NeurIPS 2021, arXiv:2106.05203.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elastic_jax import consistency
from elastic_jax.compressors import Compressor, check_contractive, compression_info
from elastic_jax.links import Facts, Link


def ef21(compressor: Compressor) -> Link:
    """The EF21 gradient link around a contractive `compressor`.

    Args:
      compressor: a bare contractive compressor (`ej.top_k(...)`,
        `ej.scaled_sign()`, `ej.identity()`, `ej.random_k(..., scaled=False)`).

    Returns:
      A `Link` for `ej.chain(ej.ef21(C), ej.sgd())`, for `ej.sync_sgd(..., rule=...)`.

    Example:
      >>> alg = ej.sync_sgd(0.1, 8, rule=ej.chain(ej.ef21(ej.top_k(fraction=0.01)), ej.sgd()))
    """
    check_contractive(compressor)
    spec = compressor.spec

    def init(params):
        dtype = consistency.wide_dtype(jnp.result_type(*jax.tree.leaves(params)))
        return consistency.wide_zeros(params), jnp.zeros((), dtype)

    def update(grad, state, context):
        estimate, largest = state
        diff = jax.tree.map(lambda g, e: g.astype(e.dtype) - e, grad, estimate)
        estimate = jax.tree.map(lambda e, c: e + c, estimate, spec.compress(diff, context.key))
        error = consistency.tree_norm(
            jax.tree.map(lambda e, g: e - g.astype(e.dtype), estimate, grad))
        largest = jnp.maximum(largest, consistency.tree_norm(grad).astype(largest.dtype))
        out = jax.tree.map(lambda e, g: e.astype(g.dtype), estimate, grad)
        return out, (estimate, largest), {"ef21/tracking_error": error,
                                          "ef21/gradient_max": largest}

    def metrics(aux, params):
        # M: the largest gradient norm this link has received, over workers and rounds.
        q = (1.0 - compression_info(compressor, params).delta) ** 0.5
        error = aux["ef21/tracking_error"]
        limit = 2.0 * aux["ef21/gradient_max"] * q / (1.0 - q)
        return {"ef21/tracking_error": error,
                "ef21/tracking_bound": jnp.asarray(limit, error.dtype)}

    facts = Facts(
        f"ej.ef21({compressor!r})", "gradient", stochastic=spec.stochastic,
        compressor=compressor, out_bound=lambda b, params: None, variants=("sync_sgd",),
        bound_kind="expectation" if spec.contractive == "expectation" else "deterministic",
        metrics=metrics,
    )
    return Link(init, update, facts)
