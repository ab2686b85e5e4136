"""The drivers: make_step, run, compilation, checks, randomness, state invariants."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import base
from tests import helpers as h


def test_fifty_rounds_compile_once():
    p = h.params0()
    alg = ej.async_sgd(0.05, 4, 6, reads="inconsistent", compressor=ej.top_k(fraction=0.2),
                       error_feedback=True)
    # Two traces of the loss: the loop rule reads its jaxpr once (shapes only),
    # the compiled round is the other.
    loss = chex.assert_max_traces(h.noisy_quadratic, n=2)
    batch_fn = h.noise_batch_fn(p)
    state, metrics = ej.run(alg, loss, alg.init(p, jax.random.key(0)), batch_fn=batch_fn,
                            rounds=50)
    assert metrics["loss"].shape == (50,)
    assert int(state.shared.round) == 50
    # A second run of the same configuration reuses the compiled round.
    state, _ = ej.run(alg, loss, state, batch_fn=batch_fn, rounds=3)
    assert int(state.shared.round) == 53


def test_state_is_stable_and_caller_state_is_not_donated():
    p = h.params0()
    alg = ej.sync_sgd(0.1, 2, compressor=ej.top_k(k=3), error_feedback=True)
    state = alg.init(p, jax.random.key(0))
    new, _ = ej.run(alg, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(p), rounds=2)
    ej.checks.assert_state_stable(state, new)
    # The caller's state is still usable after run (its buffers were not donated).
    assert np.isfinite(h.flat(ej.params(state))).all()
    with pytest.raises(AssertionError):
        ej.checks.assert_state_stable(state, new.replace(workers=new.workers._replace(
            rule=jax.tree.map(lambda x: x.astype(jnp.float16), new.workers.rule))))


def test_scan_and_python_loops_agree():
    p = h.params0()
    alg = ej.async_sgd(0.05, 2, 3, compressor=ej.top_k(k=4))
    state = alg.init(p, jax.random.key(1))
    a, ma = ej.run(alg, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(p), rounds=6)
    b, mb = ej.run(alg, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(p), rounds=6,
                   loop="scan")
    np.testing.assert_allclose(h.flat(ej.params(a)), h.flat(ej.params(b)), rtol=1e-6)
    assert set(ma) == set(mb)


def test_same_seed_same_trajectory_and_seeds_differ():
    p = h.params0()
    alg = ej.async_sgd(0.05, 3, 4, reads="inconsistent")
    runs = [ej.run(alg, h.noisy_quadratic, alg.init(p, jax.random.key(s)),
                   batch_fn=h.noise_batch_fn(p), rounds=5)[0] for s in (7, 7, 8)]
    np.testing.assert_array_equal(h.flat(ej.params(runs[0])), h.flat(ej.params(runs[1])))
    assert not np.array_equal(h.flat(ej.params(runs[0])), h.flat(ej.params(runs[2])))


def test_keys_are_derived_not_split():
    root = jax.random.key(0)
    a = ej.derive_key(root, base.TAG_DELAY, 5, 3)
    b = base.worker_keys(root, base.TAG_DELAY, 5, 8)[3]
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    c = ej.derive_key(root, base.TAG_DATA, 5, 3)
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(c))


def test_has_aux_and_stacked_batches():
    alg = ej.sync_sgd(0.1, 2)
    p = h.params0()

    def loss(params, batch):
        value = h.noisy_quadratic(params, batch)
        return value, {"double": 2 * value}

    batches = jax.tree.map(lambda x: jnp.zeros((4, 2) + x.shape), p)
    state, metrics = ej.run(alg, loss, alg.init(p, 0), batches, has_aux=True)
    np.testing.assert_allclose(metrics["aux/double"], 2 * metrics["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="rounds"):
        ej.run(alg, loss, state, batches, rounds=5, has_aux=True)
    with pytest.raises(ValueError, match="batches"):
        ej.run(alg, loss, state, has_aux=True)


def test_every_algorithm_reports_the_common_metrics():
    p = h.params0()
    expected = {"loss", "consistency/b_hat", "consistency/b_rms", "consistency/bound",
                "grad_norm/max", "update_norm", "comm/bits", "learning_rate"}
    algs = {
        "sync": ej.sync_sgd(0.1, 2),
        "sync_ef": ej.sync_sgd(0.1, 2, compressor=ej.top_k(k=2), error_feedback=0.5),
        "async": ej.async_sgd(0.1, 2, 2),
    }
    for name, alg in algs.items():
        _, metrics = ej.run(alg, h.noisy_quadratic, alg.init(p, 0),
                            batch_fn=h.noise_batch_fn(p), rounds=1)
        assert expected <= set(metrics), name
        assert ("ef/residual_norm" in metrics) == name.endswith("_ef")
        assert ("delay/mean" in metrics) == (name == "async")
    # comm/bits: 2 dense workers send 32 d bits each; Top-k sends k (32 + ceil(log2 d)).
    _, metrics = ej.run(algs["sync"], h.noisy_quadratic, algs["sync"].init(p, 0),
                        batch_fn=h.noise_batch_fn(p), rounds=1)
    assert float(metrics["comm/bits"][0]) == 2 * 32 * 20
    _, metrics = ej.run(algs["sync_ef"], h.noisy_quadratic, algs["sync_ef"].init(p, 0),
                        batch_fn=h.noise_batch_fn(p), rounds=1)
    assert float(metrics["comm/bits"][0]) == 2 * 2 * (32 + 5)


def test_zero_learning_rate_round_reports_zero():
    alg = ej.async_sgd(0.0, 2, 3)
    p = h.params0()
    _, metrics = ej.run(alg, h.noisy_quadratic, alg.init(p, 0), batch_fn=h.noise_batch_fn(p),
                        rounds=2, checks=True)
    np.testing.assert_array_equal(metrics["consistency/b_hat"], 0)
    np.testing.assert_array_equal(metrics["consistency/bound"], 0)
    np.testing.assert_array_equal(metrics["update_norm"], 0)


def test_checks_pass_on_a_correct_run_and_fail_with_the_round():
    p = h.params0()
    alg = ej.async_sgd(0.05, 2, 3, compressor=ej.top_k(k=4), error_feedback=True)
    state, _ = ej.run(alg, h.noisy_quadratic, alg.init(p, 0), batch_fn=h.noise_batch_fn(p),
                      rounds=5, checks=True)

    def broken_combine(shared, msg):
        new_shared, metrics = alg.combine(shared, msg)
        metrics = dict(metrics)
        metrics["consistency/b_hat"] = 2 * metrics["consistency/bound"] + 1
        return new_shared, metrics

    broken = alg._replace(combine=broken_combine)
    batch = h.noise_batch_fn(p)(0, jax.random.split(jax.random.key(0), 2))
    # Called from Python, the step raises InvariantError itself.
    step = ej.make_step(broken, h.noisy_quadratic, checks=True)
    with pytest.raises(ej.checks.InvariantError, match="round 5: consistency/b_hat = "):
        step(state, batch)
    # Inside the user's own jit, JAX wraps it (documented).
    with pytest.raises(Exception, match="round 5: consistency/b_hat"):
        jax.block_until_ready(jax.jit(step)(state, batch))
    nan_batch = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), batch)
    good = ej.make_step(alg, h.noisy_quadratic, checks=True)
    with pytest.raises(ej.checks.InvariantError, match="round 5: the state is not finite"):
        good(state, nan_batch)
    # ej.run raises it unwrapped, catchable, naming the first failing round.
    with pytest.raises(ej.checks.InvariantError, match="round 5: consistency/b_hat"):
        ej.run(broken, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(p), rounds=3,
               checks=True)


def _conv_loss(params, batch):
    """A one-filter-bank convolution: a loss whose jaxpr has `conv_general_dilated`."""
    out = jax.lax.conv_general_dilated(batch, params["w"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.square(out - 1.0))


def _conv_batch_fn(round_, keys):
    del round_
    return jax.vmap(lambda k: jax.random.normal(k, (2, 5, 5, 1)))(keys)


def test_auto_worker_loop_resolves_by_loss_backend_and_block():
    resolve = ej.workers.resolve
    assert resolve("auto", convolutional=True, block=8, platform="cpu") == "unroll"
    assert resolve("auto", convolutional=True, block=32, platform="cpu") == "unroll"
    assert resolve("auto", convolutional=True, block=33, platform="cpu") == "groups"
    assert resolve("auto", convolutional=True, block=8, platform="gpu") == "vmap"
    assert resolve("auto", convolutional=False, block=8, platform="cpu") == "vmap"
    for loop in ("map", "unroll", "vmap"):
        assert resolve(loop, convolutional=True, block=8, platform="cpu") == loop
    p, batch = {"w": jnp.ones((3, 3, 1, 2))}, jnp.ones((2, 5, 5, 1))
    assert ej.workers.is_convolutional(_conv_loss, False, p, batch)
    assert not ej.workers.is_convolutional(h.noisy_quadratic, False, h.params0(), h.params0())
    # A convolution nested in a sub-jaxpr (here inside a `jax.checkpoint`) is found.
    assert ej.workers.is_convolutional(jax.checkpoint(_conv_loss), False, p, batch)
    # The rule of `run`: chunks for dense losses, the Python loop where the
    # gradients are unrolled or mapped, or on a mesh.
    choose = ej.drivers.choose_loops
    kw = dict(mesh=None, platform="cpu", block=8)
    assert choose("auto", "auto", convolutional=False, **kw) == ("chunks", "vmap")
    assert choose("auto", "auto", convolutional=True, **kw) == ("python", "unroll")
    assert choose("auto", "map", convolutional=False, **kw) == ("python", "map")
    assert choose("auto", "vmap", convolutional=False, mesh=object(), platform="cpu",
                  block=8) == ("python", "vmap")
    assert choose("scan", "auto", convolutional=True, **kw) == ("scan", "unroll")


@pytest.mark.parametrize("num_workers", [4, 40])
def test_worker_loops_agree_to_rounding(num_workers):
    """map, unroll, vmap and auto (unroll at P=4, vmapped groups at P=40) on a conv loss."""
    alg = ej.async_sgd(0.1, num_workers, num_workers, reads="inconsistent",
                       compressor=ej.top_k(fraction=0.3), error_feedback=True)
    state = alg.init({"w": 0.1 * jnp.ones((3, 3, 1, 2))}, 0)
    loops = ("map", "auto") if num_workers > 32 else ("map", "unroll", "vmap", "auto")
    finals = {}
    for loop in loops:
        s, m = ej.run(alg, _conv_loss, state, batch_fn=_conv_batch_fn, rounds=3,
                      worker_loop=loop)
        finals[loop] = (h.flat(ej.params(s)), np.asarray(m["loss"]))
    ref_params, ref_loss = finals["map"]
    assert np.abs(ref_params - h.flat(ej.params(state))).max() > 1e-3  # It moved.
    for loop, (params, loss) in finals.items():
        np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-6, err_msg=loop)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=loop)


def test_bad_worker_loop_is_refused():
    alg = ej.sync_sgd(0.1, 2)
    with pytest.raises(ValueError, match=r"worker_loop: got 'scan'; expected one of"):
        ej.make_step(alg, h.noisy_quadratic, worker_loop="scan")


CHUNK_ALG = ej.async_sgd(0.05, 3, 4, reads="inconsistent", compressor=ej.top_k(k=4),
                         error_feedback=True)


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else np.asarray(x) for x in jax.tree.leaves(tree)]


def test_chunks_split_anywhere_are_bitwise_and_agree_with_python_loop():
    p = h.params0()
    state = CHUNK_ALG.init(p, jax.random.key(3))
    batch_fn = h.noise_batch_fn(p)
    run = functools.partial(ej.run, CHUNK_ALG, h.noisy_quadratic, batch_fn=batch_fn,
                            loop="chunks", chunk=5)
    whole, m_whole = run(state, rounds=12)
    part, m_a = run(state, rounds=3)
    part, m_b = run(part, rounds=9)  # Starts mid-chunk: chunk boundaries at 3, 8.
    for got, want in zip(_leaves(part), _leaves(whole), strict=True):
        np.testing.assert_array_equal(got, want)
    assert set(m_whole) == set(m_a)
    for name, values in m_whole.items():
        assert values.shape == (12,)
        np.testing.assert_array_equal(np.concatenate([m_a[name], m_b[name]]), values,
                                      err_msg=name)
    python, m_python = ej.run(CHUNK_ALG, h.noisy_quadratic, state, batch_fn=batch_fn,
                              rounds=12, loop="python")
    assert np.abs(h.flat(ej.params(whole)) - h.flat(ej.params(state))).max() > 1e-2
    np.testing.assert_allclose(h.flat(ej.params(whole)), h.flat(ej.params(python)), rtol=1e-6)
    for name in m_python:
        np.testing.assert_allclose(m_whole[name], m_python[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_chunks_with_stacked_batches_pad_the_last_chunk():
    p = h.params0()
    alg = ej.sync_sgd(0.1, 2, compressor=ej.top_k(k=3), error_feedback=True)
    state = alg.init(p, jax.random.key(0))
    noise = jax.vmap(lambda k: jax.vmap(lambda kk: jax.tree.map(
        lambda x: jax.random.normal(kk, x.shape), p))(jax.random.split(k, 2)))(
        jax.random.split(jax.random.key(1), 7))
    python, m_python = ej.run(alg, h.noisy_quadratic, state, noise, loop="python")
    chunks, m_chunks = ej.run(alg, h.noisy_quadratic, state, noise, loop="chunks", chunk=3)
    assert m_chunks["loss"].shape == (7,)
    np.testing.assert_allclose(h.flat(ej.params(chunks)), h.flat(ej.params(python)), rtol=1e-6)
    np.testing.assert_allclose(m_chunks["loss"], m_python["loss"], rtol=1e-6)
    assert int(chunks.shared.round) == 7


def test_auto_loop_runs_chunks_for_dense_and_python_for_conv_losses_tracing_once():
    p = h.params0()
    # The loop rule reads the loss's jaxpr once more, and each call checks the
    # shapes `batch_fn` returns (a trace, no compilation).
    loss = chex.assert_max_traces(h.noisy_quadratic, n=2)
    batch_fn = chex.assert_max_traces(h.noise_batch_fn(p), n=3)
    state = CHUNK_ALG.init(p, jax.random.key(5))
    auto, _ = ej.run(CHUNK_ALG, loss, state, batch_fn=batch_fn, rounds=4)
    auto, _ = ej.run(CHUNK_ALG, loss, auto, batch_fn=batch_fn, rounds=3)
    chunks, _ = ej.run(CHUNK_ALG, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(p),
                       rounds=7, loop="chunks")
    for got, want in zip(_leaves(auto), _leaves(chunks), strict=True):
        np.testing.assert_array_equal(got, want)

    # A convolutional loss on CPU: the Python loop (convolutions are slow in loop
    # bodies there).
    # Traced by the loop rule, then once per unrolled worker (2).
    conv = chex.assert_max_traces(_conv_loss, n=3)
    conv_batch = chex.assert_max_traces(_conv_batch_fn, n=3)
    alg = ej.async_sgd(0.1, 2, 2)
    state = alg.init({"w": 0.1 * jnp.ones((3, 3, 1, 2))}, 0)
    auto, m_auto = ej.run(alg, conv, state, batch_fn=conv_batch, rounds=3)
    python, m_python = ej.run(alg, conv, state, batch_fn=conv_batch, rounds=3, loop="python")
    if jax.devices()[0].platform == "cpu":
        for got, want in zip(_leaves(auto), _leaves(python), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(m_auto["loss"], m_python["loss"])


@pytest.mark.parametrize("kwargs, match", [
    ({"loop": "while"}, r"loop: got 'while'; expected one of 'auto', 'python'"),
    ({"chunk": 0}, r"chunk: got 0; expected an integer >= 1"),
    ({"chunk": 2.5}, r"chunk: got 2.5; expected an integer >= 1"),
    ({"worker_loop": "scan"}, r"worker_loop: got 'scan'; expected one of"),
])
def test_bad_loop_arguments_are_refused_before_compiling(kwargs, match):
    p = h.params0()
    alg = ej.sync_sgd(0.1, 2)
    loss = chex.assert_max_traces(h.noisy_quadratic, n=0)
    with pytest.raises(ValueError, match=match):
        ej.run(alg, loss, alg.init(p, 0), batch_fn=h.noise_batch_fn(p), rounds=2, **kwargs)


def test_chunks_take_a_batch_fn_without_vmap_rule():
    p = h.params0()
    leaves, treedef = jax.tree.flatten(p)

    def host(round_):  # A host-side loader: round-dependent noise.
        rng = np.random.default_rng(int(round_))
        return [rng.standard_normal((2,) + x.shape).astype(np.float32) for x in leaves]

    def batch_fn(round_, keys):
        del keys
        shapes = [jax.ShapeDtypeStruct((2,) + x.shape, jnp.float32) for x in leaves]
        return treedef.unflatten(jax.pure_callback(host, shapes, round_))

    alg = ej.sync_sgd(0.1, 2)
    state = alg.init(p, 0)
    auto, m_auto = ej.run(alg, h.noisy_quadratic, state, batch_fn=batch_fn, rounds=3)
    python, m_python = ej.run(alg, h.noisy_quadratic, state, batch_fn=batch_fn, rounds=3,
                              loop="python")
    # The chunk samples its batches in a loop (lax.map): no vmap rule is needed.
    np.testing.assert_allclose(h.flat(ej.params(auto)), h.flat(ej.params(python)), rtol=1e-6)
    np.testing.assert_allclose(m_auto["loss"], m_python["loss"], rtol=1e-6)


def test_chunks_on_a_mesh_agree_with_the_python_loop():
    p = h.params0()
    state = CHUNK_ALG.init(p, jax.random.key(2))
    mesh = ej.parallel.make_mesh(3) if len(jax.devices()) >= 3 else None
    kwargs = dict(batch_fn=h.noise_batch_fn(p), rounds=6, mesh=mesh)
    chunks, m_chunks = ej.run(CHUNK_ALG, h.noisy_quadratic, state, loop="chunks", chunk=4,
                              **kwargs)
    python, m_python = ej.run(CHUNK_ALG, h.noisy_quadratic, state, loop="python", **kwargs)
    np.testing.assert_allclose(h.flat(ej.params(chunks)), h.flat(ej.params(python)), rtol=1e-6)
    np.testing.assert_allclose(m_chunks["consistency/b_hat"], m_python["consistency/b_hat"],
                               rtol=1e-5, atol=1e-6)
