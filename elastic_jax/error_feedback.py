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

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import validation
from elastic_jax.compressors import Compressor, CompressorSpec

_SUGGESTIONS = {
    "random_k": "use random_k(..., scaled=False) or top_k",
    "qsgd": "use top_k, random_k(..., scaled=False) or scaled_sign",
}


class ErrorFeedbackState(NamedTuple):
    """State of `error_feedback`."""

    residual: Any  # pytree like params; float32 where params are float16/bfloat16
    inner_state: Any  # the wrapped compressor's state


def residual_dtype(dtype):
    """Residuals of low-precision (16-bit) parameters are kept in float32."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _is_python(value, target: float) -> bool:
    """Whether `value` is a concrete Python/NumPy scalar equal to `target`."""
    return not isinstance(value, jax.Array) and validation.concrete_number(value) == target


def ef_step(residual, update, compress, key, beta):
    """One EF14 step: `a = e + update; u = C(a); e_new = beta (a - u)`.

    Pure. `a` is formed in the residual's dtype; `u` is returned in the update's
    dtype and the residual keeps what was not sent of `a`, so conservation
    `u + e_new == e + update` holds for `beta = 1` up to the rounding of `a - u`
    (none for masking compressors). A concrete `beta` of exactly 1 skips the
    multiplication (`e_new = a - u`); a concrete 0 is no error feedback, literally
    `u = C(update)` with zero residual (the residual, zero in any run started from
    `init`, is not read), so the output is bitwise the bare compressor's. Any
    other `beta`, tracers included, multiplies, so `jax.grad` with respect to
    `beta` works.

    Args:
      residual: `e`, a pytree like `update`.
      update: the update to send, already scaled by the learning rate.
      compress: `(tree, key) -> tree`, e.g. `top_k(k=10).spec.compress`.
      key: the compressor's key (None for deterministic compressors).
      beta: damping in [0, 1].

    Returns:
      `(u, e_new)`: the compressed update and the new residual.
    """
    if _is_python(beta, 0.0):  # no error feedback: C(update), literally
        a = jax.tree.map(lambda e, g: jnp.asarray(g).astype(e.dtype), residual, update)
        u = jax.tree.map(lambda ui, g: ui.astype(jnp.result_type(g)), compress(a, key), update)
        return u, jax.tree.map(jnp.zeros_like, residual)
    a = jax.tree.map(lambda e, g: e + jnp.asarray(g).astype(e.dtype), residual, update)
    u = compress(a, key)
    u = jax.tree.map(lambda ui, g: ui.astype(jnp.result_type(g)), u, update)
    if _is_python(beta, 1.0):
        new_residual = jax.tree.map(lambda ai, ui: ai - ui.astype(ai.dtype), a, u)
    else:
        new_residual = jax.tree.map(
            lambda ai, ui: (beta * (ai - ui.astype(ai.dtype))).astype(ai.dtype), a, u
        )
    return u, new_residual


def _check_compressor(compressor):
    if not isinstance(compressor, Compressor):
        validation.fail("compressor", compressor, "a compressor such as top_k(k=10)")
    if compressor.spec.name == "error_feedback":
        raise ValueError(
            f"compressor: got {compressor!r}; expected a bare compressor: "
            "error feedback is already applied"
        )
    if compressor.spec.contractive == "no":
        suggestion = _SUGGESTIONS.get(compressor.spec.name, "use top_k or scaled_sign")
        raise ValueError(
            f"compressor: got {compressor!r}, which is not contractive; error feedback "
            f"needs a contractive compressor: {suggestion}"
        )


def _check_beta(beta):
    if validation.is_traced(beta):
        return
    number = validation.concrete_number(beta)
    if (
        number is None
        or isinstance(number, bool)
        or not math.isfinite(number)
        or not 0.0 <= number <= 1.0
    ):
        validation.fail("beta", beta, "a number in [0, 1] (1: EF14, 0: no error feedback)")


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
    _check_compressor(compressor)
    _check_beta(beta)
    inner = compressor

    def init_fn(params):
        residual = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), residual_dtype(jnp.result_type(p))), params
        )
        return ErrorFeedbackState(residual=residual, inner_state=inner.init(params))

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
