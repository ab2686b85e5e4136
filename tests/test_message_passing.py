"""Message passing: reductions, bounds, exactly-once delivery, crashes, permanent drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

ROUNDS = 10


def stacked_noise(num_workers, rounds=ROUNDS, seed=0):
    fn = h.noise_batch_fn(h.params0())
    keys = jax.random.split(jax.random.key(seed), rounds * num_workers).reshape(
        rounds, num_workers)
    return jax.vmap(lambda k: fn(0, k))(keys)


def test_no_delay_no_faults_is_sync_sgd():
    """Every view is the auxiliary model itself; XLA may fuse the two programs' updates
    differently (multiply-adds), so the trajectories agree to a few ulp per round."""
    batches = stacked_noise(4)
    sync, ms = ej.run(ej.sync_sgd(0.1, 4), h.noisy_quadratic,
                      ej.sync_sgd(0.1, 4).init(h.params0(), 0), batches)
    alg = ej.message_passing_sgd(0.1, 4)
    mp, mm = ej.run(alg, h.noisy_quadratic, alg.init(h.params0(), 0), batches)
    np.testing.assert_allclose(h.flat(ej.params(mp)), h.flat(ej.params(sync)), rtol=1e-5)
    np.testing.assert_array_equal(h.flat(ej.model(mp)), h.flat(ej.params(mp)))
    np.testing.assert_allclose(mm["loss"], ms["loss"], rtol=1e-5)
    np.testing.assert_array_equal(mm["consistency/b_hat"], 0)
    np.testing.assert_array_equal(mm["consistency/bound"], 0)
    np.testing.assert_array_equal(mm["comm/messages_delivered"], 12)


def test_compressed_messages_with_feedback_reduce_to_sync():
    batches = stacked_noise(3)
    kw = dict(compressor=ej.top_k(k=4), error_feedback=True)
    sync = ej.sync_sgd(0.1, 3, **kw)
    mp = ej.message_passing_sgd(0.1, 3, **kw)
    a, _ = ej.run(sync, h.noisy_quadratic, sync.init(h.params0(), 0), batches)
    b, _ = ej.run(mp, h.noisy_quadratic, mp.init(h.params0(), 0), batches)
    np.testing.assert_allclose(h.flat(ej.params(b)), h.flat(ej.params(a)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.flat(ej.model(b)), h.flat(ej.model(a)), rtol=1e-5, atol=1e-6)


CASES = {
    "delays": dict(max_delay=3),
    "delays_fixed": dict(max_delay=3, delay="fixed"),
    "retransmitted_drops": dict(max_delay=2, drop_prob=0.3, delay="geometric"),
    "crash_1": dict(crashes=1, crash_horizon=30),
    "crash_3": dict(crashes=3, crash_horizon=30),
    "delays_crashes": dict(max_delay=2, crashes=2, crash_horizon=30, drop_prob=0.2),
    "top_k": dict(max_delay=2, compressor=ej.top_k(fraction=0.2)),
    "top_k_ef_crash": dict(max_delay=2, compressor=ej.top_k(fraction=0.2), error_feedback=True,
                           crashes=1, crash_horizon=20),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bound_holds_every_round_over_seeds(name):
    p = h.params0()
    alg = ej.message_passing_sgd(0.05, 4, **CASES[name])
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(6), rounds=40)
    h.assert_bound_holds(metrics, norms)
    assert np.max(metrics["consistency/b_hat"]) > 0
    alive = np.asarray(metrics["faults/alive"])
    f = CASES[name].get("crashes", 0)
    assert np.all(np.diff(alive, axis=1) <= 0)  # never rises
    if f:
        assert np.all(alive[:, -1] == 4 - f)


def one_hot_batches(num_workers, rounds, dim):
    """Worker p's gradient in round s is the unit vector of coordinate s * P + p."""
    eye = np.eye(dim, dtype=np.float32)
    out = np.zeros((rounds, num_workers, dim), np.float32)
    for s in range(rounds):
        for p in range(num_workers):
            if s * num_workers + p < dim:
                out[s, p] = eye[s * num_workers + p]
    return {"w": jnp.asarray(out)}


def test_each_message_is_applied_exactly_once_and_in_time():
    num_workers, max_delay, sent_rounds = 3, 2, 6
    rounds = sent_rounds + max_delay + 2
    dim = sent_rounds * num_workers
    alg = ej.message_passing_sgd(1.0, num_workers, max_delay=max_delay, drop_prob=0.4)
    state = alg.init({"w": jnp.zeros((dim,))}, jax.random.key(5))
    step = jax.jit(ej.make_step(alg, h.linear))
    batches = one_hot_batches(num_workers, rounds, dim)
    applied_at = np.full((num_workers, dim), -1)
    for r in range(rounds):
        views = -np.asarray(ej.views(alg, state)["w"]) * num_workers  # 1 where applied
        assert set(np.unique(np.round(views, 5))) <= {0.0, 1.0}, "applied twice or partly"
        for q in range(num_workers):
            newly = (views[q] > 0.5) & (applied_at[q] < 0)
            applied_at[q, newly] = r
            assert np.all(views[q][applied_at[q] >= 0] > 0.5)  # never unapplied
        state, metrics = step(state, {"w": batches["w"][r]})
    sender_round = np.arange(dim) // num_workers
    sender = np.arange(dim) % num_workers
    for q in range(num_workers):
        assert np.all(applied_at[q] >= 0), "a retransmitted message never arrived"
        lag = applied_at[q] - sender_round  # applied before round s + 1 + k
        own = sender == q
        # Own messages are applied at once (seen at round s + 1).
        np.testing.assert_array_equal(lag[own], 1)
        assert np.all((lag[~own] >= 1) & (lag[~own] <= 1 + max_delay))
    np.testing.assert_allclose(np.asarray(ej.params(state)["w"]), -1 / num_workers)


def test_crashed_node_sends_nothing_after_its_crash():
    num_workers, sent_rounds = 4, 6
    dim = sent_rounds * num_workers
    alg = ej.message_passing_sgd(1.0, num_workers, crashes=[(1, 2), (3, 4)])
    state = alg.init({"w": jnp.zeros((dim,))}, jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.linear))
    batches = one_hot_batches(num_workers, sent_rounds + 2, dim)
    alive = []
    for r in range(sent_rounds + 2):
        state, metrics = step(state, {"w": batches["w"][r]})
        alive.append(int(metrics["faults/alive"]))
    assert alive == [4, 4, 4, 3, 3, 2, 2, 2]
    views = np.asarray(ej.views(alg, state)["w"])
    aux = np.asarray(ej.params(state)["w"])
    sender_round = np.arange(dim) // num_workers
    sender = np.arange(dim) % num_workers
    for p, c in ((1, 2), (3, 4)):
        after = (sender == p) & (sender_round > c)
        np.testing.assert_array_equal(aux[after], 0)
        np.testing.assert_array_equal(views[[0, 2]][:, after], 0)
        # Before its crash round, every survivor has every message of the node.
        before = (sender == p) & (sender_round < c)
        assert np.all(views[[0, 2]][:, before] < 0)
    # Messages are weighted by the nodes alive at the start of their round.
    assert np.isclose(aux[(sender == 0) & (sender_round == 0)][0], -1 / 4)
    assert np.isclose(aux[(sender == 0) & (sender_round == 5)][0], -1 / 2)


def test_permanent_drops_have_no_bound_and_drift_linearly():
    """From the optimum, under gradient noise E b_hat^2 grows linearly in t."""
    p = {"w": jnp.ones((4,))}
    alg = ej.message_passing_sgd(0.02, 4, drop_prob=0.3, retransmit=False)
    assert alg.info.bound_kind == "none"
    _, metrics, _ = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                seeds=np.arange(16), rounds=2000)
    assert np.all(np.isinf(metrics["consistency/bound"]))
    b2 = np.mean(np.asarray(metrics["consistency/b_hat"]) ** 2, axis=0)
    early, late = np.mean(b2[450:550]), np.mean(b2[1950:2000])
    assert late / early > 2, (early, late)


def test_convergence_under_theory_bound_strongly_convex():
    """E||x_T - x*||^2 <= (1 - c eta)^T ||x0 - x*||^2 + eta M^2 / c + eta^2 L^2 B^2 / c^2."""
    with jax.enable_x64(True):
        p = h.params0(jnp.float64)
        x_star = jax.tree.map(jnp.ones_like, p)
        eta, rounds, c, lsmooth = 0.05, 100, 1.0, 1.0
        d0 = float(h.tree_norm(jax.tree.map(jnp.subtract, p, x_star)) ** 2)
        algs = [
            ej.message_passing_sgd(eta, 4, max_delay=3),
            ej.message_passing_sgd(eta, 4, max_delay=2, crashes=1, crash_horizon=50),
            ej.message_passing_sgd(eta, 4, max_delay=2, compressor=ej.top_k(fraction=0.3),
                                   error_feedback=True),
            ej.elastic_scheduling(eta, 4, 2, mode="variance"),
            ej.elastic_scheduling(eta, 4, 2),
            ej.local_sgd(eta, 4, 4),
        ]
        for alg in algs:
            states, metrics, _ = h.run_seeds(alg, h.noisy_quadratic, p,
                                             h.noise_batch_fn(p, sigma=0.3),
                                             seeds=np.arange(8), rounds=rounds)
            final = jax.vmap(ej.params)(states)
            dist = np.mean([float(h.tree_norm(jax.tree.map(
                lambda a, b, i=i: a[i] - b, final, x_star)) ** 2) for i in range(8)])
            m = float(np.max(metrics["grad_norm/max"]))
            b = float(np.max(metrics["consistency/b_hat"]))
            bound = ((1 - c * eta) ** rounds * d0 + eta * m**2 / c
                     + eta**2 * lsmooth**2 * b**2 / c**2)
            assert dist <= bound, (alg.info.name, dist, bound)
            assert dist < 0.1 * d0  # it did converge
