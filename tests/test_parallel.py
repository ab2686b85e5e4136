"""Workers across devices: bitwise placement independence, multi-process runs, bad meshes."""

import functools
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import elastic_jax as ej
from tests import helpers as h
from tests.test_contract import ALGORITHMS

ROUNDS = 20

# Every algorithm of the contract registry (tests/test_contract.py), at P = 8
# on meshes of 4 devices (of 1, 2, 4 and 8 for EVERY_MESH), and configurations without a finite
# bound (outside the contract registry) whose draws must not depend on the placement.
CONFIGS = {name: functools.partial(make, 0.1) for name, make in ALGORITHMS.items()}
UNBOUNDED = {
    # A random matching drawn every round; CHOCO's stochastic compressor per node.
    "gossip_choco_random_matching": lambda p: ej.gossip_sgd(
        0.1, p, topology="random_matching", gossip_compressor=ej.random_k(fraction=0.34),
        gamma=0.5),
    # PowerSGD's two phases and its residuals in combine (error feedback: bound inf).
    "sync_powersgd": lambda p: ej.sync_sgd(0.1, p, compressor=ej.powersgd(
        1, min_compression_rate=0.0)),
}
CONFIGS.update(UNBOUNDED)


def run(alg, mesh):
    p = h.params0()
    return ej.run(alg, h.noisy_quadratic, alg.init(p, 0), batch_fn=_BATCH_FN, rounds=ROUNDS,
                  mesh=mesh, worker_loop="map")


_BATCH_FN = h.noise_batch_fn(h.params0())


def assert_bitwise(alg, a, b):
    """Final auxiliary model, actual model, views and every metric, bitwise."""
    (sa, ma), (sb, mb) = a, b
    for accessor in (ej.params, ej.model, lambda s: ej.views(alg, s), jax.jit(ej.params)):
        for x, y in zip(jax.tree.leaves(accessor(sa)), jax.tree.leaves(accessor(sb)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert set(ma) == set(mb)
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]), err_msg=k)


def check_bitwise(name: str, num_workers: int, device_counts) -> None:
    """Runs `CONFIGS[name]` on one device and on each mesh; asserts bitwise equality.

    The meshes are `ej.parallel.make_mesh(n)` for each count, and one built by
    `jax.make_mesh` (explicit axes, the default in JAX 0.10) on the largest
    count below 8, whose states carry their worker split in their type: the
    accessors (params, model, views) must work on them.
    """
    alg = CONFIGS[name](num_workers)
    reference = run(alg, None)
    meshes = [ej.parallel.make_mesh(n) for n in device_counts]
    explicit = [n for n in device_counts if n < 8]
    if explicit:
        meshes.append(jax.make_mesh((explicit[-1],), ("workers",)))
    for mesh in meshes:
        assert_bitwise(alg, reference, run(alg, mesh))


CHECK = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                               + " --xla_cpu_collective_timeout_seconds=900")
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from tests.test_parallel import check_bitwise
    check_bitwise(sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3].split(",")])
''')


def in_fresh_process(name, num_workers, device_counts, tmp_path):
    """`check_bitwise` in a fresh process.

    Eight fake CPU devices share two cores; after the rest of the suite has run
    in the same process, XLA:CPU's collectives were seen to stall waiting for
    each other, so the multi-device runs get a runtime of their own.
    """
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, str(script), name, str(num_workers),
         ",".join(map(str, device_counts))],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


# Every mesh size for the variants whose rounds gather the most (a ring of past
# iterates read per coordinate, a buffer of delayed messages); four devices for
# the others, which share the worker axis's code.
EVERY_MESH = ("async_inconsistent_top_k_ef", "message_passing_faults_top_k_ef")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_device_and_meshes_are_bitwise_identical(name, tmp_path):
    # And the accessors on a state split over an explicit mesh of four devices
    # (two workers each, the chains' residuals split over them).
    in_fresh_process(name, 8, (1, 2, 4, 8) if name in EVERY_MESH else (4,), tmp_path)


@pytest.mark.parametrize("name", sorted(UNBOUNDED))
def test_unbounded_configurations_on_one_and_four_devices(name, tmp_path):
    in_fresh_process(name, 8, (4,), tmp_path)  # against the one-device reference


def test_ninety_six_workers_on_eight_devices(tmp_path):
    # Twelve workers per device, and sums over more workers than the left fold
    # takes (`ej.consistency.FOLD_WORKERS`): the auxiliary model sums 96 residuals.
    in_fresh_process("async_inconsistent_top_k_ef", 96, (8,), tmp_path)


@pytest.mark.parametrize("size", [65, 96, 1024])
def test_worker_sums_above_the_fold_halve_pairwise(size):
    """Above the fold, `worker_sum` adds `x[:h] + x[h:2h]`, the odd last entry carried."""
    x = np.random.default_rng(size).normal(size=(size, 3)).astype(np.float32)

    def reference(x):
        while len(x) > 1:
            half = len(x) // 2
            x = np.concatenate([x[:half] + x[half:2 * half], x[2 * half:]])
        return x[0]

    got = jax.jit(ej.consistency.worker_sum)(x)
    np.testing.assert_array_equal(np.asarray(got), reference(x))


def test_bad_meshes_are_refused():
    alg = ej.sync_sgd(0.1, 6)
    p = h.params0()
    with pytest.raises(ValueError, match=r"num_workers: got 6; expected a multiple of .* 4"):
        ej.run(alg, h.noisy_quadratic, alg.init(p, 0), batch_fn=_BATCH_FN, rounds=1,
               mesh=ej.parallel.make_mesh(4))
    other = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    with pytest.raises(ValueError, match="mesh: got axes \\('data',\\); expected a mesh with"):
        ej.make_step(alg, h.noisy_quadratic, mesh=other)
    with pytest.raises(ValueError, match="num_devices: got 9"):
        ej.parallel.make_mesh(9)


def test_no_host_round_trips_without_checks():
    alg = CONFIGS["message_passing_faults_top_k_ef"](4)
    p = h.params0()
    state = alg.init(p, 0)
    batch = _BATCH_FN(0, jax.random.split(jax.random.key(0), 4))
    plain = jax.jit(ej.make_step(alg, h.noisy_quadratic)).lower(state, batch).as_text()
    checked = jax.jit(ej.make_step(alg, h.noisy_quadratic, checks=True)).lower(
        state, batch).as_text()
    assert "callback" not in plain.lower()
    assert "callback" in checked.lower()


WORKER = textwrap.dedent('''
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    import elastic_jax as ej
    from jax.experimental import multihost_utils
    from tests import helpers as h
    from tests.test_parallel import CONFIGS, ROUNDS_MULTIPROCESS, multiprocess_batches
    alg = CONFIGS["async_inconsistent_top_k_ef"](4)
    mesh = ej.parallel.make_mesh()
    assert mesh.shape["workers"] == 4 and jax.process_count() == 2
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic, mesh=mesh, worker_loop="map"))
    state = ej.parallel.shard_state(alg.init(h.params0(), 0), mesh)
    batches = multiprocess_batches()
    for r in range(ROUNDS_MULTIPROCESS):
        # Each process feeds only its own workers' batches (2 of the 4).
        mine = jax.tree.map(lambda x: x[r, 2 * process_id: 2 * process_id + 2], batches)
        state, metrics = step(state, ej.parallel.shard_batches(mine, mesh))
    params = multihost_utils.process_allgather(ej.params(state), tiled=True)
    b_hat = multihost_utils.process_allgather(metrics["consistency/b_hat"], tiled=True)
    if process_id == 0:
        leaves = jax.tree.leaves(params)
        np.savez(out, b_hat=np.asarray(b_hat), **{f"p{i}": np.asarray(x)
                                                   for i, x in enumerate(leaves)})
''')

ROUNDS_MULTIPROCESS = 10


def multiprocess_batches():
    keys = jax.random.split(jax.random.key(7), ROUNDS_MULTIPROCESS * 4).reshape(
        ROUNDS_MULTIPROCESS, 4)
    return jax.vmap(lambda k: _BATCH_FN(0, k))(keys)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_reproduce_the_single_process_run(tmp_path):
    alg = CONFIGS["async_inconsistent_top_k_ef"](4)
    mesh = ej.parallel.make_mesh(4)
    step = jax.jit(ej.make_step(alg, h.noisy_quadratic, mesh=mesh, worker_loop="map"))
    state = alg.init(h.params0(), 0)
    batches = multiprocess_batches()
    for r in range(ROUNDS_MULTIPROCESS):
        state, metrics = step(state, ej.parallel.shard_batches(
            jax.tree.map(lambda x, r=r: x[r], batches), mesh))
    expected = jax.tree.leaves(ej.params(state))

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.npz"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=110)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    result = np.load(out)
    for i, x in enumerate(expected):
        np.testing.assert_array_equal(result[f"p{i}"], np.asarray(x))
    np.testing.assert_array_equal(result["b_hat"], np.asarray(metrics["consistency/b_hat"]))
