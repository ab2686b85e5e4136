"""Argument validation with one message form: `<argument>: got <value>; expected <range>`.

Only concrete Python or NumPy values are checked; JAX tracers pass through, so
factories can be built inside a differentiated function (DESIGN.md).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value) -> bool:
    """True for values only known at run time (tracers)."""
    return isinstance(value, jax.core.Tracer)


def concrete_number(value):
    """The value as a Python number when concrete and scalar, else None."""
    if is_traced(value) or callable(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Number):
        return value
    if isinstance(value, np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return None


class Text(str):
    """A description of a value, shown without quotes in error messages."""

    def __repr__(self) -> str:
        return str(self)


def fail(name: str, value, expected: str):
    """Raises `ValueError("<name>: got <value>; expected <expected>")`."""
    raise ValueError(f"{name}: got {value!r}; expected {expected}")


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """Checks that `value` is an integer in `[lo, hi]` and returns it."""
    lo_s = "-inf" if lo is None else str(lo)
    hi_s = "inf" if hi is None else str(hi)
    expected = f"an integer in [{lo_s}, {hi_s}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, expected)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(name, value, expected)
    return int(value)


def check_real(
    name: str,
    value,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
):
    """Checks a real number in a range when concrete (finite); tracers pass through."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    expected = (
        f"a finite number in {left}{'-inf' if lo is None else lo}, "
        f"{'inf' if hi is None else hi}{right}"
    )
    if is_traced(value):
        return value
    number = concrete_number(value)
    if number is None or isinstance(number, bool) or not isinstance(number, numbers.Real):
        fail(name, value, expected)
    if not math.isfinite(number):
        fail(name, value, expected)
    if lo is not None and (number < lo or (lo_open and number == lo)):
        fail(name, value, expected)
    if hi is not None and (number > hi or (hi_open and number == hi)):
        fail(name, value, expected)
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def as_schedule(learning_rate) -> Callable[[jax.Array], jax.Array]:
    """A learning rate (float, array or tracer) or an optax schedule, as a schedule.

    Negative or non-finite concrete rates are refused; a schedule is a callable
    of the round number and is not inspected.
    """
    if callable(learning_rate):
        return learning_rate
    check_real("learning_rate", learning_rate, lo=0.0)
    if not is_traced(learning_rate) and np.ndim(learning_rate) != 0:
        fail("learning_rate", learning_rate, "a scalar or an optax schedule")

    def constant(count):
        del count
        return jnp.asarray(learning_rate)

    return constant


def check_clip_norm(clip_norm):
    if clip_norm is not None:
        check_real("clip_norm", clip_norm, lo=0.0, lo_open=True)
    return clip_norm


def check_beta(error_feedback):
    """`error_feedback` as a damping `beta` in [0, 1], or None (no error feedback)."""
    if error_feedback is None or error_feedback is False:
        return None
    if error_feedback is True:
        return 1.0
    if is_traced(error_feedback):
        return error_feedback
    number = concrete_number(error_feedback)
    if number is None or not 0.0 <= number <= 1.0 or not math.isfinite(number):
        fail("error_feedback", error_feedback, "a bool or a float beta in [0, 1]")
    return error_feedback
