"""How a device evaluates its block of workers: the worker loops.

A device runs the views, the gradients and `local` for its block of workers
(all `P` on one device, `P / n` on a mesh of `n`). `worker_loop` says how:

- `"map"`: one `lax.scan` loop body, compiled once, whatever the block size: a
  worker's arithmetic is then identical on one device and on a mesh of any
  size (bitwise placement independence);
- `"unroll"`: a Python loop inside `jit` (fast on XLA:CPU for small blocks;
  XLA may fuse the copies differently for different block sizes);
- `"vmap"`: batched over the block (scales to hundreds of workers);
- `"auto"` (the default): the fastest measured for the loss and backend
  (`resolve`): on CPU, an unrolled loop for a convolutional loss (XLA:CPU
  lowers a convolution to its fast library call only outside loop bodies and
  without a batch of per-worker weights, which `vmap` would make a grouped
  convolution), in vmapped groups of 8 above 32 workers (an unrolled loop
  compiles slowly); `"vmap"` otherwise. benchmarks/README.md has the
  measurements.

They agree with one another to rounding, not bitwise.
"""

from __future__ import annotations

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

WORKER_LOOPS = ("auto", "map", "unroll", "vmap")

_CONV_PRIMITIVES = frozenset({"conv_general_dilated"})
_MAX_UNROLL = 32
_GROUP = 8


def primitives(jaxpr) -> set[str]:
    """The names of every primitive in a (closed) `jaxpr` and its sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr | jax_core.Jaxpr):
                    names |= primitives(sub)
    return names


def is_convolutional(loss_fn, has_aux: bool, view, batch) -> bool:
    """Whether `loss_fn`'s value-and-gradient at one worker's `view`, `batch` convolves.

    Traces the loss once on abstract values (shapes only; compiles nothing).
    """
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
    return bool(primitives(jax.make_jaxpr(vg)(view, batch)) & _CONV_PRIMITIVES)


def resolve(loop: str, *, convolutional: bool, block: int, platform: str) -> str:
    """The loop `"auto"` stands for (module docstring); any other `loop` is returned as is.

    Returns `"unroll"`, `"groups"` (unrolled vmapped groups of 8) or `"vmap"`
    for `"auto"`.
    """
    if loop != "auto":
        return loop
    if platform == "cpu" and convolutional:
        return "unroll" if block <= _MAX_UNROLL else "groups"
    return "vmap"


def map_workers(fn, indices, *trees, shared=None, loop: str = "map", vary=None):
    """`fn(index, *slices, shared)` over a block of workers, stacked on a leading axis.

    `loop` is `"map"`, `"unroll"`, `"vmap"` or `"groups"` (resolved already).
    `vary` (on a mesh) marks values as varying over the worker axis.
    """
    if loop == "map":
        return _scan_workers(fn, indices, trees, shared, vary or (lambda tree: tree))
    if loop == "vmap":
        return jax.vmap(lambda i, *xs: fn(i, *xs, shared))(indices, *trees)
    if loop == "groups":
        outs = []
        for lo in range(0, indices.shape[0], _GROUP):
            part = jax.tree.map(lambda x, lo=lo: x[lo:lo + _GROUP], (indices, trees))
            outs.append(jax.vmap(lambda i, *xs: fn(i, *xs, shared))(part[0], *part[1]))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
    if loop != "unroll":
        raise ValueError(f"worker_loop: got {loop!r}; expected one of {WORKER_LOOPS}")
    outs = []
    for j in range(indices.shape[0]):
        slices = [jax.tree.map(lambda x, j=j: x[j], t) for t in trees]
        outs.append(fn(indices[j], *slices, shared))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _scan_workers(fn, indices, trees, shared, vary):
    """`fn` over the block in one `lax.scan` body of at least two iterations.

    XLA inlines a loop of one iteration (one worker per device), which compiles
    the worker's arithmetic differently; padding to two iterations, the second
    skipped by a `lax.cond`, keeps one loop body for every block size.
    """
    block = indices.shape[0]

    def one(j):
        args = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False),
                            (indices, trees))
        return vary(fn(args[0], *args[1], shared))

    # Trace the worker's function once: its jaxpr serves the real branch.
    closed, shapes = jax.make_jaxpr(one, return_shape=True)(jnp.int32(0))
    treedef = jax.tree.structure(shapes)
    run_one = jax_core.jaxpr_as_fun(closed)

    def real(j):
        return jax.tree.unflatten(treedef, run_one(j))

    def skip(j):
        del j
        return vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def body(carry, j):
        return carry, jax.lax.cond(j < block, real, skip, j)

    _, outs = jax.lax.scan(body, None, jnp.arange(max(block, 2), dtype=jnp.int32))
    return jax.tree.map(lambda x: x[:block], outs)
