"""The worker axis on one device, across a mesh of devices, or across hosts.

Per-worker state and batches carry a leading worker axis of size `P`, the only
axis ever split across devices (docs/design.md, "Workers and devices"). On a mesh
with a `"workers"` axis of `n` devices, each device runs `local` for its block
of `P / n` workers under `jax.shard_map`, the messages are `all_gather`ed in
global worker order, and every device runs the same `combine` on the same
inputs: a fixed-order reduction over gathered messages, so with
`worker_loop="map"` 1, 2, 4 or 8 devices (or several hosts, after
`jax.distributed.initialize`) give bitwise the same result as one.
Randomness is keyed by the global worker index, never by the device.

Example:
  >>> mesh = ej.parallel.make_mesh(4)
  >>> step = jax.jit(ej.make_step(alg, loss_fn, mesh=mesh))
  >>> state = ej.parallel.shard_state(alg.init(params, key), mesh)
  >>> state, metrics = step(state, ej.parallel.shard_batches(batch, mesh))
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from elastic_jax import base, rounds

WORKER_AXIS = base.WORKER_AXIS


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh with a `"workers"` axis over `num_devices` devices (all by default).

    The axis is `AxisType.Auto`, so `shard_map` places its inputs itself.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devices)
    if not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"num_devices: got {num_devices!r}; expected an integer in [1, {len(devices)}]"
        )
    return Mesh(np.asarray(devices[:num_devices]), (WORKER_AXIS,), axis_types=(AxisType.Auto,))


def check_mesh(mesh, num_workers: int) -> int:
    """Checks a mesh for `num_workers` workers and returns its number of worker shards."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: got {type(mesh).__name__}; expected a jax.sharding.Mesh or None")
    if WORKER_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh: got axes {tuple(mesh.axis_names)}; expected a mesh with a {WORKER_AXIS!r} "
            "axis (ej.parallel.make_mesh builds one)"
        )
    shards = mesh.shape[WORKER_AXIS]
    if num_workers % shards:
        raise ValueError(
            f"num_workers: got {num_workers}; expected a multiple of the mesh's "
            f"{WORKER_AXIS!r} axis size {shards} (each device runs P / n workers)"
        )
    return shards


def _gather(tree):
    return jax.lax.all_gather(tree, WORKER_AXIS, tiled=True, to="invarying")


def _vary(tree):
    """Marks every leaf as varying over the worker axis (a no-op where it already is)."""

    def one(x):
        manual = getattr(jax.typeof(x), "manual_axis_type", None)
        if WORKER_AXIS in getattr(manual, "varying", frozenset()):
            return x
        return jax.lax.pcast(x, WORKER_AXIS, to="varying")

    return jax.tree.map(one, tree)


def sharded_round(alg: base.Algorithm, loss_fn, has_aux: bool, mesh: Mesh, loop: str = "map"):
    """The round body under `shard_map`: `(shared, workers, batch) -> (shared, workers, metrics)`.

    `loop` is a resolved worker loop (`ej.workers`).
    """
    shards = check_mesh(mesh, alg.num_workers)
    block = alg.num_workers // shards
    replicated, split = PartitionSpec(), PartitionSpec(WORKER_AXIS)

    def per_device(shared, workers, batch):
        first = jax.lax.axis_index(WORKER_AXIS) * block
        return rounds.round_body(alg, loss_fn, has_aux, shared, workers, batch, first, loop,
                                _gather, _vary)

    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(replicated, split, split),
        out_specs=(replicated, split, replicated),
    )
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)

    def body(shared, workers, batch):
        if explicit:
            shared = jax.tree.map(lambda x: jax.sharding.reshard(
                x, NamedSharding(mesh, replicated)), shared)
            workers, batch = jax.tree.map(lambda x: jax.sharding.reshard(
                x, NamedSharding(mesh, split)), (workers, batch))
        return mapped(shared, workers, batch)

    return body


def _place(x, sharding):
    """A global array from a full host copy of `x` (every process holds the same copy)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: base.State, mesh: Mesh) -> base.State:
    """Places `state`: shared arrays replicated, per-worker arrays split over `"workers"`.

    Every process passes the same full state (`alg.init` is deterministic);
    each keeps only what its devices hold. A placed array may share buffers
    with `state`'s.
    """
    leaves = jax.tree.leaves(state.workers)
    if leaves:
        check_mesh(mesh, leaves[0].shape[0])
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(WORKER_AXIS))
    shardings = state.replace(shared=jax.tree.map(lambda _: replicated, state.shared),
                              workers=jax.tree.map(lambda _: split, state.workers))
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)  # One batched transfer.
    return jax.tree.map(_place, state, shardings)  # New buffers, from the host copy.


def shard_batches(batches, mesh: Mesh, *, worker_axis: int = 0):
    """Places per-worker batches with their worker axis split over the mesh.

    On one process `batches` holds every worker's data (`[P, ...]`, or
    `[R, P, ...]` with `worker_axis=1`). On several processes each process
    passes only its own workers' data (its addressable devices' blocks, in
    global worker order), and the global array is assembled with
    `jax.make_array_from_process_local_data`.
    """
    spec = PartitionSpec(*([None] * worker_axis + [WORKER_AXIS]))
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(batches, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batches)
