"""PowerSGD (`ej.powersgd`): full rank is exact, the bits, conservation, sync SGD with it.

Direct calls of its `reduce` on stacked Gaussian matrices (float64, to rounding),
and one small synchronous run with a system model (its two all-reduces).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

P = 4


def _stacked(shapes, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(P,) + s), dtype) for s in shapes]


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (5, 5), (2, 2, 3, 4)])
def test_full_rank_reproduces_the_mean_and_conserves_the_mean_residual(shape):
    """Rank `min(n, m)`, a Gaussian `Q_0`, QR: the mean to rounding; with error feedback
    the mean residual stays ~0 while a worker's own may not (its columns need not lie in
    the mean's span when `r = m < n`)."""
    with jax.enable_x64(True):
        n, m = math.prod(shape[:-1]), shape[-1]
        compressor = ej.powersgd(min(n, m), min_compression_rate=0.0)
        stacked = _stacked([shape])
        state = compressor.init([stacked[0][0]], P, jax.random.key(1))
        assert compressor.plan([stacked[0][0]]) == [(n, m)]
        for _ in range(3):  # the warm-started Q stays full rank
            mean, state = compressor.reduce(stacked, state)
            np.testing.assert_allclose(np.asarray(mean[0]), np.mean(np.asarray(stacked[0]), 0),
                                       rtol=1e-10, atol=1e-12)
            owed = compressor.mean_residual(state)[0]
            np.testing.assert_allclose(np.asarray(owed), 0.0, atol=1e-12)
        if m < n:
            assert float(jnp.max(jnp.abs(state.residual[0]))) > 0.1


def test_error_feedback_conserves_the_mean_at_low_rank():
    """`mean_p C(M_p) + mean_p e_p' = mean_p e_p + mean_p u_p`, round after round."""
    with jax.enable_x64(True):
        compressor = ej.powersgd(1, min_compression_rate=0.0)
        shapes = [(7, 5), (5,)]
        state = compressor.init([x[0] for x in _stacked(shapes)], P, jax.random.key(0))
        for seed in range(4):
            updates = _stacked(shapes, seed)
            owed = compressor.mean_residual(state)
            mean, state = compressor.reduce(updates, state)
            for got, e_old, e_new, u in zip(mean, owed, compressor.mean_residual(state),
                                            updates, strict=True):
                np.testing.assert_allclose(np.asarray(got + e_new),
                                           np.asarray(e_old + jnp.mean(u, 0)), atol=1e-12)
            assert float(jnp.max(jnp.abs(compressor.mean_residual(state)[0]))) > 1e-3


def test_bits_follow_the_compression_rule():
    """`32 r (n + m)` per compressed matrix, 32 per value of the rest; a kernel
    `(kh, kw, cin, cout)` is `(kh kw cin) x cout`; a matrix rank r does not compress
    (`n m <= 2 r (n + m)`) is sent dense."""
    params = {"conv": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros(32),
              "dense": jnp.zeros((128, 10))}
    leaves = jax.tree.leaves(params)  # bias, conv, dense
    assert ej.powersgd(4).plan(params) == [None, (144, 32), (128, 10)]
    assert ej.powersgd(4).bits(params) == 32 * (32 + 4 * (144 + 32) + 4 * (128 + 10))
    assert ej.powersgd(5).plan(params)[2] is None  # 5 (128 + 10) 2 > 1280
    assert ej.powersgd(5).phase_bits(params) == (32 * (32 + 5 * 144 + 1280), 32 * 5 * 32)
    assert len(leaves) == 3


def test_sync_sgd_with_powersgd_sends_its_bits_and_reports_its_bound():
    """Without error feedback every view is the model (`B = 0`); with it the model owes
    the mean residual, measured, and no constant bounds it (`bound = inf`). A round costs
    two all-reduces: the P factors with the dense leaves, then the Q factors."""
    params = h.params0()  # a (12,) vector, sent dense, and a 2 x 4 matrix
    network = ej.clock.network(latency=1e-3, bandwidth=1e6)
    system = ej.clock.system(ej.clock.constant(0.01), rounds=6, network=network)
    compressor = ej.powersgd(1, min_compression_rate=0.0)
    for feedback in (True, False):
        alg = ej.sync_sgd(0.05, P, compressor=compressor._replace(error_feedback=feedback),
                          system=system)
        _, m = ej.run(alg, h.noisy_quadratic, alg.init(params, 0),
                      batch_fn=h.noise_batch_fn(params), rounds=6)
        np.testing.assert_array_equal(np.asarray(m["comm/bits"]), P * 32 * (12 + 1 * (2 + 4)))
        b_hat, bound = np.asarray(m["consistency/b_hat"]), np.asarray(m["consistency/bound"])
        if feedback:
            assert alg.info.bound_kind == "none" and np.all(bound == np.inf)
            assert np.all(b_hat[1:] > 0) and b_hat[0] == 0
        else:
            assert np.all(bound == 0) and np.all(b_hat == 0)
    two = sum(ej.clock.seconds("all_reduce", network, P - 1, b) for b in (32 * (12 + 2), 32 * 4))
    np.testing.assert_allclose(np.asarray(m["comm/seconds"]), two, rtol=1e-6)
    np.testing.assert_allclose(ej.clock.times(alg, params)["time/elapsed"][-1],
                               6 * (0.01 + two), rtol=1e-12)


def test_server_momentum_after_powersgd_is_sgd_at_full_rank():
    """PowerSGD's own setting: compressed raw gradients, momentum at the server. At full
    rank the compressed mean is the mean, so it is sync SGD with server momentum."""
    params = {"w": h.params0()["b"]}  # 2 x 4
    rule = ej.chain(ej.sgd(momentum=0.9))
    full = ej.sync_sgd(0.05, P, rule=rule, compressor=ej.powersgd(2, min_compression_rate=0.0),
                       optimizer_placement="server")
    plain = ej.sync_sgd(0.05, P, rule=rule, optimizer_placement="server")
    states = [ej.run(alg, h.noisy_quadratic, alg.init(params, 0),
                     batch_fn=h.noise_batch_fn(params), rounds=8)[0] for alg in (full, plain)]
    np.testing.assert_allclose(np.asarray(ej.model(states[0])["w"]),
                               np.asarray(ej.model(states[1])["w"]), rtol=2e-5, atol=1e-6)
