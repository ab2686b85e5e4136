"""1,024 simulated workers: each family's round runs, with every bound checked.

Tiny parameters (20), so the test is about the worker axis alone: sums over it
above the left fold, asynchronous SGD's ring of 1,024 iterates (max_delay 1,023),
message passing's `[P, P]` draws and arrival tables, with faults. The rounds/s
and peak memory of the MLP at this size are `benchmarks/scaling.py`'s.
"""

import jax
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

P, ROUNDS = 1024, 3

SCALE = {
    "sync_top_k_ef": lambda: ej.sync_sgd(0.01, P, compressor=ej.top_k(k=2), error_feedback=True),
    "async_inconsistent_top_k_ef": lambda: ej.async_sgd(
        1e-4, P, P - 1, reads="inconsistent", compressor=ej.top_k(k=2), error_feedback=True),
    "message_passing_faults": lambda: ej.message_passing_sgd(
        0.01, P, max_delay=2, crashes=3, crash_horizon=2, drop_prob=0.1),
}


@pytest.mark.parametrize("name", sorted(SCALE))
def test_a_thousand_and_twenty_four_workers(name):
    alg = SCALE[name]()
    params = h.params0()
    state, metrics = ej.run(alg, h.noisy_quadratic, alg.init(params, 0),
                            batch_fn=h.noise_batch_fn(params), rounds=ROUNDS, checks=True)
    assert int(state.shared.round) == ROUNDS
    b_hat = np.asarray(metrics["consistency/b_hat"])
    assert np.all(b_hat[1:] > 0) and np.all(np.isfinite(np.asarray(metrics["loss"])))
    if name == "message_passing_faults":
        assert np.asarray(metrics["faults/alive"]).tolist() == [P, P, P - 3]  # round 1
    assert jax.tree.leaves(state.workers)[0].shape[0] == P
