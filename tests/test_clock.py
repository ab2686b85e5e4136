"""The simulated clock: time semantics, emergent asynchrony, network formulas, bad inputs.

Schedules are computed on the host in float64 (`ej.clock`), so most properties
are checked on the schedules alone, without compiling a run; the runs here are
few, tiny and share nothing but their problem. The contract suite covers
clock-driven asynchronous SGD as one more registry entry (tests/test_contract.py),
including one device against meshes (tests/test_parallel.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import clock
from tests import helpers as h

PARAMS = {"w": jnp.zeros(3)}


def _times(alg):
    return ej.clock.times(alg, PARAMS)


# ------------------------------------------------- round semantics (schedules)


def test_sync_time_is_rounds_times_c_and_k_c_with_a_straggler():
    """In float64 on the host (the run reports these values rounded once to its
    metrics' dtype: test_equal_constant_speeds_give_async_sgd_with_fixed_delays)."""
    c, k, rounds = 0.1, 3.0, 1000
    equal = ej.clock.system(ej.clock.constant(c), rounds=rounds)
    straggler = ej.clock.system(ej.clock.constant(c), rounds=rounds, slowdown=[1, 1, k, 1])
    np.testing.assert_allclose(_times(ej.sync_sgd(0.1, 4, system=equal))["time/elapsed"],
                               c * np.arange(1, rounds + 1), rtol=1e-12)
    slow = _times(ej.sync_sgd(0.1, 4, system=straggler))
    np.testing.assert_allclose(slow["time/elapsed"][-1], rounds * k * c, rtol=1e-12)
    # The three fast workers wait (k - 1) c of every k c.
    np.testing.assert_allclose(slow["time/idle_fraction"][-1], 3 * (k - 1) / (4 * k), rtol=1e-12)


def test_exponential_stragglers_idle_one_minus_one_over_h8_and_elastic_idles_less():
    """Rate-1 exponential compute times, P = 8, no network. Sync: each round lasts the
    slowest of 8 (mean H_8) while a worker computes for 1 on average, so the idle share
    tends to 1 - 1/H_8. Over 4,000 rounds its standard error is about 0.003
    (1/H_8 times the relative error of the mean round, 1.24 / 2.72 / sqrt(4000));
    the tolerance is 0.012, four of them."""
    system = ej.clock.system(ej.clock.exponential(1.0), rounds=4000, seed=1)
    h8 = sum(1.0 / k for k in range(1, 9))
    idle = _times(ej.sync_sgd(0.1, 8, system=system))["time/idle_fraction"][-1]
    assert abs(idle - (1 - 1 / h8)) < 0.012, (idle, 1 - 1 / h8)
    # Elastic scheduling with tau = 0 is sync; each extra outstanding average idles less
    # (by about 0.1 per step here: far beyond the Monte-Carlo error).
    by_tau = [_times(ej.elastic_scheduling(0.1, 8, tau, system=system))["time/idle_fraction"][-1]
              for tau in (0, 1, 2, 4)]
    assert by_tau[0] == idle
    assert all(a - b > 0.05 for a, b in zip(by_tau[:-1], by_tau[1:], strict=True)), by_tau


def test_message_passing_delays_emerge_within_max_delay():
    system = ej.clock.system(ej.clock.lognormal(1.0, 1.0), rounds=300, seed=2,
                             network=ej.clock.network(0.05, 1e3, jitter=0.2))
    alg = ej.message_passing_sgd(0.1, 6, max_delay=3, system=system)
    timeline = alg.info.clock(PARAMS)
    delays = timeline.delays
    assert delays.shape == (300, 6, 6) and delays.min() == 0 and delays.max() == 3
    assert np.all(delays[:, np.arange(6), np.arange(6)] == 0)  # own messages at once
    # With max_delay = 0 it is lockstep: every message applied before the next round.
    assert ej.message_passing_sgd(0.1, 6, max_delay=0, system=system).info.clock(
        PARAMS).delays.max() == 0


# ---------------------------------------------------- asynchrony from speeds


def _writes(system, num_workers, writes, cap=None):
    return clock.simulate_writes(system, num_workers, writes=writes, push_bits=0, pull_bits=0,
                                 max_delay=cap)


def test_equal_constant_speeds_give_async_sgd_with_fixed_delays():
    """The pinned tie rules make every lag exactly `delays.fixed()` with max_delay = P - 1:
    lag i in the first round, P - 1 after. The runs agree bitwise in the Python loop,
    where both read each round's batch from the same sampler program (in chunks the
    fixed-delay run samples a chunk's batches first, the clock-driven one in its loop
    body, and XLA fuses the two differently)."""
    p = 4
    system = ej.clock.system(ej.clock.constant(1.0), rounds=8)
    w = _writes(system, p, 8 * p)
    lags = np.arange(w.writer.size) - w.read
    np.testing.assert_array_equal(lags, np.minimum(np.arange(8 * p), p - 1))
    np.testing.assert_array_equal(w.writer, np.tile(np.arange(p), 8))
    params = h.params0()
    batch_fn = h.noise_batch_fn(params)
    runs = []
    for alg in (ej.clock_async_sgd(0.05, p, system=system),
                ej.async_sgd(0.05, p, p - 1, delay="fixed")):
        runs.append(ej.run(alg, h.noisy_quadratic, alg.init(params, 0), batch_fn=batch_fn,
                           rounds=8, loop="python"))
    (clocked, mc), (fixed, mf) = runs
    for a, b in zip(jax.tree.leaves(ej.params(clocked)), jax.tree.leaves(ej.params(fixed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("consistency/b_hat", "consistency/bound", "delay/mean"):
        np.testing.assert_array_equal(mc[name], mf[name], err_msg=name)
    # The loss at the views: the same views, in programs fused differently.
    np.testing.assert_allclose(mc["loss"], mf["loss"], rtol=1e-6)
    np.testing.assert_array_equal(mc["updates"], p * np.arange(1, 9))
    # The metrics are the float64 schedule rounded once to float32.
    table = ej.clock.times(ej.clock_async_sgd(0.05, p, system=system), params)
    np.testing.assert_array_equal(mc["time/elapsed"], table["time/elapsed"].astype(np.float32))


def test_a_worker_k_times_faster_writes_k_times_as_often():
    system = ej.clock.system(ej.clock.constant(1.0), rounds=1, slowdown=[3.0, 1.0])
    w = _writes(system, 2, 4000)
    counts = np.bincount(w.writer, minlength=2)
    assert abs(counts[1] / counts[0] - 3.0) < 0.01, counts


def test_two_exponential_workers_write_and_lag_as_the_theory_says():
    """Rates a = 1, b = 3: worker 0 writes a share a / (a + b) of the updates, and the
    number of worker 1's writes during one of worker 0's gradients is geometric,
    P(n) = (a / (a + b)) (b / (a + b))^n with mean b / a (worker 1's: a / b).
    20,000 writes; tolerances of about four standard errors (mean lag of worker 0:
    sd 3.5 over 5,000 writes)."""
    a, b = 1.0, 3.0
    system = ej.clock.system(ej.clock.exponential(1.0), rounds=1, slowdown=[1 / a, 1 / b])
    w = _writes(system, 2, 20_000)
    lags = np.arange(w.writer.size) - w.read
    first, second = lags[w.writer == 0], lags[w.writer == 1]
    assert abs(first.size / lags.size - a / (a + b)) < 0.015
    assert abs(first.mean() - b / a) < 0.2 and abs(second.mean() - a / b) < 0.03
    for n in range(4):
        expected = a / (a + b) * (b / (a + b)) ** n
        assert abs(np.mean(first == n) - expected) < 0.025, (n, np.mean(first == n), expected)


def test_executor_steps_mask_idle_slots_and_do_not_change_the_trajectory():
    """Steps group distinct writers whose reads precede the step; one constant 5x
    straggler among 8 masks 1/8 of the slots on average, and any slot count executes
    the same writes (bitwise the same run with 8 slots or 1)."""
    system = ej.clock.system(ej.clock.constant(1.0), rounds=1, slowdown=[1] * 7 + [5])
    w = _writes(system, 8, 8001)
    timeline = clock.asynchronous(w, 8, 1000, 8)
    assert abs(np.mean(timeline.metrics["updates/masked_fraction"]) - 0.1) < 0.01
    bounds = clock.steps(w.writer, w.read, 8)
    for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True):
        assert len(set(w.writer[t0:t1])) == t1 - t0 and np.all(w.read[t0:t1] <= t0)


# --------------------------------------------------------------- the network


def test_network_time_is_the_pinned_formula_for_each_compressor():
    alpha, beta, p = 1e-3, 1e6, 4
    net = ej.clock.network(alpha, beta)
    system = ej.clock.system(ej.clock.constant(0.0), rounds=3, network=net)
    params = {"w": jnp.zeros(100)}
    d = 100
    compressors = {"none": None, "identity": ej.identity(), "top_k": ej.top_k(fraction=0.1),
                   "random_k": ej.random_k(k=10), "qsgd": ej.qsgd(4),
                   "scaled_sign": ej.scaled_sign()}
    for name, compressor in compressors.items():
        alg = ej.sync_sgd(0.1, p, compressor=compressor, system=system)
        bits = 32 * d if compressor is None else ej.compression_info(compressor, params).bits
        if name in ("none", "identity"):  # ring all-reduce of dense updates
            expected = 2 * (p - 1) * (alpha + bits / (p * beta))
        else:  # ring all-gather of sparse or quantised ones
            expected = (p - 1) * (alpha + bits / beta)
        np.testing.assert_allclose(ej.clock.times(alg, params)["comm/seconds"], expected,
                                   rtol=1e-12, err_msg=name)
    dense = 2 * (p - 1) * (alpha + 32 * d / (p * beta))
    for alg in (ej.local_sgd(0.1, p, 2, system=system),
                ej.elastic_scheduling(0.1, p, 1, system=system)):
        comm = ej.clock.times(alg, params)["comm/seconds"]
        expected = dense if alg.info.name == "elastic_scheduling" else [0, dense, 0]
        np.testing.assert_allclose(comm, expected, rtol=1e-12, err_msg=alg.info.name)
    bits = ej.compression_info(ej.top_k(fraction=0.1), params).bits
    mp = ej.message_passing_sgd(0.1, p, compressor=ej.top_k(fraction=0.1), system=system)
    # Each node's broadcast on its uplink, summed over the round's messages.
    np.testing.assert_allclose(ej.clock.times(mp, params)["comm/seconds"],
                               p * (alpha + (p - 1) * bits / beta), rtol=1e-12)
    asynchronous = ej.clock_async_sgd(0.1, p, system=system, compressor=ej.top_k(fraction=0.1))
    # Each write: a pull of the dense model and a push of the compressed update.
    per_write = (alpha + 32 * d / beta) + (alpha + bits / beta)
    times = ej.clock.times(asynchronous, params)
    np.testing.assert_allclose(times["comm/seconds"], per_write * np.diff(times["updates"],
                                                                          prepend=0),
                               rtol=1e-12)


def test_gossip_mixing_round_is_a_send_to_deg_neighbours_after_the_slowest_compute():
    """After `H` local steps of the slowest node (2 c each), a mixing round costs
    `alpha + deg b / beta`: `deg` the most neighbours a node sends to (the star's hub:
    P - 1), `b` the node's model or CHOCO's compressed difference (Top-1 of d = 3:
    32 + 2 bits)."""
    c, alpha, beta, p, period, rounds = 0.01, 1e-3, 1e5, 16, 2, 6
    system = ej.clock.system(ej.clock.constant(c), rounds=rounds, slowdown=[1] * (p - 1) + [2],
                             network=ej.clock.network(alpha, beta))
    r = np.arange(1, rounds + 1)
    for topology, deg in (("ring", 2), ("torus", 4), ("hypercube", 4), ("exponential", 4),
                          ("one_peer_exponential", 1), ("random_matching", 1), ("star", p - 1),
                          ("complete", p - 1)):
        for compressor, bits in ((None, 32 * 3), (ej.top_k(k=1), 32 + 2)):
            kw = {} if compressor is None else {"gossip_compressor": compressor, "gamma": 0.5}
            alg = ej.gossip_sgd(0.1, p, topology=topology, local_steps=period, system=system,
                                **kw)
            times = _times(alg)
            mix = alpha + deg * bits / beta
            np.testing.assert_allclose(times["comm/seconds"], np.where(r % period, 0, mix),
                                       rtol=1e-12, err_msg=topology)
            np.testing.assert_allclose(times["time/elapsed"], 2 * c * r + (r // period) * mix,
                                       rtol=1e-12, err_msg=topology)


def test_a_gossip_run_reports_the_clock_of_the_bits_it_sends(problem):
    """The run's `comm/seconds` is the formula at the `comm/bits` it reports (its P
    nodes' models, on the mixing rounds), and its `time/elapsed` the schedule's."""
    params, batch_fn = problem
    alpha, beta = 1e-3, 1e5
    system = ej.clock.system(ej.clock.exponential(0.01), rounds=4,
                             network=ej.clock.network(alpha, beta))
    alg = ej.gossip_sgd(0.05, 4, topology="ring", local_steps=2, system=system)
    _, m = ej.run(alg, h.noisy_quadratic, alg.init(params, 0), batch_fn=batch_fn, rounds=4)
    per_node = np.asarray(m["comm/bits"]) / 4
    np.testing.assert_array_equal(per_node, [0, 32 * 20, 0, 32 * 20])
    np.testing.assert_allclose(m["comm/seconds"], np.where(per_node, alpha, 0)
                               + 2 * per_node / beta, rtol=1e-6)
    np.testing.assert_allclose(m["time/elapsed"], ej.clock.times(alg, params)["time/elapsed"],
                               rtol=1e-6)


def test_top_1_percent_all_gather_beats_dense_all_reduce_until_p_136():
    """The digits CNN (d = 25,290) with Top-1%: each node moves (P - 1) b = 82,908 bits
    in the all-gather against 2 (P - 1) 32 d / P = 1,416,240 in the dense all-reduce at
    P = 8; the all-gather overtakes it only above P = 136."""
    d = 25_290
    params = {"w": jnp.zeros(d)}
    b = ej.compression_info(ej.top_k(fraction=0.01), params).bits
    moved = lambda pattern, p: ej.clock.seconds(pattern, ej.clock.network(0.0, 1.0), p - 1,  # noqa: E731
                                                b if pattern == "all_gather" else 32 * d)
    assert moved("all_gather", 8) == 82_908 and moved("all_reduce", 8) == 1_416_240
    assert moved("all_gather", 136) < moved("all_reduce", 136)
    assert moved("all_gather", 137) > moved("all_reduce", 137)


# ------------------------------------------------------------------ bounds


@pytest.fixture(scope="module")
def problem():
    params = h.params0()
    return params, h.noise_batch_fn(params)


def test_clock_async_with_drops_keeps_b_hat_within_its_bound_every_round(problem):
    """The cap policy (policy "none", with lags beyond P - 1: the contract suite's
    registry entry, tests/test_contract.py, with checks every round)."""
    params, batch_fn = problem
    system = ej.clock.system(ej.clock.exponential(1.0), rounds=16, slowdown=[1, 1, 1, 4],
                             network=ej.clock.network(0.01, 1e4, jitter=0.01))
    alg = ej.clock_async_sgd(0.05, 4, system=system, staleness_policy="drop", max_delay=4,
                             compressor=ej.top_k(fraction=0.3), error_feedback=True)
    _, m = ej.run(alg, h.noisy_quadratic, alg.init(params, 0), batch_fn=batch_fn, rounds=16,
                  checks=True)  # raises ej.checks.InvariantError where b_hat > bound
    assert np.all(m["consistency/b_hat"] <= m["consistency/bound"])
    assert m["updates/dropped"][-1] > 0 and m["delay/max"][-1] <= 4


def test_clock_async_with_momentum_bounds_by_the_chains_u(problem):
    """With `ej.sgd(momentum=0.9)` a worker's update reaches `eta M / (1 - mu)`: the
    constant gradients here make the distances exceed `L eta M` (the bound without
    momentum) by a factor of about 7, and the bound is `L U` with the chain's
    `U = M / (1 - mu)` (policy "none": `L` the largest lag so far)."""
    params, _ = problem
    system = ej.clock.system(ej.clock.constant(1.0), rounds=12, slowdown=[1, 1, 1, 3])
    alg = ej.clock_async_sgd(0.05, 4, system=system, rule=ej.chain(ej.sgd(momentum=0.9)))
    _, m = ej.run(alg, h.linear, alg.init(params, 0),
                  batch_fn=h.constant_batch_fn(params, 4), rounds=12, checks=True)
    b_hat, bound = np.asarray(m["consistency/b_hat"]), np.asarray(m["consistency/bound"])
    lag_m = np.asarray(m["delay/max"]) * np.asarray(m["grad_norm/max"])
    np.testing.assert_allclose(bound, lag_m / (1 - 0.9), rtol=1e-6)
    assert np.all(b_hat <= bound) and np.max(b_hat / lag_m) > 5


def test_message_passing_with_clock_delays_keeps_its_bound(problem):
    params, batch_fn = problem
    system = ej.clock.system(ej.clock.exponential(1.0), rounds=12, seed=3,
                             network=ej.clock.network(0.1, 1e4, jitter=0.3))
    alg = ej.message_passing_sgd(0.05, 4, max_delay=2, system=system,
                                 compressor=ej.top_k(fraction=0.3), error_feedback=True)
    _, m = ej.run(alg, h.noisy_quadratic, alg.init(params, 0), batch_fn=batch_fn, rounds=12,
                  checks=True)
    delays = alg.info.clock(params).delays
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(m["delay/mean"], delays[:, off].mean(axis=1), rtol=1e-6)
    assert delays.max() > 0


# -------------------------------------------------------------- bad inputs


def _system(**kw):
    return ej.clock.system(ej.clock.constant(1.0), rounds=4, **kw)


@pytest.mark.parametrize("make, message", [
    (lambda: ej.clock.constant(-1.0), "seconds: got -1.0; expected a finite number in [0.0"),
    (lambda: ej.clock.constant(float("nan")), "seconds: got nan; expected"),
    (lambda: ej.clock.exponential(0.0), "mean: got 0.0; expected a finite number in (0.0"),
    (lambda: ej.clock.network(bandwidth=0.0), "bandwidth: got 0.0; expected a number in (0, inf]"),
    (lambda: ej.clock.network(latency=-1e-3), "latency: got -0.001"),
    (lambda: ej.clock.trace(np.ones(5)), "seconds: got an array of shape (5,); expected a trace"),
    (lambda: ej.clock.trace([[0.1, -0.2]]), "seconds: got a trace with -0.2 at gradient 0, "
     "worker 1; expected finite seconds >= 0"),
    (lambda: ej.sync_sgd(0.1, 3, system=ej.clock.system(ej.clock.trace(np.ones((4, 2))),
                                                        rounds=4)),
     "seconds: got a trace of shape (4, 2); expected shape [gradients, 3]"),
    (lambda: ej.sync_sgd(0.1, 3, system=_system(slowdown=[1, 2])),
     "slowdown: got 2 factors; expected one per worker (3)"),
    (lambda: _system(slowdown=[1, 0]), "slowdown: got [1, 0]; expected None or one finite"),
    (lambda: ej.clock_async_sgd(0.1, 4, system=_system(), staleness_policy="drop",
                                max_delay=2),
     "max_delay: got 2; expected an integer >= num_workers - 1 = 3"),
    (lambda: ej.clock_async_sgd(0.1, 4, system=_system(), max_delay=5),
     "max_delay: got 5; expected None with staleness_policy='none'"),
    (lambda: ej.clock_async_sgd(0.1, 4, system=_system(), slots=5),
     "slots: got 5; expected at most num_workers = 4"),
    (lambda: ej.clock_async_sgd(0.1, 4, system=_system(), optimizer_placement="server"),
     "optimizer_placement: got 'server'; expected one of 'worker' (server placement is "
     "defined for sync_sgd only)"),
    (lambda: ej.message_passing_sgd(0.1, 4, system=_system(), drop_prob=0.1),
     "drop_prob: got 0.1; expected 0 with system="),
    (lambda: ej.sync_sgd(0.1, 1, system=ej.clock.replay([{}])), "system: got"),
    (lambda: ej.clock_async_sgd(0.1, 2, system=ej.clock.replay([{"writer": 0}])),
     "events: got events without the fields"),
    (lambda: ej.clock_async_sgd(0.1, 2, system=ej.clock.replay([
        {"writer": 0, "count": 0, "read": 0, "written": 2, "read_s": 0, "computed_s": 1,
         "written_s": 1}])), "events: got 1 recorded writes; expected versions written 1, 2"),
])
def test_bad_inputs_are_one_line_before_anything_compiles(make, message):
    with pytest.raises(ValueError) as excinfo:
        make()
    assert "\n" not in str(excinfo.value)
    assert str(excinfo.value).startswith(message), str(excinfo.value)


def test_a_trace_too_short_for_the_schedule_is_refused_at_init():
    alg = ej.sync_sgd(0.1, 2, system=ej.clock.system(ej.clock.trace(np.ones((3, 2))),
                                                     rounds=4))
    with pytest.raises(ValueError, match=r"^seconds: got a trace of 3 gradients per worker; "
                                         r"expected at least 4"):
        alg.init(PARAMS, 0)
    # Asynchronous workers run out of the trace at their own pace.
    alg = ej.clock_async_sgd(0.1, 2, system=ej.clock.system(ej.clock.trace(np.ones((3, 2))),
                                                            rounds=4))
    with pytest.raises(ValueError, match=r"^seconds: got a trace of 3 gradients per worker; "):
        alg.init(PARAMS, 0)


def test_stacked_batches_and_runs_past_the_schedule_are_refused():
    alg = ej.clock_async_sgd(0.1, 2, system=_system())
    state = alg.init(PARAMS, 0)
    loss = lambda p, b: jnp.sum(p["w"] * b)  # noqa: E731
    with pytest.raises(ValueError, match="^batches: got stacked batches; expected batch_fn="):
        ej.run(alg, loss, state, jnp.ones((2, 2, 3)))
    with pytest.raises(ValueError, match=r"^rounds: got 5 rounds from round 0; expected at "
                                         r"most 4: the schedule"):
        ej.run(alg, loss, state, batch_fn=lambda r, k: jnp.ones((2, 3)), rounds=5)
    assert math.isfinite(ej.clock.measure(loss, PARAMS, jnp.ones(3), repeats=2))
