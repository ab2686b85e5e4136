"""Alternative round structures, built from the public API only (`ej.views`, `ej.update`).

`ej.make_step` evaluates the `P` per-worker gradients with one `jax.vmap` over
the stacked views and `ej.run` loops in Python over one jitted round. This
module rebuilds the same round with other structures, so the benchmarks can
measure what `elastic_jax/core.py` should adopt:

- `value_and_grads(loss_fn, P, structure)`: how the `P` gradients are formed:
  `"vmap"` (core.py today), `"unrolled"` (a Python `for` over workers inside
  `jit`), `"map"` (`lax.map`), `"hybrid:c"` (an unrolled loop over groups of
  `c` workers, `vmap` inside a group), `"shared"` (one `vmap` over the batch at a
  single shared view, for algorithms whose views are all equal);
- `make_step(alg, loss_fn, grads=...)`: `ej.make_step` with that structure
  (same metrics, same order of operations otherwise);
- `make_runner(...)`: the loop: a Python loop over the jitted round (with or
  without donated buffers) or jitted chunks of `K` rounds (`lax.scan` or unrolled
  inside the chunk), returning the final state and stacked metrics like `ej.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

import elastic_jax as ej
from benchmarks.problems import data_keys

STRUCTURES = ("vmap", "unrolled", "map", "shared")


def _split_loss(loss_fn, has_aux):
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def one(view, batch):
        if has_aux:
            (loss, aux), grad = vg(view, batch)
        else:
            (loss, grad), aux = vg(view, batch), None
        return loss, aux, grad

    return one


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def value_and_grads(loss_fn: Callable, num_workers: int, structure: str, *, has_aux=True):
    """`(views [P, ...], batch [P, ...]) -> (losses [P], aux, grads [P, ...])`.

    Args:
      loss_fn: `(params, batch) -> loss` or `(loss, aux)`.
      num_workers: `P`.
      structure: `"vmap"`, `"unrolled"`, `"map"`, `"shared"` or `"hybrid:c"`
        (`c` workers per `vmap` group, groups unrolled; `c` divides `P`).
      has_aux: whether `loss_fn` returns `(loss, aux)`.
    """
    one = _split_loss(loss_fn, has_aux)
    if structure == "vmap":
        return jax.vmap(one)
    if structure == "shared":

        def shared(views, batch):
            # Every view is the same array: evaluate at view 0 and vmap over batches only.
            return jax.vmap(one, in_axes=(None, 0))(_take(views, 0), batch)

        return shared
    if structure == "unrolled":

        def unrolled(views, batch):
            outs = [one(_take(views, p), _take(batch, p)) for p in range(num_workers)]
            return _stack(outs)

        return unrolled
    if structure == "map":
        return lambda views, batch: jax.lax.map(lambda vb: one(*vb), (views, batch))
    if structure.startswith("hybrid:"):
        group = int(structure.split(":")[1])
        if num_workers % group:
            raise ValueError(f"structure: group {group} does not divide P = {num_workers}")

        def hybrid(views, batch):
            outs = []
            for start in range(0, num_workers, group):
                sl = slice(start, start + group)
                outs.append(jax.vmap(one)(jax.tree.map(lambda x, sl=sl: x[sl], views),
                                          jax.tree.map(lambda x, sl=sl: x[sl], batch)))
            return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

        return hybrid
    raise ValueError(f"structure: got {structure!r}; expected one of {STRUCTURES} or 'hybrid:c'")


def make_step(alg: ej.Algorithm, loss_fn: Callable, *, grads: str = "vmap", has_aux=True):
    """`ej.make_step` with the per-worker gradients formed by `grads` (a structure)."""
    grads_fn = value_and_grads(loss_fn, alg.num_workers, grads, has_aux=has_aux)

    def step(state, batch):
        # The named scopes label the ops in profiles (benchmarks.profile_round).
        with jax.named_scope("views"):
            views = ej.views(alg, state)
        with jax.named_scope("grads"):
            losses, aux, g = grads_fn(views, batch)
        with jax.named_scope("update"):
            new_state, metrics = ej.update(alg, state, g)
        metrics = dict(metrics)
        metrics["loss"] = jnp.mean(losses)
        if isinstance(aux, Mapping):
            for name, value in aux.items():
                if jnp.ndim(value) == 1:
                    metrics[f"aux/{name}"] = jnp.mean(value)
        return new_state, metrics

    return step


def make_sampled_step(alg, loss_fn, batch_fn, *, grads="vmap", has_aux=True):
    """The round with its batch sampled on the device, as `ej.run(batch_fn=...)` does."""
    step = make_step(alg, loss_fn, grads=grads, has_aux=has_aux)

    def sampled(state):
        with jax.named_scope("sample"):
            batch = batch_fn(state.shared.round, data_keys(state, alg.num_workers))
        return step(state, batch)

    return sampled


def make_runner(alg, loss_fn, batch_fn, *, grads="vmap", loop="python", chunk=1, donate=True,
                has_aux=True):
    """A driver `run(state, rounds) -> (state, metrics [rounds])` like `ej.run(batch_fn=...)`.

    Args:
      loop: `"python"` (a Python loop over one jitted round), `"scan"` (jitted
        chunks of `chunk` rounds as a `lax.scan`), or `"unrolled"` (jitted chunks
        of `chunk` rounds unrolled inside `jit`). `rounds` must be a multiple of
        `chunk`.
      donate: donate the state's buffers to the jitted round/chunk.
    """
    sampled = make_sampled_step(alg, loss_fn, batch_fn, grads=grads, has_aux=has_aux)
    donate_argnums = (0,) if donate else ()
    if loop == "python":
        fn = jax.jit(sampled, donate_argnums=donate_argnums)
        chunk = 1
    elif loop == "scan":
        fn = jax.jit(lambda s: jax.lax.scan(lambda c, _: sampled(c), s, None, length=chunk),
                     donate_argnums=donate_argnums)
    elif loop == "unrolled":

        def unrolled_chunk(state):
            history = []
            for _ in range(chunk):
                state, metrics = sampled(state)
                history.append(metrics)
            return state, _stack(history)

        fn = jax.jit(unrolled_chunk, donate_argnums=donate_argnums)
    else:
        raise ValueError(f"loop: got {loop!r}; expected 'python', 'scan' or 'unrolled'")

    stack = jax.jit(lambda hs: _stack(hs) if chunk == 1 else jax.tree.map(
        lambda *xs: jnp.concatenate(xs), *hs))

    def run(state, rounds):
        if rounds % chunk:
            raise ValueError(f"rounds: got {rounds}; expected a multiple of chunk = {chunk}")
        if donate:
            state = jax.tree.map(jnp.copy, state)
        history = []
        for _ in range(rounds // chunk):
            state, metrics = fn(state)
            history.append(metrics)
        return state, stack(history)

    run.compiled = fn
    return run
