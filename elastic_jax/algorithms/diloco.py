"""DiLoCo: local SGD whose averaging is an outer optimizer step on the pseudo-gradient.

Each node `p` keeps its own model `v^p` and its inner chain's state (SGD,
momentum, AdamW, ...; kept across outer steps) and steps `v^p <- v^p - u^p`
every round. After every `H` rounds the nodes form the pseudo-gradient of the
round's global model `x_s`,

    Delta = mean_p C(x_s - v^p)        (C: an optional outer compressor)

and the outer optimizer (an optax transformation; by default Nesterov momentum
0.7 / 0.9) moves the global model, `x_s <- x_s + outer(Delta)`, which every node
then takes. With `F` fragments (streaming) the model's leaves are split into `F`
contiguous groups and fragment `f` is synchronised alone, after the rounds `r`
with `(r + 1) % H == ((f + 1) H / F) % H`: every parameter once per `H` rounds,
the fragments at staggered rounds. `F = 1` is plain DiLoCo.

The outer compressor acts on each node's pseudo-gradient in `combine`: a bare
compressor (`ej.qsgd(7)`: 4 bits an entry), one wrapped by `ej.error_feedback`
(Top-k with each node's residual `e^p`) or `ej.powersgd(r)` (collective, its
own error feedback). The auxiliary model is the mean local model minus the mean
residual owed, `x = mean_p v^p - mean_p e^p`, tracked as `x <- x - mean_p u^p`
and reset at a synchronisation to `x_s - mean_p e^p`: with outer SGD of rate 1
it is local SGD's, whose model the global model then equals. What the outer
optimizer adds beyond it is the jump `x_s + outer(Delta) - (mean_p v^p -
mean_p e^p)`, reported as `diloco/outer_gap` (docs/theory.md section 12).

References:
  A. Douillard, Q. Feng, A. A. Rusu, R. Chhaparia, Y. Donchev, A. Kuncoro,
  M. Ranzato, A. Szlam, J. Shen, "DiLoCo: Distributed Low-Communication Training
  of Language Models", arXiv:2311.08105.
  A. Douillard et al., "Streaming DiLoCo with overlapping communication",
  arXiv:2501.18512.
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elastic_jax import base, bounds, chain, consistency, validation
from elastic_jax import clock as clock_lib
from elastic_jax import compressors as compressors_lib
from elastic_jax import error_feedback as error_feedback_lib
from elastic_jax import powersgd as powersgd_lib
from elastic_jax.algorithms import _common


class DilocoWorkers(NamedTuple):
    model: Any  # pytree [P, ...]: local models (a fragment's is stale right after its sync)
    rule: Any  # the inner chain's state, stacked [P, ...], kept across outer steps


class DilocoShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key
    params: Any  # the global model x_s: each fragment as of its last synchronisation
    auxiliary: Any  # x: the mean local model minus the mean residual owed
    outer: tuple  # per fragment: (the outer optimizer's state, the outer compressor's)
    stats: consistency.ConsistencyState


def default_outer_optimizer() -> optax.GradientTransformation:
    """`optax.sgd(0.7, momentum=0.9, nesterov=True)`, DiLoCo's outer optimizer."""
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


def fragment_leaves(params, fragments: int) -> list[list[int]]:
    """The leaf indices of each fragment: `L` leaves in `jax.tree.leaves` order split into
    `F` contiguous groups of `ceil(L / F)` or `floor(L / F)` leaves (the first `L mod F`
    groups the larger); `F <= L` (one line naming `fragments` otherwise)."""
    count = len(jax.tree.leaves(params))
    if fragments > count:
        validation.fail("fragments", fragments, f"an integer in [1, {count}]: at most the "
                        f"model's {count} leaves (a fragment is a contiguous group of leaves)")
    return [list(map(int, group)) for group in np.array_split(np.arange(count), fragments)]


def sync_offsets(period: int, fragments: int) -> list[int]:
    """Fragment `f` is synchronised after the rounds `r` with `(r + 1) % H` equal to this."""
    return [((f + 1) * period // fragments) % period for f in range(fragments)]


class Outer(NamedTuple):
    """How the nodes' pseudo-gradients of one fragment become their mean (the outer compressor).

    Attributes:
      init: `(leaves, P, key) -> state`.
      reduce: `(state, stacked leaves [P, ...], keys [P]) -> (mean leaves, state)`.
      owed: `state -> mean residual leaves`, or None where nothing is held back.
      residuals: `state -> the nodes' residuals [P, ...]`, or None.
      collectives: `leaves -> ((pattern, bits per node), ...)`, the fragment's sync.
      rho: `leaves -> factor`: `||e^p|| <= rho ||Delta||max` (0: nothing held back;
        inf: no bound).
      bound_kind: `"deterministic"`, `"expectation"` or `"none"`.
    """

    init: Callable
    reduce: Callable
    owed: Callable
    residuals: Callable
    collectives: Callable
    rho: Callable
    bound_kind: str


def _none(state):
    del state


def _dense_bits(leaves) -> int:
    return compressors_lib.BITS_PER_VALUE * sum(int(np.size(x)) for x in leaves)


def outer_reduction(compressor) -> Outer:
    """The `Outer` of `outer_compressor` (None, a compressor, EF around one, PowerSGD)."""
    if compressor is None:
        return Outer(lambda leaves, p, key: (), lambda state, stacked, keys: (
            [consistency.worker_mean(x) for x in stacked], state), _none, _none,
            lambda leaves: (("all_reduce", _dense_bits(leaves)),), lambda leaves: 0.0,
            "deterministic")
    if powersgd_lib.is_powersgd(compressor):
        def reduce_collective(state, stacked, keys):
            del keys
            return compressor.reduce(list(stacked), state)

        return Outer(
            lambda leaves, p, key: compressor.init(list(leaves), p, key), reduce_collective,
            compressor.mean_residual,
            lambda state: state.residual if compressor.error_feedback else None,
            lambda leaves: tuple(("all_reduce", b) for b in compressor.phase_bits(list(leaves))
                                 if b),
            lambda leaves: math.inf if compressor.error_feedback else 0.0,
            "none" if compressor.error_feedback else "deterministic")
    if not isinstance(compressor, compressors_lib.Compressor):
        validation.fail("outer_compressor", compressor, "None, a compressor such as "
                        "ej.qsgd(7), one wrapped by ej.error_feedback(...) or ej.powersgd(rank)")
    wrapped = compressor.spec.name == "error_feedback"
    inner = compressor.inner if wrapped else compressor
    dense = inner.spec.name == "identity"

    def collectives(leaves):
        bits = compressors_lib.compression_info(inner, list(leaves)).bits
        return (("all_reduce" if dense else "all_gather", bits),)

    def compress_one(x, key):
        return inner.spec.compress(x, key)

    if not wrapped:
        def reduce_bare(state, stacked, keys):
            sent = jax.vmap(compress_one)(list(stacked), keys)
            return [consistency.worker_mean(x) for x in sent], state

        return Outer(lambda leaves, p, key: (), reduce_bare, _none, _none, collectives,
                     lambda leaves: 0.0, "deterministic")

    beta = compressor.beta

    def init_ef(leaves, p, key):
        del key
        compressors_lib.compression_info(inner, list(leaves))  # k <= d, one line otherwise
        return consistency.wide_zeros(list(leaves), (p,))

    def reduce_ef(state, stacked, keys):
        sent, residual = jax.vmap(
            lambda e, x, k: error_feedback_lib.ef_step(e, x, inner.spec.compress, k, beta))(
                state, list(stacked), keys)
        return [consistency.worker_mean(x) for x in sent], residual

    def rho(leaves):
        return bounds.rho(beta, compressors_lib.compression_info(inner, list(leaves)).delta)

    kind = "expectation" if inner.spec.contractive == "expectation" else "deterministic"
    return Outer(init_ef, reduce_ef, lambda state: [consistency.worker_mean(e) for e in state],
                 lambda state: state, collectives, rho, kind)


def diloco(learning_rate, num_workers: int, period: int, *, outer_optimizer=None,
           outer_compressor=None, fragments: int = 1, rule=None, clip_norm=None,
           optimizer_placement: str = "worker", system=None) -> base.Algorithm:
    """DiLoCo: `period` inner steps per node, then an outer optimizer step on the mean
    pseudo-gradient, optionally compressed and streamed in `fragments`.

    Update rule (node `p`, global model `x_s`, `H = period`):

        every round:        v^p <- v^p - u^p            (u^p: the inner chain's output)
        after rounds with (r + 1) % H == 0 (per fragment, at its offset):
                            Delta = mean_p C(x_s - v^p),  x_s <- x_s + outer(Delta),  v^p <- x_s

    Elastic consistency (`ej.bounds.diloco`): the views are the local models and
    the auxiliary model their mean minus the mean residual owed; between two
    synchronisations of a fragment the views differ from it as local SGD's do,
    plus the residual: `B = 2 (H - 1)(1 - 1/P) U + rho H U` (`rho` of the outer
    error feedback, 0 without; `inf` with PowerSGD's). The outer step's jump is
    `diloco/outer_gap` (docs/theory.md section 12).

    Args:
      learning_rate: the inner rate: a non-negative float or an optax schedule.
      num_workers: `P >= 1`.
      period: `H >= 1`, inner steps per outer step.
      outer_optimizer: an optax transformation applied to the pseudo-gradient
        (`optax.sgd(0.7, momentum=0.9, nesterov=True)` when None); its state is
        kept per fragment.
      outer_compressor: None, a bare compressor (`ej.qsgd(7)`, `ej.top_k(...)`),
        one wrapped by `ej.error_feedback` (Top-k with error feedback; never
        around QSGD), or `ej.powersgd(rank)`; applied to each node's
        pseudo-gradient of a fragment.
      fragments: `F >= 1`, a divisor of `period` and at most the number of
        leaves (checked at init): streaming DiLoCo.
      rule: the inner chain (`ej.chain(...)`, without compression); exclusive
        with `clip_norm`. Default `ej.chain(ej.sgd())`.
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      optimizer_placement: `"worker"` only: each node runs its inner chain.
      system: None, or an `ej.clock.system(...)`: nodes take their inner steps
        one after another; a round that synchronises a fragment ends when the
        slowest node and the fragment's collective (an all-reduce of its
        pseudo-gradient; an all-gather when compressed; PowerSGD's two
        all-reduces) are done (docs/theory.md section 11).

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.diloco(0.1, 8, period=16, rule=ej.chain(ej.adamw()),
      ...                 outer_compressor=ej.error_feedback(ej.top_k(fraction=0.01)))

    References:
      A. Douillard et al., arXiv:2311.08105 (DiLoCo); arXiv:2501.18512 (streaming).
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    period = validation.check_int("period", period, lo=1)
    fragments = validation.check_int("fragments", fragments, lo=1)
    if period % fragments:
        validation.fail("fragments", fragments, f"a divisor of period = {period} (each "
                        "fragment is synchronised once per period, at its own round)")
    if outer_optimizer is None:
        outer_optimizer = default_outer_optimizer()
    if (isinstance(outer_optimizer, compressors_lib.Compressor)
            or not isinstance(outer_optimizer, optax.GradientTransformation)):
        validation.fail("outer_optimizer", outer_optimizer, "None or an optax "
                        "GradientTransformation such as optax.sgd(0.7, momentum=0.9, "
                        "nesterov=True)")
    outer = outer_reduction(outer_compressor)
    rule = chain.resolve(rule, None, False, clip_norm, "diloco", compression=False)
    _common.check_placement(optimizer_placement)
    offsets = sync_offsets(period, fragments)
    kinds = {rule.bound_kind, outer.bound_kind}
    bound_kind = "none" if "none" in kinds else (
        "expectation" if "expectation" in kinds else "deterministic")

    def groups(params):
        return fragment_leaves(params, fragments)

    def pick(leaves, group):
        return [leaves[i] for i in group]

    def wire(params):
        """Per fragment, the collectives of its synchronisation."""
        leaves = jax.tree.leaves(params)
        return tuple(outer.collectives(pick(leaves, g)) for g in groups(params))

    timing = _common.clock(system, num_workers, wire, lambda steps, size: clock_lib.periodic(
        system, num_workers, period, dict(zip(offsets, steps, strict=True))))

    def init(params, key):
        key = base.as_key(key)
        leaves = jax.tree.leaves(params)
        state = []
        for f, group in enumerate(groups(params)):
            part = pick(leaves, group)
            state.append((outer_optimizer.init(part), outer.init(
                part, num_workers, base.derive_key(key, base.TAG_FACTORS, 0, f))))
        shared = DilocoShared(params=_common.copy_params(params),
                              auxiliary=_common.copy_params(params), outer=tuple(state),
                              **_common.counters(params, key))
        workers = DilocoWorkers(_common.repeated(params, num_workers),
                                rule.init(params, num_workers))
        return shared, workers

    def fresh(round_, params):
        """Per leaf: whether its fragment was synchronised right before this round."""
        flags = [None] * len(jax.tree.leaves(params))
        for group, offset in zip(groups(params), offsets, strict=True):
            for i in group:
                flags[i] = round_ % period == offset
        return jax.tree.unflatten(jax.tree.structure(params), flags)

    def view(index, worker, shared):
        del index
        return jax.tree.map(lambda synced, x, v: jnp.where(synced, x, v),
                            fresh(shared.round, shared.params), shared.params, worker.model)

    def local(index, worker, grad, key, shared):
        own_view = view(index, worker, shared)
        sq = consistency.tree_sq_norm(jax.tree.map(lambda x, v: x - v, shared.auxiliary,
                                                   own_view))
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key, own_view)
        model = _common.apply(own_view, sent.update)
        # The pseudo-gradient of every fragment (read at the fragment's synchronisation).
        delta = jax.tree.map(lambda x, v: (x - v).astype(x.dtype), shared.params, model)
        return DilocoWorkers(model, state), (sent, sq, delta)

    def combine(shared, inputs):
        sent, sq, delta = inputs
        eta = schedule(shared.round)
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(shared.params))
        dtype = stats.m_hat.dtype
        # The inner step, as local SGD tracks the mean local model.
        tracked = _common.apply(shared.auxiliary,
                                jax.tree.map(consistency.worker_mean, sent.update))
        xs, aux = jax.tree.leaves(shared.params), jax.tree.leaves(tracked)
        deltas, treedef = jax.tree.leaves(delta), jax.tree.structure(shared.params)
        new_xs, new_aux, states = list(xs), list(aux), []
        wire_bits, rhos, residual_norms = jnp.zeros((), dtype), [], []
        node_keys = base.worker_keys(shared.key, base.TAG_OUTER, shared.round, num_workers)
        for f, (group, offset) in enumerate(zip(groups(shared.params), offsets, strict=True)):
            synced = (shared.round + 1) % period == offset
            optimizer_state, compressor_state = shared.outer[f]
            part = pick(xs, group)
            keys = jax.vmap(lambda k, f=f: jax.random.fold_in(k, f))(node_keys)
            mean, compressor_new = outer.reduce(compressor_state, pick(deltas, group), keys)
            step, optimizer_new = outer_optimizer.update(mean, optimizer_state, part)
            moved = optax.apply_updates(part, step)
            owed = outer.owed(compressor_new)
            reset = moved if owed is None else _common.apply(moved, owed)
            for i, x_new, a_new in zip(group, moved, reset, strict=True):
                new_xs[i] = jnp.where(synced, x_new, xs[i])
                new_aux[i] = jnp.where(synced, a_new.astype(aux[i].dtype), aux[i])
            states.append(jax.tree.map(lambda n, o, s=synced: jnp.where(s, n, o),
                                       (optimizer_new, compressor_new), (optimizer_state,
                                                                         compressor_state)))
            bits = sum(b for _, b in outer.collectives(part))
            wire_bits = wire_bits + jnp.where(synced, float(bits), 0.0).astype(dtype)
            rhos.append(outer.rho(part))
            residuals = outer.residuals(states[-1][1])
            if residuals is not None:
                residual_norms.append(jax.vmap(consistency.tree_sq_norm)(residuals))
        params, auxiliary = treedef.unflatten(new_xs), treedef.unflatten(new_aux)
        update_b, _ = _common.bounds(rule, stats, shared.params)
        inner_b = bounds.diloco(period=period, num_workers=num_workers, update=update_b)
        rho = math.sqrt(sum(r * r for r in rhos))  # fragments' residuals are orthogonal
        # In distance units, each term times its own largest rate: the inner steps of
        # the last H - 1 rounds; the residuals, of every round so far.
        window = consistency.window_max(schedule, shared.round, period - 1)
        if math.isinf(rho):
            distance = jnp.asarray(jnp.inf, dtype)
        else:
            residual_b = bounds.diloco_residual(period=period, update=update_b, rho=rho)
            distance = inner_b * window + residual_b * stats.eta_max
        metrics = consistency.metrics(sq.astype(dtype), eta, distance, 1.0)
        # comm/bits: every node sends the synchronised fragment's (compressed) pseudo-gradient.
        metrics.update(_common.metrics(rule, stats, eta, sent, shared.auxiliary, auxiliary,
                                       num_workers * wire_bits, bits=1))
        gap = jax.tree.map(lambda a, t: a - t, auxiliary, tracked)
        metrics["diloco/outer_gap"] = consistency.per_eta(
            consistency.tree_norm(gap).astype(dtype), eta)
        if residual_norms:
            metrics["ef/residual_norm"] = jnp.sqrt(jnp.max(sum(residual_norms))).astype(dtype)
        new_shared = shared._replace(round=shared.round + 1, params=params, auxiliary=auxiliary,
                                     outer=tuple(states), stats=stats)
        return new_shared, metrics

    def auxiliary_of(state):
        return state.shared.auxiliary

    def actual(state):
        return state.shared.params

    return base.algorithm("diloco", num_workers, bound_kind, init=init, view=view, local=local,
                          auxiliary=auxiliary_of, actual=actual, rule=rule,
                          combine=_common.timed(combine, timing, lambda s: s.params),
                          max_rounds=_common.horizon(system), clock=timing)
