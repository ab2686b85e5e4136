"""Gradient compressors: optax transformations on one worker's pytree.

A compressor `C` maps an update `a` (a whole pytree of float arrays) to what a
worker sends. docs/theory.md section 6 fixes what each one keeps and its constants:

    contraction:  ||a - C(a)||^2 <= (1 - delta) ||a||^2       (deterministic or in expectation)
    unbiased:     E C(a) = a,  E||C(a) - a||^2 <= omega ||a||^2

Each factory returns a `Compressor`: an `optax.GradientTransformationExtraArgs`
that also carries a `CompressorSpec` (`.spec`) with the pure, stateless map
`compress(tree, key)` the algorithms call with their own derived keys, and the
shape-only `validate` and `info`. Standalone, a stochastic compressor keeps a
typed PRNG key in its state and splits it on every call that gets no `key=`.

Example:
  >>> tx = optax.chain(optax.sgd(0.1), top_k(fraction=0.01))
  >>> compression_info(top_k(k=2), {"w": jnp.zeros(5)}).delta
  0.4

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh, "Elastic
  Consistency: A General Consistency Model for Distributed Stochastic Gradient
  Descent", arXiv:2001.05918 (2020).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from elastic_jax import validation

BITS_PER_VALUE = 32  # every transmitted value is a float32
_SCOPES = ("global", "per_leaf")


class CompressionInfo(NamedTuple):
    """Facts about a compressor on a given params pytree (docs/theory.md section 6).

    Attributes:
      delta: contraction constant, `||a - C(a)||^2 <= (1 - delta) ||a||^2`; None
        for unbiased compressors that are not contractions.
      omega: variance blow-up of an unbiased compressor,
        `E||C(a) - a||^2 <= omega ||a||^2` (0 for identity); None if biased.
      contractive: `"deterministic"`, `"expectation"` or `"no"`.
      bits: bits one worker sends per round for this pytree (32 bits per value).
      d: number of entries the compressor sees in total.
      k: total number of selected entries (summed over leaves for
        `scope="per_leaf"`); None where not applicable.
    """

    delta: float | None
    omega: float | None
    contractive: str
    bits: int
    d: int
    k: int | None


class CompressorSpec(NamedTuple):
    """The static description and the pure map of a compressor.

    Attributes:
      name: `"identity"`, `"top_k"`, `"random_k"`, `"qsgd"`, `"scaled_sign"`
        (or `"error_feedback"` for the wrapper of `elastic_jax.error_feedback`).
      stochastic: whether `compress` needs a key.
      contractive: `"deterministic"`, `"expectation"` or `"no"`.
      compress: `(tree, key | None) -> tree`; pure, stateless, jittable; same
        structure, shapes and dtypes out.
      validate: `(params) -> None`; raises `ValueError` when the compressor does
        not fit `params` (e.g. `k > d`); reads shapes only, compiles nothing.
      info: `(params) -> CompressionInfo`; reads shapes only.
    """

    name: str
    stochastic: bool
    contractive: str
    compress: Callable[[Any, jax.Array | None], Any]
    validate: Callable[[Any], None]
    info: Callable[[Any], CompressionInfo]


class CompressorState(NamedTuple):
    """State of a stochastic compressor used standalone."""

    key: jax.Array  # typed PRNG key, shape []; split on every call without `key=`


class Compressor(optax.GradientTransformationExtraArgs):
    """An optax `(init, update)` pair that also carries `.spec` (a `CompressorSpec`).

    `update(updates, state, params=None, *, key=None, **extra_args)` returns the
    compressed updates and the new state. Its `repr` names the factory call,
    e.g. `top_k(k=10, scope='global')`.
    """

    def __new__(cls, init, update, spec: CompressorSpec, description: str | None = None):
        self = super().__new__(cls, init, update)
        self.spec = spec
        self.description = description if description is not None else f"{spec.name}()"
        return self

    def __getnewargs__(self):
        return (self.init, self.update, self.spec, self.description)

    def __repr__(self) -> str:
        return self.description


def _sizes(tree) -> list[int]:
    """Entry counts of the leaves, from shapes only."""
    return [math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)]


def _ceil_log2(n: int) -> int:
    """Exact `ceil(log2 n)` for an integer `n >= 1`."""
    return (int(n) - 1).bit_length()


def _check_positive_int(name: str, value):
    """An integer >= 1 when concrete; tracers pass through."""
    if validation.is_traced(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        validation.fail(name, value, "an integer >= 1")
    return int(value)


def _check_k_fraction(k, fraction):
    if (k is None) == (fraction is None):
        validation.fail("k", k, f"exactly one of k and fraction (got fraction={fraction!r})")
    if fraction is not None:
        validation.check_real("fraction", fraction, lo=0.0, hi=1.0, lo_open=True)
    return (None if k is None else _check_positive_int("k", k)), fraction


def _resolve_k(k, fraction, d: int):
    """`k`, or `max(1, floor(fraction * d))` (docs/theory.md section 6)."""
    return k if k is not None else max(1, math.floor(fraction * d))


def _check_k_fits(k, d: int, where: str = ""):
    if not validation.is_traced(k) and not 1 <= k <= d:
        validation.fail("k", k, f"1 <= k <= d = {d}{where}")


def _describe(name: str, **kwargs) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in kwargs.items() if value is not None)
    return f"{name}({args})"


def _as_key(key) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key or a raw `uint32[2]` key."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, jax.Array | np.ndarray) and np.shape(key) == (2,):
        return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return jax.random.key(key)


def _check_key(key):
    if isinstance(key, bool) or not (isinstance(key, numbers.Integral | jax.Array | np.ndarray)):
        validation.fail("key", key, "an int seed or a jax.random key")
    return key


def _compute_dtype(leaves):
    """The common dtype for norms over mixed-precision leaves (at least float32)."""
    return jnp.result_type(*(jnp.promote_types(leaf.dtype, jnp.float32) for leaf in leaves))


def _flat_abs(leaves) -> jax.Array:
    """|a| over the leaves concatenated in `jax.tree.leaves` order (exact upcast)."""
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.abs(leaf).astype(dtype).ravel() for leaf in leaves])


def _mask_of(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the `k` largest scores; ties to the lowest index (`lax.top_k`)."""
    _, idx = lax.top_k(scores, k)
    return jnp.zeros(scores.shape, bool).at[idx].set(True)


def _keep(leaves, treedef, flat_mask: jax.Array, scale=None):
    """`where(mask, a, 0)` leaf by leaf, so that `a - C(a)` only zeroes entries."""
    out, offset = [], 0
    for leaf in leaves:
        mask = flat_mask[offset : offset + leaf.size].reshape(leaf.shape)
        out.append(jnp.where(mask, leaf if scale is None else leaf * scale, 0))
        offset += leaf.size
    return treedef.unflatten(out)


def _flatten(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return [jnp.asarray(leaf) for leaf in leaves], treedef


def _make(spec: CompressorSpec, description: str, seed=None) -> Compressor:
    """Wraps a spec as an optax transformation (a key in state iff stochastic)."""

    def init_fn(params):
        del params
        return CompressorState(key=_as_key(seed)) if spec.stochastic else optax.EmptyState()

    def update_fn(updates, state, params=None, *, key=None, **extra_args):
        del params, extra_args
        if spec.stochastic and key is None:
            new_key, key = jax.random.split(state.key)
            state = CompressorState(key=new_key)
        return spec.compress(updates, key), state

    return Compressor(init_fn, update_fn, spec, description)


def identity() -> Compressor:
    """The identity `C(a) = a`: `delta = 1`, `omega = 0`, `32 d` bits.

    Returns:
      A deterministic `Compressor` with an empty state.
    """

    def compress(tree, key):
        del key
        return tree

    def info(params):
        d = sum(_sizes(params))
        return CompressionInfo(1.0, 0.0, "deterministic", BITS_PER_VALUE * d, d, None)

    spec = CompressorSpec("identity", False, "deterministic", compress, lambda p: None, info)
    return _make(spec, "identity()")


def top_k(k: int | None = None, *, fraction: float | None = None, scope: str = "global"):
    """Top-k: keeps the `k` entries of largest magnitude, zeroes the rest.

    `C(a)_j = a_j` for the `k` largest `|a_j|` (ties to the lowest flattened index,
    leaves concatenated in `jax.tree.leaves` order), else 0. Exactly `k` entries
    are selected; a selected zero stays zero, so `a - C(a)` only zeroes entries.
    Deterministic contraction: the `d - k` dropped entries are the smallest, so
    their mean square is at most the overall one, `||a - C(a)||^2 <= (1 - k/d)||a||^2`,
    i.e. `delta = k/d`. Sends `k (32 + ceil(log2 d))` bits (value and index).

    Args:
      k: entries to keep (per leaf for `scope="per_leaf"`); exclusive with `fraction`.
      fraction: keep `k = max(1, floor(fraction * d))`, `d` the entries seen.
      scope: `"global"` (one selection over the whole pytree) or `"per_leaf"`
        (one per leaf; `delta = min_l k_l/d_l`; empty leaves pass through).

    Returns:
      A deterministic `Compressor` with an empty state.

    Example:
      >>> top_k(k=1).spec.compress({"a": jnp.array([1.0, -3.0]), "b": jnp.array([2.0])}, None)
      {'a': Array([ 0., -3.], dtype=float32), 'b': Array([0.], dtype=float32)}
    """
    k, fraction = _check_k_fraction(k, fraction)
    validation.check_choice("scope", scope, _SCOPES)
    per_leaf = scope == "per_leaf"

    def leaf_ks(params) -> list[tuple[int, int]]:
        """(k_l, d_l) per non-empty selection unit."""
        sizes = _sizes(params)
        if per_leaf:
            return [(_resolve_k(k, fraction, d), d) for d in sizes if d > 0]
        d = sum(sizes)
        return [(_resolve_k(k, fraction, d), d)]

    def validate(params):
        sizes = _sizes(params)
        if not per_leaf:
            _check_k_fits(_resolve_k(k, fraction, sum(sizes)), sum(sizes))
        for i, d in enumerate(sizes if per_leaf else []):
            if d > 0:
                _check_k_fits(_resolve_k(k, fraction, d), d, f" (leaf {i}, scope='per_leaf')")

    def info(params):
        units = leaf_ks(params)
        d = sum(_sizes(params))
        bits = sum(kl * (BITS_PER_VALUE + _ceil_log2(dl)) for kl, dl in units)
        delta = min((kl / dl for kl, dl in units), default=1.0)
        return CompressionInfo(delta, None, "deterministic", bits, d, sum(kl for kl, _ in units))

    def compress(tree, key):
        del key
        leaves, treedef = _flatten(tree)
        if per_leaf:
            out = []
            for leaf in leaves:
                if leaf.size == 0:
                    out.append(leaf)
                    continue
                kl = _resolve_k(k, fraction, leaf.size)
                _check_k_fits(kl, leaf.size, " (scope='per_leaf')")
                mask = _mask_of(jnp.abs(leaf).ravel(), kl).reshape(leaf.shape)
                out.append(jnp.where(mask, leaf, 0))
            return treedef.unflatten(out)
        d = sum(leaf.size for leaf in leaves)
        kg = _resolve_k(k, fraction, d)
        _check_k_fits(kg, d)
        return _keep(leaves, treedef, _mask_of(_flat_abs(leaves), kg))

    spec = CompressorSpec("top_k", False, "deterministic", compress, validate, info)
    return _make(spec, _describe("top_k", k=k, fraction=fraction, scope=scope))


def random_k(k: int | None = None, *, fraction: float | None = None, scaled: bool = False, key=0):
    """Random-k: keeps `k` uniformly random distinct entries of the whole pytree.

    Unscaled, `C(a) = a * m` with `m` the selection mask: each entry is kept with
    probability `k/d`, so `E||a - C(a)||^2 = (1 - k/d)||a||^2`, a contraction in
    expectation only (`delta = k/d`). Scaled, `C(a) = (d/k) a * m` is unbiased with
    `E||C(a) - a||^2 = (d/k - 1)||a||^2` (`omega = d/k - 1`) and is not a
    contraction. The index set comes from a shared key, so only the `k` values
    travel: `32 k` bits.

    Args:
      k: entries to keep; exclusive with `fraction`.
      fraction: keep `k = max(1, floor(fraction * d))`.
      scaled: rescale kept entries by `d/k` (unbiased) or not (contractive).
      key: seed (int) or jax key of the standalone state; algorithms pass `key=`.

    Returns:
      A stochastic `Compressor` whose state holds a typed PRNG key.
    """
    k, fraction = _check_k_fraction(k, fraction)
    if not isinstance(scaled, bool):
        validation.fail("scaled", scaled, "True or False")
    _check_key(key)

    def validate(params):
        d = sum(_sizes(params))
        _check_k_fits(_resolve_k(k, fraction, d), d)

    def info(params):
        d = sum(_sizes(params))
        kk = _resolve_k(k, fraction, d)
        if scaled:
            return CompressionInfo(None, d / kk - 1, "no", BITS_PER_VALUE * kk, d, kk)
        return CompressionInfo(kk / d, None, "expectation", BITS_PER_VALUE * kk, d, kk)

    def compress(tree, key):
        leaves, treedef = _flatten(tree)
        d = sum(leaf.size for leaf in leaves)
        kk = _resolve_k(k, fraction, d)
        _check_k_fits(kk, d)
        # k distinct indices, uniform: the k largest of d i.i.d. random words.
        mask = _mask_of(jax.random.bits(key, (d,), jnp.uint32), kk)
        return _keep(leaves, treedef, mask, d / kk if scaled else None)

    contractive = "no" if scaled else "expectation"
    spec = CompressorSpec("random_k", True, contractive, compress, validate, info)
    desc = _describe("random_k", k=k, fraction=fraction, scaled=scaled)
    return _make(spec, desc, key)


def qsgd(levels: int, *, key=0) -> Compressor:
    """QSGD with `s = levels` levels, over the global norm of the pytree.

    `C(g)_j = ||g|| sign(g_j) xi_j / s` with `xi_j = l + Bernoulli(r - l)`,
    `r = s |g_j| / ||g||`, `l = floor(r)`: stochastic rounding of `r` to an
    integer, so `E xi_j = r` and `E C(g) = g`. Entry `j` has variance
    `(||g||/s)^2 f (1 - f) <= (||g||/s)^2 min(1/4, r_j)`, `f = r_j - l`; summing with
    `sum_j r_j = s ||g||_1 / ||g|| <= s sqrt(d)` gives
    `E||C(g) - g||^2 <= min(d/s^2, sqrt(d)/s) ||g||^2`: `omega = min(d/s^2, sqrt(d)/s)`
    (Alistarh et al., "QSGD", 2017). Not a contraction. Sends
    `32 + d (1 + ceil(log2(s + 1)))` bits (norm, then sign and level per entry).
    A zero pytree maps to zeros.

    Args:
      levels: number of quantisation levels `s >= 1`.
      key: seed (int) or jax key of the standalone state; algorithms pass `key=`.

    Returns:
      A stochastic `Compressor` whose state holds a typed PRNG key.
    """
    levels = _check_positive_int("levels", levels)
    _check_key(key)

    def info(params):
        d = sum(_sizes(params))
        omega = min(d / levels**2, math.sqrt(d) / levels)
        bits = BITS_PER_VALUE + d * (1 + int(levels).bit_length())  # = ceil(log2(s + 1))
        return CompressionInfo(None, omega, "no", bits, d, None)

    def compress(tree, key):
        leaves, treedef = _flatten(tree)
        if not leaves:
            return tree
        dtype = _compute_dtype(leaves)
        # Scaled by the largest magnitude first, so that the norm neither overflows
        # (entries near 1e19 and above in float32) nor underflows (all below ~1e-23):
        # `||g|| = scale ||g / scale||` and `1 <= ||g / scale|| <= sqrt(d)`.
        scale = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(leaf.astype(dtype)),
                                                        initial=0.0) for leaf in leaves])
        safe_scale = jnp.where(scale > 0, scale, 1)
        scaled = [leaf.astype(dtype) / safe_scale for leaf in leaves]
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in scaled))
        safe_norm = jnp.where(norm > 0, norm, 1)
        out = []
        for leaf, x, leaf_key in zip(leaves, scaled, jax.random.split(key, len(leaves)),
                                     strict=True):
            r = jnp.clip(levels * jnp.abs(x) / safe_norm, 0, levels)
            low = jnp.floor(r)
            xi = low + (jax.random.uniform(leaf_key, x.shape, dtype) < r - low)
            out.append((jnp.sign(x) * xi * (norm / levels) * safe_scale).astype(leaf.dtype))
        return treedef.unflatten(out)

    spec = CompressorSpec("qsgd", True, "no", compress, lambda p: None, info)
    return _make(spec, _describe("qsgd", levels=levels), key)


def scaled_sign() -> Compressor:
    """Scaled sign: `C(g) = (||g||_1 / d) s(g)`, global over the pytree.

    `s(g)_j` is `+1` for `g_j >= 0` and `-1` otherwise (a zero entry is sent as
    `+1`: one sign bit per entry cannot encode three values). Since
    `sum_j g_j s(g)_j = ||g||_1`, `||g - C(g)||^2 = ||g||^2 - ||g||_1^2/d`: a
    deterministic contraction with `delta = ||g||_1^2 / (d ||g||^2)`, which
    depends on `g`; `info` reports its worst case `1/d` (`||g||_1 >= ||g||`).
    Sends `32 + d` bits (the scale, then one sign bit per entry).

    Returns:
      A deterministic `Compressor` with an empty state.
    """

    def info(params):
        d = sum(_sizes(params))
        return CompressionInfo(
            1.0 / d if d else 1.0, None, "deterministic", BITS_PER_VALUE + d, d, None
        )

    def compress(tree, key):
        del key
        leaves, treedef = _flatten(tree)
        d = sum(leaf.size for leaf in leaves)
        if d == 0:
            return tree
        dtype = _compute_dtype(leaves)
        scale = sum(jnp.sum(jnp.abs(leaf.astype(dtype))) for leaf in leaves) / d
        # A zero entry is sent as +1 (one sign bit cannot encode three values).
        return treedef.unflatten(
            [(scale * jnp.where(leaf >= 0, 1, -1).astype(dtype)).astype(leaf.dtype)
             for leaf in leaves])

    spec = CompressorSpec("scaled_sign", False, "deterministic", compress, lambda p: None, info)
    return _make(spec, "scaled_sign()")


_SUGGESTIONS = {
    "random_k": "use random_k(..., scaled=False) or top_k",
    "qsgd": "use top_k, random_k(..., scaled=False) or scaled_sign",
}


def check_contractive(compressor):
    """Refuses anything but a bare contractive compressor (`ValueError` naming `compressor`)."""
    if not isinstance(compressor, Compressor):
        validation.fail("compressor", compressor, "a compressor such as top_k(k=10)")
    if compressor.spec.name == "error_feedback":
        raise ValueError(
            f"compressor: got {compressor!r}; expected a bare compressor: "
            "error feedback is already applied"
        )
    if compressor.spec.contractive == "no":
        suggestion = _SUGGESTIONS.get(compressor.spec.name, "use top_k or scaled_sign")
        raise ValueError(
            f"compressor: got {compressor!r}, which is not contractive; error feedback "
            f"needs a contractive compressor: {suggestion}"
        )



def compression_info(compressor: Compressor, params) -> CompressionInfo:
    """The constants of `compressor` on `params` (docs/theory.md section 6).

    Checks that the compressor fits `params` first (`ValueError` otherwise).
    For an `error_feedback`-wrapped compressor, returns the inner one's info.
    Reads shapes only; compiles nothing.
    """
    if not isinstance(compressor, Compressor):
        validation.fail("compressor", compressor, "an elastic_jax Compressor, e.g. top_k(k=10)")
    while compressor.spec.name == "error_feedback":
        compressor = compressor.inner
    compressor.spec.validate(params)
    return compressor.spec.info(params)
