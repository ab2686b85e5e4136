"""The constants B of docs/theory.md section 5, from the chain's bounds U and R."""

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


def test_error_feedback_terms():
    update, residual = ej.bounds.error_feedback(m=3.0, delta=0.1, beta=0.5)
    r = ej.bounds.rho(0.5, 0.1)
    assert update == pytest.approx(3.0 * (1 + r)) and residual == pytest.approx(3.0 * r)


def test_sync_rows():
    assert ej.bounds.sync_sgd() == 0.0
    _, residual = ej.bounds.error_feedback(m=3.0, delta=0.1)
    assert ej.bounds.sync_sgd(residual=residual) == pytest.approx(3.0 * ej.bounds.rho(1.0, 0.1))


def test_async_rows():
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, update=2.0) == 16.0
    # Compressed without error feedback: the measured mu in place of M.
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, update=0.5) == 4.0
    r = ej.bounds.rho(1.0, 0.25)
    update, residual = ej.bounds.error_feedback(m=2.0, delta=0.25)
    assert ej.bounds.async_sgd(max_delay=8, num_workers=4, update=update,
                               residual=residual) == pytest.approx(2.0 * (8 * (1 + r) + 4 * r))


def test_other_rows():
    assert ej.bounds.message_passing_sgd(max_delay=3, num_workers=4, update=2.0) == 4.5
    assert ej.bounds.message_passing_sgd(max_delay=3, num_workers=4, update=2.0, crashes=1) == (
        4.5 + 2.0 / 4)
    assert ej.bounds.message_passing_sgd(max_delay=3, num_workers=4, update=2.0,
                                         permanent_drops=True) == math.inf
    assert ej.bounds.elastic_scheduling(max_outstanding=3, num_workers=4, update=2.0) == 6.0
    assert ej.bounds.elastic_scheduling(max_outstanding=3, num_workers=4, update=2.0,
                                        mode="variance") == 9.0
    assert ej.bounds.local_sgd(period=4, num_workers=4, update=2.0) == 9.0


def test_bounds_accept_traced_arrays():
    update, residual = ej.bounds.error_feedback(m=jnp.float32(2.0), delta=0.5,
                                                beta=jnp.float32(0.5))
    value = ej.bounds.async_sgd(max_delay=3, num_workers=2, update=update, residual=residual)
    r = 0.5 * math.sqrt(0.5) / (1 - 0.5 * math.sqrt(0.5))
    np.testing.assert_allclose(value, 2 * (3 * (1 + r) + 2 * r), rtol=1e-6)
