"""Delay laws: ranges, shorthands, traces."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import elastic_jax as ej

LAWS = {"fixed": ej.delays.fixed(), "uniform": ej.delays.uniform(),
        "geometric": ej.delays.geometric(0.3)}
_SAMPLERS = {
    name: jax.jit(jax.vmap(lambda key, lo, law=law: law.sample(key, 0, 0, lo, 9, (50,)),
                           in_axes=(0, None)))
    for name, law in LAWS.items()
}


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(LAWS)), lo=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_lags_stay_in_range(name, lo, seed):
    keys = jax.random.split(jax.random.key(seed), 8)
    lags = np.asarray(_SAMPLERS[name](keys, lo))
    assert lags.dtype == np.int32
    assert lags.min() >= lo and lags.max() <= 9
    if name == "fixed":
        assert np.all(lags == 9)


def test_uniform_and_geometric_distributions():
    keys = jax.random.split(jax.random.key(0), 400)
    uniform = np.asarray(_SAMPLERS["uniform"](keys, 2))
    counts = np.bincount(uniform.ravel(), minlength=10)[2:]
    expected = uniform.size / 8
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))
    geo = np.asarray(_SAMPLERS["geometric"](keys, 0)).ravel()
    # P(G = 0) = p, P(G >= 9) truncated to 9: (1 - p)^9.
    assert abs(np.mean(geo == 0) - 0.3) < 0.02
    assert abs(np.mean(geo == 9) - 0.7**9) < 0.01


def test_shorthands_and_bad_laws():
    assert ej.delays.resolve("fixed").name == "fixed"
    assert ej.delays.resolve("geometric").name == "geometric"
    assert ej.delays.resolve(np.zeros((3, 2), int)).name == "trace"
    with pytest.raises(ValueError, match="delay: got 'poisson'"):
        ej.delays.resolve("poisson")
    with pytest.raises(ValueError, match="delay:.*integer trace"):
        ej.delays.resolve(np.zeros((3,), int))
    with pytest.raises(ValueError, match="delay:.*integer trace"):
        ej.delays.resolve(np.zeros((3, 2), float))
    with pytest.raises(ValueError, match=r"p: got 0.0; expected .*\(0.0, 1.0\]"):
        ej.delays.geometric(0.0)


def test_trace_validation_in_async():
    good = np.array([[0, 1, 2], [3, 1, 2]])
    ej.async_sgd(0.1, 3, 3, delay=good)
    with pytest.raises(ValueError, match=r"shape \[rounds, 3\]"):
        ej.async_sgd(0.1, 3, 3, delay=np.zeros((4, 2), int))
    with pytest.raises(ValueError, match=r"lag 0 at round 1, worker 2; expected lags in \[2, 3\]"):
        ej.async_sgd(0.1, 3, 3, delay=np.array([[0, 1, 2], [3, 1, 0]]))
    with pytest.raises(ValueError, match=r"lag 4 .* \[0, 3\]"):
        ej.async_sgd(0.1, 3, 3, delay=np.array([[4, 1, 2]]))
    with pytest.raises(ValueError, match="reads: got 'inconsistent'"):
        ej.async_sgd(0.1, 3, 3, delay=good, reads="inconsistent")
    lags = ej.delays.trace(good).sample(None, jnp.asarray(1), 2, 0, 3, ())
    assert int(lags) == 2


def test_uniform_spans_beyond_sixteen_bits_fall_back_to_randint():
    law = ej.delays.uniform()
    key = jax.random.key(3)
    wide = np.asarray(law.sample(key, 0, 0, 5, 200_000, (4000,)))
    assert wide.min() >= 5 and wide.max() <= 200_000
    assert wide.max() > 65_541  # values beyond a 16-bit span are reached
    narrow = np.asarray(law.sample(key, 0, 0, jnp.int32(3), 65_538, (4000,)))
    assert narrow.min() >= 3 and narrow.max() <= 65_538 and narrow.max() > 60_000


def test_hashed_sixteen_bit_draws_are_uniform_keyed_and_uncorrelated():
    keys = jax.random.split(jax.random.key(7), 4)
    bits = np.asarray(jax.vmap(lambda k: ej.delays._bits16(k, (50_001,)))(keys))
    assert bits.shape == (4, 50_001) and bits.min() >= 0 and bits.max() < 1 << 16
    for part in (bits & 0xFF, bits >> 8):  # each byte uniform on 256 values
        counts = np.bincount(part.ravel(), minlength=256)
        expected = part.size / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2
    assert len({row.tobytes() for row in bits}) == 4  # every key its own stream
    for lag in (1, 25_001):  # neighbours and the two halves of one word
        x, y = bits[0, :-lag].astype(float), bits[0, lag:].astype(float)
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.03
