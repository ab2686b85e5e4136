"""`ej.sweep`: a grid of hyperparameters and seeds, batched or one run after another."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h

P, D_IN, HIDDEN, B, R = 4, 16, 32, 8, 50
LEARNING_RATES = (0.01, 0.02, 0.05, 0.1)
SEEDS = (0, 1)


def mlp_loss(params, batch):
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"][None])
    return jnp.mean(((hidden @ params["w2"])[:, 0] - y) ** 2)


def init_mlp(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) / 4, "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, 1)) / 6}


def batch_fn(round_, keys):
    del round_

    def one(key):
        x = jax.random.normal(key, (B, D_IN))
        return x, jnp.sin(x[:, 0])

    return jax.vmap(one)(keys)


def make(learning_rate):
    return ej.sync_sgd(learning_rate, P, compressor=ej.top_k(fraction=0.1), error_feedback=True)


def sweep(execution, params=init_mlp, rounds=R, **kw):
    return ej.sweep(make, mlp_loss, params, {"learning_rate": LEARNING_RATES}, seeds=SEEDS,
                    batch_fn=batch_fn, rounds=rounds, execution=execution, **kw)


@pytest.fixture(scope="module")
def runs():
    """The sequential sweep, the batched one (with checks), and the 8 runs one by one."""
    sequential = sweep("sequential")
    batched = sweep("batched", checks=True)
    one_by_one = {}
    for i, lr in enumerate(LEARNING_RATES):
        alg = sequential.states[i].algorithm  # make(lr), built once per point
        assert alg.info.name == "sync_sgd" and sequential.points[i] == {"learning_rate": lr}
        for j, seed in enumerate(SEEDS):
            params_key, alg_key = ej.sweeps.seed_keys(seed)
            state = jax.jit(alg.init)(init_mlp(params_key), alg_key)  # as the launcher's
            one_by_one[i, j] = ej.run(alg, mlp_loss, state, batch_fn=batch_fn, rounds=R)
    return sequential, batched, one_by_one


def seed_state(result, i, j):
    return jax.tree.map(lambda x: x[j], result.states[i])


def test_a_sequential_sweep_is_bitwise_the_runs_one_by_one(runs):
    sequential, _, one_by_one = runs
    assert sequential.execution == "sequential"
    for (i, j), (state, metrics) in one_by_one.items():
        np.testing.assert_array_equal(h.flat(ej.params(seed_state(sequential, i, j))),
                                      h.flat(ej.params(state)))
        assert set(metrics) == set(sequential.metrics)
        for name, values in metrics.items():
            np.testing.assert_array_equal(sequential.metrics[name][i, j], values, err_msg=name)


def test_a_batched_sweep_equals_the_runs_one_by_one(runs):
    _, batched, one_by_one = runs
    assert batched.execution == "batched"  # and checks=True held every round
    assert batched.metrics["loss"].shape == (len(LEARNING_RATES), len(SEEDS), R)
    for (i, j), (state, metrics) in one_by_one.items():
        want = h.flat(ej.params(state))
        got = h.flat(ej.params(seed_state(batched, i, j)))
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
        for name in ("loss", "consistency/b_hat", "update_norm"):
            np.testing.assert_allclose(batched.metrics[name][i, j], metrics[name], rtol=1e-4,
                                       atol=1e-6, err_msg=name)
    # Every configuration and seed differs from the others: nothing was broadcast.
    finals = np.asarray(batched.metrics["loss"][..., -1]).ravel()
    assert len(set(finals.tolist())) == finals.size


def test_a_sweep_continues_from_its_result(runs):
    sequential = runs[0]
    first = sweep("sequential", rounds=20)
    rest = sweep("sequential", params=first, rounds=R - 20)
    for name in sequential.metrics:
        np.testing.assert_array_equal(rest.metrics[name], sequential.metrics[name][..., 20:],
                                      err_msg=name)
    with pytest.raises(ValueError, match=r"^params: got a Sweep over another grid or seeds; "):
        ej.sweep(make, mlp_loss, first, {"learning_rate": (0.3,)}, seeds=SEEDS,
                 batch_fn=batch_fn, rounds=1)


def test_report_has_one_row_per_point(runs):
    text = runs[1].report("loss")
    lines = text.splitlines()
    assert lines[0] == "| learning_rate | loss (mean ± std over 2 seeds) |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {lr:g}" for lr in
                                                            LEARNING_RATES]
    with pytest.raises(ValueError, match=r"^name: got 'accuracy'; expected one of"):
        runs[1].report("accuracy")


def test_the_rule_runs_a_convolutional_loss_on_the_cpu_one_run_at_a_time():
    rule = ej.sweeps.choose_execution
    assert rule("auto", platform="cpu", convolutional=True) == "sequential"
    assert rule("auto", platform="cpu", convolutional=False) == "batched"
    assert rule("auto", platform="gpu", convolutional=True) == "batched"
    assert rule("batched", platform="cpu", convolutional=True) == "batched"
    params = {"k": jnp.ones((3, 3, 1, 2)) / 9}

    def conv_loss(params, batch):
        out = jax.lax.conv_general_dilated(batch, params["k"], (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(out ** 2)

    batches = jnp.ones((1, 2, 1, 4, 4, 1))
    result = ej.sweep(lambda: ej.sync_sgd(0.1, 2), conv_loss, params, {}, batches=batches)
    assert result.execution == "sequential" and result.metrics["loss"].shape == (1, 1)


def make_linear(learning_rate):
    return ej.sync_sgd(learning_rate, 2)


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_a_failed_check_names_the_point_and_the_seed(execution):
    params = {"w": jnp.zeros(3)}
    batches = jnp.full((2, 2, 3), 10.0)  # a constant gradient: the step overflows at 1e38
    with pytest.raises(ej.checks.InvariantError,
                       match=r"^learning_rate=1e\+38, seed 5: round 0: the state is not finite"):
        ej.sweep(make_linear, h.linear, params, {"learning_rate": (0.1, 1e38)}, seeds=(5,),
                 batches={"w": batches}, checks=True, execution=execution)


def make_mixed(beta):
    return ej.sync_sgd(0.1, 2, error_feedback=beta if beta > 0 else False)


def make_momentum_from_zero(momentum):
    # `ej.sgd(momentum=0)` keeps no state; any other momentum keeps its trace.
    return ej.sync_sgd(0.1, 2, rule=ej.chain(ej.sgd(momentum=momentum)))


@pytest.mark.parametrize("make_algorithm, hparams", [
    (make_mixed, {"beta": (0.0, 1.0)}),
    (make_momentum_from_zero, {"momentum": (0.0, 0.9)}),
])
def test_points_whose_states_differ_are_refused_batched(make_algorithm, hparams):
    with pytest.raises(ValueError, match=r"^hparams: got points whose states differ"):
        ej.sweep(make_algorithm, h.linear, {"w": jnp.zeros(3)}, hparams,
                 batches={"w": jnp.ones((1, 2, 3))}, execution="batched")


def make_momentum(momentum):
    """Async Top-k SGD with EF14 on heavy-ball momentum at the workers."""
    rule = ej.chain(ej.sgd(momentum=momentum), ej.error_feedback(ej.top_k(fraction=0.1)))
    return ej.async_sgd(0.02, P, P, rule=rule)


def make_choco(gamma):
    """CHOCO-SGD on a ring of `P` nodes, its mixing step `gamma` swept."""
    return ej.gossip_sgd(0.02, P, topology="ring", gossip_compressor=ej.top_k(fraction=0.25),
                         gamma=gamma)


@pytest.mark.parametrize("make_algorithm, hparams", [
    (make_momentum, {"momentum": (0.5, 0.9)}),  # ej.sgd(momentum=mu), mu traced
    (make_choco, {"gamma": (0.3, 0.6)}),
])
def test_a_batched_sweep_over_momentum_or_gossip_equals_one_run_after_another(make_algorithm,
                                                                              hparams):
    def run(execution):
        return ej.sweep(make_algorithm, mlp_loss, init_mlp, hparams, seeds=SEEDS,
                        batch_fn=batch_fn, rounds=10, execution=execution, checks=True)

    batched, sequential = run("batched"), run("sequential")
    assert batched.execution == "batched"  # and checks=True held every round
    for name in ("loss", "consistency/b_hat", "update_norm"):
        np.testing.assert_allclose(batched.metrics[name], sequential.metrics[name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    for i, j in np.ndindex(len(batched.points), len(SEEDS)):
        want = h.flat(ej.params(seed_state(sequential, i, j)))
        got = h.flat(ej.params(seed_state(batched, i, j)))
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # The swept value reached the rounds: the two points' trajectories differ.
    loss = np.asarray(batched.metrics["loss"])
    assert np.all(np.abs(loss[0, :, -1] - loss[1, :, -1]) > 1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hparams={"learning_rate": ()}), r"^hparams\['learning_rate'\]: got \(\); expected a "
                                          r"non-empty sequence"),
    (dict(hparams={"learning_rate": (0.1, "x")}), r"^hparams\['learning_rate'\]: got 'x'"),
    (dict(hparams={"learning_rate": (0.1, -1.0)}), r"^learning_rate: got -1.0; expected"),
    (dict(hparams=[0.1]), r"^hparams: got \[0.1\]; expected a dict"),
    (dict(seeds=()), r"^seeds: got \(\); expected a non-empty sequence of integers"),
    (dict(seeds=(0, -1)), r"^seeds: got -1; expected an integer in \[0, 4294967295\]"),
    (dict(execution="parallel"), r"^execution: got 'parallel'; expected one of 'auto'"),
    (dict(rounds=0), r"^rounds: got 0; expected an integer in \[1, 3\]"),
    (dict(batch_fn=batch_fn), r"^batches: got both or neither"),
    (dict(batches={"w": jnp.ones((3, 5, 3))}), r"^batches: got leading sizes \(3, 5\)"),
    (dict(params={"w": jnp.zeros(3, jnp.int32)}), r"^params: got a pytree with non-float"),
    (dict(checks=1), r"^checks: got 1; expected a bool"),
    (dict(make_algorithm=lambda learning_rate: 1), r"^make_algorithm: got .*; expected a "
                                                   r"callable returning an ej.Algorithm"),
])
def test_bad_arguments_are_one_line_errors_before_anything_compiles(kwargs, match):
    args = dict(make_algorithm=make_linear, loss_fn=h.linear, params={"w": jnp.zeros(3)},
                hparams={"learning_rate": (0.1,)}, seeds=(0,),
                batches={"w": jnp.ones((3, 2, 3))})
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ej.sweep(args.pop("make_algorithm"), args.pop("loss_fn"), args.pop("params"),
                 args.pop("hparams"), **args)
