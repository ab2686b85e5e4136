"""Asynchronous shared-memory SGD: reductions, bounds, delay traces, hypergradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from tests import helpers as h

ROUNDS = 12


def stacked_noise(num_workers, rounds=ROUNDS, seed=0, params=None):
    p = h.params0() if params is None else params
    fn = h.noise_batch_fn(p)
    keys = jax.random.split(jax.random.key(seed), rounds * num_workers).reshape(
        rounds, num_workers)
    return jax.vmap(lambda k: fn(0, k))(keys)


def run(alg, batches, seed=3, params=None):
    p = h.params0() if params is None else params
    return ej.run(alg, h.noisy_quadratic, alg.init(p, jax.random.key(seed)), batches)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, maxulp=4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=maxulp)


def test_one_worker_no_delay_equals_optax_sgd():
    p = h.params0()
    batches = stacked_noise(1)
    state, metrics = run(ej.async_sgd(0.1, 1, 0), batches)
    opt = optax.sgd(0.1)

    @jax.jit
    def step(q, s, batch):
        u, s = opt.update(jax.grad(h.noisy_quadratic)(q, batch), s, q)
        return optax.apply_updates(q, u), s

    q, s = p, opt.init(p)
    for r in range(ROUNDS):
        q, s = step(q, s, jax.tree.map(lambda x, r=r: x[r, 0], batches))
    assert_trees_close(ej.params(state), q)
    np.testing.assert_array_equal(metrics["consistency/b_hat"], 0.0)
    np.testing.assert_array_equal(metrics["delay/mean"], 0.0)


def test_degenerate_compressors_and_feedback():
    batches = stacked_noise(3)
    kw = dict(num_workers=3, max_delay=4, delay="uniform")
    plain, _ = run(ej.async_sgd(0.1, **kw), batches)
    ident, _ = run(ej.async_sgd(0.1, compressor=ej.identity(), **kw), batches)
    full_k, _ = run(ej.async_sgd(0.1, compressor=ej.top_k(k=20), **kw), batches)
    assert_trees_equal(ej.params(ident), ej.params(full_k))
    assert_trees_equal(ej.params(plain), ej.params(ident))
    ef_ident, m = run(ej.async_sgd(0.1, error_feedback=True, **kw), batches)
    assert_trees_close(ej.params(plain), ej.params(ef_ident))
    top = ej.top_k(fraction=0.25)
    no_ef, _ = run(ej.async_sgd(0.1, compressor=top, **kw), batches)
    beta0, _ = run(ej.async_sgd(0.1, compressor=top, error_feedback=0.0, **kw), batches)
    assert_trees_equal(ej.params(no_ef), ej.params(beta0))
    assert not np.array_equal(h.flat(ej.params(no_ef)), h.flat(ej.params(plain)))


def test_virtual_iterate_follows_uncompressed_sgd():
    """x = X - sum_p e^p moves by -eta * sum_i g_i per round (updates summed in async)."""
    lr, num_workers = 0.05, 3
    alg = ej.async_sgd(lr, num_workers, 5, reads="inconsistent", compressor=ej.top_k(k=2),
                       error_feedback=True)
    batches = stacked_noise(num_workers)
    state = alg.init(h.params0(), jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic))
    grad = jax.jit(jax.vmap(jax.grad(h.noisy_quadratic)))
    for r in range(ROUNDS):
        batch = jax.tree.map(lambda x, r=r: x[r], batches)
        g = grad(ej.views(alg, state), batch)
        expected = h.flat(ej.params(state)) - lr * h.flat(
            jax.tree.map(lambda x: jnp.sum(x, axis=0), g))
        state, _ = step(state, batch)
        np.testing.assert_allclose(h.flat(ej.params(state)), expected, rtol=0, atol=4e-6)


# A pairwise covering of reads x delay law x compression (every pair of values
# appears), plus a recorded trace (consistent reads only) with every compression.
BOUND_CASES = [
    ("consistent", "fixed", "none"), ("inconsistent", "fixed", "top_k"),
    ("consistent", "fixed", "top_k_ef"), ("inconsistent", "uniform", "none"),
    ("consistent", "uniform", "top_k"), ("inconsistent", "uniform", "top_k_ef"),
    ("consistent", "geometric", "none"), ("inconsistent", "geometric", "top_k"),
    ("consistent", "geometric", "top_k_ef"),
] + [("consistent", "trace", comp) for comp in ("none", "top_k", "top_k_ef")]


def make_async(reads, delay, comp, *, lr=0.05, num_workers=4, max_delay=7, **kw):
    if delay == "trace":
        rng = np.random.default_rng(0)
        lo = np.arange(num_workers)[None]
        delay = rng.integers(lo, max_delay + 1, size=(64, num_workers))
    compressor = None if comp == "none" else ej.top_k(fraction=0.1)
    return ej.async_sgd(lr, num_workers, max_delay, delay=delay, reads=reads,
                        compressor=compressor, error_feedback=comp == "top_k_ef", **kw)


@pytest.mark.parametrize("reads,delay,comp", BOUND_CASES)
def test_bound_holds_every_round_over_seeds(reads, delay, comp):
    p = h.params0()
    alg = make_async(reads, delay, comp)
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(6), rounds=60)
    h.assert_bound_holds(metrics, norms)
    assert np.max(metrics["consistency/b_hat"]) > 0
    mean_lag = np.asarray(metrics["delay/mean"])
    assert np.all((mean_lag >= 0) & (mean_lag <= 7))


def test_bound_holds_with_decaying_schedule_and_clipping():
    p = h.params0()
    schedule = optax.exponential_decay(0.2, transition_steps=5, decay_rate=0.7)
    for comp in ("none", "top_k", "top_k_ef"):
        alg = make_async("inconsistent", "uniform", comp, lr=schedule)
        _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                        seeds=np.arange(4), rounds=40)
        h.assert_bound_holds(metrics, norms)
        eta = np.asarray(metrics["learning_rate"][0])
        assert eta[-1] < 0.2 * eta[0]
    clipped = make_async("consistent", "uniform", "none", clip_norm=0.5)
    _, metrics, norms = h.run_seeds(clipped, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(4), rounds=20)
    h.assert_bound_holds(metrics, norms)
    # With clipping M is known from round 0: bound = max_delay * clip_norm.
    np.testing.assert_allclose(metrics["consistency/bound"], 7 * 0.5, rtol=1e-6)
    assert np.all(metrics["grad_norm/max"] <= 0.5 * (1 + 1e-6))


@pytest.mark.parametrize("reads,comp", [("consistent", "none"), ("inconsistent", "none"),
                                        ("consistent", "top_k")])
def test_bound_is_attained_with_constant_gradients(reads, comp):
    """On a linear loss with every lag at max_delay, b_hat reaches at least 90% of the bound."""
    p = jax.tree.map(jnp.zeros_like, h.params0())
    alg = make_async(reads, "fixed", comp, lr=0.01)
    _, metrics, norms = h.run_seeds(alg, h.linear, p, h.constant_batch_fn(p, 4, 0.5),
                                    seeds=np.arange(2), rounds=10)
    h.assert_bound_holds(metrics, norms)
    ratio = np.asarray(metrics["consistency/b_hat"] / metrics["consistency/bound"])
    assert np.all(ratio[:, 3:] >= 0.9), ratio


def test_recorded_trace_is_replayed_exactly():
    """An instrumented run recovers every lag from the views (X_t = -t on a linear loss)."""
    num_workers, max_delay, rounds = 3, 6, 9
    rng = np.random.default_rng(1)
    lags = rng.integers(np.arange(num_workers)[None], max_delay + 1, size=(rounds, num_workers))
    alg = ej.async_sgd(1.0, num_workers, max_delay, delay=lags)
    p = {"w": jnp.zeros((2,), jnp.float32)}
    state = alg.init(p, jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.linear))
    batch = {"w": jnp.ones((num_workers, 2), jnp.float32)}
    for r in range(rounds):
        views = np.asarray(ej.views(alg, state)["w"])
        t = r * num_workers + np.arange(num_workers)
        recovered = t + views[:, 0]  # view = X_{t - lag} = -(t - lag)
        np.testing.assert_array_equal(recovered, np.minimum(lags[r], t))
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["delay/mean"], np.mean(np.minimum(lags[r], t)))
    with pytest.raises(ValueError, match="rounds"):
        ej.run(alg, h.linear, state, {"w": jnp.ones((1, num_workers, 2))})


def test_lags_never_exceed_max_delay_for_inconsistent_reads():
    num_workers, max_delay = 4, 5
    alg = ej.async_sgd(1.0, num_workers, max_delay, reads="inconsistent", delay="uniform")
    p = {"w": jnp.zeros((64,), jnp.float32)}
    state = alg.init(p, jax.random.key(0))
    step = jax.jit(ej.make_step(alg, h.linear))
    batch = {"w": jnp.ones((num_workers, 64), jnp.float32)}
    seen = set()
    for r in range(8):
        views = np.asarray(ej.views(alg, state)["w"])
        t = (r * num_workers + np.arange(num_workers))[:, None]
        lag = t + views
        assert np.all(lag <= max_delay) and np.all(lag >= np.minimum(np.arange(4)[:, None], t))
        seen.update(np.unique(lag).tolist())
        state, _ = step(state, batch)
    assert seen == set(range(max_delay + 1))


def test_hypergradient_of_learning_rate_matches_finite_difference():
    """Traced hyperparameters pass validation; float64 grad matches a central difference."""
    with jax.enable_x64(True):
        p = h.params0(jnp.float64)
        batches = stacked_noise(3, rounds=5, params=p)

        def final_loss(lr):
            alg = ej.async_sgd(lr, 3, 4, compressor=ej.top_k(k=5), error_feedback=True)
            step = ej.make_step(alg, h.noisy_quadratic)
            state = alg.init(p, jax.random.key(0))
            state, _ = jax.lax.scan(step, state, batches)
            return h.noisy_quadratic(ej.params(state), jax.tree.map(jnp.zeros_like, p))

        lr = 0.05
        grad = jax.jit(jax.grad(final_loss))(lr)
        f = jax.jit(final_loss)
        eps = 1e-6
        fd = (f(lr + eps) - f(lr - eps)) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-5)
        assert abs(float(grad)) > 1e-3
