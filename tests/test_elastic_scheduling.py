"""Elastic scheduling: reduction to sync, bounds in both modes, the variance law."""

import jax
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h


def stacked_noise(num_workers, rounds=10, seed=0):
    fn = h.noise_batch_fn(h.params0())
    keys = jax.random.split(jax.random.key(seed), rounds * num_workers).reshape(
        rounds, num_workers)
    return jax.vmap(lambda k: fn(0, k))(keys)


@pytest.mark.parametrize("mode", ["norm", "variance"])
def test_zero_outstanding_is_sync_sgd(mode):
    batches = stacked_noise(4)
    sync = ej.sync_sgd(0.1, 4)
    alg = ej.elastic_scheduling(0.1, 4, 0, mode=mode)
    a, ma = ej.run(sync, h.noisy_quadratic, sync.init(h.params0(), 0), batches)
    b, mb = ej.run(alg, h.noisy_quadratic, alg.init(h.params0(), 0), batches)
    np.testing.assert_allclose(h.flat(ej.params(b)), h.flat(ej.params(a)), rtol=1e-5)
    np.testing.assert_array_equal(mb["consistency/b_hat"], 0)
    np.testing.assert_array_equal(mb["consistency/bound"], 0)


@pytest.mark.parametrize("mode,delay", [("norm", "uniform"), ("norm", "fixed"),
                                        ("variance", "geometric"), ("variance", "fixed")])
def test_bound_holds_every_round_over_seeds(mode, delay):
    p = h.params0()
    alg = ej.elastic_scheduling(0.05, 4, 3, mode=mode, delay=delay)
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(6), rounds=40)
    h.assert_bound_holds(metrics, norms)
    assert np.max(metrics["consistency/b_hat"]) > 0
    if delay == "fixed":
        np.testing.assert_array_equal(metrics["delay/mean"], 3)


def test_variance_mode_matches_tau_sigma_squared():
    """E||x - v||^2 / eta^2 ~ tau sigma^2 (1 - 1/P) with every delay at tau and small L eta."""
    tau, num_workers, sigma_c, dim = 3, 4, 0.5, 20
    sigma2 = dim * sigma_c**2  # total noise variance E||g - grad f||^2
    p = jax.tree.map(lambda x: x * 0 + 1.0, h.params0())  # start at the optimum
    alg = ej.elastic_scheduling(0.002, num_workers, tau, mode="variance", delay="fixed")
    _, metrics, _ = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p, sigma=sigma_c),
                                seeds=np.arange(16), rounds=200)
    measured = float(np.mean(np.asarray(metrics["consistency/b_rms"])[:, tau:] ** 2))
    expected = tau * sigma2 * (1 - 1 / num_workers)
    assert abs(measured / expected - 1) < 0.2, (measured, expected)
