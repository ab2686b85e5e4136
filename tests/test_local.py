"""Local SGD: reduction to sync, bound, synchronisation."""

import jax
import numpy as np

import elastic_jax as ej
from tests import helpers as h


def test_period_one_is_sync_sgd():
    fn = h.noise_batch_fn(h.params0())
    keys = jax.random.split(jax.random.key(0), 40).reshape(10, 4)
    batches = jax.vmap(lambda k: fn(0, k))(keys)
    sync = ej.sync_sgd(0.1, 4)
    alg = ej.local_sgd(0.1, 4, 1)
    a, _ = ej.run(sync, h.noisy_quadratic, sync.init(h.params0(), 0), batches)
    b, mb = ej.run(alg, h.noisy_quadratic, alg.init(h.params0(), 0), batches)
    np.testing.assert_allclose(h.flat(ej.params(b)), h.flat(ej.params(a)), rtol=1e-5)
    np.testing.assert_array_equal(mb["consistency/b_hat"], 0)


def test_bound_holds_and_views_meet_at_synchronisation():
    p = h.params0()
    period = 4
    alg = ej.local_sgd(0.05, 4, period)
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(6), rounds=40)
    h.assert_bound_holds(metrics, norms)
    b_hat = np.asarray(metrics["consistency/b_hat"])
    # Right after a synchronisation every node holds the average.
    np.testing.assert_array_equal(b_hat[:, ::period], 0)
    assert np.all(b_hat[:, 1::period] > 0)
