"""Error feedback (EF14 residual memory) around a contractive compressor.

docs/theory.md section 4. A worker keeps a residual `e` (zero at the start) of what
it has not sent yet:

    a     = e + update          # update = eta * g
    u     = C(a)                # what is sent or written
    e_new = beta * (a - u)      # beta = 1: EF14; beta = 0: no error feedback

With `beta = 1` nothing is lost, `u + e_new == e + update` (bitwise for masking
compressors, whose `a - u` only zeroes entries), so the virtual iterate
`x - e` follows plain SGD. For a contraction `||a - C(a)|| <= q ||a||`,
`q = sqrt(1 - delta)`, every step has `||e_new|| <= beta q ||a||`, and by
induction over updates of norm at most `eta M`,

    ||e|| <= eta M rho,   rho = beta q / (1 - beta q).

Unbiased compressors (scaled random-k, QSGD) can expand (`q >= 1`), so wrapping
them is refused.

Example:
  >>> tx = optax.chain(optax.sgd(0.1), error_feedback(top_k(fraction=0.01)))

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh, "Elastic
  Consistency: A General Consistency Model for Distributed Stochastic Gradient
  Descent", arXiv:2001.05918 (2020).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import bounds, consistency, validation
from elastic_jax.compressors import (
    Compressor,
    CompressorSpec,
    check_contractive,
    compression_info,
)
from elastic_jax.links import Facts, Link


class ErrorFeedbackState(NamedTuple):
    """State of `error_feedback`."""

    residual: Any  # pytree like params; float32 where params are float16/bfloat16
    inner_state: Any  # the wrapped compressor's state


def ef_step(residual, update, compress, key, beta):
    """One EF14 step: `a = e + update; u = C(a); e_new = beta (a - u)`.

    Pure. `a` is formed in the residual's dtype; `u` is returned in the update's
    dtype and the residual keeps what was not sent of `a`, so conservation
    `u + e_new == e + update` holds for `beta = 1` up to the rounding of `a - u`
    (none for masking compressors; a product with 1 is exact). With `beta = 0`
    the residual stays zero and `u = C(update)` exactly (adding a zero residual
    changes nothing). `beta` may be a tracer, so `jax.grad` with respect to it
    works.

    Args:
      residual: `e`, a pytree like `update`.
      update: the update to send, already scaled by the learning rate.
      compress: `(tree, key) -> tree`, e.g. `top_k(k=10).spec.compress`.
      key: the compressor's key (None for deterministic compressors).
      beta: damping in [0, 1].

    Returns:
      `(u, e_new)`: the compressed update and the new residual.
    """
    a = jax.tree.map(lambda e, g: e + jnp.asarray(g).astype(e.dtype), residual, update)
    u = compress(a, key)
    u = jax.tree.map(lambda ui, g: ui.astype(jnp.result_type(g)), u, update)

    def keep(ai, ui):
        return (jnp.asarray(beta).astype(ai.dtype) * (ai - ui.astype(ai.dtype))).astype(ai.dtype)

    return u, jax.tree.map(keep, a, u)


def _no_stateless_map(tree, key):
    del tree, key
    raise ValueError(
        "error_feedback keeps state: call its update(updates, state, key=...), or "
        "ef_step(residual, update, wrapped.inner.spec.compress, key, beta)"
    )


def error_feedback(compressor: Compressor, beta=1.0) -> Compressor:
    """Wraps a contractive compressor with EF14 residual memory.

    Each `update(updates, state, params=None, *, key=None)` runs `ef_step` on the
    state's residual: `a = e + updates; u = C(a); e <- beta (a - u)`, and returns
    `u`. Put it after the learning-rate scaling, so that `updates = eta * g`. A
    stochastic inner compressor gets `key=` when given, else a key split from the
    inner state.

    Contraction gives `||e_new|| = beta ||a - C(a)|| <= beta q ||a||` at each step
    (`q = sqrt(1 - delta)`); with `||updates|| <= eta M`, induction on
    `||e_new|| <= beta q (||e|| + eta M)` gives `||e|| <= eta M rho` with
    `rho = beta q / (1 - beta q)` (docs/theory.md section 4). For `random_k`
    (unscaled) this holds in expectation only.

    Args:
      compressor: a bare contractive compressor (`identity`, `top_k`,
        `random_k(scaled=False)`, `scaled_sign`).
      beta: damping in [0, 1]; 1 is EF14, 0 is no error feedback. A tracer is
        accepted (for `jax.grad` with respect to `beta`).

    Returns:
      A `Compressor` with `spec.name == "error_feedback"`, state
      `ErrorFeedbackState`, and attributes `.inner` (the wrapped compressor) and
      `.beta`. Its `spec.validate` and `spec.info` are the inner compressor's; its
      `spec.compress` raises, since error feedback is stateful.

    Raises:
      ValueError: for a non-contractive or already wrapped compressor, or a
        concrete `beta` outside [0, 1].

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), error_feedback(top_k(k=10), beta=1.0))
    """
    check_contractive(compressor)
    validation.check_real("beta", beta, lo=0.0, hi=1.0)
    inner = compressor

    def init_fn(params):
        return ErrorFeedbackState(residual=consistency.wide_zeros(params),
                                  inner_state=inner.init(params))

    def update_fn(updates, state, params=None, *, key=None, **extra_args):
        del params, extra_args
        inner_state = state.inner_state
        if inner.spec.stochastic and key is None:
            new_key, key = jax.random.split(inner_state.key)
            inner_state = inner_state._replace(key=new_key)
        u, residual = ef_step(state.residual, updates, inner.spec.compress, key, beta)
        return u, ErrorFeedbackState(residual=residual, inner_state=inner_state)

    spec = CompressorSpec(
        name="error_feedback",
        stochastic=inner.spec.stochastic,
        contractive=inner.spec.contractive,
        compress=_no_stateless_map,
        validate=inner.spec.validate,
        info=inner.spec.info,
    )
    wrapped = Compressor(init_fn, update_fn, spec, f"error_feedback({inner!r}, beta={beta!r})")
    wrapped.inner = inner
    wrapped.beta = beta
    return wrapped


def link(wrapped: Compressor) -> Link:
    """The per-worker chain's EF14 link for an `error_feedback(compressor, beta)` value.

    An update link whose state is the worker's residual `e` (float32 for
    16-bit parameters). Its facts: it sends the inner compressor's bits; it
    holds `e` back (the auxiliary model is the virtual iterate, the actual
    model minus the residuals, averaged or summed as the variant applies
    updates); with updates of norm at most `eta b`, `||e|| <= eta b rho` and
    `||u|| <= eta b (1 + rho)`, `rho = beta q / (1 - beta q)`, in expectation
    only around unscaled random-k.
    """
    inner, beta = wrapped.inner, wrapped.beta

    def update(tree, residual, context):
        # In the residual's dtype (float32 for 16-bit parameters): the update is
        # formed, compressed and sent at that precision, so nothing is lost to
        # rounding in between; the model casts it when applying it.
        tree = jax.tree.map(lambda t, e: t.astype(e.dtype), tree, residual)
        u, residual = ef_step(residual, tree, inner.spec.compress, context.key, beta)
        return u, residual, {}

    def rho(params):
        return bounds.rho(beta, compression_info(inner, params).delta)

    facts = Facts(
        repr(wrapped), "update", stochastic=inner.spec.stochastic, compressor=inner,
        out_bound=lambda b, params: None if b is None else b * (1.0 + rho(params)),
        residual_bound=lambda b, params: None if b is None else b * rho(params),
        pending=lambda residual: residual,
        bound_kind="expectation" if inner.spec.contractive == "expectation" else "deterministic",
    )
    return Link(consistency.wide_zeros, update, facts)
