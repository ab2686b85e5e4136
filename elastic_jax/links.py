"""Links of the per-worker update rule: the type, and clipping and compression.

A worker turns its stochastic gradient `g` into the update `u` it sends or
writes by a chain of links, in the optax manner (`ej.chain`): each link maps a
pytree to a pytree and keeps a state of its own, which the algorithms stack on
the worker axis. What a link computes is its `update`; what the consistency
bounds need to know about it is its `Facts`, static and declared once:

- its *stage*: `"gradient"` links act on the gradient before the base
  optimizer (clipping, EF21, weight decay), the one `"optimizer"` link turns
  it into an update using the round's learning rate (`ej.sgd`, `ej.adamw`,
  `ej.from_optax`: `elastic_jax.optimizers`), `"update"` links act on the
  update (a compressor, EF14 error feedback);
- how it moves a norm bound: `out_bound(b, params)` bounds the norm of its
  output given a bound `b` on its input's (None: not known, the library then
  measures the update norm, `u_hat`); `residual_bound(b, params)` bounds what
  it holds back and owes the model (EF14's residual);
- `pending(state)`: what it holds back, which the auxiliary model subtracts
  (docs/theory.md section 4);
- what it puts on the wire (`compressor`, for `comm/bits`), whether its bound
  holds only in expectation, and which variants may use it.

Norms are in the units of the learning rate: an update bound `U` means
`||u|| <= eta U`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import consistency, validation
from elastic_jax.compressors import Compressor

STAGES = ("gradient", "optimizer", "update")


class Context(NamedTuple):
    """What a link may read besides its input and its state, for one worker and round."""

    learning_rate: jax.Array  # [] eta_r
    key: jax.Array | None  # this link's key for the round (stochastic links)
    view: Any  # the worker's view v^p (the parameters its gradient was taken at)


def _same(bound, params):
    del params
    return bound


class Facts(NamedTuple):
    """The static facts of a link that the bounds, the metrics and validation read.

    Attributes:
      name: what error messages call the link, e.g. `"ej.sgd()"`.
      stage: `"gradient"`, `"optimizer"` or `"update"` (module docstring).
      stochastic: whether `update` needs `Context.key`.
      compressor: the compressor whose output goes on the wire, or None.
      out_bound: `(b, params) -> bound or None` on the output norm, given a bound
        `b` on the input's (None: unknown).
      residual_bound: `(b, params) -> bound or None` on what the link holds
        back, or None when it holds nothing back.
      pending: `(state) -> pytree` the link holds back (the auxiliary model
        subtracts it), or None.
      bound_kind: `"deterministic"`, or `"expectation"` where the link's bound
        holds only in expectation.
      variants: the algorithms that may use the link (None: every one).
      metrics: `(aux, params) -> dict` of metrics from the link's per-worker
        `aux` (maximised over workers), or None.
    """

    name: str
    stage: str
    stochastic: bool = False
    compressor: Compressor | None = None
    out_bound: Callable[[Any, Any], Any] = _same
    residual_bound: Callable[[Any, Any], Any] | None = None
    pending: Callable[[Any], Any] | None = None
    bound_kind: str = "deterministic"
    variants: tuple[str, ...] | None = None
    metrics: Callable[[dict, Any], dict] | None = None


class Link(NamedTuple):
    """One transformation of the per-worker chain.

    Attributes:
      init: `(params) -> state` for one worker.
      update: `(tree, state, context) -> (tree, state, aux)`; `aux` is a dict
        of per-worker scalars (possibly empty) that `Facts.metrics` reads.
      facts: the link's `Facts`.
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Context], tuple[Any, Any, dict]]
    facts: Facts

    def __repr__(self) -> str:
        return self.facts.name


def _empty(params):
    del params
    return ()


def clip(max_norm) -> Link:
    """Clips the gradient to global norm `max_norm`: `g <- g min(1, C / ||g||)`.

    A gradient link; it makes the bound `M = C` known before the run.

    Args:
      max_norm: `C > 0` (a tracer passes).
    """
    validation.check_real("max_norm", max_norm, lo=0.0, lo_open=True)

    def update(tree, state, context):
        del context
        norm = consistency.tree_norm(tree)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
        return jax.tree.map(lambda g: (g * scale.astype(g.dtype)).astype(g.dtype), tree), state, {}

    def out_bound(bound, params):
        del bound, params
        return max_norm

    return Link(_empty, update, Facts(f"ej.clip({max_norm!r})", "gradient",
                                      out_bound=out_bound))


def _measured(bound, params):
    del bound, params
    return None


def compress(compressor: Compressor) -> Link:
    """An update link applying `compressor` (no error feedback): `u <- C(u)`.

    `ej.chain` builds it from a bare compressor. The norm of a compressed update
    is measured (`u_hat`), not derived: unbiased compressors can expand.
    """
    spec = compressor.spec

    def update(tree, state, context):
        return spec.compress(tree, context.key), state, {}

    return Link(_empty, update, Facts(repr(compressor), "update", stochastic=spec.stochastic,
                                      compressor=compressor, out_bound=_measured))
