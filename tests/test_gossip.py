"""Gossip SGD: reductions, mixing, the exact consensus bound, CHOCO-SGD, bad topologies.

The placement properties run over the contract registry (tests/test_contract.py,
tests/test_parallel.py); CHOCO over random matchings has its own placement check
in tests/test_parallel.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import base, topologies
from tests import helpers as h


def _shift(p, offset):
    out = np.zeros((p, p))
    out[(np.arange(p) + offset) % p, np.arange(p)] = 1.0
    return out


def _user_sequence(p, seed=0):
    """Two doubly stochastic matrices (convex combinations of permutation matrices)."""
    rng = np.random.default_rng(seed)
    perms = [np.eye(p)[rng.permutation(p)] for _ in range(3)]
    return [0.4 * np.eye(p) + 0.6 * perms[0],
            0.5 * np.eye(p) + 0.25 * perms[1] + 0.25 * perms[2]]


def _with_models(state, models):
    """`state` with the nodes' models replaced (a start away from consensus)."""
    return state.replace(shared=state.shared._replace(models=models))


def _zero_gradients(params, p):
    return h.constant_batch_fn(params, p, value=0.0)


# ------------------------------------------------------------ one program, many runs

NUM, LR, ROUNDS, SEEDS = 8, 0.05, 18, 3
DETERMINISTIC = ("ring", "torus", "hypercube", "exponential", "one_peer_exponential", "star",
                 "complete", "user")


def _spec(topology):
    return _user_sequence(NUM) if topology == "user" else topology


def _configs() -> dict[str, ej.Algorithm]:
    """Every configuration the noisy runs share (one compiled program for all of them)."""
    out = {"sync": ej.sync_sgd(LR, NUM)}
    for topology in DETERMINISTIC:
        for local_steps in (1, 3):
            out[f"{topology}-{local_steps}"] = ej.gossip_sgd(
                LR, NUM, topology=_spec(topology), local_steps=local_steps)
    out["choco_identity"] = ej.gossip_sgd(LR, NUM, topology="ring",
                                          gossip_compressor=ej.identity(), gamma=1.0)
    out["choco_top_k-2"] = ej.gossip_sgd(LR, NUM, topology="ring", local_steps=2,
                                         gossip_compressor=ej.top_k(k=3), gamma=0.5)
    return out


def _scan(alg, loss_fn, params, batch_fn, seed, rounds):
    """`rounds` rounds of `alg` from `seed` in a `lax.scan`: the final views and auxiliary
    model, the metrics `[rounds]`, and `max(||x_r||, ||x_{r+1}||)` for the allowance."""
    step = ej.make_step(alg, loss_fn)

    def body(state, _):
        shared = state.shared
        keys = base.worker_keys(shared.key, base.TAG_DATA, shared.round, alg.num_workers)
        new, metrics = step(state, batch_fn(shared.round, keys))
        norm = jnp.maximum(h.tree_norm(ej.params(state)), h.tree_norm(ej.params(new)))
        return new, (metrics, norm)

    state, (metrics, norms) = jax.lax.scan(body, alg.init(params, jax.random.key(seed)), None,
                                           length=rounds)
    return ej.views(alg, state), ej.params(state), metrics, norms


@pytest.fixture(scope="module")
def noisy():
    """`name -> (views, params, metrics, norms)`, each stacked over seeds, on the noisy
    quadratic: every configuration in one program, compiled once, called per seed."""
    configs = _configs()
    p = h.params0()
    fn = h.noise_batch_fn(p)
    program = jax.jit(lambda seed: {name: _scan(alg, h.noisy_quadratic, p, fn, seed, ROUNDS)
                                    for name, alg in configs.items()})
    runs = [jax.device_get(program(seed)) for seed in range(SEEDS)]
    return jax.tree.map(lambda *xs: np.stack(xs), *runs)


def test_complete_topology_is_sync_sgd_to_a_few_ulp(noisy):
    # Each round rounds differently (`sum_j (x - u_j) / P` against `x - sum_j u_j / P`),
    # by about an ulp: the differences may add up over the rounds.
    for got, want in zip(jax.tree.leaves(noisy["complete-1"][1]),
                         jax.tree.leaves(noisy["sync"][1]), strict=True):
        np.testing.assert_array_max_ulp(got, want, maxulp=ROUNDS)
    # W = J: B = 0, and b_hat is rounding only (the allowance of docs/theory.md section 2).
    _, _, metrics, norms = noisy["complete-1"]
    np.testing.assert_array_equal(metrics["consistency/bound"], 0.0)
    h.assert_bound_holds(metrics, norms)
    np.testing.assert_array_equal(metrics["gossip/spectral_gap"], 1.0)


# ------------------------------------------------------------------ mixing


def test_ring_consensus_distance_decays_as_lambda_2_squared():
    num, rounds = 8, 10
    lam = (1 + 2 * math.cos(2 * math.pi / num)) / 3  # the ring's second eigenvalue
    with jax.enable_x64(True):
        u = np.array([0.3, -1.2, 0.7])
        params = {"w": jnp.zeros(3, jnp.float64)}
        alg = ej.gossip_sgd(0.1, num, topology="ring")
        start = np.cos(2 * np.pi * np.arange(num) / num)[:, None] * u
        state = _with_models(alg.init(params, 0), {"w": jnp.asarray(start)})
        _, metrics = ej.run(alg, h.linear, state, batch_fn=_zero_gradients(params, num),
                            rounds=rounds)
        distance = np.asarray(metrics["gossip/consensus_distance"])
    np.testing.assert_allclose(distance[0], np.mean(np.sum(start**2, axis=1)), rtol=1e-12)
    np.testing.assert_allclose(distance, distance[0] * lam ** (2 * np.arange(rounds)),
                               rtol=1e-11)
    np.testing.assert_allclose(metrics["gossip/spectral_gap"], 1 - lam, rtol=1e-12)
    np.testing.assert_allclose(metrics["gossip/norm_gap"], 1 - lam, rtol=1e-12)


def test_one_peer_exponential_averages_exactly_in_log2_p_rounds():
    num = 8
    params = {"w": jnp.zeros(5, jnp.float32)}
    alg = ej.gossip_sgd(0.1, num, topology="one_peer_exponential")
    start = np.asarray(jax.random.normal(jax.random.key(1), (num, 5)), np.float32)
    state = _with_models(alg.init(params, 0), {"w": jnp.asarray(start)})
    state, _ = ej.run(alg, h.linear, state, batch_fn=_zero_gradients(params, num), rounds=3)
    views = np.asarray(ej.views(alg, state)["w"], np.float64)
    mean = start.astype(np.float64).mean(axis=0)
    eps = np.finfo(np.float32).eps
    assert np.all(np.abs(views - mean) <= 4 * eps * np.abs(start).max())


def test_random_matching_pairs_every_node_with_one_other_each_round():
    num = 8
    params = {"w": jnp.zeros(1, jnp.float32)}
    alg = ej.gossip_sgd(0.1, num, topology="random_matching")
    assert alg.info.bound_kind == "none"
    state, start = alg.init(params, 0), jnp.arange(num, dtype=jnp.float32)[:, None]
    partners = []
    for _ in range(2):
        # Node i holds i before the round: after it, (i + partner(i)) / 2.
        state, metrics = ej.run(alg, h.linear, _with_models(state, {"w": start}),
                                batch_fn=_zero_gradients(params, num), rounds=1)
        after = np.asarray(ej.views(alg, state)["w"][:, 0])
        partner = np.rint(2 * after - np.arange(num)).astype(int)
        assert np.all(partner != np.arange(num)) and np.all(partner[partner] == np.arange(num))
        partners.append(partner)
        assert np.isinf(metrics["consistency/bound"][0])
        assert metrics["comm/bits"][0] == num * 32
        # The gaps of E W: 1 - (P - 2) / (2 (P - 1)).
        np.testing.assert_allclose(metrics["gossip/spectral_gap"], num / (2 * (num - 1)),
                                   rtol=1e-6)
    assert not np.array_equal(*partners)  # a new matching every round


# ------------------------------------------------------------------ the bound


def _brute_force_factor(matrices, local_steps, rounds):
    """`max_t max_i sum_{s<t} ||(W_s ... W_{t-1} - J) e_i||_1` over the first `rounds`
    rounds, from the definition: `W_r` the `(r // H)`-th matrix on mixing rounds, else I."""
    p = matrices[0].shape[0]
    per_round = [matrices[(r // local_steps) % len(matrices)]
                 if (r + 1) % local_steps == 0 else np.eye(p) for r in range(rounds)]
    best = 0.0
    for t in range(1, rounds + 1):
        product, total = np.eye(p), np.zeros(p)
        for s in range(t - 1, -1, -1):
            product = per_round[s] @ product
            total += np.abs(product - 1.0 / p).sum(axis=0)
        best = max(best, total.max())
    return best


@pytest.mark.parametrize("topology, num, local_steps", [
    ("ring", 6, 2), ("one_peer_exponential", 8, 2), ("star", 5, 3), ("user", 6, 1)])
def test_consensus_factor_is_the_definition_by_brute_force(topology, num, local_steps):
    if topology == "user":
        topology = _user_sequence(num)
    schedule = topologies.mixing(topology, num)
    exact = topologies.consensus_factor(schedule, local_steps)
    rounds = 240
    brute = _brute_force_factor(schedule.matrices, local_steps, rounds)
    # The brute force sums a finite horizon (a lower bound); the factor includes the tail.
    assert brute <= exact * (1 + 1e-12)
    np.testing.assert_allclose(brute, exact, rtol=1e-6)


def test_consensus_factor_closed_forms():
    for num in (8, 16, 64):  # One-peer exponential: 2 (tau - 2 + 2 / P).
        tau = int(math.log2(num))
        got = topologies.consensus_factor(topologies.mixing("one_peer_exponential", num))
        np.testing.assert_allclose(got, 2 * (tau - 2 + 2 / num), rtol=1e-9)
    for local_steps in (1, 3):  # W = J with H local steps: local SGD's 2 (H - 1)(1 - 1/P).
        got = topologies.consensus_factor(topologies.mixing("complete", 8), local_steps)
        np.testing.assert_allclose(got, 2 * (local_steps - 1) * (1 - 1 / 8), atol=1e-12)
    # Ring of 16: 24.8 from an independent check; 3x below the loose closed form.
    ring = topologies.consensus_factor(topologies.mixing("ring", 16))
    lam = (1 + 2 * math.cos(2 * math.pi / 16)) / 3
    np.testing.assert_allclose(ring, 24.8, atol=0.05)
    np.testing.assert_allclose(lam * math.sqrt(16) / (1 - lam), 74.8, atol=0.05)


@pytest.mark.parametrize("topology", DETERMINISTIC)
def test_bound_holds_every_round_over_seeds_with_and_without_local_steps(noisy, topology):
    for local_steps in (1, 3):
        alg = _configs()[f"{topology}-{local_steps}"]
        assert alg.info.bound_kind == "deterministic"
        _, _, metrics, norms = noisy[f"{topology}-{local_steps}"]
        h.assert_bound_holds(metrics, norms)
        factor = topologies.consensus_factor(topologies.mixing(_spec(topology), NUM),
                                             local_steps)
        np.testing.assert_allclose(metrics["consistency/bound"],
                                   factor * metrics["grad_norm/max"], rtol=1e-6)
        if factor > 0:  # the nodes disagree between mixings
            assert np.all(metrics["consistency/b_hat"][:, 1:].max(axis=1) > 0)


# (topology, P, b_hat / B* measured by an independent check, rounds to run)
ADVERSARIAL = [("ring", 16, 0.93, 60), ("ring", 64, 0.92, 320), ("torus", 64, 0.66, 30),
               ("hypercube", 64, 0.43, 20)]


def test_bound_is_not_vacuous_on_opposite_halves():
    """`f_i(x) = s_i M <u, x>`, `s = +1` on the first half of the nodes and -1 on the
    others: `b_hat` reaches at least half the fraction of `B*` an independent check
    measured, and stays below the bound every round (one program for the four)."""
    m, u = 2.0, np.array([0.6, 0.8], np.float32)
    params = {"w": jnp.zeros(2, jnp.float32)}

    def one(topology, num, rounds):
        signs = np.where(np.arange(num) < num // 2, 1.0, -1.0).astype(np.float32)
        gradients = {"w": jnp.asarray(m * signs[:, None] * u)}
        alg = ej.gossip_sgd(LR, num, topology=topology)
        return _scan(alg, h.linear, params, lambda r, keys: gradients, 0, rounds)[2:]

    runs = jax.device_get(jax.jit(lambda: [one(t, n, r) for t, n, _, r in ADVERSARIAL])())
    for (topology, num, ratio, _), (metrics, norms) in zip(ADVERSARIAL, runs, strict=True):
        h.assert_bound_holds(metrics, norms)
        b_star = m * topologies.consensus_factor(topologies.mixing(topology, num))
        np.testing.assert_allclose(metrics["consistency/bound"], b_star, rtol=1e-6)
        assert metrics["consistency/b_hat"].max() / b_star >= 0.5 * ratio, (topology, num)


def test_a_non_lazy_bipartite_or_disconnected_graph_has_no_finite_bound():
    bipartite = (_shift(4, 1) + _shift(4, -1)) / 2  # a 4-ring without self-weights
    schedule = topologies.mixing(bipartite, 4)
    assert not schedule.finite and topologies.consensus_factor(schedule) == math.inf
    spectral, norm = topologies.gaps(schedule)
    assert spectral > 0.5 and norm == 0.0  # eigenvalue -1: the norm gap sees it
    assert ej.gossip_sgd(0.1, 4, topology=bipartite).info.bound_kind == "none"
    disconnected = np.kron(np.eye(2), np.full((2, 2), 0.5))
    assert topologies.gaps(topologies.mixing(disconnected, 4)) == (0.0, 0.0)
    assert ej.gossip_sgd(0.1, 4, topology=disconnected).info.bound_kind == "none"


# ------------------------------------------------------------------ CHOCO-SGD


def test_choco_with_the_identity_and_unit_step_is_plain_gossip(noisy):
    assert _configs()["choco_identity"].info.bound_kind == "none"
    plain, choco = noisy["ring-1"], noisy["choco_identity"]
    for x, y in zip(jax.tree.leaves(plain[0]), jax.tree.leaves(choco[0]), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(choco[2]["consistency/b_hat"], plain[2]["consistency/b_hat"],
                               rtol=1e-3, atol=1e-4)
    assert np.all(np.isinf(choco[2]["consistency/bound"]))
    np.testing.assert_array_equal(choco[2]["comm/bits"], plain[2]["comm/bits"])


def test_choco_sends_compressed_bits_only_in_mixing_rounds(noisy):
    k, d = 3, 20
    metrics = noisy["choco_top_k-2"][2]
    per_node = k * (32 + math.ceil(math.log2(d)))
    np.testing.assert_array_equal(metrics["comm/bits"],
                                  np.tile([0, NUM * per_node], (SEEDS, ROUNDS // 2)))
    assert np.all(np.isfinite(metrics["consistency/b_hat"]))
    assert np.all(np.isinf(metrics["consistency/bound"]))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, name", [
    ({"topology": "rng"}, "topology"),
    ({"topology": "hypercube", "num_workers": 6}, "topology"),
    ({"topology": np.eye(3)}, "topology"),
    ({"topology": np.full((4, 4), 0.3)}, "topology"),
    ({"topology": np.eye(4)[[1, 0, 3, 2]] * 1.5 - np.eye(4) * 0.5}, "topology"),
    ({"topology": [np.eye(4), np.full((4, 4), np.nan)]}, "topology"),
    ({"topology": [[1, 0], [0, 1]]}, "topology"),
    ({"topology": object()}, "topology"),
    ({"local_steps": 0}, "local_steps"),
    ({"gossip_compressor": ej.error_feedback(ej.top_k(k=1))}, "gossip_compressor"),
    ({"gossip_compressor": ej.top_k(k=1), "gamma": 0.0}, "gamma"),
    ({"gamma": 0.5}, "gamma"),
])
def test_bad_topologies_and_arguments_are_one_line_errors(kwargs, name):
    kwargs = {"num_workers": 4, "topology": "ring", **kwargs}
    with pytest.raises(ValueError) as excinfo:
        ej.gossip_sgd(0.1, **kwargs)  # the factory: before anything compiles
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{name}: got "), message
    assert "; expected " in message, message
