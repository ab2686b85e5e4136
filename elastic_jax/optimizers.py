"""Base optimizers of the per-worker chain: SGD with momentum, weight decay, optax transforms.

The chain's one `"optimizer"` link turns the gradient `g` (after the gradient
links) into the update `u` with the round's learning rate `eta_r`, in optax's
own terms (docs/theory.md section 9):

- `sgd(momentum, nesterov)`: `optax.sgd`'s rule. Plain SGD `u = eta g`; heavy
  ball `m <- mu m + g`, `u = eta m`; Nesterov `m <- mu m + g`,
  `u = eta (g + mu m)`. A bound `b` on `||g||` gives `||u|| / eta <= b / (1 - mu)`
  in both forms, so with clipping at `C` the update bound `C / (1 - mu)` is
  known before the run.
- `weight_decay(decay)`: a gradient link, `g <- g + decay v` at the worker's
  view `v` (`optax.add_decayed_weights` before `optax.sgd`).
- `from_optax(tx)`: any rate-free optax transformation as the base optimizer,
  `u = eta tx(g)`; `adamw(...)` is optax's AdamW this way. Its output norm is
  measured (`u_hat`), not derived.

The learning rate and its schedule stay the algorithm's `learning_rate`: they
are the unit `consistency/b_hat` is measured in.

References:
  B. T. Polyak, "Some methods of speeding up the convergence of iteration
  methods", USSR Computational Mathematics and Mathematical Physics 4(5), 1964.
  I. Sutskever, J. Martens, G. Dahl, G. Hinton, "On the importance of
  initialization and momentum in deep learning", ICML 2013.
  I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization",
  arXiv:1711.05101.
  D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization",
  arXiv:1412.6980.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from elastic_jax import consistency, validation
from elastic_jax.compressors import Compressor
from elastic_jax.links import Facts, Link


def _empty(params):
    del params
    return ()


def scale(eta, tree):
    """`eta * tree`, leaf by leaf in each leaf's dtype."""
    return jax.tree.map(lambda g: jnp.asarray(eta).astype(g.dtype) * g, tree)


def _like(tree, reference):
    """`tree` cast leaf by leaf to the dtypes of `reference`."""
    return jax.tree.map(lambda t, r: t.astype(r.dtype), tree, reference)


def sgd(momentum=0.0, nesterov: bool = False) -> Link:
    """The SGD base optimizer, with optional heavy-ball or Nesterov momentum (optax's form).

    Update rule, with the round's learning rate `eta` and `mu = momentum`:

        plain (mu = 0):   u = eta g
        heavy ball:       m <- mu m + g,    u = eta m
        Nesterov:         m <- mu m + g,    u = eta (g + mu m)

    exactly `optax.sgd(eta, momentum=mu, nesterov=nesterov)` (its `optax.trace`),
    with the sign of the step on the model. The state is the worker's `m`
    (zeros, in `consistency.wide_dtype`: float32 for 16-bit parameters); with
    `momentum = 0` (concrete) the link keeps no state. Its facts: a bound `b`
    on `||g||` gives `||m|| <= b / (1 - mu)` by induction
    (`||m|| <= mu ||m|| + b`), and Nesterov's `||g + mu m|| <= b + mu b / (1 - mu)`
    is the same, so `||u|| / eta <= b / (1 - mu)` (docs/theory.md section 9).

    Args:
      momentum: `mu` in [0, 1) (a tracer passes).
      nesterov: whether to use Nesterov's form (a bool).

    Returns:
      The base optimizer `Link` of `ej.chain`.

    Raises:
      ValueError: for a concrete `momentum` outside [0, 1) or a non-bool `nesterov`.

    Example:
      >>> rule = ej.chain(ej.clip(1.0), ej.sgd(momentum=0.9, nesterov=True))
      >>> alg = ej.async_sgd(0.01, 8, max_delay=8, rule=rule)  # U = 1 / (1 - 0.9) = 10

    References:
      B. T. Polyak (1964); I. Sutskever, J. Martens, G. Dahl, G. Hinton, ICML 2013
      (Nesterov's momentum in this form).
    """
    validation.check_real("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
    if not isinstance(nesterov, bool):
        validation.fail("nesterov", nesterov, "a bool")
    if validation.concrete_number(momentum) == 0:
        def plain(tree, state, context):
            return scale(context.learning_rate, tree), state, {}

        return Link(_empty, plain, Facts("ej.sgd()", "optimizer"))

    def update(tree, trace, context):
        def decayed(g, t):
            return g.astype(t.dtype) + jnp.asarray(momentum).astype(t.dtype) * t

        trace = jax.tree.map(decayed, tree, trace)
        direction = jax.tree.map(decayed, tree, trace) if nesterov else trace
        return _like(scale(context.learning_rate, direction), tree), trace, {}

    def out_bound(bound, params):
        del params
        return None if bound is None else bound / (1.0 - momentum)

    name = f"ej.sgd(momentum={momentum!r}" + (", nesterov=True)" if nesterov else ")")
    return Link(consistency.wide_zeros, update, Facts(name, "optimizer", out_bound=out_bound))


def _unknown(bound, params):
    del bound, params
    return None


def weight_decay(decay) -> Link:
    """Decoupled weight decay as a gradient link: `g <- g + decay v`, `v` the worker's view.

    `optax.add_decayed_weights(decay)` placed before the base optimizer: with
    `ej.sgd` it is `optax.chain(optax.add_decayed_weights(decay), optax.sgd(...))`.
    The view is the point the gradient was taken at (`Context.view`). Its
    output norm is not derived (`||v||` has no bound known before the run): the
    bound `M` at the base optimizer's input is then the measured `m_hat`, the
    largest norm of the decayed gradients (docs/theory.md section 9).

    Args:
      decay: the coefficient, >= 0 (a tracer passes).

    Returns:
      A gradient `Link`, for before the base optimizer.

    Example:
      >>> rule = ej.chain(ej.weight_decay(1e-4), ej.sgd(momentum=0.9, nesterov=True))

    References:
      I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
    """
    validation.check_real("decay", decay, lo=0.0)

    def update(tree, state, context):
        def one(g, v):
            return g + jnp.asarray(decay).astype(g.dtype) * v.astype(g.dtype)

        return jax.tree.map(one, tree, context.view), state, {}

    return Link(_empty, update, Facts(f"ej.weight_decay({decay!r})", "gradient",
                                      out_bound=_unknown))


def _transformation(tx, name: str) -> Link:
    def init(params):
        return tx.init(params)

    def update(tree, state, context):
        direction, state = tx.update(tree, state, context.view)
        return _like(scale(context.learning_rate, direction), tree), state, {}

    return Link(init, update, Facts(name, "optimizer", out_bound=_unknown))


def from_optax(tx) -> Link:
    """A rate-free optax transformation as the base optimizer: `u = eta tx(g)`.

    `tx` maps the gradient to a descent direction in optax's sign convention
    (positive: `optax.scale_by_adam()`, `optax.add_decayed_weights(wd)`, a
    chain of them); the link scales it by the round's learning rate `eta`, so
    the rate and its schedule stay the algorithm's `learning_rate` and the
    model moves by `-u`. `tx` must not scale by a learning rate itself (no
    `optax.adam(lr)`, no `optax.scale_by_learning_rate`): the update would be
    scaled twice. Its state is `tx`'s, per worker (or once, at the server,
    under `optimizer_placement="server"`); its `params` argument is the
    worker's view. The norm of its output is not derived: every bound uses the
    measured `u_hat`, the running maximum of `||u|| / eta` (docs/theory.md
    section 9).

    Args:
      tx: an `optax.GradientTransformation` without a learning rate (not a
        compressor: compressors go after the base optimizer).

    Returns:
      The base optimizer `Link` of `ej.chain`.

    Example:
      >>> rule = ej.chain(ej.from_optax(optax.chain(optax.scale_by_adam(),
      ...                                           optax.add_decayed_weights(1e-4))))
      >>> alg = ej.async_sgd(1e-3, 4, max_delay=4, rule=rule)

    References:
      optax, `GradientTransformation` (its sign convention: `scale_by_*` output
      directions that a negative learning rate turns into updates).
    """
    if isinstance(tx, Compressor) or not isinstance(tx, optax.GradientTransformation):
        validation.fail("tx", tx, "a rate-free optax GradientTransformation such as "
                        "optax.scale_by_adam() (compressors go after the base optimizer)")
    return _transformation(tx, "ej.from_optax(...)")


def adamw(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4) -> Link:
    """AdamW as the base optimizer: `optax.adamw` with the rate left to the algorithm.

    Update rule (`k` the worker's step count, from 1; `v` its view):

        m <- b1 m + (1 - b1) g,     s <- b2 s + (1 - b2) g^2
        u = eta (m / (1 - b1^k) / (sqrt(s / (1 - b2^k)) + eps) + weight_decay v)

    that is `ej.from_optax(optax.chain(optax.scale_by_adam(b1, b2, eps),
    optax.add_decayed_weights(weight_decay)))`; with the algorithm's rate
    `eta` it equals `optax.adamw(eta, b1, b2, eps, weight_decay=...)`. Every
    bound uses the measured `u_hat` (docs/theory.md section 9).

    Args:
      b1: the first moment's decay, in [0, 1).
      b2: the second moment's decay, in [0, 1).
      eps: added to the denominator, > 0.
      weight_decay: the decoupled decay coefficient, >= 0.

    Returns:
      The base optimizer `Link` of `ej.chain`.

    Example:
      >>> alg = ej.sync_sgd(1e-3, 8, rule=ej.chain(ej.adamw(weight_decay=1e-4)),
      ...                   optimizer_placement="server")

    References:
      D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
      I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
    """
    validation.check_real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    validation.check_real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    validation.check_real("eps", eps, lo=0.0, lo_open=True)
    validation.check_real("weight_decay", weight_decay, lo=0.0)
    tx = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.add_decayed_weights(weight_decay))
    return _transformation(tx, f"ej.adamw(b1={b1!r}, b2={b2!r}, eps={eps!r}, "
                               f"weight_decay={weight_decay!r})")


def raw_gradient() -> Link:
    """The workers' base optimizer under server placement: `u = g`, in gradient units.

    `Rule.placed("server")` puts it in place of the chain's base optimizer, so
    compression and error feedback act on the raw gradient and the server
    applies the base optimizer to the workers' mean (docs/theory.md section 9).
    """

    def update(tree, state, context):
        del context
        return tree, state, {}

    return Link(_empty, update, Facts("the raw gradient (server placement)", "optimizer"))
