"""DiLoCo (`ej.diloco`): its reductions to local and synchronous SGD, streaming, bounds.

The contract suite runs its registry entry (tests/test_contract.py); these tests
pin what is particular to it: outer SGD of rate 1 is local SGD, and with one
inner step synchronous SGD, to the rounding of the outer step; the outer step
against a reference written from the update rule (float64); streaming's
schedule; the inner phase's bound with SGD, momentum and AdamW; the outer
step's jump against its derived bound; bits and seconds on the wire; refusals.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from tests import helpers as h

P, H, LR = 3, 4, 0.05
EPS = float(jnp.finfo(jnp.float32).eps)


def _noise(rounds, dtype=jnp.float32, workers=P, seed=0):
    """Stacked batches `[rounds, P, ...]` of Gaussian noise for `h.noisy_quadratic`."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(rounds, workers) + x.shape),
                                              dtype), h.params0())


def _chunks(alg, batches, size):
    """The state after every `size` rounds (each a synchronisation), one run per chunk."""
    state, out = alg.init(jax.tree.map(lambda x: x.astype(jax.tree.leaves(batches)[0].dtype),
                                       h.params0()), 0), []
    rounds = jax.tree.leaves(batches)[0].shape[0]
    for start in range(0, rounds, size):
        chunk = jax.tree.map(lambda x, s=start: x[s:s + size], batches)
        state, _ = ej.run(alg, h.noisy_quadratic, state, chunk, loop="python")
        out.append(state)
    return out


@pytest.mark.parametrize("period, other", [
    (H, lambda: ej.local_sgd(LR, P, H)),
    (1, lambda: ej.sync_sgd(LR, P)),
])
def test_outer_sgd_of_rate_one_is_local_sgd_and_with_one_step_sync_sgd(period, other):
    """Within `4 eps max(|x|, |m|)` per synchronisation, entry by entry: `x` the global
    model before the outer step, `m` the other algorithm's model (the steps are the
    same; only the outer step `x - (x - mean_p v^p)` rounds differently)."""
    batches = _noise(12)
    ours = _chunks(ej.diloco(LR, P, period, outer_optimizer=optax.sgd(1.0)), batches, period)
    theirs = _chunks(other(), batches, period)
    allowance = jax.tree.map(jnp.zeros_like, h.params0())
    before = h.params0()
    for a, b in zip(ours, theirs, strict=True):
        m = ej.model(b)
        allowance = jax.tree.map(lambda t, x, y: t + 4 * EPS * jnp.maximum(jnp.abs(x),
                                                                           jnp.abs(y)),
                                 allowance, before, m)
        for x, y, t in zip(jax.tree.leaves(ej.model(a)), jax.tree.leaves(m),
                           jax.tree.leaves(allowance), strict=True):
            assert np.all(np.abs(np.asarray(x) - np.asarray(y)) <= np.asarray(t))
        before = ej.model(a)
    # Not bitwise the same computation: the check has rounding to allow for.
    assert any(np.any(np.asarray(x) != np.asarray(y))
               for a, b in zip(ours, theirs, strict=True)
               for x, y in zip(jax.tree.leaves(ej.model(a)), jax.tree.leaves(ej.model(b)),
                               strict=True))


def _reference(batches, period, fragments, outer, lr):
    """DiLoCo from its update rule (module docstring), float64, for the noisy quadratic."""
    x = [np.asarray(a, np.float64) for a in jax.tree.leaves(h.params0())]
    noise = [np.asarray(n) for n in jax.tree.leaves(batches)]
    local = [[a.copy() for a in x] for _ in range(P)]
    groups = np.array_split(np.arange(len(x)), fragments)
    states = [outer.init([jnp.asarray(x[i]) for i in g]) for g in groups]
    for r in range(noise[0].shape[0]):
        for p in range(P):
            local[p] = [v - lr * (v - 1.0 + n[r, p]) for v, n in zip(local[p], noise,
                                                                     strict=True)]
        for f, group in enumerate(groups):
            if (r + 1) % period != ((f + 1) * period // fragments) % period:
                continue
            delta = [jnp.asarray(x[i] - np.mean([local[p][i] for p in range(P)], axis=0))
                     for i in group]
            step, states[f] = outer.update(delta, states[f], [jnp.asarray(x[i]) for i in group])
            for i, u in zip(group, step, strict=True):
                x[i] = x[i] + np.asarray(u)
                for p in range(P):
                    local[p][i] = x[i].copy()
    return x, local


@pytest.mark.parametrize("fragments", [1, 2])
def test_outer_nesterov_step_and_streaming_follow_the_update_rule(fragments):
    """One fragment is plain DiLoCo; two are synchronised at their own rounds."""
    with jax.enable_x64(True):
        batches = _noise(14, jnp.float64)
        alg = ej.diloco(LR, P, H, fragments=fragments)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), h.params0())
        state, _ = ej.run(alg, h.noisy_quadratic, alg.init(params, 0), batches)
        x, local = _reference(batches, H, fragments, ej.algorithms.diloco.default_outer_optimizer(),
                              LR)
        for got, want in zip(jax.tree.leaves(ej.model(state)), x, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        views = jax.tree.leaves(ej.views(alg, state))
        for p in range(P):
            for got, want in zip(views, local[p], strict=True):
                np.testing.assert_allclose(np.asarray(got[p]), want, rtol=1e-12, atol=1e-12)


def test_streaming_synchronises_every_parameter_once_per_period():
    """Two fragments (the two leaves): each one's nodes agree right after its own
    synchronisation and at no other round, and it goes on the wire then (`P 32 d_f`)."""
    fragments, rounds = 2, 3 * H
    alg = ej.diloco(LR, P, H, fragments=fragments, outer_optimizer=optax.sgd(1.0))
    state = alg.init(h.params0(), 0)
    batch_fn = h.noise_batch_fn(h.params0())
    sizes = [x.size for x in jax.tree.leaves(h.params0())]
    agreed, bits = [], []
    for _ in range(rounds):
        state, m = ej.run(alg, h.noisy_quadratic, state, batch_fn=batch_fn, rounds=1)
        views = jax.tree.leaves(ej.views(alg, state))  # of the next round
        agreed.append([bool(np.all(np.asarray(v) == np.asarray(v)[:1])) for v in views])
        bits.append(float(m["comm/bits"][0]))
    agreed = np.asarray(agreed)
    for leaf in range(fragments):
        rounds_synced = np.flatnonzero(agreed[:, leaf])
        # Exactly once in every window of H rounds, H rounds apart.
        assert np.all(np.diff(rounds_synced) == H) and rounds_synced[0] < H
        for r in range(rounds - H + 1):
            assert np.sum(agreed[r:r + H, leaf]) == 1
        np.testing.assert_array_equal(np.asarray(bits)[rounds_synced], P * 32 * sizes[leaf])
    # The fragments take turns: never both in one round.
    assert not np.any(agreed.all(axis=1)) and np.count_nonzero(bits) == rounds // H * fragments


@pytest.mark.parametrize("inner", ["sgd", "nesterov", "adamw"])
def test_inner_phase_bound_holds_with_sgd_momentum_and_adamw(inner):
    """`b_hat <= 2 (H - 1)(1 - 1/P) U` every round (U: M, M / (1 - mu), u_hat), with the
    default outer Nesterov step; and its jump, `diloco/outer_gap`, within the bound
    derived for outer Nesterov momentum (docs/theory.md section 12)."""
    rule = {"sgd": ej.chain(ej.sgd()), "nesterov": ej.chain(ej.sgd(momentum=0.9, nesterov=True)),
            "adamw": ej.chain(ej.adamw())}[inner]
    params = h.params0()
    alg = ej.diloco(LR, 4, H, rule=rule)
    _, m, norms = h.run_seeds(alg, h.noisy_quadratic, params, h.noise_batch_fn(params),
                              seeds=[0, 1], rounds=4 * H)
    h.assert_bound_holds(m, norms)
    bound = np.asarray(m["consistency/bound"])
    u = bound / (2 * (H - 1) * (1 - 1 / 4))  # U, in units of eta
    b_hat = np.asarray(m["consistency/b_hat"])
    inner_rounds = np.arange(4 * H) % H != 0  # a round right after a sync reads x itself
    assert np.all(b_hat[:, ~inner_rounds] == 0) and np.all(b_hat[:, inner_rounds] > 0)
    assert np.max(b_hat / bound) > 0.05
    alpha, mu = 0.7, 0.9
    gap_bound = H * u * (abs(1 - alpha * (1 + mu)) + alpha * mu**2 / (1 - mu))
    gap = np.asarray(m["diloco/outer_gap"])
    assert np.all(gap <= gap_bound * (1 + 1e-5)) and np.all(gap[:, H - 1::H] > 0)


def test_outer_error_feedback_adds_its_residual_to_the_bound():
    """Top-k with error feedback on the pseudo-gradients: `B = 2 (H - 1)(1 - 1/P) U +
    rho H U`, and the auxiliary model owes the mean residual; 4-bit QSGD holds nothing
    back (its error is in the outer step's jump)."""
    params = h.params0()
    compressor = ej.top_k(fraction=0.25)
    alg = ej.diloco(LR, P, H, outer_compressor=ej.error_feedback(compressor))
    _, m, norms = h.run_seeds(alg, h.noisy_quadratic, params, h.noise_batch_fn(params),
                              seeds=[0], rounds=3 * H)
    h.assert_bound_holds(m, norms)
    rho = ej.bounds.rho(1.0, ej.compression_info(compressor, params).delta)
    u = np.asarray(m["grad_norm/max"])
    np.testing.assert_allclose(np.asarray(m["consistency/bound"]),
                               (2 * (H - 1) * (1 - 1 / P) + rho * H) * u, rtol=1e-6)
    assert np.all(np.asarray(m["ef/residual_norm"])[:, H - 1:] > 0)
    quantised = ej.diloco(LR, P, H, outer_compressor=ej.qsgd(7))
    _, q, _ = h.run_seeds(quantised, h.noisy_quadratic, params, h.noise_batch_fn(params),
                          seeds=[0], rounds=H)
    d = sum(x.size for x in jax.tree.leaves(params))
    assert float(q["comm/bits"][0, H - 1]) == P * (32 + d * 4) and "ef/residual_norm" not in q


def test_a_synchronisation_costs_its_fragments_collective_on_the_clock():
    network = ej.clock.network(latency=1e-3, bandwidth=1e6)
    system = ej.clock.system(ej.clock.constant(0.01), rounds=2 * H, network=network)
    alg = ej.diloco(LR, P, H, fragments=2, system=system)
    times = ej.clock.times(alg, h.params0())
    sizes = [x.size for x in jax.tree.leaves(h.params0())]
    expected = np.zeros(2 * H)
    for f, r in ((0, H // 2 - 1), (1, H - 1)):
        for start in (0, H):
            expected[start + r] = ej.clock.seconds("all_reduce", network, P - 1, 32 * sizes[f])
    np.testing.assert_allclose(times["comm/seconds"], expected, rtol=1e-12)
    np.testing.assert_allclose(times["time/elapsed"][-1],
                               2 * H * 0.01 + expected.sum(), rtol=1e-12)
    sparse = ej.diloco(LR, P, H, system=system,
                       outer_compressor=ej.error_feedback(ej.top_k(k=2)))
    d = sum(sizes)
    gather = ej.clock.seconds("all_gather", network, P - 1, 2 * (32 + math.ceil(math.log2(d))))
    assert ej.clock.times(sparse, h.params0())["comm/seconds"][H - 1] == gather


@pytest.mark.parametrize("make, message", [
    (lambda: ej.diloco(LR, P, H, fragments=3), r"^fragments: got 3; expected a divisor of "
                                               r"period = 4"),
    (lambda: ej.diloco(LR, P, H, fragments=4).init(h.params0(), 0),
     r"^fragments: got 4; expected an integer in \[1, 2\]: at most the model's 2 leaves"),
    (lambda: ej.diloco(LR, P, 0), r"^period: got 0; expected an integer in \[1, inf\]"),
    (lambda: ej.diloco(LR, P, H, outer_optimizer=ej.top_k(k=1)), r"^outer_optimizer: got "),
    (lambda: ej.diloco(LR, P, H, outer_compressor="top_k"), r"^outer_compressor: got "),
    (lambda: ej.diloco(LR, P, H, outer_compressor=ej.error_feedback(ej.qsgd(7))),
     r"^compressor: got qsgd\(levels=7\), which is not contractive"),
    (lambda: ej.diloco(LR, P, H, rule=ej.chain(ej.sgd(), ej.top_k(k=1))),
     r"^rule: got .*expected an uncompressed chain"),
    (lambda: ej.powersgd(0), r"^rank: got 0; expected an integer in \[1, inf\]"),
    (lambda: ej.async_sgd(LR, P, P, compressor=ej.powersgd(1)),
     r"^compressor: got powersgd\(rank=1.*defined for sync_sgd and diloco"),
    (lambda: ej.local_sgd(LR, P, H, rule=ej.chain(ej.sgd(), ej.powersgd(1))),
     r"^rule: got powersgd\(rank=1.*a collective compressor"),
    (lambda: ej.sync_sgd(LR, P, compressor=ej.powersgd(1), error_feedback=True),
     r"^error_feedback: got True; expected False with ej.powersgd"),
])
def test_bad_inputs_are_one_line_before_anything_compiles(make, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        make()
    assert "\n" not in str(excinfo.value)
