"""What every algorithm shares: its counters, the running maxima, its common metrics.

Each algorithm module defines its state (a shared `NamedTuple` with `round`,
`key`, `stats` and its own fields; a per-worker `NamedTuple` with the chain's
state) and its `view`, `local`, `combine`, `auxiliary` and `actual`; the
pieces every one of them needs live here once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from elastic_jax import base, consistency, validation
from elastic_jax import clock as clock_lib
from elastic_jax.chain import Rule, Sent


def setup(learning_rate, num_workers):
    """The validated learning-rate schedule and number of workers of a factory."""
    return (validation.as_schedule(learning_rate),
            validation.check_int("num_workers", num_workers, lo=1))


def check_placement(optimizer_placement, choices=("worker",)) -> str:
    """`optimizer_placement` among `choices` (one line naming it otherwise).

    Every variant keeps its base optimizer at the workers (`"worker"`);
    `sync_sgd` also offers `"server"` (docs/theory.md section 9).
    """
    if not isinstance(optimizer_placement, str) or optimizer_placement not in choices:
        note = "" if "server" in choices else (" (server placement is defined for sync_sgd "
                                               "only)")
        validation.fail("optimizer_placement", optimizer_placement,
                        "one of " + ", ".join(repr(c) for c in choices) + note)
    return optimizer_placement


def counters(params, key) -> dict:
    """`round`, `key` and `stats` of a fresh shared state."""
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return {"round": jnp.zeros((), jnp.int32), "key": base.as_key(key),
            "stats": consistency.init(dtype)}


def copy_params(params):
    return jax.tree.map(jnp.asarray, params)


def stacked(params, size: int, dtype_of=lambda x: x.dtype):
    """Zeros `[size, ...]` like each leaf of `params` (in `dtype_of(leaf)`)."""
    return jax.tree.map(lambda x: jnp.zeros((size,) + jnp.shape(x), dtype_of(jnp.asarray(x))),
                        params)


def repeated(params, size: int):
    """`size` copies of `params` stacked on a leading axis."""
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (size,) + jnp.shape(x)).copy(), params)


def check_staleness(staleness):
    """`staleness` in [0, 1] when concrete (`ValueError` naming it otherwise); a tracer passes."""
    return validation.check_real("staleness", staleness, lo=0.0, hi=1.0)


def scale_gap(staleness, gap):
    """`staleness * gap`, leaf by leaf in each leaf's dtype.

    Where the freshest view is the auxiliary model `x` itself (message passing,
    elastic scheduling), the blended view `(1 - s) x + s (x + gap)` is
    `x + s gap`, and its distance to `x` is exactly `s` times the delayed one.
    """
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


def apply(params, update):
    """`params - update`, in the parameters' dtype."""
    return jax.tree.map(lambda x, u: (x - u.astype(x.dtype)).astype(x.dtype), params, update)


def observe(stats: consistency.ConsistencyState, sent: Sent, eta, live=None, *,
            measure_update: bool):
    """Folds the round's gradient norms (of live workers) into the running maxima, and its
    update norms where `measure_update` (the variant's bound reads `u_hat`: pass
    `rule.measures_update(params)`); otherwise `u_hat` stays as it was and the
    workers' update norms are never computed."""
    grad_norms = sent.grad_norm
    update_norms = sent.update_norm if measure_update else None
    if live is not None:
        grad_norms = jnp.where(live, grad_norms, 0)
        update_norms = None if update_norms is None else jnp.where(live, update_norms, 0)
    return consistency.observe(stats, grad_norms, eta, update_norms)


def bounds(rule: Rule, stats: consistency.ConsistencyState, params):
    """`(U, R)`: the chain's bounds on `||u|| / eta` and `||pending|| / eta` (`Rule.bounds`)."""
    update, residual = rule.bounds(stats.m_hat, stats.u_hat, params)
    dtype = stats.m_hat.dtype
    return jnp.asarray(update, dtype), jnp.asarray(residual, dtype)


def metrics(rule: Rule, stats, eta, sent: Sent, old, new, senders, live=None,
            bits=None) -> dict:
    """`grad_norm/max`, `update_norm`, `comm/bits`, `learning_rate`, the links' metrics.

    `grad_norm/max` is `m_hat`, the largest norm the base optimizer received
    (after clipping, where the chain clips).

    `comm/bits` is `senders` messages of `bits` each, by default the chain's
    (docs/theory.md section 7); `update_norm` is `||new - old|| / eta`.
    """
    dtype = stats.m_hat.dtype
    diff = jax.tree.map(lambda a, b: a - b, new, old)
    out = {
        "grad_norm/max": stats.m_hat,
        "update_norm": consistency.per_eta(consistency.tree_norm(diff).astype(dtype), eta),
        "comm/bits": float(rule.bits(old) if bits is None else bits)
        * jnp.asarray(senders, dtype),
        "learning_rate": jnp.asarray(eta, dtype),
    }
    if rule.holds_back:
        norms = sent.pending_norm if live is None else jnp.where(live, sent.pending_norm, 0)
        out["ef/residual_norm"] = jnp.max(norms).astype(dtype)
    aux = sent.aux if live is None else {k: jnp.where(live, v, 0) for k, v in sent.aux.items()}
    out.update({k: jnp.asarray(v, dtype) for k, v in rule.metrics(aux, old).items()})
    return out


def reduce_pending(rule: Rule, chain_state, reduce):
    """`reduce` (a worker mean or sum) of what every worker's chain holds back, or None."""
    pending = rule.pending(chain_state)
    if pending is None:
        return None
    return jax.tree.map(reduce, pending)


# ------------------------------------------------------------------ the clock


def dense(rule: Rule) -> bool:
    """Whether the chain sends dense updates (no compressor, or the identity)."""
    return rule.compressor is None or rule.compressor.spec.name == "identity"


def clock(system, num_workers: int, bits, timeline, *, replays: bool = False):
    """A variant's schedule under `system`: `params -> ej.clock.Timeline`, or None.

    `timeline(bits, size)` is the variant's time semantics (`elastic_jax.clock`)
    for messages of `bits(params)` per node (docs/theory.md section 7: the
    chain's, `Rule.bits`, or what else the variant sends) and a model of `size`
    entries; it depends on the parameters' shapes only, so it is computed once
    per shape, on the host, when a program is traced (or by `ej.clock.times`).
    A recorded run (`ej.clock.replay`) is refused unless the variant `replays`
    it (and checks it itself).
    """
    if system is None:
        return None
    if not (replays and isinstance(system, clock_lib.Record)):
        clock_lib.check(system, num_workers)
    cached = functools.lru_cache(maxsize=8)(timeline)
    return lambda params: cached(bits(params), sum(jnp.size(x) for x in jax.tree.leaves(params)))


def horizon(system, max_rounds=None):
    """The rounds a run may go to: the system's (or a recorded trace's), else None."""
    return max_rounds if system is None else system.rounds


def timed(combine, schedule, params_of):
    """`combine` that also reports the round's times: the one place a clock reaches a round.

    `schedule` is `clock(...)` (None: `combine` itself); `params_of(shared)` the
    model whose shapes size the messages. Every per-round entry of the
    timeline's float64 `metrics` (`time/elapsed`, `time/round`,
    `time/idle_fraction`, `comm/seconds`, ...) is read at the round and
    rounded once to the metrics' dtype (at least float32).
    """
    if schedule is None:
        return combine

    def with_time(shared, messages):
        new_shared, metrics = combine(shared, messages)
        timeline = schedule(params_of(shared))
        dtype = jnp.promote_types(jnp.result_type(metrics["learning_rate"]), jnp.float32)
        metrics = dict(metrics)
        for name, values in timeline.metrics.items():
            metrics[name] = jnp.asarray(values, dtype)[shared.round]
        return new_shared, metrics

    return with_time
