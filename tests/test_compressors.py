"""Tests for elastic_jax.compressors (docs/theory.md section 6)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from elastic_jax import compressors as C

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
N_KEYS = 2000  # Monte-Carlo draws for the statistical tests
Z = 6.0  # standard errors allowed in the statistical tests

# A few small leaf shapes, so hypothesis examples share compilations.
SHAPES = [(1,), (3,), (2, 3), (5,)]


@st.composite
def pytrees(draw, shapes=None):
    """A dict of 1-3 small float32 leaves; `coarse` values make ties and zeros."""
    if shapes is None:
        shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    coarse = draw(st.booleans())
    rng = np.random.default_rng(seed)
    tree = {}
    for i, shape in enumerate(shapes):
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-2, 3)
        tree[f"l{i}"] = np.round(x * 2) / 2 if coarse else x
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree), seed


# The statistical tests share one fixed structure (d = 10), so they compile once.
STAT_SHAPES = [(2, 3), (4,)]
stat_trees = functools.partial(pytrees, shapes=STAT_SHAPES)


def nonzero_tree(tree):
    return jax.tree.map(lambda x: jnp.where(x == 0, 1.0, x), tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def sq_norm(tree):
    return float(np.sum(flat(tree) ** 2))


def top_k_reference(x, k):
    """NumPy Top-k: a stable sort of -|x| puts ties at the lowest index first."""
    keep = np.argsort(-np.abs(x), kind="stable")[:k]
    out = np.zeros_like(x)
    out[keep] = x[keep]
    return out


@functools.cache
def jitted(compressor_factory, *args, **kwargs):
    """One jitted `compress` per configuration, shared across examples."""
    return jax.jit(compressor_factory(*args, **kwargs).spec.compress)


@functools.cache
def sampler(factory, *args, **kwargs):
    """`(tree, keys [N]) -> C(tree) per key`, leaves [N, ...]; one compile per configuration.

    `lax.map` rather than `vmap`: a vmapped threefry takes ~1.5 s to compile here.
    """
    if factory is C.qsgd:  # levels is traced: one compile for every level count
        return jax.jit(lambda t, ks, s: lax.map(lambda k: C.qsgd(s).spec.compress(t, k), ks))
    compress = factory(*args, **kwargs).spec.compress
    return jax.jit(lambda t, ks: lax.map(lambda k: compress(t, k), ks))


def draws_of(out):
    """Samples [N, d] (float64) from a pytree of [N, ...] leaves."""
    leaves = jax.tree.leaves(out)
    return np.concatenate([np.reshape(x, (N_KEYS, -1)) for x in leaves], 1).astype(np.float64)


def keys_for(seed):
    return jax.random.split(jax.random.key(seed), N_KEYS)


# ------------------------------------------------------------------------------ top-k


@SETTINGS
@given(pytrees(), st.floats(0.0, 1.0), st.sampled_from(["global", "per_leaf"]))
def test_top_k_matches_reference(tree_seed, u, scope):
    tree, _ = tree_seed
    sizes = [x.size for x in jax.tree.leaves(tree)]
    d = min(sizes) if scope == "per_leaf" else sum(sizes)
    k = 1 + int(u * (d - 1))
    out = jitted(C.top_k, k, scope=scope)(tree, None)
    leaves, outs = jax.tree.leaves(tree), jax.tree.leaves(out)
    if scope == "global":
        np.testing.assert_array_equal(flat(out), top_k_reference(flat(tree), k))
    else:
        for x, y in zip(leaves, outs, strict=True):
            np.testing.assert_array_equal(np.ravel(y), top_k_reference(np.ravel(x), k))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(
        lambda x: (x.shape, x.dtype), tree
    )
    # With every entry non-zero, exactly k per selection unit survive.
    dense = jitted(C.top_k, k, scope=scope)(nonzero_tree(tree), None)
    expected = k * len(sizes) if scope == "per_leaf" else k
    assert int(np.count_nonzero(flat(dense))) == expected


def test_top_k_ties_go_to_lowest_index():
    out = C.top_k(2).spec.compress({"a": jnp.array([1.0, 3.0, -3.0, 2.0, 3.0])}, None)
    np.testing.assert_array_equal(out["a"], [0.0, 3.0, -3.0, 0.0, 0.0])
    # Across leaves, in jax.tree.leaves order ("a" before "b").
    tree = {"b": jnp.array([5.0, 5.0]), "a": jnp.array([1.0, -5.0])}
    out = C.top_k(2).spec.compress(tree, None)
    np.testing.assert_array_equal(out["a"], [0.0, -5.0])
    np.testing.assert_array_equal(out["b"], [5.0, 0.0])


def test_top_k_zeros_stay_zero_and_fewer_nonzeros_pass_through():
    x = {"a": jnp.array([0.0, 0.0, -1.0, 0.0]), "b": jnp.array([[0.0, 2.0]])}
    out = C.top_k(3).spec.compress(x, None)
    jax.tree.map(np.testing.assert_array_equal, out, x)


def test_top_k_global_and_per_leaf_differ():
    tree = {"a": jnp.array([10.0, 9.0, 8.0]), "b": jnp.array([1.0, 2.0, 0.5])}
    glob = C.top_k(2).spec.compress(tree, None)
    np.testing.assert_array_equal(glob["a"], [10.0, 9.0, 0.0])
    np.testing.assert_array_equal(glob["b"], [0.0, 0.0, 0.0])
    per = C.top_k(1, scope="per_leaf").spec.compress(tree, None)
    np.testing.assert_array_equal(per["a"], [10.0, 0.0, 0.0])
    np.testing.assert_array_equal(per["b"], [0.0, 2.0, 0.0])


@pytest.mark.parametrize(
    "compressor",
    [C.top_k(6), C.top_k(fraction=1.0), C.top_k(fraction=1.0, scope="per_leaf")],
    ids=repr,
)
def test_top_k_with_k_equal_d_is_identity_bitwise(compressor):
    tree = {"a": jnp.array([1.5, -0.0, 3.0]), "b": jnp.array([[1e-30, -2.0, 0.0]])}
    out = compressor.spec.compress(tree, None)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


@pytest.mark.parametrize(
    ("fraction", "scope", "ks"),
    [
        (0.25, "global", [4]),  # floor(0.25 * 17) = 4
        (0.01, "global", [1]),  # max(1, floor(0.17)) = 1
        (0.5, "per_leaf", [2, 6]),  # leaves b, w: floor(0.5 * 5) = 2, floor(0.5 * 12) = 6
        (0.1, "per_leaf", [1, 1]),  # max(1, floor(0.5)) = 1, floor(1.2) = 1
    ],
)
def test_fraction_rounding(fraction, scope, ks):
    tree = {"b": jnp.arange(1.0, 6.0), "w": jnp.arange(1.0, 13.0).reshape(3, 4)}
    compressor = C.top_k(fraction=fraction, scope=scope)
    assert C.compression_info(compressor, tree).k == sum(ks)
    out = compressor.spec.compress(tree, None)
    if scope == "per_leaf":
        assert [int(np.count_nonzero(x)) for x in jax.tree.leaves(out)] == ks
    else:
        assert int(np.count_nonzero(flat(out))) == ks[0]


# ----------------------------------------------------------------- contraction constants


@SETTINGS
@given(pytrees(), st.floats(0.0, 1.0), st.sampled_from(["global", "per_leaf"]))
def test_top_k_contraction(tree_seed, u, scope):
    tree, _ = tree_seed
    sizes = [x.size for x in jax.tree.leaves(tree)]
    k = 1 + int(u * ((min(sizes) if scope == "per_leaf" else sum(sizes)) - 1))
    delta = C.compression_info(C.top_k(k, scope=scope), tree).delta
    out = jitted(C.top_k, k, scope=scope)(tree, None)
    err = sq_norm(jax.tree.map(jnp.subtract, tree, out))
    assert err <= (1 - delta) * sq_norm(tree) * (1 + 1e-5)


@SETTINGS
@given(pytrees())
def test_scaled_sign_contraction(tree_seed):
    tree, _ = tree_seed
    d = sum(x.size for x in jax.tree.leaves(tree))
    out = jitted(C.scaled_sign)(tree, None)
    err, norm2, l1 = (
        sq_norm(jax.tree.map(jnp.subtract, tree, out)),
        sq_norm(tree),
        np.abs(flat(tree)).sum(),
    )
    assert C.compression_info(C.scaled_sign(), tree).delta == 1 / d
    assert err <= (1 - 1 / d) * norm2 * (1 + 1e-5)
    # The actual error: ||g - C(g)||^2 = ||g||^2 - ||g||_1^2 / d (docs/theory.md's delta).
    np.testing.assert_allclose(err, norm2 - l1**2 / d, rtol=1e-4, atol=1e-6 * norm2)
    # Every entry is +-||g||_1/d: a zero is sent as +1, so the output is what the
    # 32 + d bits of `compression_info` (the scale and one sign bit each) encode.
    np.testing.assert_allclose(flat(out), np.where(flat(tree) >= 0, 1, -1) * l1 / d, rtol=1e-5)
    assert len(np.unique(np.abs(flat(out)))) == 1
    assert C.compression_info(C.scaled_sign(), tree).bits == 32 + d


@SETTINGS
@given(stat_trees(), st.sampled_from([1, 3, 10]))
def test_random_k_unscaled_contracts_in_expectation(tree_seed, k):
    tree, seed = tree_seed
    tree = nonzero_tree(tree)
    d = sum(x.size for x in jax.tree.leaves(tree))
    draws = draws_of(sampler(C.random_k, k)(tree, keys_for(seed)))
    a = flat(tree)
    # Exactly k entries kept, each an unscaled copy.
    kept = draws != 0
    assert np.all(kept.sum(axis=1) == k)
    np.testing.assert_array_equal(draws, np.where(kept, a, 0.0))
    # Each entry kept with probability k/d.
    p = k / d
    assert np.all(np.abs(kept.mean(axis=0) - p) <= Z * math.sqrt(p * (1 - p) / N_KEYS) + 1e-12)
    # E||a - C(a)||^2 = (1 - k/d) ||a||^2.
    errs = np.sum((a - draws) ** 2, axis=1)
    se = errs.std() / math.sqrt(N_KEYS)
    assert abs(errs.mean() - (1 - p) * np.sum(a**2)) <= Z * se + 1e-6 * np.sum(a**2)


# ------------------------------------------------------------------------- unbiasedness


def check_unbiased(draws, tree, omega, var):
    """Mean over keys within Z standard errors of `a`; E||C(a) - a||^2 <= omega ||a||^2.

    `var` is each entry's exact variance, so that rare events (an entry kept with
    probability 1e-3) do not get an empirical standard error of zero.
    """
    a = flat(tree)
    scale = np.sqrt(np.sum(a**2))
    se = np.sqrt(var / N_KEYS)
    assert np.all(np.abs(draws.mean(axis=0) - a) <= Z * se + 1e-5 * scale)
    errs = np.sum((draws - a) ** 2, axis=1)
    bound = omega * scale**2
    assert errs.mean() <= bound + Z * errs.std() / math.sqrt(N_KEYS) + 1e-5 * scale**2
    return errs.mean(), bound


@SETTINGS
@given(stat_trees(), st.sampled_from([1, 3, 10]))
def test_random_k_scaled_is_unbiased(tree_seed, k):
    tree, seed = tree_seed
    draws = draws_of(sampler(C.random_k, k, scaled=True)(tree, keys_for(seed)))
    omega = C.compression_info(C.random_k(k, scaled=True), tree).omega
    a = flat(tree)
    mean_err, bound = check_unbiased(draws, tree, omega, var=a**2 * (10 / k - 1))
    # omega = d/k - 1 is attained: E||C(a) - a||^2 = (d/k - 1) ||a||^2.
    assert mean_err >= 0.8 * bound - 1e-6


@SETTINGS
@given(stat_trees(), st.integers(1, 8))
def test_qsgd_is_unbiased(tree_seed, levels):
    tree, seed = tree_seed
    draws = draws_of(sampler(C.qsgd)(tree, keys_for(seed), levels))
    # xi_j = floor(r) + Bernoulli(r - floor(r)), r = s |g_j| / ||g||: each entry's
    # variance is (||g|| / s)^2 f (1 - f), f = r - floor(r).
    norm = math.sqrt(sq_norm(tree))
    r = levels * np.abs(flat(tree)) / max(norm, 1e-30)
    f = r - np.floor(r)
    var = (norm / levels) ** 2 * f * (1 - f)
    check_unbiased(draws, tree, C.compression_info(C.qsgd(levels), tree).omega, var)
    # Entries are ||g|| sign(g_j) xi_j / s with integer xi_j in [0, s].
    xi = np.abs(draws) * levels / max(norm, 1e-30)
    np.testing.assert_allclose(xi, np.round(xi), atol=1e-4 * levels)
    assert np.all((np.round(xi) >= 0) & (np.round(xi) <= levels))
    assert np.all(draws * flat(tree) >= 0)


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_qsgd_is_finite_and_unbiased_at_extreme_magnitudes(magnitude):
    """The float32 norm of such entries overflows (1e30) or underflows (1e-30)."""
    levels = 4
    tree = {"a": jnp.asarray([3.0, -4.0, 0.5, 0.0], jnp.float32) * magnitude,
            "b": jnp.asarray([[1.0, -2.0]], jnp.float32) * magnitude}
    draws = draws_of(sampler(C.qsgd)(tree, keys_for(0), levels))
    assert np.all(np.isfinite(draws))
    a = flat(tree).astype(np.float64)
    norm = np.sqrt(np.sum(a**2))
    r = levels * np.abs(a) / norm
    f = r - np.floor(r)
    var = (norm / levels) ** 2 * f * (1 - f)
    check_unbiased(draws, tree, C.compression_info(C.qsgd(levels), tree).omega, var)
    assert np.any(draws != 0)


def test_qsgd_accepts_traced_levels():
    tree = {"a": jnp.array([3.0, -4.0])}
    out = jax.jit(lambda s: C.qsgd(s).spec.compress(tree, jax.random.key(0)))(1)
    xi = np.abs(out["a"]) / 5.0
    np.testing.assert_allclose(xi, np.round(xi), atol=1e-6)


# ------------------------------------------------------------------------------- info


PARAMS = {"b": jnp.zeros(5), "w": jnp.zeros((3, 4))}  # d = 17


@pytest.mark.parametrize(
    ("compressor", "expected"),
    [
        (C.identity(), C.CompressionInfo(1.0, 0.0, "deterministic", 32 * 17, 17, None)),
        # k (32 + ceil(log2 17)) = 4 * 37.
        (C.top_k(4), C.CompressionInfo(4 / 17, None, "deterministic", 148, 17, 4)),
        (C.top_k(fraction=0.25), C.CompressionInfo(4 / 17, None, "deterministic", 148, 17, 4)),
        # min(2/5, 6/12); 2 * (32 + 3) + 6 * (32 + 4).
        (
            C.top_k(fraction=0.5, scope="per_leaf"),
            C.CompressionInfo(0.4, None, "deterministic", 286, 17, 8),
        ),
        (C.random_k(4), C.CompressionInfo(4 / 17, None, "expectation", 128, 17, 4)),
        (C.random_k(4, scaled=True), C.CompressionInfo(None, 17 / 4 - 1, "no", 128, 17, 4)),
        # min(17/16, sqrt(17)/4); 32 + 17 (1 + ceil(log2 5)).
        (C.qsgd(4), C.CompressionInfo(None, math.sqrt(17) / 4, "no", 100, 17, None)),
        (C.qsgd(1), C.CompressionInfo(None, math.sqrt(17), "no", 32 + 17 * 2, 17, None)),
        (C.scaled_sign(), C.CompressionInfo(1 / 17, None, "deterministic", 49, 17, None)),
    ],
    ids=lambda x: repr(x) if isinstance(x, C.Compressor) else "",
)
def test_compression_info(compressor, expected):
    info = C.compression_info(compressor, PARAMS)
    assert info._replace(delta=None, omega=None) == expected._replace(delta=None, omega=None)
    for got, want in [(info.delta, expected.delta), (info.omega, expected.omega)]:
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, rel=1e-12)
    assert compressor.spec.contractive == expected.contractive
    # Shapes only: abstract leaves work, nothing is computed.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert C.compression_info(compressor, abstract) == info


@pytest.mark.parametrize(
    ("sizes", "k", "scope", "bits"),
    [
        ((16,), 2, "global", 2 * (32 + 4)),  # ceil(log2 16) = 4
        ((16, 1), 2, "global", 2 * (32 + 5)),  # ceil(log2 17) = 5
        ((1,), 1, "global", 32),  # ceil(log2 1) = 0
        ((1, 2, 4), 1, "per_leaf", (32 + 0) + (32 + 1) + (32 + 2)),
    ],
)
def test_top_k_index_bits(sizes, k, scope, bits):
    params = {f"l{i}": jnp.zeros(n) for i, n in enumerate(sizes)}
    assert C.compression_info(C.top_k(k, scope=scope), params).bits == bits


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: C.top_k(), "k"),
        (lambda: C.top_k(3, fraction=0.1), "k"),
        (lambda: C.top_k(0), "k"),
        (lambda: C.top_k(2.5), "k"),
        (lambda: C.top_k(True), "k"),
        (lambda: C.top_k(fraction=0.0), "fraction"),
        (lambda: C.top_k(fraction=1.5), "fraction"),
        (lambda: C.top_k(fraction=float("nan")), "fraction"),
        (lambda: C.top_k(3, scope="leaf"), "scope"),
        (lambda: C.random_k(0), "k"),
        (lambda: C.random_k(fraction=-0.1), "fraction"),
        (lambda: C.random_k(2, scaled="yes"), "scaled"),
        (lambda: C.random_k(2, key="seed"), "key"),
        (lambda: C.qsgd(0), "levels"),
        (lambda: C.qsgd(1.5), "levels"),
        (lambda: C.compression_info(optax.sgd(0.1), PARAMS), "compressor"),
    ],
)
def test_factory_validation(make, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: got .*; expected "):
        make()


def test_k_larger_than_d():
    small = {"a": jnp.zeros((5, 6))}
    with pytest.raises(ValueError, match=r"^k: got 50; expected 1 <= k <= d = 30$"):
        C.top_k(50).spec.validate(small)
    with pytest.raises(ValueError, match=r"^k: got 31; expected 1 <= k <= d = 30$"):
        C.compression_info(C.random_k(31), small)
    with pytest.raises(ValueError, match=r"^k: got 4; expected 1 <= k <= d = 3"):
        C.top_k(4, scope="per_leaf").spec.validate({"a": jnp.zeros(5), "b": jnp.zeros(3)})
    # And at trace time inside compress.
    with pytest.raises(ValueError, match=r"^k: got 50; expected"):
        jax.jit(C.top_k(50).spec.compress)(small, None)


# ------------------------------------------------------------------------------- optax


def test_optax_chain_deterministic():
    params = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([0.5])}
    grads = {"w": jnp.array([0.3, -2.0, 1.0]), "b": jnp.array([-4.0])}
    tx = optax.chain(optax.sgd(0.1), C.top_k(2))
    state = tx.init(params)
    assert isinstance(state[1], optax.EmptyState)
    updates, state = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_allclose(updates["w"], [0.0, 0.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [0.4], rtol=1e-6)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], [1.0, 2.2, 3.0], rtol=1e-6)


def test_stochastic_state_key_advances_and_explicit_key_is_honoured():
    grads = {"w": jnp.arange(1.0, 9.0)}
    compressor = C.random_k(3, key=7)
    update = jax.jit(compressor.update)
    s0 = compressor.init(grads)
    u1, s1 = update(grads, s0)
    u2, s2 = update(grads, s1)
    data = jax.random.key_data
    assert not np.array_equal(data(s0.key), data(s1.key))
    assert not np.array_equal(data(s1.key), data(s2.key))
    new_key, sub = jax.random.split(s0.key)
    np.testing.assert_array_equal(data(s1.key), data(new_key))
    np.testing.assert_array_equal(u1["w"], compressor.spec.compress(grads, sub)["w"])
    assert not np.array_equal(u1["w"], u2["w"])  # 56 index sets; fixed seed: they differ
    # An explicit key is used as given and leaves the state's key alone.
    key = jax.random.key(123)
    u, s = update(grads, s1, key=key)
    np.testing.assert_array_equal(u["w"], compressor.spec.compress(grads, key)["w"])
    np.testing.assert_array_equal(data(s.key), data(s1.key))
    # Through an optax chain the key reaches the compressor.
    tx = optax.chain(optax.sgd(1.0), compressor)
    u, _ = tx.update(grads, tx.init(grads), grads, key=key)
    neg = jax.tree.map(jnp.negative, grads)
    np.testing.assert_array_equal(u["w"], compressor.spec.compress(neg, key)["w"])
    # The seed may be an int, a typed key or a raw key.
    for seed in [jax.random.key(7), jax.random.PRNGKey(7)]:
        other = C.random_k(3, key=seed).init(grads)
        np.testing.assert_array_equal(data(other.key), data(s0.key))


# ------------------------------------------------------------------------------ contract


ALL = [
    C.identity(),
    C.top_k(2),
    C.top_k(fraction=0.5, scope="per_leaf"),
    C.random_k(3),
    C.random_k(3, scaled=True),
    C.qsgd(3),
    C.scaled_sign(),
]


@pytest.mark.parametrize("compressor", ALL, ids=repr)
def test_contract_zeros_dtypes_structure(compressor):
    tree = {"a": jnp.zeros((2, 3), jnp.float32), "b": [jnp.zeros(4, jnp.bfloat16)]}
    compress = jax.jit(compressor.spec.compress)
    key = jax.random.key(0) if compressor.spec.stochastic else None
    out = compress(tree, key)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)  # no NaN either
    # Non-zero inputs keep dtypes too, and the state is the right kind.
    ones = jax.tree.map(lambda x: x + 1, tree)
    out = compress(ones, key)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, ones)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))
    state = compressor.init(tree)
    assert isinstance(state, C.CompressorState if compressor.spec.stochastic else optax.EmptyState)
    assert compressor.spec.name in {"identity", "top_k", "random_k", "qsgd", "scaled_sign"}
