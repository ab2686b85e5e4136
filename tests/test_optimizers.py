"""Base optimizers: momentum, Nesterov, weight decay, optax transformations, their placements.

- With one worker, no delay and the identity compressor each base optimizer is its
  optax counterpart run the same way, to a few ulp; worker and server placement
  coincide there.
- `b_hat <= bound` every round over seeds with momentum in every variant (sync with
  error feedback under both placements), and with AdamW, whose bound comes from the
  measured `u_hat`; on a constant gradient the momentum bound of async SGD is reached.
- The heavy-ball virtual iterate `z = X - (eta mu / (1 - mu)) sum_p m_p` follows SGD
  with rate `eta / (1 - mu)`; under server placement `X - eta mean_p e^p` follows SGD.
- Bad inputs cost one line before anything compiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from tests import helpers as h

LR, MU, WD, ROUNDS = 0.05, 0.9, 0.01, 12


def least_squares(params, batch):
    a, t = batch
    return 0.5 * jnp.mean((a @ params["w"] - t) ** 2)


def problem(dtype=jnp.float32, workers=1, rounds=ROUNDS):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(rounds, workers, 5, 6)), dtype)
    t = jnp.asarray(rng.normal(size=(rounds, workers, 5)), dtype)
    return {"w": jnp.asarray(rng.normal(size=6), dtype)}, (a, t)


def optax_run(tx, params, batches):
    """A jitted loop of `tx` on one worker's batches."""

    @jax.jit
    def run(params):
        def body(carry, batch):
            p, s = carry
            g = jax.grad(least_squares)(p, jax.tree.map(lambda x: x[0], batch))
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, tx.init(params)), batches)[0][0]

    return run(params)


# name -> (the chain's base optimizer links, the optax optimizer run the same way).
OPTIMIZERS = {
    "momentum": ([ej.sgd(momentum=MU)], optax.sgd(LR, momentum=MU)),
    "nesterov": ([ej.sgd(momentum=MU, nesterov=True)], optax.sgd(LR, MU, nesterov=True)),
    "weight_decay": ([ej.weight_decay(WD), ej.sgd(momentum=MU)],
                     optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MU))),
    "adamw": ([ej.adamw(weight_decay=WD)], optax.adamw(LR, weight_decay=WD)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_worker_without_delay_or_compression_is_the_optax_optimizer(name):
    links, tx = OPTIMIZERS[name]
    params, batches = problem()
    rule = ej.chain(*links, ej.identity())
    alg = ej.async_sgd(LR, 1, 0, rule=rule)
    state, metrics = ej.run(alg, least_squares, alg.init(params, 0), batches)
    np.testing.assert_array_max_ulp(np.asarray(ej.params(state)["w"]),
                                    np.asarray(optax_run(tx, params, batches)["w"]), maxulp=4)
    # Not vacuous: the optimizer moved the model away from plain SGD's trajectory.
    plain = optax_run(optax.sgd(LR), params, batches)["w"]
    assert np.max(np.abs(np.asarray(ej.params(state)["w"]) - np.asarray(plain))) > 1e-3
    np.testing.assert_array_equal(metrics["consistency/b_hat"], 0.0)


@pytest.mark.parametrize("name", ["weight_decay", "adamw"])
def test_worker_and_server_placement_coincide_for_one_worker(name):
    """The same arithmetic in two programs: XLA's fusions may round one step apart by an
    ulp, which momentum then carries on, so the runs are short."""
    links, _ = OPTIMIZERS[name]
    params, batches = problem(rounds=4)
    rule = ej.chain(*links, ej.error_feedback(ej.identity()))
    finals = []
    for placement in ("worker", "server"):
        alg = ej.sync_sgd(LR, 1, rule=rule, optimizer_placement=placement)
        state, _ = ej.run(alg, least_squares, alg.init(params, 0), batches, checks=True)
        finals.append(np.asarray(ej.params(state)["w"]))
    np.testing.assert_array_max_ulp(finals[0], finals[1], maxulp=4)


# ------------------------------------------------------------------ bounds

CLIP = 2.0


def _momentum(nesterov=False, clip=None):
    head = [ej.clip(clip)] if clip else []
    return head + [ej.sgd(momentum=MU, nesterov=nesterov)]


def _ef():
    return ej.error_feedback(ej.top_k(fraction=0.2))


# name -> a variant with momentum (or AdamW) in its chain, P = 4.
BOUNDED = {
    "async_consistent": lambda: ej.async_sgd(LR, 4, 5, rule=ej.chain(*_momentum())),
    "async_inconsistent_nesterov_ef": lambda: ej.async_sgd(
        LR, 4, 5, reads="inconsistent", rule=ej.chain(*_momentum(True, CLIP), _ef())),
    "message_passing_crash": lambda: ej.message_passing_sgd(
        LR, 4, max_delay=2, crashes=[(2, 6)], rule=ej.chain(*_momentum(clip=CLIP))),
    "elastic_scheduling_variance": lambda: ej.elastic_scheduling(
        LR, 4, 2, mode="variance", rule=ej.chain(ej.weight_decay(WD), ej.sgd(momentum=MU))),
    "local_sgd_cosine": lambda: ej.local_sgd(optax.cosine_decay_schedule(LR, 30), 4, 3,
                                             rule=ej.chain(*_momentum(True))),
    "sync_ef_worker": lambda: ej.sync_sgd(LR, 4, rule=ej.chain(*_momentum(), _ef())),
    "sync_ef_server": lambda: ej.sync_sgd(LR, 4, rule=ej.chain(*_momentum(), _ef()),
                                          optimizer_placement="server"),
    "async_adamw": lambda: ej.async_sgd(LR, 4, 5, rule=ej.chain(ej.adamw())),
    "sync_adamw_ef_server": lambda: ej.sync_sgd(LR, 4, rule=ej.chain(ej.adamw(), _ef()),
                                                optimizer_placement="server"),
}


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_b_hat_stays_below_a_finite_bound_every_round_over_seeds(name):
    p = h.params0()
    alg = BOUNDED[name]()
    _, metrics, norms = h.run_seeds(alg, h.noisy_quadratic, p, h.noise_batch_fn(p),
                                    seeds=np.arange(3), rounds=30)
    h.assert_bound_holds(metrics, norms)
    bound = np.asarray(metrics["consistency/bound"])
    assert np.all(np.isfinite(bound)) and np.max(metrics["consistency/b_hat"]) > 0, name
    if name in KNOWN:
        # Clipped momentum: U = C / (1 - mu), so the bound is known from round 0 on.
        np.testing.assert_allclose(bound, KNOWN[name](CLIP / (1 - MU)), rtol=1e-5)


def _ef_bounds(update):
    """EF14 around Top-20% of the 20 parameters: `(U (1 + rho), U rho)`."""
    rho = ej.bounds.rho(1.0, ej.compression_info(ej.top_k(fraction=0.2), h.params0()).delta)
    return {"update": update * (1 + rho), "residual": update * rho}


# name -> the bound as a function of U = C / (1 - mu), for the clipped chains above.
KNOWN = {
    "async_inconsistent_nesterov_ef": lambda u: ej.bounds.async_sgd(
        max_delay=5, num_workers=4, **_ef_bounds(u)),
    "message_passing_crash": lambda u: ej.bounds.message_passing_sgd(
        max_delay=2, num_workers=4, update=u, crashes=1),
}


def test_u_hat_is_measured_exactly_where_a_bound_reads_it():
    """`u_hat` (the workers' update norms) is computed only where a link cannot bound its
    output's norm: AdamW, an unbiased compressor; never for SGD, momentum or EF14."""
    p = h.params0()
    assert not ej.chain(ej.sgd(momentum=MU)).measures_update(p)
    assert not ej.chain(ej.sgd(), _ef()).measures_update(p)
    assert ej.chain(ej.adamw()).measures_update(p)
    assert ej.chain(ej.sgd(), ej.qsgd(4)).measures_update(p)
    for rule, measured in ((ej.chain(ej.sgd()), False), (ej.chain(ej.adamw()), True)):
        alg = ej.async_sgd(LR, 4, 3, rule=rule)
        state, metrics = ej.run(alg, h.noisy_quadratic, alg.init(p, 0),
                                batch_fn=h.noise_batch_fn(p), rounds=5)
        assert (float(state.shared.stats.u_hat) > 0) == measured
        assert np.all(np.isfinite(metrics["consistency/bound"]))


def test_momentum_async_bound_is_reached_on_a_constant_gradient():
    """Every update is `eta m` with `m -> g / (1 - mu)`: a view `max_delay` updates old
    misses `max_delay eta ||g|| / (1 - mu)`, the bound `max_delay M / (1 - mu)`."""
    p = h.params0()
    alg = ej.async_sgd(LR, 2, 4, delay="fixed", rule=ej.chain(ej.sgd(momentum=MU)))
    state = alg.init(p, 0)
    _, metrics = ej.run(alg, h.linear, state, batch_fn=h.constant_batch_fn(p, 2, 0.5),
                        rounds=80, checks=True)
    g_norm = 0.5 * np.sqrt(sum(x.size for x in jax.tree.leaves(p)))
    np.testing.assert_allclose(metrics["consistency/bound"], 4 * g_norm / (1 - MU), rtol=1e-5)
    warm = np.asarray(metrics["consistency/b_hat"][50:] / metrics["consistency/bound"][50:])
    assert np.all(warm >= 1 / 1.5) and np.all(warm <= 1 + 1e-5), warm


# --------------------------------------------------------- virtual iterates


def test_heavy_ball_virtual_iterate_follows_sgd_at_the_effective_rate():
    """z = X - (eta mu / (1 - mu)) m moves by -(eta / (1 - mu)) g at every step."""
    with jax.enable_x64(True):
        params, batches = problem(jnp.float64, rounds=40)
        alg = ej.async_sgd(LR, 1, 0, rule=ej.chain(ej.sgd(momentum=MU)))
        c = LR * MU / (1 - MU)

        @jax.jit
        def trajectory(state):
            def body(state, batch):
                view = ej.views(alg, state)
                grads = jax.vmap(jax.grad(least_squares))(view, batch)
                new = ej.update(alg, state, grads)[0]
                parts = (ej.model(state)["w"], state.workers.rule[0]["w"][0], grads["w"][0])
                return new, parts

            return jax.lax.scan(body, state, batches)[1]

        x, m, g = (np.asarray(a) for a in trajectory(alg.init(params, 0)))
    z = x - c * m
    predicted = z[:-1] - LR / (1 - MU) * g[:-1]
    ulp = np.finfo(np.float64).eps * np.maximum(np.abs(x[1:]), np.abs(c * m[1:]))
    assert np.all(np.abs(z[1:] - predicted) <= 4 * ulp), np.max(np.abs(z[1:] - predicted) / ulp)
    # Not vacuous: X itself does not follow that rule.
    assert np.max(np.abs(x[1:] - (x[:-1] - LR / (1 - MU) * g[:-1]))) > 1e-3


def test_server_placement_virtual_iterate_follows_uncompressed_sgd():
    """Without momentum, x = X - eta mean_p e^p moves by -eta mean_p g^p (in math)."""
    p = h.params0()
    alg = ej.sync_sgd(0.1, 4, rule=ej.chain(ej.sgd(), ej.error_feedback(ej.top_k(k=3))),
                      optimizer_placement="server")
    state = alg.init(p, 0)
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic))
    grad = jax.jit(jax.vmap(jax.grad(h.noisy_quadratic)))
    batch_fn = h.noise_batch_fn(p)
    for r in range(8):
        batch = batch_fn(r, jax.random.split(jax.random.key(r), 4))
        g = grad(ej.views(alg, state), batch)
        expected = h.flat(ej.params(state)) - 0.1 * h.flat(
            jax.tree.map(lambda x: jnp.mean(x, axis=0), g))
        state, _ = step(state, batch)
        np.testing.assert_allclose(h.flat(ej.params(state)), expected, rtol=0, atol=2e-6)
    assert np.linalg.norm(h.flat(ej.model(state)) - h.flat(ej.params(state))) > 1e-3


def test_grad_with_respect_to_momentum_and_decay_matches_a_central_difference():
    """Tracers pass the links' checks: hypergradients through `ej.run` (float64)."""
    with jax.enable_x64(True):
        params, batches = problem(jnp.float64)

        def final_loss(hp):
            rule = ej.chain(ej.weight_decay(hp[1]), ej.sgd(momentum=hp[0], nesterov=True))
            alg = ej.async_sgd(LR, 1, 0, rule=rule)
            state, _ = ej.run(alg, least_squares, alg.init(params, 0), batches)
            return least_squares(ej.params(state), jax.tree.map(lambda x: x[0, 0], batches))

        point, step = jnp.array([0.5, WD]), 1e-6
        grad = jax.grad(final_loss)(point)
        shifts = jnp.concatenate([jnp.eye(2), -jnp.eye(2)]) * step
        values = jax.vmap(final_loss)(point[None] + shifts)
        central = (values[:2] - values[2:]) / (2 * step)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(central), rtol=1e-6)
    assert np.all(np.abs(np.asarray(grad)) > 1e-3)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("make, message", [
    (lambda: ej.sgd(momentum=1.0), r"^momentum: got 1.0; expected a finite number in \[0.0, 1.0\)"),
    (lambda: ej.sgd(momentum=-0.1), r"^momentum: got -0.1; expected"),
    (lambda: ej.sgd(0.9, nesterov=1), r"^nesterov: got 1; expected a bool"),
    (lambda: ej.weight_decay(-1e-4), r"^decay: got -0.0001; expected a finite number in \[0.0"),
    (lambda: ej.adamw(b2=1.0), r"^b2: got 1.0; expected a finite number in \[0.0, 1.0\)"),
    (lambda: ej.adamw(weight_decay=-1.0), r"^weight_decay: got -1.0; expected"),
    (lambda: ej.from_optax(optax.adam), r"^tx: got .*; expected a rate-free optax"),
    (lambda: ej.from_optax(ej.top_k(k=1)), r"^tx: got .*; expected a rate-free optax"),
    (lambda: ej.sync_sgd(0.1, 2, optimizer_placement="host"),
     r"^optimizer_placement: got 'host'; expected one of 'worker', 'server'$"),
] + [(make, r"^optimizer_placement: got 'server'; expected one of 'worker' \(server placement "
      r"is defined for sync_sgd only\)$") for make in (
    lambda: ej.async_sgd(0.1, 2, 1, rule=ej.chain(ej.sgd(0.9)), optimizer_placement="server"),
    lambda: ej.message_passing_sgd(0.1, 2, optimizer_placement="server"),
    lambda: ej.elastic_scheduling(0.1, 2, 1, optimizer_placement="server"),
    lambda: ej.local_sgd(0.1, 2, 2, optimizer_placement="server"))])
def test_bad_input_is_one_line_before_compiling(make, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        make()
    assert "\n" not in str(excinfo.value)
