"""Tests for elastic_jax.error_feedback (docs/theory.md section 4)."""

import functools
import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_jax import compressors as C

# `elastic_jax.error_feedback` the attribute may be the re-exported function.
EF = importlib.import_module("elastic_jax.error_feedback")

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
STEPS = 6
SHAPES = {"b": (3,), "w": (2, 4)}  # d = 11


def updates_for(seed, steps=STEPS, scale=1.0):
    """`steps` random update pytrees (leaves [steps, ...]) with entries of mixed magnitude."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        x = rng.standard_normal((steps, *shape)) * 10.0 ** rng.integers(-3, 3, (steps, *shape))
        out[name] = jnp.asarray(x * scale, jnp.float32)
    return out


def at(tree, t):
    return jax.tree.map(lambda x: x[t], tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@functools.cache
def jitted_update(wrapped):
    return jax.jit(wrapped.update)


cached_error_feedback = functools.cache(EF.error_feedback)


def run(wrapped, updates, key=None):
    """Applies `wrapped` to each update in turn, jitted once.

    Returns per step the residual before, the sent update and the residual after.
    """
    update = jitted_update(wrapped)
    state = wrapped.init(at(updates, 0))
    history = []
    for t in range(jax.tree.leaves(updates)[0].shape[0]):
        kwargs = {} if key is None else {"key": jax.random.fold_in(key, t)}
        u, new_state = update(at(updates, t), state, **kwargs)
        history.append((state.residual, u, new_state.residual))
        state = new_state
    return history


CONSERVING = [C.identity(), C.top_k(2), C.top_k(fraction=0.3, scope="per_leaf"), C.random_k(3)]


@pytest.mark.parametrize("compressor", CONSERVING, ids=repr)
def test_conservation_is_bitwise_for_masking_compressors(compressor):
    updates = updates_for(0)
    for t, (e_old, u, e_new) in enumerate(run(EF.error_feedback(compressor), updates)):
        a = flat(e_old) + flat(at(updates, t))  # float32, as in the library
        np.testing.assert_array_equal(flat(u) + flat(e_new), a)
        # A masking compressor: every entry is either sent or kept, never split.
        assert np.all((flat(u) == 0) | (flat(e_new) == 0))
    assert np.any(flat(e_new) != 0) or compressor.spec.name == "identity"


def test_conservation_within_one_ulp_for_scaled_sign():
    updates = updates_for(1)
    for t, (e_old, u, e_new) in enumerate(run(EF.error_feedback(C.scaled_sign()), updates)):
        a = flat(e_old) + flat(at(updates, t))
        u, e_new = flat(u), flat(e_new)
        # e_new = fl(a - u) is exact when u and a are within a factor 2 (Sterbenz);
        # otherwise the two roundings cost at most one ulp of the larger of |a|, |u|.
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(u)))
        assert np.all(np.abs((u + e_new) - a) <= ulp)


def test_error_feedback_around_identity_is_no_error_feedback():
    updates = updates_for(2)
    for t, (_, u, e_new) in enumerate(run(EF.error_feedback(C.identity()), updates)):
        np.testing.assert_array_equal(flat(u), flat(at(updates, t)))
        np.testing.assert_array_equal(flat(e_new), 0.0)


@pytest.mark.parametrize("compressor", [C.top_k(2), C.random_k(3), C.scaled_sign()], ids=repr)
def test_beta_zero_is_the_bare_compressor(compressor):
    """Bitwise for masking compressors; scaled sign's scale is a reduction, which XLA
    may order differently once fused with the (zero) residual: within 2 ulp."""
    updates, key = updates_for(3), jax.random.key(3)
    history = run(EF.error_feedback(compressor, beta=0.0), updates, key=key)
    compress = jax.jit(compressor.spec.compress)
    for t, (_, u, e_new) in enumerate(history):
        bare = compress(at(updates, t), jax.random.fold_in(key, t))
        if compressor.spec.name == "scaled_sign":
            np.testing.assert_array_max_ulp(flat(u), flat(bare), maxulp=2)
        else:
            np.testing.assert_array_equal(flat(u), flat(bare))
        np.testing.assert_array_equal(flat(e_new), 0.0)


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([C.top_k(1), C.top_k(5), C.top_k(fraction=0.5, scope="per_leaf")]),
    st.sampled_from([1.0, 0.5]),
)
def test_residual_bounds(seed, compressor, beta):
    # Updates of norm <= M = 1; e_new <= beta q ||a|| each step and ||e|| <= M rho.
    updates = updates_for(seed, steps=8)
    norms = np.sqrt(sum(np.sum(np.reshape(x, (8, -1)) ** 2, 1) for x in jax.tree.leaves(updates)))
    shrink = np.maximum(norms, 1.0).astype(np.float32)
    updates = jax.tree.map(lambda x: x / shrink.reshape((8,) + (1,) * (x.ndim - 1)), updates)
    delta = C.compression_info(compressor, at(updates, 0)).delta
    q = math.sqrt(1 - delta)
    rho = beta * q / (1 - beta * q)
    for t, (e_old, _, e_new) in enumerate(run(cached_error_feedback(compressor, beta), updates)):
        a = flat(e_old).astype(np.float64) + flat(at(updates, t))
        e_norm = np.linalg.norm(flat(e_new).astype(np.float64))
        assert e_norm <= beta * q * np.linalg.norm(a) * (1 + 1e-5) + 1e-30
        assert e_norm <= rho * (1 + 1e-5)


def test_scaled_sign_residual_bound_uses_worst_case_delta():
    updates = updates_for(4)
    q = math.sqrt(1 - C.compression_info(C.scaled_sign(), at(updates, 0)).delta)
    for t, (e_old, _, e_new) in enumerate(run(EF.error_feedback(C.scaled_sign()), updates)):
        a = flat(e_old).astype(np.float64) + flat(at(updates, t))
        assert np.linalg.norm(flat(e_new)) <= q * np.linalg.norm(a) * (1 + 1e-5)


@pytest.mark.parametrize(
    ("compressor", "suggestion"),
    [
        (C.random_k(3, scaled=True), r"use random_k\(\.\.\., scaled=False\) or top_k"),
        (C.qsgd(4), r"use top_k, random_k\(\.\.\., scaled=False\) or scaled_sign"),
    ],
    ids=repr,
)
def test_rejects_non_contractive_compressors(compressor, suggestion):
    pattern = rf"^compressor: got {compressor.spec.name}\(.*\), which is not contractive; "
    with pytest.raises(ValueError, match=pattern + r"error feedback needs .*" + suggestion):
        EF.error_feedback(compressor)


def test_rejects_wrapped_and_foreign_compressors():
    with pytest.raises(ValueError, match=r"^compressor: got error_feedback\(top_k.*bare"):
        EF.error_feedback(EF.error_feedback(C.top_k(1)))
    with pytest.raises(ValueError, match=r"^compressor: got "):
        EF.error_feedback(optax.sgd(0.1))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), float("inf"), True, "1", None])
def test_beta_validation(beta):
    with pytest.raises(ValueError,
                       match=r"^beta: got .*; expected a finite number in \[0.0, 1.0\]"):
        EF.error_feedback(C.top_k(1), beta)


def test_wrapper_attributes_info_and_state():
    inner = C.random_k(2, key=5)
    wrapped = EF.error_feedback(inner, beta=0.5)
    assert wrapped.spec.name == "error_feedback" and wrapped.inner is inner
    assert wrapped.beta == 0.5 and wrapped.spec.stochastic
    assert wrapped.spec.contractive == "expectation"
    params = {"b": jnp.zeros(3, jnp.bfloat16), "w": jnp.zeros((2, 4))}
    assert C.compression_info(wrapped, params) == C.compression_info(inner, params)
    with pytest.raises(ValueError, match="keeps state"):
        wrapped.spec.compress(params, None)
    # Residuals: zeros like params, float32 for 16-bit leaves; sent updates keep dtypes.
    state = wrapped.init(params)
    assert state.residual["b"].dtype == jnp.float32 and state.residual["w"].dtype == jnp.float32
    grads = {"b": jnp.array([1.0, -2.0, 3.0], jnp.bfloat16), "w": jnp.ones((2, 4))}
    update = jax.jit(wrapped.update)
    u, new_state = update(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, grads)
    # The inner key advances without key=, and an explicit key is used as given.
    data = jax.random.key_data
    assert not np.array_equal(data(new_state.inner_state.key), data(state.inner_state.key))
    key = jax.random.key(9)
    u_key, s_key = update(grads, state, key=key)
    np.testing.assert_array_equal(data(s_key.inner_state.key), data(state.inner_state.key))
    expected, _ = EF.ef_step(state.residual, grads, inner.spec.compress, key, 0.5)
    chex.assert_trees_all_equal(u_key, expected)


def test_bfloat16_conservation_is_bitwise_in_float32():
    wrapped = EF.error_feedback(C.top_k(3))
    grads = {"w": jnp.asarray(updates_for(5)["w"][0], jnp.bfloat16)}
    state = wrapped.init(grads)
    e_old = state.residual
    for _ in range(3):
        u, state = wrapped.update(grads, state)
        a = flat(e_old) + flat(grads).astype(np.float32)
        np.testing.assert_array_equal(flat(u).astype(np.float32) + flat(state.residual), a)
        e_old = state.residual


def test_ef_step_is_the_ef14_formula():
    e = {"x": jnp.array([0.5, -1.0, 0.0, 2.0])}
    g = {"x": jnp.array([1.0, 0.5, -3.0, 0.25])}
    u, e_new = EF.ef_step(e, g, C.top_k(2).spec.compress, None, 0.5)
    np.testing.assert_array_equal(u["x"], [0.0, 0.0, -3.0, 2.25])  # a = [1.5, -.5, -3, 2.25]
    np.testing.assert_array_equal(e_new["x"], [0.75, -0.25, 0.0, 0.0])


def test_optax_chain_with_error_feedback():
    # Plain SGD on f(x) = ||x||^2 / 2 with Top-1 and error feedback, jitted once.
    tx = optax.chain(optax.sgd(0.1), EF.error_feedback(C.top_k(1)))
    x = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, state):
        updates, new_state = tx.update(x, state, x)  # the gradient of f is x
        return optax.apply_updates(x, updates), new_state

    for _ in range(60):
        new_x, new_state = step(x, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        x, state = new_x, new_state
    assert float(jnp.linalg.norm(x["w"])) < 0.05


@pytest.mark.parametrize("make", [C.scaled_sign, lambda: C.top_k(2)], ids=["sign", "top_k"])
def test_gradient_with_respect_to_beta_matches_finite_differences(make):
    with jax.enable_x64(True):
        target = jnp.array([0.3, -1.2, 2.0, 0.7, -0.4])

        def loss(beta):
            wrapped = EF.error_feedback(make(), beta)
            x = jnp.zeros(5)
            state = wrapped.init(x)
            for _ in range(6):
                u, state = wrapped.update(0.3 * (x - target), state)
                x = x - u
            return jnp.sum((x - target) ** 2)

        beta, h = 0.6, 1e-6
        grad = float(jax.jit(jax.grad(loss))(beta))
        fd = (float(loss(beta + h)) - float(loss(beta - h))) / (2 * h)
        assert math.isfinite(grad) and abs(grad) > 1e-6
        assert grad == pytest.approx(fd, rel=1e-5, abs=1e-9)
