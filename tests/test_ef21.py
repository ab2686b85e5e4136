"""EF21: reduction to SGD, the tracking-error bound, the drift against SGD, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h


def ef21_sync(lr, p, compressor):
    return ej.sync_sgd(lr, p, rule=ej.chain(ej.ef21(compressor), ej.sgd()))


def test_identity_compressor_is_plain_sync_sgd_step_by_step():
    """From the same model and gradients, one EF21 step and one SGD step agree to
    `4 eps max(|g|, |grad|)` per entry (the estimate `g + (grad - g)` rounds)."""
    lr, p = 0.1, 3
    alg, sgd = ef21_sync(lr, p, ej.identity()), ej.sync_sgd(lr, p)
    state = alg.init(h.params0(), 0)
    batch_fn = h.noise_batch_fn(h.params0())
    eps = np.finfo(np.float32).eps
    for r in range(6):
        batch = batch_fn(r, jax.random.split(jax.random.key(r), p))
        grads = jax.vmap(jax.grad(h.noisy_quadratic))(ej.views(alg, state), batch)
        reference, _ = ej.update(sgd, sgd.init(ej.params(state), 0), grads)
        state, metrics = ej.update(alg, state, grads)
        estimate = state.workers.rule[0][0]
        scale = np.max([np.maximum(np.abs(h.flat(jax.tree.map(lambda x, q=q: x[q], estimate))),
                                   np.abs(h.flat(jax.tree.map(lambda x, q=q: x[q], grads))))
                        for q in range(p)], axis=0)
        gap = np.abs(h.flat(ej.params(state)) - h.flat(ej.params(reference)))
        assert np.all(gap <= lr * 4 * eps * scale + eps * np.abs(h.flat(ej.params(state))))
        assert float(metrics["consistency/b_hat"]) == 0.0


def test_tracking_error_stays_under_its_bound_over_seeds():
    p = h.params0()
    alg = ef21_sync(0.05, 4, ej.top_k(fraction=0.1))
    assert alg.info.bound_kind == "deterministic"
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(6), rounds=40)
    h.assert_bound_holds(metrics, norms)
    np.testing.assert_array_equal(metrics["consistency/b_hat"], 0)
    error = np.asarray(metrics["ef21/tracking_error"])
    bound = np.asarray(metrics["ef21/tracking_bound"])
    assert np.all(error <= bound * (1 + 1e-5)) and np.max(error) > 0
    # checks=True asserts the pair every round, like b_hat.
    ej.run(alg, h.noisy_quadratic, alg.init(p, 0), batch_fn=h.noise_batch_fn(p), rounds=5,
           checks=True)


def _alternating(rounds):
    """Gradients (1, 0) and (0, 0.9) in turn, one worker: `h.linear` with the batch as c."""
    c = np.zeros((rounds, 1, 2), np.float32)
    c[0::2, 0, 0], c[1::2, 0, 1] = 1.0, 0.9
    return {"w": jnp.asarray(c)}


def test_tracking_error_comes_within_six_times_of_its_bound_and_drifts_from_sgd():
    params = {"w": jnp.zeros(2)}
    alg, sgd = ef21_sync(0.1, 1, ej.top_k(k=1)), ej.sync_sgd(0.1, 1)
    rounds = 40
    state, metrics = ej.run(alg, h.linear, alg.init(params, 0), _alternating(rounds))
    bound = float(metrics["ef21/tracking_bound"][-1])
    np.testing.assert_allclose(bound, 2 * np.sqrt(0.5) / (1 - np.sqrt(0.5)), rtol=1e-6)
    assert bound / 6 <= float(np.max(metrics["ef21/tracking_error"])) <= bound
    # Against the plain SGD iterate the distance grows linearly: no finite B exists.
    reference, _ = ej.run(sgd, h.linear, sgd.init(params, 0), _alternating(rounds))
    half, _ = ej.run(alg, h.linear, alg.init(params, 0), _alternating(rounds // 2))
    half_ref, _ = ej.run(sgd, h.linear, sgd.init(params, 0), _alternating(rounds // 2))
    far = np.linalg.norm(h.flat(ej.params(state)) - h.flat(ej.params(reference)))
    near = np.linalg.norm(h.flat(ej.params(half)) - h.flat(ej.params(half_ref)))
    np.testing.assert_allclose(far / near, 2.0, rtol=0.1)


@pytest.mark.parametrize("factory", [
    lambda rule: ej.async_sgd(0.1, 2, 2, rule=rule),
    lambda rule: ej.message_passing_sgd(0.1, 2, rule=rule),
    lambda rule: ej.local_sgd(0.1, 2, 2, rule=rule),
])
def test_ef21_is_refused_outside_sync_sgd(factory):
    rule = ej.chain(ej.ef21(ej.top_k(k=1)), ej.sgd())
    with pytest.raises(ValueError, match=r"^rule: got .*defined for sync_sgd only") as info:
        factory(rule)
    assert "\n" not in str(info.value)


def test_ef21_needs_a_contractive_compressor_before_the_optimizer():
    with pytest.raises(ValueError, match="^compressor: got qsgd.*not contractive"):
        ej.ef21(ej.qsgd(4))
    with pytest.raises(ValueError, match="^rule: got .*; expected ej.ef21.* before the base"):
        ej.chain(ej.sgd(), ej.ef21(ej.top_k(k=1)))
