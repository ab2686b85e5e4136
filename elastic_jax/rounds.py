"""One round: `local` over a device's workers, `combine` over the gathered messages.

`views` and `update` are the library functions a caller who evaluates the
gradients itself uses; `round_body` is what the drivers run for a loss, on one
device or (through `ej.parallel`) on each device of a mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from elastic_jax import base, consistency, workers


def views(alg: base.Algorithm, state: base.State):
    """The views `v_t^p` of every worker, stacked `[P, ...]` (any placement of `state`)."""
    state = base.replicated(state)
    idx = jnp.arange(alg.num_workers)
    return jax.vmap(alg.view, in_axes=(0, 0, None))(idx, state.workers, state.shared)


def local_half(alg: base.Algorithm, shared, worker_states, grads, indices, loop: str = "vmap",
               vary=None):
    """`alg.local` over a block of workers with global indices `indices`.

    Returns the new worker states and the messages, behind an optimisation
    barrier: XLA may not fuse a worker's computation into `combine`.
    """

    def one(index, worker, grad, shared):
        count = base.gradient_count(alg, shared, index)
        key = base.derive_key(shared.key, base.TAG_LOCAL, count, index)
        return alg.local(index, worker, grad, key, shared)

    out = workers.map_workers(one, indices, worker_states, grads, shared=shared, loop=loop,
                              vary=vary)
    return jax.lax.optimization_barrier(out)


def update(alg: base.Algorithm, state: base.State, grads):
    """One round from the caller's gradients `[P, ...]` (taken at `views(alg, state)`).

    Returns `(state, metrics)`. Maps `local` over the worker axis and hands the
    stacked messages, in global worker order, to `combine`, on one device.
    """
    idx = jnp.arange(alg.num_workers)
    worker_states, messages = local_half(alg, state.shared, state.workers, grads, idx)
    shared, metrics = alg.combine(state.shared, messages)
    return state.replace(shared=shared, workers=worker_states), metrics


def _identity(tree):
    return tree


def round_body(alg: base.Algorithm, loss_fn, has_aux: bool, shared, worker_states, batch,
               first_index, loop: str, gather=_identity, vary=_identity):
    """One round for a block of workers (all `P` on one device, or a device's share).

    Evaluates each worker's gradient at its view, runs `local`, gathers the
    messages in global worker order (`gather` is the identity on one device and
    an `all_gather` on a mesh) and runs `combine` on them. `loop` is a resolved
    worker loop (`workers.resolve`) for the gradients; the views and `local`
    follow it when it is `"map"` or `"unroll"`, and are vmapped otherwise.

    On a mesh, `vary` marks the views as varying across devices before they are
    differentiated: a view computed from replicated state alone (synchronous
    SGD) would otherwise have its gradient summed over devices.

    Returns:
      `(shared, worker_states, metrics)`; the metrics are the algorithm's plus
      `loss`, the mean over workers of the training loss at their views (and,
      with `has_aux` and a mapping as aux, `aux/<name>` means).
    """
    block = jax.tree.leaves(batch)[0].shape[0]
    indices = first_index + jnp.arange(block)
    side = loop if loop in ("map", "unroll") else "vmap"
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def gradient(index, view, batch, shared):
        del index, shared
        if has_aux:
            (loss, aux), grad = vg(view, batch)
        else:
            (loss, grad), aux = vg(view, batch), None
        return loss, aux, grad

    view_stack = vary(workers.map_workers(alg.view, indices, worker_states, shared=shared,
                                          loop=side, vary=vary))
    losses, aux, grads = workers.map_workers(gradient, indices, view_stack, batch, loop=loop,
                                             vary=vary)
    worker_states, messages = local_half(alg, shared, worker_states, grads, indices, loop=side,
                                         vary=vary)
    messages, losses, aux = gather((messages, losses, aux))
    shared, metrics = alg.combine(shared, messages)
    metrics = dict(metrics)
    metrics["loss"] = consistency.worker_mean(losses)
    if isinstance(aux, Mapping):
        for name, value in aux.items():
            if jnp.ndim(value) == 1:
                metrics[f"aux/{name}"] = consistency.worker_mean(value)
    return shared, worker_states, metrics
