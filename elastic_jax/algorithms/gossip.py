"""Decentralized (gossip) SGD: each node steps its own model and averages with its neighbours.

There is no central model. With the nodes' models the columns of `X` (`d x P`)
and `U` their chains' updates (`eta g` for plain SGD), every round is

    X <- (X - U) W_r,

`W_r` the topology's mixing matrix on every `H`-th round (`(r + 1) % H == 0`,
`H = local_steps`) and `I` on the others (docs/theory.md section 10). `W_r` is
doubly stochastic, so the mean of the models follows SGD with the gradients
taken at the nodes' models: the views are the nodes' models, the auxiliary
model is their mean (minus the mean of what the chains hold back, under
EF14). CHOCO-SGD (`gossip_compressor`) sends compressed differences to public
copies instead of models.

The node models live in the shared state (replicated, `P x d`): `local` steps
a node and sends its half-step model; `combine` mixes the gathered models in a
fixed order (bitwise the same on any mesh with `worker_loop="map"`).

References:
  A. Koloskova, N. Loizou, S. Boreiri, M. Jaggi, S. Stich, "A Unified Theory of
  Decentralized SGD with Changing Topology and Local Updates", arXiv:2003.10422.
  A. Koloskova, S. Stich, M. Jaggi, "Decentralized Stochastic Optimization and
  Gossip Algorithms with Compressed Communication", arXiv:1902.00340 (CHOCO-SGD).
  X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu, "Can Decentralized
  Algorithms Outperform Centralized Algorithms?", arXiv:1705.09056.
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import base, bounds, chain, consistency, topologies, validation
from elastic_jax import clock as clock_lib
from elastic_jax import compressors as compressors_lib
from elastic_jax.algorithms import _common


class GossipWorkers(NamedTuple):
    rule: Any  # the chain's state, stacked [P, ...]


class GossipShared(NamedTuple):
    round: jax.Array  # [] int32
    key: jax.Array  # [] typed key: the base key
    models: Any  # pytree [P, ...]: the nodes' models (the views)
    public: Any  # CHOCO: pytree [P, ...], the public copies xhat; else None
    stats: consistency.ConsistencyState


def _stacked_neighbours(schedule: topologies.Mixing) -> tuple[np.ndarray, np.ndarray]:
    """`(index [T, P, K], weights [T, P, K])` of every matrix of the schedule, padded to one K."""
    parts = [topologies.neighbours(w) for w in schedule.matrices]
    width = max(index.shape[1] for index, _ in parts)
    nodes = np.arange(schedule.num_workers, dtype=np.int32)[:, None]
    index = np.stack([np.concatenate([i, np.repeat(nodes, width - i.shape[1], 1)], 1)
                      for i, _ in parts])
    weights = np.stack([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for _, w in parts])
    return index, weights


def _matching(key, num_workers: int):
    """A uniformly random perfect matching as `(index [P, 2], weights [P, 2])`: self, partner.

    Pairs `perm[i]` with `perm[P // 2 + i]` for a random permutation `perm`; for
    odd `P` the last node of `perm` is its own partner (it keeps its model).
    """
    perm = jax.random.permutation(key, num_workers)
    half = num_workers // 2
    first, second = perm[:half], perm[half:2 * half]
    nodes = jnp.arange(num_workers)
    partner = nodes.at[first].set(second).at[second].set(first)
    return jnp.stack([nodes, partner], axis=1), jnp.full((num_workers, 2), 0.5)


def mix(models, index, weights):
    """`new_i = sum_k weights[i, k] x_{index[i, k]}` for every leaf `[P, ...]`.

    A left fold over the neighbour slots `k`, in their fixed order: the same
    operations on every mesh.
    """

    def leaf(x):
        w = jnp.asarray(weights).astype(x.dtype)
        total = None
        for k in range(index.shape[1]):
            term = jnp.take(x, index[:, k], axis=0) * w[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
            total = term if total is None else total + term
        return total

    return jax.tree.map(leaf, models)


def _per_node_sq(center, models):
    """`[P]` squared distances `||center - x_i||^2` (`center` a params tree, `models` stacked)."""
    diff = jax.tree.map(lambda c, x: c[None] - x, center, models)
    return jax.vmap(consistency.tree_sq_norm)(diff)


def gossip_sgd(
    learning_rate,
    num_workers: int,
    *,
    topology,
    local_steps: int = 1,
    rule=None,
    compressor=None,
    error_feedback=False,
    clip_norm=None,
    gossip_compressor=None,
    gamma=1.0,
    optimizer_placement: str = "worker",
    system=None,
) -> base.Algorithm:
    """Decentralized SGD over a topology, with local steps and optional CHOCO compression.

    Update rule (round `r`, node `i`, `u_i` its chain's output, `H = local_steps`):

        y_i = x_i - u_i
        x_i <- sum_j W_r[j, i] y_j     if (r + 1) % H == 0, else x_i <- y_i

    With `gossip_compressor = C` (CHOCO-SGD), each mixing round node `i` sends
    `q_i = C(y_i - xhat_i)`, every public copy moves `xhat_j <- xhat_j + q_j`,
    and `x_i <- y_i + gamma (sum_j W_r[j, i] xhat_j - xhat_i)`; the copies start
    at the initial model (which every node knows).

    Elastic consistency (`ej.bounds.gossip_sgd`): the views are the nodes'
    models, the auxiliary model their mean, and

        B = factor U + R,   factor = sup_t max_i sum_{s<t} ||(W_s ... W_{t-1} - J) e_i||_1

    computed once in float64 (`ej.topologies.consensus_factor`: tight for
    updates of norm `eta U`); `U`, `R` the chain's bounds (`U = M` for plain
    SGD). No deterministic bound (`inf`, `bound_kind="none"`) for random
    matching (one matching repeated mixes nothing more), for a schedule that
    does not contract (a non-lazy bipartite graph), and for CHOCO (its
    disagreement also carries the compression error of `y - xhat`, bounded
    only relative to itself); `b_hat` is measured in every case.

    Metrics besides every variant's: `gossip/consensus_distance`
    (`(1/P) sum_i ||xbar - x_i||^2` of the round's views), `gossip/spectral_gap`
    and `gossip/norm_gap` (`ej.topologies.gaps`); `comm/bits` counts one send
    per node per mixing round: the model (`32 d`) or CHOCO's compressed `q_i`.

    Args:
      learning_rate: a non-negative float or an optax schedule of the round.
      num_workers: `P >= 1`, the nodes.
      topology: a name of `ej.topologies.NAMES` (`"ring"`, `"torus"`,
        `"hypercube"`, `"exponential"`, `"one_peer_exponential"`,
        `"random_matching"`, `"star"`, `"complete"`), or a doubly stochastic
        matrix `[P, P]` or sequence `[T, P, P]` (the `k`-th mixing round uses
        `W_{k mod T}`).
      local_steps: `H >= 1`, rounds per mixing round (local steps between mixings).
      rule: each node's chain (`ej.chain(...)`); exclusive with the three
        shorthands below. A compressor or error feedback in the chain shapes
        the node's own update; what goes on the wire is its model.
      compressor: shorthand: a bare compressor applied to each node's update.
      error_feedback: shorthand: False, True (`beta = 1`) or a float `beta`.
      clip_norm: shorthand: clip each gradient to this global norm (> 0).
      gossip_compressor: None (send models) or a bare compressor of the library
        for CHOCO-SGD.
      gamma: CHOCO's mixing step in (0, 1]; 1.0 without `gossip_compressor`.
      optimizer_placement: `"worker"` only (each node runs its chain's base
        optimizer); server placement is defined for `ej.sync_sgd`.
      system: None, or an `ej.clock.system(...)`: each node takes its `H`
        local steps one after another, and a mixing round ends when the
        slowest node has computed and sent its message to its `deg` neighbours
        (`ej.topologies.degree`) on its uplink, `alpha + deg bits / beta`
        (docs/theory.md section 11); each round reports `time/*` and
        `comm/seconds`. The run may not go beyond the system's rounds.

    Returns:
      An `ej.Algorithm`.

    Example:
      >>> alg = ej.gossip_sgd(0.05, 16, topology="ring", local_steps=2)
      >>> choco = ej.gossip_sgd(0.05, 16, topology="torus",
      ...                       gossip_compressor=ej.top_k(fraction=0.1), gamma=0.5)
      >>> timed = ej.gossip_sgd(0.05, 16, topology="ring", system=ej.clock.system(
      ...     ej.clock.constant(0.01), rounds=100, network=ej.clock.network(1e-4, 1e9)))
    """
    schedule, num_workers = _common.setup(learning_rate, num_workers)
    local_steps = validation.check_int("local_steps", local_steps, lo=1)
    mixing = topologies.mixing(topology, num_workers)
    _common.check_placement(optimizer_placement)
    rule = chain.resolve(rule, compressor, error_feedback, clip_norm, "gossip_sgd")
    if gossip_compressor is not None:
        if not isinstance(gossip_compressor, compressors_lib.Compressor) or (
                gossip_compressor.spec.name == "error_feedback"):
            validation.fail("gossip_compressor", gossip_compressor,
                            "None or a bare compressor such as ej.top_k(...)")
    validation.check_real("gamma", gamma, lo=0.0, hi=1.0, lo_open=True)
    if gossip_compressor is None and validation.concrete_number(gamma) not in (None, 1.0):
        validation.fail("gamma", gamma, "1.0 without gossip_compressor (CHOCO's mixing step)")
    choco = gossip_compressor is not None
    finite = mixing.finite and not choco
    kind = rule.bound_kind if finite else "none"
    fixed = None if mixing.matrices is None else _stacked_neighbours(mixing)

    def wire_bits(params) -> int:
        """Bits one node sends in a mixing round: its model, or CHOCO's compressed `q_i`."""
        if choco:
            return compressors_lib.compression_info(gossip_compressor, params).bits
        return compressors_lib.BITS_PER_VALUE * sum(x.size for x in jax.tree.leaves(params))

    degree = topologies.degree(mixing)
    timing = _common.clock(system, num_workers, wire_bits, lambda bits, size: clock_lib.gossip(
        system, num_workers, bits, degree, local_steps))

    @functools.cache
    def constants() -> tuple[float, float, float]:
        """`(factor, spectral_gap, norm_gap)`, float64, computed once (at the first init)."""
        factor = topologies.consensus_factor(mixing, local_steps) if finite else math.inf
        return (factor, *topologies.gaps(mixing))

    def init(params, key):
        rule.validate(params)
        if choco:
            compressors_lib.compression_info(gossip_compressor, params)
        constants()
        models = _common.repeated(params, num_workers)
        public = _common.repeated(params, num_workers) if choco else None
        shared = GossipShared(**_common.counters(params, key), models=models, public=public)
        return shared, GossipWorkers(rule.init(params, num_workers))

    def view(index, worker, shared):
        del worker
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False),
                            shared.models)

    def local(index, worker, grad, key, shared):
        own = view(index, worker, shared)
        sent, state = rule.apply(grad, worker.rule, schedule(shared.round), key, own)
        half = _common.apply(own, sent.update)
        sends = None
        if choco:
            public = view(index, worker, shared._replace(models=shared.public))
            difference = jax.tree.map(lambda y, h: y - h, half, public)
            stochastic = gossip_compressor.spec.stochastic
            sends = gossip_compressor.spec.compress(
                difference, jax.random.fold_in(key, len(rule.links)) if stochastic else None)
        return GossipWorkers(state), (sent, half, sends)

    def neighbours_of(shared):
        """The round's mixing as `(index [P, K], weights [P, K])`."""
        if fixed is None:
            key = base.derive_key(shared.key, base.TAG_TOPOLOGY, shared.round, num_workers)
            return _matching(key, num_workers)
        index, weights = fixed
        if index.shape[0] == 1:
            return index[0], weights[0]
        phase = (shared.round // local_steps) % index.shape[0]
        return jnp.asarray(index)[phase], jnp.asarray(weights)[phase]

    def combine(shared, message):
        sent, half, sends = message
        eta = schedule(shared.round)
        old_mean = jax.tree.map(consistency.worker_mean, shared.models)
        stats = _common.observe(shared.stats, sent, eta,
                                measure_update=rule.measures_update(old_mean))
        dtype = stats.m_hat.dtype
        mixes = (shared.round + 1) % local_steps == 0
        index, weights = neighbours_of(shared)
        public = shared.public
        if choco:
            public = jax.tree.map(lambda h, q: jnp.where(mixes, h + q, h), public, sends)
            mixed = jax.tree.map(lambda y, m, h: y + jnp.asarray(gamma).astype(y.dtype) * (m - h),
                                 half, mix(public, index, weights), public)
        else:
            mixed = mix(half, index, weights)
        models = jax.tree.map(lambda m, y: jnp.where(mixes, m, y), mixed, half)

        old = _aux(old_mean, sent.pending)
        new = _aux(jax.tree.map(consistency.worker_mean, models), sent.pending_after)
        update_b, residual = _common.bounds(rule, stats, old)
        factor, spectral_gap, norm_gap = constants()
        bound_b = bounds.gossip_sgd(factor=factor, update=update_b,
                                    residual=residual) if finite else jnp.inf
        sq = _per_node_sq(old, shared.models).astype(dtype)
        metrics = consistency.metrics(sq, eta, bound_b, stats.eta_max)
        metrics.update(_common.metrics(rule, stats, eta, sent, old, new,
                                       jnp.where(mixes, num_workers, 0), bits=wire_bits(old)))
        metrics["gossip/consensus_distance"] = consistency.worker_mean(
            _per_node_sq(old_mean, shared.models)).astype(dtype)
        metrics["gossip/spectral_gap"] = jnp.asarray(spectral_gap, dtype)
        metrics["gossip/norm_gap"] = jnp.asarray(norm_gap, dtype)
        shared = shared._replace(round=shared.round + 1, models=models, public=public,
                                 stats=stats)
        return shared, metrics

    def actual(state):
        return jax.tree.map(consistency.worker_mean, state.shared.models)

    def auxiliary(state):
        return _aux(actual(state), rule.pending(state.workers.rule))

    return base.algorithm("gossip_sgd", num_workers, kind, init=init, view=view, local=local,
                          auxiliary=auxiliary, actual=actual, rule=rule,
                          # One node's model: its shapes size the messages.
                          combine=_common.timed(combine, timing,
                                                lambda s: jax.tree.map(lambda x: x[0], s.models)),
                          max_rounds=_common.horizon(system), clock=timing)


def _aux(mean, pending):
    """The auxiliary model: the nodes' mean minus the mean of what the chains hold back."""
    if pending is None:
        return mean
    return _common.apply(mean, jax.tree.map(consistency.worker_mean, pending))
