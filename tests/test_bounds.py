"""The constants B of docs/theory.md section 5 (sync and async rows)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej


def test_rho_matches_theory():
    delta = 0.01
    q = math.sqrt(1 - delta)
    assert ej.bounds.rho(1.0, delta) == pytest.approx(q / (1 - q))
    # beta = 1: rho <= 2 sqrt(1 - delta) / delta.
    assert ej.bounds.rho(1.0, delta) <= 2 * math.sqrt(1 - delta) / delta
    assert ej.bounds.rho(0.0, delta) == 0.0
    assert ej.bounds.rho(1.0, 1.0) == 0.0  # identity compressor: no residual


def test_sync_rows():
    assert ej.bounds.sync_sgd(m=3.0) == 0.0
    assert ej.bounds.sync_sgd(m=3.0, delta=0.1, error_feedback=False) == 0.0
    assert ej.bounds.sync_sgd(m=3.0, delta=0.1, error_feedback=True) == pytest.approx(
        3.0 * ej.bounds.rho(1.0, 0.1))
    assert ej.bounds.sync_sgd(m=3.0, delta=0.1, error_feedback=0.5) == pytest.approx(
        3.0 * ej.bounds.rho(0.5, 0.1))


def test_async_rows():
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, m=2.0) == 16.0
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, m=2.0, mu=0.5) == 4.0
    r = ej.bounds.rho(1.0, 0.25)
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, m=2.0, delta=0.25,
                               error_feedback=True) == pytest.approx(2.0 * (8 * (1 + r) + 4 * r))


def test_bounds_accept_traced_arrays():
    value = ej.bounds.async_sgd(max_delay=3, num_workers=2, m=jnp.float32(2.0), delta=0.5,
                                error_feedback=jnp.float32(0.5))
    r = 0.5 * math.sqrt(0.5) / (1 - 0.5 * math.sqrt(0.5))
    np.testing.assert_allclose(value, 2 * (3 * (1 + r) + 2 * r), rtol=1e-6)
