"""Bad input: a ValueError naming the argument and its valid range, before compiling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

FACTORY_CASES = [
    (lambda: ej.sync_sgd(0.1, 0), r"num_workers: got 0; expected an integer in \[1, inf\]"),
    (lambda: ej.sync_sgd(0.1, 2.5), r"num_workers: got 2.5"),
    (lambda: ej.sync_sgd(-0.1, 2), r"learning_rate: got -0.1; expected a finite number in \[0.0"),
    (lambda: ej.sync_sgd(math.inf, 2), r"learning_rate: got inf"),
    (lambda: ej.sync_sgd(math.nan, 2), r"learning_rate: got nan"),
    (lambda: ej.sync_sgd(0.1, 2, error_feedback=1.5),
     r"error_feedback: got 1.5; expected a bool or a float beta in \[0, 1\]"),
    (lambda: ej.sync_sgd(0.1, 2, error_feedback=-0.1), r"error_feedback: got -0.1"),
    (lambda: ej.sync_sgd(0.1, 2, clip_norm=0.0), r"clip_norm: got 0.0; expected .*\(0.0, inf\]"),
    (lambda: ej.async_sgd(0.1, 4, 2),
     r"max_delay: got 2; expected an integer >= num_workers - 1 = 3"),
    (lambda: ej.async_sgd(0.1, 4, -1), r"max_delay: got -1"),
    (lambda: ej.async_sgd(0.1, 2, 3, delay="poisson"), r"delay: got 'poisson'; expected one of"),
    (lambda: ej.async_sgd(0.1, 2, 3, reads="stale"),
     r"reads: got 'stale'; expected one of 'consistent', 'inconsistent'"),
    (lambda: ej.async_sgd(0.1, 2, 3, compressor="top_k"), r"compressor: got 'top_k'"),
    (lambda: ej.sync_sgd(0.1, 2, compressor=ej.qsgd(4), error_feedback=True),
     r"compressor: .*not contractive.*"),
    (lambda: ej.async_sgd(0.1, 2, 3, compressor=ej.random_k(k=2, scaled=True),
                          error_feedback=0.5), r"scaled=False"),
    (lambda: ej.async_sgd(0.1, 2, 3, compressor=ej.error_feedback(ej.top_k(k=2))),
     r"compressor: got a compressor already wrapped by ej.error_feedback; expected a bare"),
    (lambda: ej.top_k(fraction=0.0), r"fraction: got 0.0; expected"),
    (lambda: ej.top_k(fraction=1.5), r"fraction: got 1.5; expected"),
    (lambda: ej.top_k(k=0), r"k: got 0"),
]


@pytest.mark.parametrize("make,message", FACTORY_CASES)
def test_factories_refuse_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_k_larger_than_d_is_refused_at_init():
    alg = ej.async_sgd(0.1, 2, 3, compressor=ej.top_k(k=21))
    with pytest.raises(ValueError, match=r"k: got 21; expected .*20"):
        alg.init(h.params0(), jax.random.key(0))
    alg = ej.sync_sgd(0.1, 2, compressor=ej.random_k(k=100), error_feedback=True)
    with pytest.raises(ValueError, match=r"k: got 100"):
        alg.init(h.params0(), jax.random.key(0))


def test_traced_hyperparameters_pass_validation():
    def build(lr, beta):
        alg = ej.async_sgd(lr, 2, 3, compressor=ej.top_k(k=2), error_feedback=beta)
        return ej.params(alg.init(h.params0(), 0))["a"].sum() * lr * beta

    value = jax.jit(build)(0.1, 0.5)
    assert np.isfinite(value)


def test_numpy_scalars_are_accepted():
    alg = ej.async_sgd(np.float32(0.1), np.int64(2), np.int32(3), error_feedback=np.float64(1.0))
    assert alg.num_workers == 2


MESSAGE_PASSING_CASES = [
    (lambda: ej.message_passing_sgd(0.1, 4, drop_prob=1.0),
     r"drop_prob: got 1.0; expected a finite number in \[0.0, 1.0\)"),
    (lambda: ej.message_passing_sgd(0.1, 4, drop_prob=-0.1), r"drop_prob: got -0.1"),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=4, crash_horizon=10),
     r"crashes: got 4; expected an integer in \[0, 3\]"),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=2),
     r"crash_horizon: got None; expected an integer >= 2 when crashes is a count"),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=2, crash_horizon=1),
     r"crash_horizon: got 1; expected an integer in \[2, inf\]"),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=[(4, 1)]), r"workers in \[0, 3\]"),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=[(1, -1)]), r"crash rounds in \[0, "),
    (lambda: ej.message_passing_sgd(0.1, 4, crashes=[(1, 2), (1, 3)]), r"worker 1 repeats"),
    (lambda: ej.message_passing_sgd(0.1, 2, crashes=[(0, 2), (1, 3)]),
     r"at most num_workers - 1 = 1 crashes"),
    (lambda: ej.message_passing_sgd(0.1, 4, max_delay=-1), r"max_delay: got -1"),
    (lambda: ej.message_passing_sgd(0.1, 4, retransmit=1), r"retransmit: got 1; expected a bool"),
    (lambda: ej.local_sgd(0.1, 4, 0), r"period: got 0; expected an integer in \[1, inf\]"),
    (lambda: ej.elastic_scheduling(0.1, 4, -1),
     r"max_outstanding: got -1; expected an integer in \[0, inf\]"),
    (lambda: ej.elastic_scheduling(0.1, 4, 2, mode="mean"), r"mode: got 'mean'"),
]


@pytest.mark.parametrize("make,message", MESSAGE_PASSING_CASES)
def test_message_passing_factories_refuse_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----------------------------------------------- drivers: batches, states, chains

_P4 = ej.sync_sgd(0.1, 4)
_STATE = _P4.init(h.params0(), 0)


def _batches(*leading):
    return jax.tree.map(lambda x: jnp.zeros(leading + x.shape), h.params0())


DRIVER_CASES = [
    # Batches without the worker axis, or with another P.
    (lambda: ej.run(_P4, h.noisy_quadratic, _STATE, _batches(3)),
     r"^batches: got leading sizes .*; expected \[R, P=4, \.\.\.\] on every leaf$"),
    (lambda: ej.run(_P4, h.noisy_quadratic, _STATE, _batches(3, 2)),
     r"^batches: got leading sizes \(3, 2\); expected \[R, P=4, \.\.\.\] on every leaf$"),
    (lambda: ej.make_step(_P4, h.noisy_quadratic)(_STATE, _batches(2)),
     r"^batch: got leading sizes \(2,\); expected \[P=4, \.\.\.\] on every leaf$"),
    (lambda: ej.run(_P4, h.noisy_quadratic, _STATE, batch_fn=lambda r, k: _batches(3),
                    rounds=2),
     r"^batch_fn: got leading sizes \(3,\); expected \[P=4, \.\.\.\] on every leaf$"),
    # A state another algorithm made.
    (lambda: ej.run(_P4, h.noisy_quadratic, ej.async_sgd(0.1, 4, 3).init(h.params0(), 0),
                    _batches(2, 4)),
     r"^state: got a state of async_sgd; expected one made by this algorithm's init"),
    (lambda: ej.make_step(_P4, h.noisy_quadratic)(
        ej.sync_sgd(0.1, 4, error_feedback=True).init(h.params0(), 0), _batches(4)),
     r"^state: got a state of another sync_sgd configuration; expected one made by"),
    # Chains.
    (lambda: ej.sync_sgd(0.1, 2, rule=ej.chain(ej.top_k(k=1))),
     r"^rule: got .*; expected exactly one base optimizer link"),
    (lambda: ej.sync_sgd(0.1, 2, rule=ej.chain(ej.sgd()), clip_norm=1.0),
     r"^clip_norm: got 1.0; expected the default with rule="),
    (lambda: ej.local_sgd(0.1, 2, 2, rule=ej.chain(ej.sgd(), ej.top_k(k=1))),
     r"^rule: got .*; expected an uncompressed chain"),
    (lambda: ej.chain(ej.sgd(), ej.top_k(k=1), ej.error_feedback(ej.top_k(k=1))),
     r"^rule: got .*; expected at most one link that compresses"),
]


@pytest.mark.parametrize("call,message", DRIVER_CASES)
def test_drivers_and_chains_refuse_bad_input_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
