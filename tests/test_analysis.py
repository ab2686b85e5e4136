"""Hypergradients through whole runs, and the continuous `staleness` of the stale variants."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

P, ROUNDS, EPS = 3, 5, 1e-6
LR, BETA, STALENESS = 0.1, 0.7, 0.6


def stacked_noise(params, num_workers=P, rounds=ROUNDS, seed=0):
    fn = h.noise_batch_fn(params)
    keys = jax.random.split(jax.random.key(seed), rounds * num_workers).reshape(
        rounds, num_workers)
    return jax.vmap(lambda k: fn(0, k))(keys)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Factories of the three families the finite-difference test covers; module-level
# functions, so compiled runs are shared between tests (analysis caches on them).
def make_sync(learning_rate, beta, decay):
    # A schedule parameter too: eta_r = learning_rate * decay^r.
    return ej.sync_sgd(lambda r: learning_rate * decay ** r, P, compressor=ej.top_k(k=5),
                       error_feedback=beta)


# Fixed delays: every read lags max_delay updates, every message max_delay rounds (the
# random laws are the same code after the draw, and compile more slowly).
def make_async(learning_rate, beta, staleness):
    return ej.async_sgd(learning_rate, P, 5, delay="fixed", compressor=ej.top_k(k=5),
                        error_feedback=beta, staleness=staleness)


def make_message_passing(learning_rate, beta, staleness):
    return ej.message_passing_sgd(learning_rate, P, max_delay=2, delay="fixed",
                                  compressor=ej.top_k(k=5), error_feedback=beta,
                                  staleness=staleness)


def make_async_plain(learning_rate):
    return ej.async_sgd(learning_rate, P, 5, delay="fixed", compressor=ej.top_k(k=5))


CASES = {
    "sync_topk_ef": (make_sync, {"learning_rate": LR, "beta": BETA, "decay": 0.8}),
    "async_topk_ef": (make_async, {"learning_rate": LR, "beta": BETA, "staleness": STALENESS}),
    "message_passing_delays": (
        make_message_passing, {"learning_rate": LR, "beta": BETA, "staleness": STALENESS}),
}


@pytest.fixture(scope="module")
def problem64():
    with jax.enable_x64(True):
        p = h.params0(jnp.float64)
        yield p, stacked_noise(p)


def hypergradient(make, hparams, problem, **kw):
    p, batches = problem
    return ej.analysis.hypergradient(make, h.noisy_quadratic, p, batches, hparams, key=1, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hypergradients_match_central_differences(problem64, case):
    make, hparams = CASES[case]
    with jax.enable_x64(True):
        value, grads = hypergradient(make, hparams, problem64, mode="reverse")
        assert list(grads) == list(hparams)
        for name in hparams:
            up, down = dict(hparams), dict(hparams)
            up[name] += EPS
            down[name] -= EPS
            fd = (float(hypergradient(make, up, problem64, mode="reverse")[0])
                  - float(hypergradient(make, down, problem64, mode="reverse")[0])) / (2 * EPS)
            np.testing.assert_allclose(float(grads[name]), fd, rtol=1e-3, atol=1e-7,
                                       err_msg=f"{case}: d/d{name}")
            assert abs(fd) > 1e-4, f"{case}: d/d{name} is too small to test"
        if case == "sync_topk_ef":  # (the experiment's smoke test runs async forward)
            # Forward mode agrees with reverse mode; the value is the same run's.
            value_f, grads_f = hypergradient(make, hparams, problem64, mode="forward")
            np.testing.assert_allclose(float(value_f), float(value), rtol=1e-14)
            for name in hparams:
                np.testing.assert_allclose(float(grads_f[name]), float(grads[name]),
                                           rtol=1e-10)


def test_two_level_checkpointing_equals_per_round_remat(problem64):
    """`remat="sqrt"` (R = 5: a segment of K = 3 rounds and a ragged one of 2) against
    `"round"`, and `"none"`."""
    make, hparams = CASES["async_topk_ef"]
    with jax.enable_x64(True):
        value, grads = hypergradient(make, hparams, problem64, mode="reverse", remat="round")
        for remat, rtol in (("sqrt", 1e-10), ("none", 1e-12)):
            value_r, grads_r = hypergradient(make, hparams, problem64, mode="reverse",
                                             remat=remat)
            np.testing.assert_allclose(float(value_r), float(value), rtol=rtol)
            for name in hparams:
                assert float(grads[name]) != 0.0
                np.testing.assert_allclose(float(grads_r[name]), float(grads[name]), rtol=rtol,
                                           err_msg=f"{remat}: d/d{name}")


@pytest.mark.parametrize("rounds, expected", [
    (1, (1, 1, 0)), (2, (2, 1, 0)), (4, (2, 2, 0)), (5, (3, 1, 2)), (9, (3, 3, 0)),
    (10, (4, 2, 2)), (1000, (32, 31, 8)), (10_000, (100, 100, 0)),
])
def test_segments_are_ceil_sqrt_rounds_with_a_ragged_last_one(rounds, expected):
    size, full, tail = ej.analysis.segments(rounds)
    assert (size, full, tail) == expected
    assert size == math.ceil(math.sqrt(rounds)) and full * size + tail == rounds


def make_sync_ef(learning_rate):
    return ej.sync_sgd(learning_rate, 2, error_feedback=True)


def test_two_level_checkpointing_keeps_fewer_states():
    """XLA's scratch memory of the compiled reverse pass at R = 400: the backward pass
    keeps 400 states per round, 20 + 20 with segments of 20 rounds."""
    p = {"a": jnp.zeros(256)}
    batches = stacked_noise(p, num_workers=2, rounds=400)

    def temp_bytes(remat):
        def program(params, batches):
            return ej.analysis.hypergradient(make_sync_ef, h.noisy_quadratic, params, batches,
                                             {"learning_rate": LR}, key=1, mode="reverse",
                                             remat=remat)

        compiled = jax.jit(program).lower(p, batches).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    state_bytes = 3 * 256 * 4  # the model and two residuals
    per_round, two_level = temp_bytes("round"), temp_bytes("sqrt")
    assert per_round >= 400 * state_bytes
    assert two_level <= per_round / 4


def test_value_is_the_run_and_beta_zero_is_no_error_feedback(problem64):
    """The traced run at beta = 0, staleness = 1 is the run without error feedback."""
    p, batches = problem64
    with jax.enable_x64(True):
        alg = make_async_plain(LR)
        state, _ = ej.run(alg, h.noisy_quadratic, alg.init(p, jax.random.key(1)), batches,
                          loop="scan")
        last = jax.tree.map(lambda b: b[-1], batches)
        expected = np.mean([h.noisy_quadratic(ej.params(state), jax.tree.map(
            lambda b, q=q: b[q], last)) for q in range(P)])
        traced, grads = hypergradient(
            make_async, {"learning_rate": LR, "beta": 0.0, "staleness": 1.0}, problem64,
            mode="reverse")
        np.testing.assert_allclose(float(traced), expected, rtol=1e-14)
        assert np.isfinite(float(grads["beta"])) and float(grads["beta"]) != 0.0
        # Zero residuals and zero gaps have zero (not NaN) derivatives in reverse mode.
        _, grads = hypergradient(make_message_passing,
                                 {"learning_rate": LR, "beta": 0.0, "staleness": 0.0},
                                 problem64, mode="reverse")
        assert all(np.isfinite(float(g)) and float(g) != 0.0 for g in grads.values())


# ------------------------------------------------------------------ staleness


def run(alg, batches, params):
    return ej.run(alg, h.noisy_quadratic, alg.init(params, jax.random.key(3)), batches,
                  loop="scan")


def assert_metrics_equal(a, b):
    """Bitwise, except `loss`: XLA may fuse the loss's reduction with the blend differently."""
    assert set(a) == set(b)
    for name in a:
        if name == "loss":
            np.testing.assert_array_max_ulp(np.asarray(a[name]), np.asarray(b[name]), maxulp=4)
        else:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_async_staleness_endpoints_and_blend():
    p = h.params0()
    batches = stacked_noise(p, num_workers=3, rounds=6)
    kw = dict(clip_norm=2.0)  # (compressors and error feedback: the finite-difference test)
    # staleness = 0 is the recorded schedule lags[r, i] = i (the freshest reads).
    zero, m_zero = run(ej.async_sgd(0.1, 3, 5, delay="fixed", staleness=0.0, **kw), batches, p)
    lags = np.tile(np.arange(3), (6, 1))
    fresh, m_fresh = run(ej.async_sgd(0.1, 3, 5, delay=lags, **kw), batches, p)
    assert_trees_equal(ej.params(zero), ej.params(fresh))
    assert_metrics_equal(m_zero, m_fresh)
    np.testing.assert_array_equal(m_zero["delay/mean"], 1.0)

    # In between (and at 1 as an array): (1 - s) X_{rP} + s (the delayed read), with
    # the same draws (inconsistent reads: the b_hat test below).
    @jax.jit
    def views(state):
        return [ej.views(ej.async_sgd(0.1, 3, 5, staleness=s, **kw), state)
                for s in (jnp.asarray(0.25), jnp.asarray(1.0), 1.0)]

    quarter, one, delayed = views(fresh)
    for v, d, f in zip(jax.tree.leaves(quarter), jax.tree.leaves(delayed),
                       jax.tree.leaves(ej.model(fresh)), strict=True):
        assert np.any(d != f[None])
        np.testing.assert_allclose(v, 0.75 * f[None] + 0.25 * d, rtol=1e-6, atol=1e-6)
    assert_trees_equal(one, delayed)


def test_async_b_hat_uses_the_blended_view():
    """b_hat = max_i ||x_t - v_t|| / eta with v_t the blended view `ej.views` returns.

    (Inconsistent reads: the blend is per coordinate, after the per-coordinate draws.)
    """
    p = h.params0()
    batches = stacked_noise(p, num_workers=2, rounds=4)
    alg = ej.async_sgd(0.1, 2, 3, reads="inconsistent", delay="fixed", staleness=0.25)
    state = alg.init(p, jax.random.key(0))
    step = ej.make_step(alg, h.noisy_quadratic)

    @jax.jit
    def step_and_expected(state, batch):
        views = ej.views(alg, state)
        grads = jax.vmap(jax.grad(h.noisy_quadratic))(views, batch)
        x, dists = ej.params(state), []
        for i in range(2):
            dists.append(h.tree_norm(jax.tree.map(lambda a, v, i=i: a - v[i], x, views)))
            x = jax.tree.map(lambda a, g, i=i: a - 0.1 * g[i], x, grads)
        return step(state, batch), jnp.max(jnp.stack(dists)) / 0.1

    for r in range(4):
        (state, metrics), expected = step_and_expected(
            state, jax.tree.map(lambda b, r=r: b[r], batches))
        np.testing.assert_allclose(metrics["consistency/b_hat"], expected, rtol=1e-5)
    assert float(metrics["consistency/b_hat"]) > 0


@pytest.mark.parametrize("family", ["message_passing", "elastic_scheduling"])
def test_staleness_endpoints_of_message_passing_and_elastic_scheduling(family):
    p = h.params0()
    batches = stacked_noise(p, num_workers=3, rounds=6)
    if family == "message_passing":
        def make(delay, **kw):
            return ej.message_passing_sgd(0.1, 3, max_delay=delay, **kw)
    else:
        def make(delay, **kw):
            return ej.elastic_scheduling(0.1, 3, max_outstanding=delay, mode="variance", **kw)
    # staleness = 0: every view is x, as with no delay at all.
    zero, m_zero = run(make(2, staleness=0.0), batches, p)
    fresh, m_fresh = run(make(0), batches, p)
    assert_trees_equal(ej.params(zero), ej.params(fresh))
    np.testing.assert_array_equal(m_zero["consistency/b_hat"], m_fresh["consistency/b_hat"])
    np.testing.assert_array_max_ulp(m_zero["loss"], m_fresh["loss"], maxulp=4)
    # In between, the gap to the freshest view (every message delivered, nothing
    # outstanding: x) is exactly s times the delayed one.
    @jax.jit
    def views(state):
        return (ej.views(make(2, staleness=jnp.asarray(0.5)), state),
                ej.views(make(2), state))

    blended, delayed = views(zero)
    for vh, v, x in zip(jax.tree.leaves(blended), jax.tree.leaves(delayed),
                        jax.tree.leaves(zero.shared.params), strict=True):
        assert np.any(v != x[None])
        np.testing.assert_allclose(vh - x[None], 0.5 * (v - x[None]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factory", ["async_sgd", "message_passing_sgd",
                                     "elastic_scheduling"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "high", np.ones(2)])
def test_staleness_validation(factory, bad):
    args = {"async_sgd": (0.1, 2, 1), "message_passing_sgd": (0.1, 2),
            "elastic_scheduling": (0.1, 2, 1)}[factory]
    with pytest.raises(ValueError, match=r"^staleness: got .*; expected a finite number in "
                                         r"\[0.0, 1.0\]"):
        getattr(ej, factory)(*args, staleness=bad)


# ------------------------------------------------------------------ objectives


def make_sync_lr(learning_rate):
    return ej.sync_sgd(learning_rate, P)


def test_objectives_params_and_aux(problem64):
    p, batches = problem64
    with jax.enable_x64(True):
        alg = make_sync_lr(LR)
        state, metrics = ej.run(alg, h.noisy_quadratic, alg.init(p, jax.random.key(1)),
                                batches, loop="scan")
        eval_batch = jax.tree.map(lambda b: b[0, 0], batches)
        x = ej.params(state)
        z = jax.tree.map(lambda a: 0.5 * jnp.ones_like(a), p)
        hp = {"learning_rate": LR}
        def with_aux(params, batch):
            return h.noisy_quadratic(params, batch), {"unused": jnp.zeros(())}

        final, _ = ej.analysis.hypergradient(make_sync_lr, with_aux, p, batches, hp, key=1,
                                             has_aux=True, eval_batch=eval_batch)
        np.testing.assert_allclose(float(final), h.noisy_quadratic(x, eval_batch), rtol=1e-13)
        value, _ = hypergradient(make_sync_lr, hp, problem64, objective="mean_loss")
        np.testing.assert_allclose(float(value), np.mean(metrics["loss"]), rtol=1e-13)
        dist, g_dist = hypergradient(make_sync_lr, hp, problem64, objective=("distance_to", z),
                                     wrt_params=True)
        np.testing.assert_allclose(float(dist), float(h.tree_norm(jax.tree.map(
            lambda a, b: a - b, x, z)) ** 2), rtol=1e-13)
        call, g_call = hypergradient(
            make_sync_lr, hp, problem64, mode="forward",
            objective=lambda st: h.tree_norm(jax.tree.map(lambda a, b: a - b,
                                                          ej.params(st), z)) ** 2)
        np.testing.assert_allclose(float(call), float(dist), rtol=1e-13)
        np.testing.assert_allclose(float(g_call["learning_rate"]),
                                   float(g_dist["learning_rate"]), rtol=1e-12)
        # d/d params along a direction matches a central difference.
        direction = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), p)
        fd = []
        for sign in (1, -1):
            moved = jax.tree.map(lambda a, d, sign=sign: a + sign * EPS * d, p, direction)
            fd.append(float(ej.analysis.hypergradient(
                make_sync_lr, h.noisy_quadratic, moved, batches, hp, key=1,
                objective=("distance_to", z), wrt_params=True)[0]))
        inner = sum(float(jnp.vdot(g, d)) for g, d in zip(
            jax.tree.leaves(g_dist["params"]), jax.tree.leaves(direction), strict=True))
        np.testing.assert_allclose(inner, (fd[0] - fd[1]) / (2 * EPS), rtol=1e-6)
        # b_hat of the last round (with error feedback it is not 0).
        b_hat, g_b_hat = hypergradient(make_sync, CASES["sync_topk_ef"][1], problem64,
                                       objective="final_b_hat", mode="forward")
        assert float(b_hat) > 0 and np.isfinite(float(g_b_hat["beta"]))



@pytest.mark.parametrize("kwargs, match", [
    (dict(hparams={}), r"^hparams: got \{\}; expected at least one"),
    (dict(hparams={"learning_rate": "fast"}), r"^hparams\['learning_rate'\]: got 'fast'"),
    (dict(hparams={"learning_rate": -1.0}), r"^learning_rate: got -1.0"),
    (dict(objective="best"), r"^objective: got 'best'; expected one of"),
    (dict(objective=("distance_to", {"a": 0.0})), r"^objective: got \('distance_to', point\)"),
    (dict(mode="sideways"), r"^mode: got 'sideways'"),
    (dict(mode="forward", wrt_params=True), r"^mode: got 'forward'; expected 'reverse'"),
    (dict(remat=True), r"^remat: got True; expected one of 'sqrt', 'round', 'none'"),
    (dict(batches_workers=2), r"^batches: got leading shape \(5, 2\); expected \[R >= 1, P = 3\]"),
])
def test_hypergradient_validation(kwargs, match):
    p = h.params0()
    workers = kwargs.pop("batches_workers", P)
    batches = jax.tree.map(lambda x: np.zeros((ROUNDS, workers) + x.shape, np.float32), p)
    hparams = kwargs.pop("hparams", {"learning_rate": LR})
    with pytest.raises(ValueError, match=match):
        ej.analysis.hypergradient(make_sync_lr, h.noisy_quadratic, p, batches, hparams, key=0,
                                  **kwargs)


def test_experiment_smoke(tmp_path):
    from experiments import flags, hypergradients, studies

    settings = studies.validate(hypergradients.FLAGS, {"workdir": str(tmp_path), "smoke": True},
                                hypergradients.SMOKE)
    path = hypergradients.run(settings)
    assert path == os.path.join(str(tmp_path), "report.md")
    text = open(path).read()
    assert "d loss / d beta" in text and "d loss / d staleness" in text
    for name in ("beta_k1.png", "staleness.png"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert len(results["beta"]) == 3 * settings.beta_points  # sync and two async delays
    assert all(np.isfinite(r["dloss_dbeta"]) for r in results["beta"])
    with pytest.raises(flags.UsageError, match=r"^--rounds: got 0; expected"):
        studies.validate(hypergradients.FLAGS, {"workdir": str(tmp_path), "rounds": 0})
