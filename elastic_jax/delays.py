"""Delay laws: how stale a read is, or how late a message arrives.

A delay law draws each lag in `[min_lag, max_lag]` from a key (docs/theory.md
section 5): `fixed` (always `max_lag`, the worst case), `uniform`,
`geometric(p)` (`min_lag + min(G, max_lag - min_lag)`, `G` geometric on
`{0, 1, ...}` with success probability `p`), or a recorded `trace` of shape
`[rounds, P]` replayed exactly. The strings `"fixed"`, `"uniform"`,
`"geometric"` (with `p = 0.5`) and an integer array are shorthands.

Example:
  >>> law = ej.delays.geometric(0.3)
  >>> alg = ej.async_sgd(0.1, num_workers=4, max_delay=8, delay=law)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import validation


class DelayLaw(NamedTuple):
    """A law of lags.

    Attributes:
      name: `"fixed"`, `"uniform"`, `"geometric"` or `"trace"`.
      sample: `(key, round, worker, min_lag, max_lag, shape) -> int32[shape]`,
        each lag in `[min_lag, max_lag]`; `min_lag` may be traced, `max_lag` is
        a Python integer.
      lags: for a trace, the recorded `[rounds, P]` lags (NumPy), else None.
    """

    name: str
    sample: Callable[..., jax.Array]
    lags: np.ndarray | None = None

    @property
    def num_rounds(self) -> int | None:
        return None if self.lags is None else int(self.lags.shape[0])


def fixed() -> DelayLaw:
    """Every lag at its maximum: the worst case the bounds are tight for."""

    def sample(key, round_, worker, min_lag, max_lag, shape=()):
        del key, round_, worker, min_lag
        return jnp.full(shape, max_lag, jnp.int32)

    return DelayLaw("fixed", sample)


# Spans up to this many lags are drawn from 16 random bits (see `uniform`).
_BITS16_SPAN = 1 << 16


def _mix32(h):
    """A bijective avalanche mix of uint32 words (MurmurHash3's 32-bit finaliser)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits16(key, shape):
    """16 pseudo-random bits per element (as uint32), two from each 32-bit word.

    The words are a counter-based hash keyed by two threefry words of `key`:
    word `i` is `mix(mix(i * 0x9E3779B9 + s0) ^ s1)` with `mix` MurmurHash3's
    32-bit finaliser. Every key (worker, round, leaf) gets its own threefry
    words; within one draw the hash replaces threefry, which spends ~20 rounds
    of add-rotate-xor on every 64 bits (benchmarks/README.md compares them).
    """
    size = math.prod(shape)
    seed = jax.random.bits(key, (2,), jnp.uint32)
    count = jnp.arange((size + 1) // 2, dtype=jnp.uint32)
    words = _mix32(_mix32(count * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[:size]
    return halves.reshape(shape)


def uniform() -> DelayLaw:
    """Lags uniform on the integers of `[min_lag, max_lag]`.

    A lag is `min_lag + (b * n) >> 16` for 16 random bits `b` and `n = max_lag -
    min_lag + 1` values: each value has probability within `1 / 65536` of
    `1 / n` (a relative error below `n / 65536`, 1.4e-4 for `n = 9`), two
    lags from each 32-bit word of a keyed counter hash (`_bits16`). It is much
    cheaper than `jax.random.randint` on XLA:CPU, which matters for
    per-coordinate reads (`P x d` lags a round; benchmarks/README.md). Spans
    above 65,536 lags use `randint`.
    """

    def sample(key, round_, worker, min_lag, max_lag, shape=()):
        del round_, worker
        if max_lag + 1 > _BITS16_SPAN:
            return jax.random.randint(key, shape, min_lag, max_lag + 1, jnp.int32)
        span = (max_lag + 1 - jnp.asarray(min_lag, jnp.int32)).astype(jnp.uint32)
        bits = _bits16(key, shape)
        return (min_lag + ((bits * span) >> 16).astype(jnp.int32)).astype(jnp.int32)

    return DelayLaw("uniform", sample)


def geometric(p: float = 0.5) -> DelayLaw:
    """Lags `min_lag + min(G, max_lag - min_lag)`, `G ~ Geometric(p)` on `{0, 1, ...}`.

    Args:
      p: the success probability, in (0, 1]; the mean extra lag is `(1 - p) / p`
        before truncation.
    """
    validation.check_real("p", p, lo=0.0, hi=1.0, lo_open=True)

    def sample(key, round_, worker, min_lag, max_lag, shape=()):
        del round_, worker
        extra = jax.random.geometric(key, p, shape, jnp.int32) - 1
        return (min_lag + jnp.minimum(extra, max_lag - min_lag)).astype(jnp.int32)

    return DelayLaw("geometric", sample)


def trace(lags) -> DelayLaw:
    """A recorded schedule of lags, replayed exactly.

    Args:
      lags: an integer array `[rounds, P]`: `lags[r, p]` is the lag of worker
        `p`'s read in round `r`. The algorithm checks the shape and the range
        (`[p, max_delay]` for asynchronous SGD) when it is built. Consistent
        reads only.
    """
    arr = np.asarray(lags)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.shape[0] < 1:
        validation.fail(
            "delay", validation.Text(f"an array of shape {arr.shape} and dtype {arr.dtype}"),
            "an integer trace of shape [rounds >= 1, num_workers]",
        )
    table = jnp.asarray(arr, jnp.int32)

    def sample(key, round_, worker, min_lag, max_lag, shape=()):
        del key, min_lag, max_lag
        return jnp.broadcast_to(table[round_, worker], shape)

    return DelayLaw("trace", sample, arr)


_SHORTHANDS = {"fixed": fixed, "uniform": uniform, "geometric": geometric}


def resolve(delay) -> DelayLaw:
    """A `DelayLaw` from a law, a shorthand string, or an integer trace array."""
    if isinstance(delay, DelayLaw):
        return delay
    if isinstance(delay, str):
        if delay not in _SHORTHANDS:
            validation.fail("delay", delay, "one of 'fixed', 'uniform', 'geometric', "
                            "a DelayLaw or an integer trace [rounds, num_workers]")
        return _SHORTHANDS[delay]()
    if isinstance(delay, np.ndarray | jax.Array | list | tuple):
        return trace(delay)
    validation.fail("delay", delay, "one of 'fixed', 'uniform', 'geometric', "
                    "a DelayLaw or an integer trace [rounds, num_workers]")


def check_trace(law: DelayLaw, num_workers: int, max_delay: int, min_lags) -> None:
    """Checks a trace's shape `[rounds, P]` and that `min_lags[p] <= lag <= max_delay`."""
    if law.lags is None:
        return
    lags = law.lags
    if lags.shape[1] != num_workers:
        validation.fail("delay", validation.Text(f"a trace of shape {lags.shape}"),
                        f"shape [rounds, {num_workers}] (one column per worker)")
    lo = np.broadcast_to(np.asarray(min_lags), lags.shape)
    bad = np.argwhere((lags < lo) | (lags > max_delay))
    if bad.size:
        r, p = bad[0]
        where = f"a trace with lag {int(lags[r, p])} at round {r}, worker {p}"
        validation.fail(
            "delay", validation.Text(where),
            f"lags in [{int(lo[r, p])}, {max_delay}] (max_delay = {max_delay})",
        )
