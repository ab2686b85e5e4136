"""The contract every algorithm keeps, run over a registry of all of them.

In the spirit of optax's alias tests: each property is one test, parametrised
over `ALGORITHMS`, so a new variant is covered by adding one line.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej

P, D, B, R = 4, 6, 5, 12
LR = 0.05
K = 2  # Top-k entries kept

# name -> factory of the learning rate (float or traced).
ALGORITHMS = {
    "sync": lambda lr: ej.sync_sgd(lr, P),
    "sync_top_k_ef": lambda lr: ej.sync_sgd(lr, P, compressor=ej.top_k(k=K),
                                            error_feedback=True),
    "async_inconsistent_top_k_ef": lambda lr: ej.async_sgd(
        lr, P, max_delay=P + 1, reads="inconsistent", compressor=ej.top_k(k=K),
        error_feedback=True),
    "message_passing": lambda lr: ej.message_passing_sgd(lr, P, max_delay=2),
    "elastic_scheduling": lambda lr: ej.elastic_scheduling(lr, P, max_outstanding=2),
    "local_sgd": lambda lr: ej.local_sgd(lr, P, period=3),
}


def least_squares(params, batch):
    a, t = batch
    return 0.5 * jnp.mean((a @ params["w"] - t) ** 2)


def problem(dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(R, P, B, D)), dtype)
    t = jnp.asarray(rng.normal(size=(R, P, B)), dtype)
    return {"w": jnp.zeros(D, dtype)}, (a, t)


def final_loss(make, lr, loop):
    """The full-batch loss of the auxiliary model after `R` rounds at rate `lr`."""
    params, batches = problem(jnp.float64)
    alg = make(lr)
    kwargs = {} if loop == "default" else {"loop": loop}
    state, _ = ej.run(alg, least_squares, alg.init(params, jax.random.key(0)), batches,
                      **kwargs)
    a, t = batches
    return least_squares(ej.params(state), (a.reshape(-1, D), t.reshape(-1)))


@pytest.mark.parametrize("loop", ["default", "python", "chunks"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_grad_through_run_matches_a_central_difference(name, loop):
    make = ALGORITHMS[name]
    with jax.enable_x64(True):
        # `jax.grad` straight through the driver (no enclosing `jit`): the Python
        # loop then calls its compiled round once per round, as a user's run does.
        grad = jax.grad(lambda lr: final_loss(make, lr, loop))(LR)
        h = 1e-4 * LR
        # Both points in one (vmapped) run: one compilation.
        up, down = jax.vmap(lambda lr: final_loss(make, lr, loop))(jnp.array([LR + h, LR - h]))
        central = (up - down) / (2 * h)
    assert math.isfinite(float(grad))
    np.testing.assert_allclose(float(grad), float(central), rtol=1e-6)


def test_reverse_mode_never_deletes_a_buffer_the_caller_holds():
    make = ALGORITHMS["async_inconsistent_top_k_ef"]
    params, batches = problem(jnp.float32)
    key = jax.random.key(3)

    def loss(lr):
        alg = make(lr)
        state, _ = ej.run(alg, least_squares, alg.init(params, key), batches, loop="python")
        return least_squares(ej.params(state), jax.tree.map(lambda x: x[0, 0], batches))

    jax.grad(loss)(LR)
    jax.grad(loss)(LR)  # The key and the batches are still alive.
    assert not key.is_deleted() and not batches[0].is_deleted()


def _bits_per_worker(compressed: bool) -> int:
    if not compressed:
        return 32 * D
    return K * (32 + math.ceil(math.log2(D)))


# name -> the closed form of `comm/bits` summed over `R` rounds (docs/theory.md
# section 7): the bits the nodes put on the wire, one send per message.
TOTAL_BITS = {
    "sync": R * P * _bits_per_worker(False),
    "sync_top_k_ef": R * P * _bits_per_worker(True),
    "async_inconsistent_top_k_ef": R * P * _bits_per_worker(True),
    "message_passing": R * P * _bits_per_worker(False),
    "elastic_scheduling": R * P * _bits_per_worker(False),
    # Only the averaging rounds communicate: R / H of them.
    "local_sgd": (R // 3) * P * _bits_per_worker(False),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_comm_bits_sum_to_the_closed_form(name):
    assert set(TOTAL_BITS) == set(ALGORITHMS)
    params, batches = problem(jnp.float32)
    alg = ALGORITHMS[name](LR)
    _, metrics = ej.run(alg, least_squares, alg.init(params, 0), batches)
    assert float(np.sum(np.asarray(metrics["comm/bits"], np.float64))) == TOTAL_BITS[name]


def test_comm_bits_of_message_passing_count_the_live_senders():
    params, batches = problem(jnp.float32)
    # Node 1 crashes at round 3: it still sends in round 3, not after.
    alg = ej.message_passing_sgd(LR, P, crashes=[(1, 3)])
    _, metrics = ej.run(alg, least_squares, alg.init(params, 0), batches)
    senders = 4 * P + (R - 4) * (P - 1)
    assert float(np.sum(np.asarray(metrics["comm/bits"], np.float64))) == (
        senders * _bits_per_worker(False))


def test_local_sgd_communicates_only_in_averaging_rounds():
    params, batches = problem(jnp.float32)
    alg = ej.local_sgd(LR, P, period=4)
    _, metrics = ej.run(alg, least_squares, alg.init(params, 0), batches)
    expected = [P * 32 * D if (r + 1) % 4 == 0 else 0 for r in range(R)]
    np.testing.assert_array_equal(np.asarray(metrics["comm/bits"]), expected)
