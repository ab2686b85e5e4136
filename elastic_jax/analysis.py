"""Differentiable analysis: gradients of training outcomes with respect to the update rule.

`hypergradient` runs a whole training run as one `lax.scan` over rounds and
differentiates an outcome of it (the final loss, the mean loss, the measured
elastic consistency constant, a distance, or any function of the final state)
with respect to continuous hyperparameters of the algorithm and, optionally,
the initial parameters. The algorithm is rebuilt from traced hyperparameters
inside the differentiated function, which works because every factory accepts
traced values (docs/design.md, "The one abstraction").

What is differentiable:

- the learning rate, and the parameters of an optax schedule built from it;
- the error-feedback damping `beta` (`error_feedback=beta`; `beta = 0` is no
  error feedback, `beta = 1` EF14);
- `staleness` of `ej.async_sgd`, `ej.message_passing_sgd` and
  `ej.elastic_scheduling`: each view is `(1 - s) * freshest + s * delayed`,
  a continuous stand-in for the discrete lag;
- the clipping norm `clip_norm`, and the initial parameters (`wrt_params`).

What is not (the derivative is that of the run with the discrete choice held
fixed, i.e. a one-sided, piecewise derivative):

- the indices Top-k selects are discrete: the gradient flows through the
  values that are kept, not through which ones are (likewise the masks of
  random-k, QSGD's levels and the sign of scaled sign);
- lags, message delays, drops and crashes are discrete draws: use `staleness`
  to move continuously between the freshest and the delayed views;
- integer arguments (`num_workers`, `max_delay`, `k`, periods) are static.

`consistency/b_hat` is a norm, so `objective="final_b_hat"` has no derivative
where it is 0 (synchronous SGD without error feedback, or `staleness = 0`).

Memory, in reverse mode (`remat`): without rematerialisation (`"none"`) the
backward pass keeps every round's intermediates; per-round rematerialisation
(`"round"`, `jax.checkpoint` around the round) keeps only the state between
rounds, `R` states for `R` rounds; two-level checkpointing (`"sqrt"`, the
default) cuts the run into segments of `K = ceil(sqrt(R))` rounds (the last one
ragged), keeps only the `ceil(R / K)` states between segments, and
rematerialises one segment at a time (its `K` states), `O(sqrt(R))` states in
all, for one more forward pass over the run. In forward mode (`jax.jvp`, one
tangent per hyperparameter) memory does not grow with `R`.
`benchmarks/hypergradient_memory.py` measures them.

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, drivers, validation

OBJECTIVES = ("final_loss", "mean_loss", "final_b_hat")
MODES = ("reverse", "forward", "auto")
REMATS = ("sqrt", "round", "none")
_OBJECTIVE_EXPECTED = (
    "'final_loss', 'mean_loss', 'final_b_hat', ('distance_to', point) or a callable "
    "on the final state"
)


def _resolve_objective(objective, params):
    """`(kind, static callable or None, point or None)` for an objective argument."""
    if isinstance(objective, str):
        validation.check_choice("objective", objective, OBJECTIVES)
        return objective, None, None
    if isinstance(objective, tuple) and len(objective) == 2 and objective[0] == "distance_to":
        point = objective[1]
        if jax.tree.structure(point) != jax.tree.structure(params) or any(
            jnp.shape(a) != jnp.shape(b)
            for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(params), strict=True)
        ):
            validation.fail("objective", validation.Text("('distance_to', point)"),
                            "a point with the structure and shapes of params")
        return "distance_to", None, point
    if callable(objective):
        return "callable", objective, None
    validation.fail("objective", objective, _OBJECTIVE_EXPECTED)


def _check_hparams(hparams, wrt_params: bool) -> dict[str, float]:
    if not isinstance(hparams, Mapping):
        validation.fail("hparams", hparams, "a dict of float hyperparameters")
    out = {}
    for name, value in hparams.items():
        if not isinstance(name, str) or not name.isidentifier():
            validation.fail("hparams", validation.Text(f"a key {name!r}"),
                            "keyword argument names of make_algorithm")
        if wrt_params and name == "params":
            validation.fail("hparams", validation.Text("a key 'params'"),
                            "another name: grads['params'] holds the initial parameters' "
                            "gradient with wrt_params=True")
        validation.check_real(f"hparams[{name!r}]", value)
        out[name] = float(validation.concrete_number(value))
    if not out and not wrt_params:
        validation.fail("hparams", hparams, "at least one hyperparameter (or wrt_params=True)")
    return out


def _num_rounds(batches, num_workers: int) -> int:
    leaves = jax.tree.leaves(batches)
    shapes = {tuple(np.shape(x)[:2]) for x in leaves}
    if not leaves or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        validation.fail("batches", validation.Text(f"leaves with leading shapes {sorted(shapes)}"),
                        "arrays [R, P, ...] sharing one round axis and one worker axis")
    (rounds, workers), = shapes
    if rounds < 1 or workers != num_workers:
        validation.fail("batches", validation.Text(f"leading shape ({rounds}, {workers})"),
                        f"[R >= 1, P = {num_workers}] (the algorithm's workers)")
    return rounds


def _scalar_loss(loss_fn, has_aux):
    if not has_aux:
        return loss_fn
    return lambda p, batch: loss_fn(p, batch)[0]


def segments(rounds: int) -> tuple[int, int, int]:
    """`(K, full, tail)`: `R` rounds as `full` segments of `K = ceil(sqrt(R))` and a ragged
    last one of `tail = R - full K` rounds (0 when `K` divides `R`)."""
    size = math.isqrt(rounds - 1) + 1
    return size, rounds // size, rounds % size


def scan_rounds(body, state, batches, remat: str):
    """`lax.scan(body, state, batches)`, rematerialised as `remat` says (module docstring).

    `"sqrt"`: an outer scan over the full segments, each a `jax.checkpoint`ed
    inner scan of `K` per-round-checkpointed rounds (so the backward pass keeps
    the segments' first states, and rematerialises one segment's `K` states at
    a time), then the ragged last segment likewise; the rounds' outputs are
    concatenated in order. The arithmetic of every round is the same in all
    three, so their values and derivatives agree to rounding.
    """
    if remat == "none":
        return jax.lax.scan(body, state, batches)
    body = jax.checkpoint(body, prevent_cse=False)
    if remat == "round":
        return jax.lax.scan(body, state, batches)
    rounds = jax.tree.leaves(batches)[0].shape[0]
    size, full, tail = segments(rounds)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def segment(state, part):
        return jax.lax.scan(body, state, part)

    head = jax.tree.map(lambda b: b[:full * size].reshape((full, size) + b.shape[1:]), batches)
    state, out = jax.lax.scan(segment, state, head)
    out = jax.tree.map(lambda y: y.reshape((full * size,) + y.shape[2:]), out)
    if tail:
        state, last = segment(state, jax.tree.map(lambda b: b[full * size:], batches))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, last)
    return state, out


def _value_fn(make_algorithm, loss_fn, has_aux, kind, objective_fn, remat, has_eval):
    """The run as a function `(hp, params, batches, key, eval_batch, point) -> objective`."""
    scalar = _scalar_loss(loss_fn, has_aux)

    def value(hp, params, batches, key, eval_batch, point):
        alg = make_algorithm(**hp)
        step = drivers.make_step(alg, loss_fn, has_aux=has_aux)

        def body(state, batch):
            new_state, metrics = step(state, batch)
            if kind == "mean_loss":
                if has_eval:
                    out = scalar(base.params(new_state), eval_batch)
                else:
                    out = metrics["loss"]
            elif kind == "final_b_hat":
                out = metrics["consistency/b_hat"]
            else:
                out = None
            return new_state, out

        state, per_round = scan_rounds(body, alg.init(params, key), batches, remat)
        if kind == "mean_loss":
            return jnp.mean(per_round)
        if kind == "final_b_hat":
            return per_round[-1]
        x = base.params(state)
        if kind == "final_loss":
            if has_eval:
                return scalar(x, eval_batch)
            last = jax.tree.map(lambda b: b[-1], batches)
            return jnp.mean(jax.vmap(scalar, in_axes=(None, 0))(x, last))
        if kind == "distance_to":
            return sum(
                jnp.sum(jnp.square(a - jnp.asarray(b).astype(a.dtype)))
                for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(point), strict=True)
            )
        out = objective_fn(state)
        if jnp.shape(out) != ():
            validation.fail("objective", validation.Text(f"a callable returning shape "
                                                         f"{jnp.shape(out)}"),
                            "a callable returning a scalar")
        return out

    return value


@functools.lru_cache(maxsize=64)
def _compiled(make_algorithm, loss_fn, has_aux, kind, objective_fn, remat, has_eval, mode,
              wrt_params, names):
    """The jitted `(hp, params, batches, key, eval_batch, point) -> (value, grads)`."""
    value = _value_fn(make_algorithm, loss_fn, has_aux, kind, objective_fn, remat, has_eval)

    def reverse(hp, params, *args):
        if wrt_params:
            val, (g_hp, g_params) = jax.value_and_grad(value, argnums=(0, 1))(hp, params, *args)
            return val, {**g_hp, "params": g_params}
        return jax.value_and_grad(value)(hp, params, *args)

    def forward(hp, params, *args):
        def along(tangent):
            return jax.jvp(lambda h: value(h, params, *args), (hp,), (tangent,))

        if len(names) == 1:
            val, deriv = along({names[0]: jnp.ones_like(hp[names[0]])})
            return val, {names[0]: deriv}
        basis = {n: jnp.eye(len(names), dtype=hp[n].dtype)[i] for i, n in enumerate(names)}
        vals, derivs = jax.vmap(along)(basis)
        return vals[0], {n: derivs[i] for i, n in enumerate(names)}

    return jax.jit(reverse if mode == "reverse" else forward)


def hypergradient(
    make_algorithm: Callable[..., base.Algorithm],
    loss_fn: Callable,
    params: base.Params,
    batches,
    hparams: Mapping[str, float],
    *,
    key,
    objective="final_loss",
    eval_batch=None,
    wrt_params: bool = False,
    remat: str = "sqrt",
    mode: str = "auto",
    has_aux: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
    """The outcome of a whole run and its derivatives with respect to hyperparameters.

    With `alg = make_algorithm(**hparams)` and `state_0 = alg.init(params, key)`,
    the run is `state_{r+1} = step(state_r, batches[r])` for every round `r`
    (`ej.make_step`, one `lax.scan`), and the value is `J(state_R)`:

        "final_loss"         loss_fn(x_R, eval_batch), or, without eval_batch,
                             mean_p loss_fn(x_R, batches[R - 1, p])
        "mean_loss"          with eval_batch: mean_r loss_fn(x_{r+1}, eval_batch) (the
                             auxiliary model after each round); without: mean_r of the
                             per-round `loss` metric of `make_step` (the workers' losses
                             at their views, on their own batches, before round r's update)
        "final_b_hat"        the last round's `consistency/b_hat`
        ("distance_to", z)   ||x_R - z||^2
        callable J           J(state_R), a scalar

    where `x = ej.params(state)` is the auxiliary model. The derivatives are
    `dJ/dh` for each hyperparameter `h` (docs/theory.md section 5's dynamics differentiated
    through every round; see the module docstring for what is discrete).

    Args:
      make_algorithm: `(**hparams) -> ej.Algorithm`; it is called once with
        the concrete values (to validate them) and once inside the
        differentiated function with traced ones. Hashable (a function):
        compiled runs are cached per `make_algorithm` and `loss_fn`, so
        sweeping values of `hparams` compiles once.
      loss_fn: `(params, batch) -> scalar`, or `(scalar, aux)` with `has_aux`.
      params: the initial parameters (a pytree of float arrays).
      batches: a pytree of arrays `[R, P, ...]`: one batch per round and worker.
      hparams: `{name: float}`, the keyword arguments of `make_algorithm` to
        differentiate with respect to (computed in the parameters' dtype).
      key: the run's base key (a `jax.random.key`, or an int seed).
      objective: one of the objectives above.
      eval_batch: a batch (no worker axis) on which `"final_loss"` and
        `"mean_loss"` evaluate the auxiliary model, or None.
      wrt_params: also differentiate with respect to `params` (reverse mode
        only); the result is `grads["params"]`, a pytree like `params`.
      remat: in reverse mode, what the backward pass keeps (module docstring):
        `"sqrt"` (the default) `O(sqrt(R))` states, by two-level checkpointing
        in segments of `ceil(sqrt(R))` rounds; `"round"` the `R` states between
        rounds (each round rematerialised); `"none"` every round's
        intermediates. Values and derivatives agree to rounding.
      mode: `"reverse"` (`jax.value_and_grad`), `"forward"` (`jax.jvp`, one
        tangent per hyperparameter; memory independent of `R`) or `"auto"`
        (forward for a single hyperparameter without `wrt_params`, else reverse).
      has_aux: whether `loss_fn` returns `(loss, aux)` (aux is ignored).

    Returns:
      `(value, grads)`: the objective (a scalar array) and a dict with the keys
      of `hparams` (plus `"params"` with `wrt_params=True`).

    Raises:
      ValueError: `<argument>: got ...; expected ...` for a bad argument, or
        the factory's own error for a bad hyperparameter value.

    Example:
      >>> def make(learning_rate, beta):
      ...     return ej.async_sgd(learning_rate, 8, 8, compressor=ej.top_k(fraction=0.01),
      ...                         error_feedback=beta)
      >>> value, grads = ej.analysis.hypergradient(
      ...     make, loss_fn, params, batches, {"learning_rate": 0.05, "beta": 1.0}, key=0)
      >>> grads["beta"]  # d final_loss / d beta
    """
    if not callable(make_algorithm):
        validation.fail("make_algorithm", make_algorithm, "a callable (**hparams) -> Algorithm")
    if not callable(loss_fn):
        validation.fail("loss_fn", loss_fn, "a callable (params, batch) -> scalar")
    for name, flag in (("wrt_params", wrt_params), ("has_aux", has_aux)):
        if not isinstance(flag, bool):
            validation.fail(name, flag, "a bool")
    validation.check_choice("remat", remat, REMATS)
    validation.check_choice("mode", mode, MODES)
    values = _check_hparams(hparams, wrt_params)
    if mode == "forward" and wrt_params:
        validation.fail("mode", mode, "'reverse' or 'auto' with wrt_params=True (forward "
                        "mode would need one tangent per parameter)")
    if mode == "auto":
        mode = "forward" if len(values) == 1 and not wrt_params else "reverse"
    leaves = jax.tree.leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        validation.fail("params", validation.Text("a pytree with non-float or no leaves"),
                        "a pytree of float arrays")
    kind, objective_fn, point = _resolve_objective(objective, params)
    alg = make_algorithm(**values)
    if not isinstance(alg, base.Algorithm):
        validation.fail("make_algorithm", make_algorithm, "a callable returning an ej.Algorithm")
    if alg.info.gradient_count is not None:
        validation.fail("batches", validation.Text(f"stacked batches for {alg.info.name}"),
                        "an algorithm whose workers' batches follow the rounds (each worker of "
                        f"{alg.info.name} keys its batch by its own gradient count)")
    rounds = _num_rounds(batches, alg.num_workers)
    if alg.info.max_rounds is not None and rounds > alg.info.max_rounds:
        validation.fail("batches", validation.Text(f"{rounds} rounds"),
                        f"at most {alg.info.max_rounds}: the schedule (a recorded delay "
                        f"trace, or the system model's) covers {alg.info.max_rounds} rounds")
    dtype = jnp.result_type(*leaves)
    hp = {name: jnp.asarray(v, dtype) for name, v in values.items()}
    fn = _compiled(make_algorithm, loss_fn, has_aux, kind, objective_fn,
                   remat if mode == "reverse" else "none", eval_batch is not None, mode,
                   wrt_params,
                   tuple(values))
    value, grads = fn(hp, params, batches, base.as_key(key), eval_batch, point)
    order = tuple(values) + (("params",) if wrt_params else ())
    return value, {name: grads[name] for name in order}
