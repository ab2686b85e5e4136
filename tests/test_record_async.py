"""A real asynchronous run on this machine, recorded, and replayed by the clock exactly.

Four worker threads with injected delays (worker p sleeps 2 (1 + p) ms after each
gradient) write 32 updates to one shared model; the record is replayed through
`ej.clock_async_sgd(system=ej.clock.replay(events))`. The end-to-end program
(`python -m experiments.record_async`, with its simulation and plot) is the same
code; its smoke run is in the README's commands.
"""

from __future__ import annotations

import numpy as np

from experiments import record_async


def test_a_recorded_real_run_replays_to_its_final_parameters():
    s = record_async.setup("mlp", workers=4, batch_size=8, seed=0)
    events, real = record_async.record(s, workers=4, updates=32, delay_ms=2.0,
                                       learning_rate=0.05)
    assert [e["written"] for e in events] == list(range(1, 33))
    lags = np.array([e["written"] - 1 - e["read"] for e in events])
    assert lags.max() > 1, lags  # real staleness, beyond one write
    # checks=True: b_hat <= bound in every step, or ej.checks.InvariantError.
    alg, state, metrics = record_async.replay(s, events, workers=4, learning_rate=0.05)
    assert metrics["updates"][-1] == 32
    differences = record_async.relative_differences(alg.actual(state), real)
    assert max(differences) <= record_async.TOLERANCE, differences
    # The tolerance tells interleavings apart: the same writes, each reading the newest
    # model (no staleness), end far from the real run.
    fresh = [dict(e, read=e["written"] - 1) for e in events]
    alg, state, _ = record_async.replay(s, fresh, workers=4, learning_rate=0.05)
    far = record_async.relative_differences(alg.actual(state), real)
    assert max(far) > 100 * record_async.TOLERANCE, far
