"""The contract every algorithm keeps, run over a registry of all of them.

In the spirit of optax's alias tests: each property is one test, parametrised
over `ALGORITHMS`, so a new variant or link is covered by adding one line.
The placement properties (one device equals a mesh bitwise; the accessors on
a state split over an explicit mesh) run over the same registry in
`tests/test_parallel.py`, in processes of their own.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej

P, D, B, R = 4, 6, 5, 12
LR = 0.05


def _ef21(compressor):
    return ej.chain(ej.ef21(compressor), ej.sgd())


MU, WD = 0.9, 0.01


def _server_nesterov(compressor):
    """Weight decay, Nesterov momentum at the server, EF14 on the raw gradients."""
    return ej.chain(ej.weight_decay(WD), ej.sgd(momentum=MU, nesterov=True),
                    ej.error_feedback(compressor))


def _clock_async(lr, p):
    """Constant speeds, the last worker twice as slow: steps alternate between the P - 1
    fast writers (the straggler masked) and all P, the straggler's updates lagging
    2 (P - 1) writes (policy "none": the bound uses the largest lag so far)."""
    system = ej.clock.system(ej.clock.constant(1.0), rounds=24, slowdown=[1.0] * (p - 1) + [2.0])
    return ej.clock_async_sgd(lr, p, system=system, compressor=ej.top_k(fraction=0.34),
                              error_feedback=True)


# name -> factory of (learning rate, number of workers): every algorithm, and
# every link, in a representative configuration.
ALGORITHMS = {
    "sync": lambda lr, p: ej.sync_sgd(lr, p),
    "sync_top_k_ef": lambda lr, p: ej.sync_sgd(lr, p, compressor=ej.top_k(fraction=0.34),
                                               error_feedback=True),
    "sync_ef21": lambda lr, p: ej.sync_sgd(lr, p, rule=_ef21(ej.top_k(fraction=0.34))),
    "sync_server_nesterov_top_k_ef": lambda lr, p: ej.sync_sgd(
        lr, p, rule=_server_nesterov(ej.top_k(fraction=0.34)), optimizer_placement="server"),
    "async_inconsistent_top_k_ef": lambda lr, p: ej.async_sgd(
        lr, p, p + 1, reads="inconsistent", compressor=ej.top_k(fraction=0.34),
        error_feedback=True),
    "message_passing_faults_top_k_ef": lambda lr, p: ej.message_passing_sgd(
        lr, p, max_delay=2, crashes=[(1, 5)], drop_prob=0.2,
        compressor=ej.top_k(fraction=0.34), error_feedback=True),
    "elastic_scheduling_variance": lambda lr, p: ej.elastic_scheduling(lr, p, 2,
                                                                       mode="variance"),
    "local_sgd_clipped": lambda lr, p: ej.local_sgd(lr, p, 3, clip_norm=5.0),
    # A time-varying topology (one mixing matrix per phase), local steps, and EF14
    # around each node's own update.
    "gossip_one_peer_local_top_k_ef": lambda lr, p: ej.gossip_sgd(
        lr, p, topology="one_peer_exponential", local_steps=2,
        compressor=ej.top_k(fraction=0.34), error_feedback=True),
    "clock_async_straggler_top_k_ef": _clock_async,
    # Three inner steps per outer step, DiLoCo's default outer Nesterov momentum, Top-k
    # with error feedback on the pseudo-gradients.
    "diloco_nesterov_top_k_ef": lambda lr, p: ej.diloco(
        lr, p, 3, outer_compressor=ej.error_feedback(ej.top_k(fraction=0.34))),
}

# name -> the same variant in its degenerate setting (one worker, no delay, no
# compression, period 1): its base optimizer run by optax (`REFERENCE`, else plain SGD).
DEGENERATE = {
    "sync": lambda lr: ej.sync_sgd(lr, 1),
    "sync_top_k_ef": lambda lr: ej.sync_sgd(lr, 1, compressor=ej.identity(),
                                            error_feedback=True),
    "sync_ef21": lambda lr: ej.sync_sgd(lr, 1, rule=_ef21(ej.identity())),
    "sync_server_nesterov_top_k_ef": lambda lr: ej.sync_sgd(
        lr, 1, rule=_server_nesterov(ej.identity()), optimizer_placement="server"),
    "async_inconsistent_top_k_ef": lambda lr: ej.async_sgd(lr, 1, 0, reads="inconsistent",
                                                           compressor=ej.top_k(fraction=1.0),
                                                           error_feedback=True),
    "message_passing_faults_top_k_ef": lambda lr: ej.message_passing_sgd(lr, 1),
    "elastic_scheduling_variance": lambda lr: ej.elastic_scheduling(lr, 1, 0, mode="variance"),
    "local_sgd_clipped": lambda lr: ej.local_sgd(lr, 1, 1),
    "gossip_one_peer_local_top_k_ef": lambda lr: ej.gossip_sgd(
        lr, 1, topology="one_peer_exponential", compressor=ej.identity(), error_feedback=True),
    "clock_async_straggler_top_k_ef": lambda lr: ej.clock_async_sgd(
        lr, 1, system=ej.clock.system(ej.clock.constant(1.0), rounds=R),
        compressor=ej.top_k(fraction=1.0), error_feedback=True),
    # Outer SGD of rate 1 after every inner step: the inner SGD step itself.
    "diloco_nesterov_top_k_ef": lambda lr: ej.diloco(
        lr, 1, 1, outer_optimizer=optax.sgd(1.0),
        outer_compressor=ej.error_feedback(ej.identity())),
}
REFERENCE = {
    "sync_server_nesterov_top_k_ef": lambda lr: optax.chain(
        optax.add_decayed_weights(WD), optax.sgd(lr, momentum=MU, nesterov=True)),
}


def least_squares(params, batch):
    a, t = batch
    return 0.5 * jnp.mean((a @ params["w"] - t) ** 2)


def problem(dtype, workers=P):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(R, workers, B, D)), dtype)
    t = jnp.asarray(rng.normal(size=(R, workers, B)), dtype)
    return {"w": jnp.zeros(D, dtype)}, (a, t)


def full_batch(batches):
    a, t = batches
    return a.reshape(-1, D), t.reshape(-1)


def feed(alg, batches, start=0, rounds=None, reader=None):
    """`ej.run`'s data arguments for rounds `start ..` of `batches`: the stacked batches,
    or, for an algorithm that keys each worker's batch by its own gradient count and so
    takes `batch_fn` only (clock-driven async), `reader`, a `batch_fn` reading them by
    round (pass the same one to every call of a test: a new function compiles anew)."""
    if alg.info.gradient_count is None:
        return {"batches": jax.tree.map(lambda x: x[start:], batches), "rounds": rounds}
    return {"batch_fn": reader or round_reader(batches),
            "rounds": R - start if rounds is None else rounds}


def round_reader(batches):
    return lambda round_, keys: jax.tree.map(lambda x: x[round_], batches)


def _bits(compressed: bool) -> int:
    if not compressed:
        return 32 * D
    k = max(1, math.floor(0.34 * D))
    return k * (32 + math.ceil(math.log2(D)))


# name -> the closed form of `comm/bits` summed over `R` rounds (docs/theory.md
# section 7): the bits the nodes put on the wire, one send per message.
TOTAL_BITS = {
    "sync": R * P * _bits(False),
    "sync_top_k_ef": R * P * _bits(True),
    "sync_ef21": R * P * _bits(True),
    "sync_server_nesterov_top_k_ef": R * P * _bits(True),
    "async_inconsistent_top_k_ef": R * P * _bits(True),
    # Node 1 crashes at round 5: it still sends in round 5, not after.
    "message_passing_faults_top_k_ef": (6 * P + (R - 6) * (P - 1)) * _bits(True),
    "elastic_scheduling_variance": R * P * _bits(False),
    # Only the averaging rounds communicate: R / H of them.
    "local_sgd_clipped": (R // 3) * P * _bits(False),
    # Each node sends its (dense) model in every mixing round: R / H of them.
    "gossip_one_peer_local_top_k_ef": (R // 2) * P * _bits(False),
    # Steps of P - 1 and P writes, alternately.
    "clock_async_straggler_top_k_ef": (R // 2) * (2 * P - 1) * _bits(True),
    # Each node sends its compressed pseudo-gradient once per outer step.
    "diloco_nesterov_top_k_ef": (R // 3) * P * _bits(True),
}


def test_the_registries_cover_every_factory():
    assert set(DEGENERATE) == set(ALGORITHMS) == set(TOTAL_BITS)
    names = {ALGORITHMS[n](LR, P).info.name for n in ALGORITHMS}
    assert names == {"sync_sgd", "async_sgd", "message_passing_sgd", "elastic_scheduling",
                     "local_sgd", "gossip_sgd", "clock_async_sgd", "diloco"}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_state_bound_bits_and_split_runs(name):
    """The state keeps its structure, shapes and dtypes; `b_hat <= bound` every round
    (checks=True raises ej.checks.InvariantError where it fails); `comm/bits` sums to
    its closed form; the same configuration compiles once; a run split in two
    calls is bitwise the run in one; the accessors work inside `jit`."""
    params, batches = problem(jnp.float32)
    alg = ALGORITHMS[name](LR, P)
    assert alg.info.bound_kind == "deterministic"
    state = alg.init(params, 0)
    # The loss is traced twice: once by the loop rule (shapes only), once compiled.
    chex.clear_trace_counter()
    loss = chex.assert_max_traces(least_squares, n=2)
    reader = round_reader(batches)
    first, m1 = ej.run(alg, loss, state, **feed(alg, batches, rounds=5, reader=reader),
                       checks=True)
    ej.checks.assert_state_stable(state, first)
    second, m2 = ej.run(alg, loss, first, **feed(alg, batches, 5, reader=reader), checks=True)
    whole, m = ej.run(alg, loss, state, **feed(alg, batches, reader=reader), checks=True)
    for got, want in zip(jax.tree.leaves(second), jax.tree.leaves(whole), strict=True):
        if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for key in m:
        np.testing.assert_array_equal(np.concatenate([m1[key], m2[key]]), m[key], err_msg=key)
    assert int(whole.shared.round) == R and whole.algorithm is alg
    assert np.all(np.isfinite(m["consistency/bound"]))
    assert float(np.sum(np.asarray(m["comm/bits"], np.float64))) == TOTAL_BITS[name]
    # The accessors work inside `jit` (another program: equal to rounding; the split
    # states: tests/test_parallel.py).
    for accessor in (ej.params, ej.model, lambda s: ej.views(alg, s)):
        for a, b in zip(jax.tree.leaves(accessor(whole)),
                        jax.tree.leaves(jax.jit(accessor)(whole)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_setting_is_a_jitted_optax_loop(name):
    params, batches = problem(jnp.float32, workers=1)
    alg = DEGENERATE[name](LR)
    state, _ = ej.run(alg, least_squares, alg.init(params, 0), **feed(alg, batches))
    opt = REFERENCE.get(name, optax.sgd)(LR)

    @jax.jit
    def reference(params):
        def body(carry, batch):
            p, s = carry
            u, s = opt.update(jax.grad(least_squares)(p, jax.tree.map(lambda x: x[0], batch)),
                              s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt.init(params)), batches)[0][0]

    # EF21's estimate `g + (grad - g)` rounds at each step (tests/test_ef21.py bounds
    # one step): its drift may add up over the rounds.
    maxulp = 4 * R if name == "sync_ef21" else 4
    np.testing.assert_array_max_ulp(np.asarray(ej.params(state)["w"]),
                                    np.asarray(reference(params)["w"]), maxulp=maxulp)


@pytest.mark.parametrize("loop", ["default", "python"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_grad_through_run_matches_a_central_difference(name, loop):
    """Reverse mode through `ej.run` in float64. The default loop is chunks here
    (a dense loss on one device), so the two cover both loops `"auto"` picks."""
    make = ALGORITHMS[name]

    def final_loss(lr):
        params, batches = problem(jnp.float64)
        alg = make(lr, P)
        kwargs = {} if loop == "default" else {"loop": loop}
        state, _ = ej.run(alg, least_squares, alg.init(params, jax.random.key(0)),
                          **feed(alg, batches), **kwargs)
        return least_squares(ej.params(state), full_batch(batches))

    with jax.enable_x64(True):
        # `jax.grad` straight through the driver (no enclosing `jit`): the Python
        # loop then calls its compiled round once per round, as a user's run does.
        grad = jax.grad(final_loss)(LR)
        h_ = 1e-4 * LR
        # Both points in one (vmapped) run: one compilation.
        up, down = jax.vmap(final_loss)(jnp.array([LR + h_, LR - h_]))
        central = (up - down) / (2 * h_)
    assert math.isfinite(float(grad))
    np.testing.assert_allclose(float(grad), float(central), rtol=1e-6)


def test_default_loop_of_the_grad_problem_is_chunks():
    assert ej.drivers.choose_loops("auto", "auto", mesh=None, platform="cpu",
                                   convolutional=False, block=P) == ("chunks", "vmap")
    params, batches = problem(jnp.float32)
    alg = ALGORITHMS["sync"](LR, P)
    state = alg.init(params, 0)
    default, _ = ej.run(alg, least_squares, state, batches)
    chunks, _ = ej.run(alg, least_squares, state, batches, loop="chunks")
    np.testing.assert_array_equal(ej.params(default)["w"], ej.params(chunks)["w"])


def test_reverse_mode_never_deletes_a_buffer_the_caller_holds():
    make = ALGORITHMS["async_inconsistent_top_k_ef"]
    params, batches = problem(jnp.float32)
    key = jax.random.key(3)

    def loss(lr):
        alg = make(lr, P)
        state, _ = ej.run(alg, least_squares, alg.init(params, key), batches, loop="python")
        return least_squares(ej.params(state), jax.tree.map(lambda x: x[0, 0], batches))

    jax.grad(loss)(LR)
    jax.grad(loss)(LR)  # The key and the batches are still alive.
    assert not key.is_deleted() and not batches[0].is_deleted()


def test_local_sgd_communicates_only_in_averaging_rounds():
    params, batches = problem(jnp.float32)
    alg = ej.local_sgd(LR, P, period=4)
    _, metrics = ej.run(alg, least_squares, alg.init(params, 0), batches)
    expected = [P * 32 * D if (r + 1) % 4 == 0 else 0 for r in range(R)]
    np.testing.assert_array_equal(np.asarray(metrics["comm/bits"]), expected)
