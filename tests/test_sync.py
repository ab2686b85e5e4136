"""Synchronous SGD: reductions to optax.sgd, error feedback, bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from tests import helpers as h

ROUNDS = 12


def stacked_noise(num_workers, rounds=ROUNDS, seed=0):
    p = h.params0()
    fn = h.noise_batch_fn(p)
    keys = jax.random.split(jax.random.key(seed), rounds * num_workers).reshape(
        rounds, num_workers)
    return jax.vmap(lambda k: fn(0, k))(keys)


def optax_reference(params, batches, lr):
    """A jitted optax.sgd loop on the mean over workers of the gradients."""
    opt = optax.sgd(lr)

    @jax.jit
    def step(p, s, batch):
        g = jax.vmap(jax.grad(h.noisy_quadratic), in_axes=(None, 0))(p, batch)
        g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for r in range(jax.tree.leaves(batches)[0].shape[0]):
        params, s = step(params, s, jax.tree.map(lambda x, r=r: x[r], batches))
    return params


@pytest.mark.parametrize("num_workers", [1, 4])
def test_sync_equals_optax_sgd_on_mean_gradient(num_workers):
    p = h.params0()
    batches = stacked_noise(num_workers)
    alg = ej.sync_sgd(0.1, num_workers)
    state, metrics = ej.run(alg, h.noisy_quadratic, alg.init(p, jax.random.key(0)), batches)
    ref = optax_reference(p, batches, 0.1)
    for a, b in zip(jax.tree.leaves(ej.params(state)), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=4)
    np.testing.assert_array_equal(metrics["consistency/b_hat"], 0.0)
    np.testing.assert_array_equal(metrics["consistency/bound"], 0.0)
    assert metrics["loss"].shape == (ROUNDS,)


def sync_run(alg, batches):
    state, metrics = ej.run(alg, h.noisy_quadratic, alg.init(h.params0(), jax.random.key(3)),
                            batches)
    return state, metrics


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, maxulp=4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=maxulp)


def test_error_feedback_around_identity_and_beta_zero_equal_plain():
    batches = stacked_noise(3)
    plain, plain_m = sync_run(ej.sync_sgd(0.1, 3), batches)
    around_identity, m1 = sync_run(ej.sync_sgd(0.1, 3, error_feedback=True), batches)
    # Not literally the same computation (a = 0 + eta g feeds the mean): a few ulp.
    assert_trees_close(ej.params(plain), ej.params(around_identity))
    assert_trees_close(ej.model(plain), ej.model(around_identity))
    np.testing.assert_array_equal(m1["consistency/b_hat"], 0.0)
    np.testing.assert_array_equal(m1["consistency/bound"], 0.0)
    top = ej.top_k(fraction=0.2)
    no_ef, _ = sync_run(ej.sync_sgd(0.1, 3, compressor=top), batches)
    beta0, _ = sync_run(ej.sync_sgd(0.1, 3, compressor=top, error_feedback=0.0), batches)
    assert_trees_equal(ej.params(no_ef), ej.params(beta0))
    # A real compressor changes the trajectory: the comparison above is not vacuous.
    assert not np.array_equal(h.flat(ej.params(no_ef)), h.flat(ej.params(plain)))


def test_virtual_iterate_follows_uncompressed_sgd():
    """With error feedback, x = X - mean_p e^p moves by -eta * mean_p g^p exactly (in math)."""
    num_workers, lr = 4, 0.1
    alg = ej.sync_sgd(lr, num_workers, compressor=ej.top_k(k=3), error_feedback=True)
    batches = stacked_noise(num_workers)
    state = alg.init(h.params0(), jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic))
    grad = jax.jit(jax.vmap(jax.grad(h.noisy_quadratic)))
    for r in range(ROUNDS):
        batch = jax.tree.map(lambda x, r=r: x[r], batches)
        g = grad(ej.views(alg, state), batch)
        expected = h.flat(ej.params(state)) - lr * h.flat(
            jax.tree.map(lambda x: jnp.mean(x, axis=0), g))
        state, _ = step(state, batch)
        np.testing.assert_allclose(h.flat(ej.params(state)), expected, rtol=0, atol=2e-6)
    # The actual model differs from the virtual one by the mean residual.
    gap = h.flat(ej.model(state)) - h.flat(ej.params(state))
    assert np.linalg.norm(gap) > 1e-3


def test_error_feedback_conservation_in_local():
    """u + e_new == e_old + eta g bitwise, for the worker half of the round."""
    alg = ej.sync_sgd(0.25, 2, compressor=ej.top_k(k=4), error_feedback=True)
    state = alg.init(h.params0(), jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic))
    batches = stacked_noise(2)
    local = jax.jit(alg.local)
    for r in range(4):
        batch = jax.tree.map(lambda x, r=r: x[r], batches)
        g = jax.vmap(jax.grad(h.noisy_quadratic))(ej.views(alg, state), batch)
        g0 = jax.tree.map(lambda x: x[0], g)
        e_old = jax.tree.map(lambda x: x[0], alg.info.rule.pending(state.workers.rule))
        worker = jax.tree.map(lambda x: x[0], state.workers)
        _, msg = local(0, worker, g0, jax.random.key(1), state.shared)
        lhs = h.flat(jax.tree.map(jnp.add, msg.update, msg.pending_after))
        rhs = h.flat(e_old) + np.float32(0.25) * h.flat(g0)
        np.testing.assert_array_equal(lhs, rhs.astype(np.float32))
        state, _ = step(state, batch)


def test_sync_topk_error_feedback_bound_holds_over_seeds():
    p = h.params0()
    alg = ej.sync_sgd(0.05, 4, compressor=ej.top_k(fraction=0.1), error_feedback=True)
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(8), rounds=60)
    h.assert_bound_holds(metrics, norms)
    assert np.max(metrics["consistency/b_hat"]) > 0
    # Residual bound, docs/theory.md section 4: ||e|| <= eta M rho.
    delta = ej.compression_info(ej.top_k(fraction=0.1), p).delta
    rho = ej.bounds.rho(1.0, delta)
    bound = 0.05 * metrics["grad_norm/max"] * rho
    assert np.all(metrics["ef/residual_norm"] <= bound * (1 + 1e-5))
