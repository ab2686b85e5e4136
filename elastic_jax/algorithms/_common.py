"""What every algorithm's worker does with its gradient: clip, scale, compress, feed back.

docs/theory.md sections 4 and 5: a worker turns its stochastic gradient `g` into
the update it sends or writes,

    uncompressed:               u = eta * g
    compressed, no feedback:    u = C(eta * g)
    error feedback (EF14):      a = e + eta * g;  u = C(a);  e <- beta * (a - u)

optionally after clipping `g` to norm `clip_norm`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import compressors as compressors_lib
from elastic_jax import consistency, validation
from elastic_jax.error_feedback import ef_step
from elastic_jax.error_feedback import error_feedback as wrap_error_feedback


class WorkerUpdate(NamedTuple):
    """One worker's contribution to a round (fields absent are None)."""

    update: Any  # pytree like params: u
    residual_old: Any  # pytree or None: e before the round
    residual_new: Any  # pytree or None: e after the round
    grad_norm: jax.Array  # [] ||g|| after clipping
    update_norm: jax.Array  # [] ||u||
    residual_norm: jax.Array  # [] ||e_new|| (0 without error feedback)


class Rule(NamedTuple):
    """The static description of how workers form updates."""

    compressor: Any  # a bare compressor, or None
    beta: Any  # damping, or None for no error feedback
    clip_norm: Any  # float or None

    @property
    def compressed(self) -> bool:
        return self.compressor is not None and self.beta is None

    def bound_kind(self) -> str:
        if self.beta is not None and self.compressor.spec.contractive == "expectation":
            return "expectation"
        return "deterministic"

    def delta(self, params) -> float:
        return compressors_lib.compression_info(self.compressor, params).delta

    def bits(self, params) -> int:
        if self.compressor is None:
            return 32 * sum(x.size for x in jax.tree.leaves(params))
        return compressors_lib.compression_info(self.compressor, params).bits

    def validate(self, params) -> None:
        if self.compressor is not None:
            self.compressor.spec.validate(params)


def make_rule(compressor, error_feedback, clip_norm) -> Rule:
    """Validates and normalises the update-rule arguments shared by every factory."""
    beta = validation.check_beta(error_feedback)
    validation.check_clip_norm(clip_norm)
    if compressor is not None:
        if not isinstance(compressor, compressors_lib.Compressor):
            validation.fail("compressor", compressor, "a compressor such as ej.top_k(...)")
        if compressor.spec.name == "error_feedback":
            validation.fail(
                "compressor", validation.Text("a compressor already wrapped by ej.error_feedback"),
                "a bare compressor; pass error_feedback=True or a float beta instead",
            )
    if beta is not None:
        if compressor is None:
            compressor = compressors_lib.identity()
        wrap_error_feedback(compressor, beta=1.0)  # refuses a non-contractive compressor
    return Rule(compressor, beta, clip_norm)


def check_staleness(staleness):
    """`staleness` in [0, 1] when concrete (`ValueError` naming it otherwise); a tracer passes."""
    return validation.check_real("staleness", staleness, lo=0.0, hi=1.0)


def is_literal_one(value) -> bool:
    """Whether `value` is a concrete Python or NumPy number equal to 1 (not a JAX array).

    Factories take their old code path, literally, for such a `staleness`, so the
    default stays bitwise what it was; any other value (a JAX array, a tracer)
    takes the blended path, which `jax.grad` differentiates.
    """
    if isinstance(value, jax.Array | bool):
        return False
    return validation.concrete_number(value) == 1


def scale_gap(staleness, gap):
    """`staleness * gap`, leaf by leaf in each leaf's dtype (`gap` itself when literally 1).

    Where the freshest view is the auxiliary model `x` itself (message passing,
    elastic scheduling), the blended view `(1 - s) x + s (x + gap)` is
    `x + s gap`, and its distance to `x` is exactly `s` times the delayed one.
    """
    if is_literal_one(staleness):
        return gap
    return jax.tree.map(lambda g: jnp.asarray(staleness).astype(g.dtype) * g, gap)


def blend(staleness, freshest, delayed):
    """`(1 - s) * freshest + s * delayed`, leaf by leaf in the leaves' dtype.

    Exact at both ends: `s = 0` gives `freshest` and `s = 1` gives `delayed`
    (a product with 0 or 1 is exact, and adding a zero changes nothing).
    """

    def one(f, d):
        s = jnp.asarray(staleness).astype(f.dtype)
        return ((1 - s) * f + s * d.astype(f.dtype)).astype(f.dtype)

    return jax.tree.map(one, freshest, delayed)


def residual_dtype(dtype):
    """Residuals and accumulators of low-precision parameters are kept in float32."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def init_residual(rule: Rule, params, num_workers: int):
    if rule.beta is None:
        return None
    return jax.tree.map(
        lambda x: jnp.zeros((num_workers,) + jnp.shape(x), residual_dtype(jnp.result_type(x))),
        params,
    )


def clip(grad, clip_norm):
    """Clips `grad` to global norm `clip_norm`; returns it and its (clipped) norm."""
    norm = consistency.tree_norm(grad)
    if clip_norm is None:
        return grad, norm
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    clipped = jax.tree.map(lambda g: (g * scale.astype(g.dtype)).astype(g.dtype), grad)
    return clipped, jnp.minimum(norm, clip_norm)


def scale(eta, tree):
    return jax.tree.map(lambda g: jnp.asarray(eta).astype(g.dtype) * g, tree)


def worker_update(rule: Rule, eta, grad, residual, key) -> WorkerUpdate:
    """The update one worker sends for gradient `grad` (docs/theory.md sections 4, 5)."""
    grad, grad_norm = clip(grad, rule.clip_norm)
    step = scale(eta, grad)
    zero = jnp.zeros((), grad_norm.dtype)
    if rule.beta is not None:
        step = jax.tree.map(lambda s, e: s.astype(e.dtype), step, residual)
        update, new_residual = ef_step(
            residual, step, rule.compressor.spec.compress, key, rule.beta
        )
        return WorkerUpdate(
            update, residual, new_residual, grad_norm,
            consistency.tree_norm(update), consistency.tree_norm(new_residual),
        )
    if rule.compressor is not None:
        step = rule.compressor.spec.compress(step, key)
    return WorkerUpdate(step, None, None, grad_norm, consistency.tree_norm(step), zero)


def apply(params, update):
    """`params - update`, in the parameters' dtype."""
    return jax.tree.map(lambda x, u: (x - u.astype(x.dtype)).astype(x.dtype), params, update)


def gradient_bound(rule: Rule, stats: consistency.ConsistencyState):
    """`M`: the clipping norm when clipping, else the running maximum `m_hat`."""
    if rule.clip_norm is not None:
        return jnp.asarray(rule.clip_norm, stats.m_hat.dtype)
    return stats.m_hat


def common_metrics(rule, stats, eta, msg: WorkerUpdate, old, new, bits_per_worker, num_workers):
    """`grad_norm/max`, `update_norm`, `comm/bits`, `learning_rate`, `ef/residual_norm`."""
    dtype = stats.m_hat.dtype
    diff = jax.tree.map(lambda a, b: a - b, new, old)
    metrics = {
        "grad_norm/max": stats.m_hat,
        "update_norm": consistency.per_eta(consistency.tree_norm(diff).astype(dtype), eta),
        "comm/bits": jnp.asarray(float(bits_per_worker * num_workers), dtype),
        "learning_rate": jnp.asarray(eta, dtype),
    }
    if rule.beta is not None:
        metrics["ef/residual_norm"] = jnp.max(msg.residual_norm).astype(dtype)
    return metrics
