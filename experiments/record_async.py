r"""A real asynchronous SGD run on this machine, recorded, then replayed by the clock.

    python -m experiments.record_async --workdir=DIR [--smoke]

`--workers` Python threads train a model of `experiments.models` on the bundled
digits, without waiting for one another: each computes a jitted gradient at the
model it read (on its own batch: worker `p`'s `g`-th batch is `batch_fn`'s with
the key `ej.clock.batch_keys` gives it), waits for it (`block_until_ready`),
sleeps its injected delay (`--delay_ms` times `1 + p`: a heterogeneous fleet, so
that reads go stale by more than one write even on two cores, where XLA:CPU's
pool already uses both and threads alone gain no parallelism), then, under one
lock, applies its update to the shared model with a jitted update, reads the
new model (a snapshot: JAX arrays are immutable) and starts again. Every
applied write is recorded (`events.json`): its writer, the writer's gradient
count, the version it read, the version it wrote, and the seconds at which it
read, had its gradient and was applied.

The record is then replayed through `ej.clock_async_sgd(system=ej.clock.replay(
events))` with `ej.run`, from the same initial model and base key: the replay
must end at the real run's final parameters (per leaf, `||delta|| / ||theta|| <=
1e-5`; the two compute the same gradients in programs fused differently) with
`b_hat <= bound` every round. Last, the measured seconds drive the simulator: each
worker's measured cycles (read to write) become a compute-time trace
(`ej.clock.trace`), and a clock-driven run of as many writes gives a loss curve
against simulated seconds, plotted with the real one (`loss_vs_seconds.png`).
`report.md` has the numbers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import studies
from experiments import workdir as workdir_lib
from experiments.flags import Flag

MODULE = "experiments.record_async"
TOLERANCE = 1e-5  # per leaf ||delta|| / ||theta|| between the replay and the real run
EVENTS = "events.json"
FLAGS = (
    Flag("workdir", "path", "", "Directory for events.json, report.md and the plot (created if "
         "missing; required)."),
    Flag("smoke", "bool", False, "Tiny sizes for CI (updates 40, workers 4) unless those flags "
         "are given."),
    Flag("workers", "int", 4, "Worker threads P.", 2, 64),
    Flag("updates", "int", 120, "Writes applied in all.", 1, 1_000_000),
    Flag("delay_ms", "float", 2.0, "Injected compute delay: worker p sleeps delay_ms (1 + p) "
         "milliseconds after each gradient.", 0.0, 10_000.0),
    Flag("model", "enum", "mlp", "Model on the digits.", choices=("mlp", "cnn")),
    Flag("learning_rate", "float", 0.05, "Learning rate eta (constant).", 0.0, 100.0,
         lo_open=True),
    Flag("batch_size", "int", 16, "Samples per gradient.", 1, 65_536),
    Flag("seed", "int", 0, "Seed of the model, the data split and the batches.", 0, 2**31 - 1),
)
SMOKE = {"updates": 40, "workers": 4}


class Setup(NamedTuple):
    """What the real run and its replay share."""

    loss_fn: Any  # (params, batch) -> (loss, aux)
    batch_fn: Any  # (round, worker_keys [P]) -> batch [P, ...]
    params: Any  # the initial model
    key: Any  # the base key (the algorithm's, as ej.run derives the batch keys from it)


def setup(model: str, workers: int, batch_size: int, seed: int) -> Setup:
    """The digits, split over `workers`, the model and its initial parameters."""
    ds = data_lib.load_dataset("digits")
    shards = data_lib.partition(ds.y_train, workers, kind="iid", seed=seed)
    batch_fn = data_lib.make_batch_fn(ds.x_train, ds.y_train, *shards, batch_size=batch_size)
    module, init_params = models_lib.make_model(model, ds.num_classes, ds.x_train.shape[1:])
    base = jax.random.key(seed)
    return Setup(models_lib.classification_loss(module), batch_fn,
                 init_params(jax.random.fold_in(base, 0)), jax.random.fold_in(base, 1))


def record(s: Setup, *, workers: int, updates: int, delay_ms: float,
           learning_rate: float) -> tuple[list[dict], Any]:
    """Runs real asynchronous SGD in `workers` threads; returns the events and final model."""
    grad_fn = jax.jit(jax.grad(s.loss_fn, has_aux=True))
    # The library's update: u = eta g in the parameters' dtype (ej.sgd), then x - u.
    update_fn = jax.jit(lambda x, g: jax.tree.map(
        lambda xi, gi: xi - jnp.asarray(learning_rate).astype(gi.dtype) * gi, x, g))

    @jax.jit
    def batch_of(count, worker):
        # Worker `worker`'s batch for its gradient `count`, as ej.run samples it.
        keys = ej.clock.batch_keys(s.key, jnp.full((workers,), count))
        return jax.tree.map(lambda x: x[worker], s.batch_fn(count, keys))

    # Compile before the clock starts.
    jax.block_until_ready(update_fn(s.params, grad_fn(s.params, batch_of(0, 0))[0]))
    lock = threading.Lock()
    shared = {"params": s.params, "version": 0}
    events: list[dict] = []
    start = time.perf_counter()

    def worker(p: int) -> None:
        with lock:
            params, read, read_s = shared["params"], shared["version"], time.perf_counter()
        count = 0
        while True:
            grad, _ = grad_fn(params, batch_of(count, p))
            jax.block_until_ready(grad)
            computed_s = time.perf_counter()
            time.sleep(delay_ms * (1 + p) / 1000.0)
            with lock:
                if shared["version"] >= updates:
                    return
                shared["params"] = jax.block_until_ready(update_fn(shared["params"], grad))
                shared["version"] += 1
                now = time.perf_counter()
                events.append({"writer": p, "count": count, "read": read,
                               "written": shared["version"], "read_s": read_s - start,
                               "computed_s": computed_s - start, "written_s": now - start})
                # The worker reads right after its own write, before any other write.
                params, read, read_s = shared["params"], shared["version"], now
            count += 1

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return events, shared["params"]


def replay(s: Setup, events: list[dict], *, workers: int, learning_rate: float):
    """`(alg, final state, metrics)` of the record replayed by clock-driven async SGD."""
    alg = ej.clock_async_sgd(learning_rate, workers, system=ej.clock.replay(events))
    state, metrics = ej.run(alg, s.loss_fn, alg.init(s.params, s.key), batch_fn=s.batch_fn,
                            rounds=alg.info.max_rounds, has_aux=True, checks=True)
    return alg, state, metrics


def relative_differences(a, b) -> list[float]:
    """Per leaf `||a - b|| / ||b||`."""
    return [float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                  / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]


def measured_system(events: list[dict], workers: int, rounds: int) -> ej.clock.System:
    """Each worker's measured cycles (read to write) as a compute-time trace.

    A worker's gradients beyond those it wrote take its mean cycle.
    """
    cycles = [[e["written_s"] - e["read_s"] for e in events if e["writer"] == p]
              for p in range(workers)]
    length = 4 * max(len(c) for c in cycles) + 8
    table = np.array([c + [float(np.mean(c)) if c else 0.0] * (length - len(c))
                      for c in cycles]).T
    return ej.clock.system(ej.clock.trace(table), rounds=rounds)


def simulate(s: Setup, events: list[dict], *, workers: int, learning_rate: float):
    """A clock-driven run driven by the measured seconds, as many writes as the record."""
    steps = 1
    while True:  # the fewest steps that apply at least as many writes as the record
        system = measured_system(events, workers, steps)
        alg = ej.clock_async_sgd(learning_rate, workers, system=system)
        if ej.clock.times(alg, s.params)["updates"][-1] >= len(events):
            break
        steps *= 2
    times = ej.clock.times(alg, s.params)
    rounds = int(np.searchsorted(times["updates"], len(events)) + 1)
    alg = ej.clock_async_sgd(learning_rate, workers,
                             system=measured_system(events, workers, rounds))
    _, metrics = ej.run(alg, s.loss_fn, alg.init(s.params, s.key), batch_fn=s.batch_fn,
                        rounds=rounds, has_aux=True)
    return metrics


def plot(path: str, real, simulated, title: str) -> str:
    fig, axes = studies.figure(1, 1, (7.0, 4.6))
    ax = axes[0, 0]
    ax.plot(real["time/elapsed"], real["loss"], ".-", label="real run (replayed: its seconds)")
    ax.plot(simulated["time/elapsed"], simulated["loss"], ".-",
            label="clock-driven simulation from the measured cycles")
    ax.set_xlabel("seconds")
    ax.set_ylabel("training loss at the workers' views")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return studies.save_figure(fig, path)


def run(s, invocation=None) -> str:
    t0 = time.perf_counter()
    prepared = setup(s.model, s.workers, s.batch_size, s.seed)
    events, real = record(prepared, workers=s.workers, updates=s.updates,
                          delay_ms=s.delay_ms, learning_rate=s.learning_rate)
    with workdir_lib.writing(s.workdir):
        with workdir_lib.atomic_open(os.path.join(s.workdir, EVENTS)) as f:
            json.dump(events, f)
    alg, state, metrics = replay(prepared, events, workers=s.workers,
                                 learning_rate=s.learning_rate)
    differences = relative_differences(ej.model(state), real)
    simulated = simulate(prepared, events, workers=s.workers, learning_rate=s.learning_rate)
    lags = np.array([e["written"] - 1 - e["read"] for e in events])
    title = (f"asynchronous SGD, {s.workers} threads, {s.model} on digits, injected delays "
             f"{s.delay_ms:g} ms x (1 + p)")
    with workdir_lib.writing(s.workdir):
        plot(os.path.join(s.workdir, "loss_vs_seconds.png"), metrics, simulated, title)
    writes = np.bincount([e["writer"] for e in events], minlength=s.workers)
    ok = max(differences) <= TOLERANCE
    bound = np.asarray(metrics["consistency/bound"])
    ratio = np.max(np.asarray(metrics["consistency/b_hat"])[bound > 0] / bound[bound > 0],
                   initial=0.0)
    lines = studies.header("A real asynchronous run, recorded and replayed", MODULE, FLAGS, s,
                           invocation, time.perf_counter() - t0)
    lines += [
        "## The record", "",
        f"{len(events)} writes in {events[-1]['written_s']:.3f} s; writes per worker "
        f"{', '.join(map(str, writes))}; lags (writes between a read and its write): mean "
        f"{lags.mean():.2f}, largest {lags.max()}, histogram "
        f"{', '.join(f'{n}: {c}' for n, c in enumerate(np.bincount(lags)))}.", "",
        "## The replay", "",
        f"`ej.clock_async_sgd` replayed the {len(events)} writes in {alg.info.max_rounds} "
        f"steps (masked-slot fraction {np.mean(metrics['updates/masked_fraction']):.2f}). "
        f"Per leaf ||replay - real|| / ||real||: largest {max(differences):.2e} "
        f"({'within' if ok else 'BEYOND'} the tolerance {TOLERANCE:g}). b_hat <= bound held "
        f"in every step (checked); the largest b_hat / bound was {ratio:.3g} (over the "
        "steps with a bound > 0).", "",
        "## The simulation", "",
        f"Driven by each worker's measured read-to-write cycles, the clock-driven run took "
        f"{simulated['time/elapsed'][-1]:.3f} simulated seconds for "
        f"{int(simulated['updates'][-1])} writes (the real run: "
        f"{events[-1]['written_s']:.3f} s); final training loss at the views "
        f"{simulated['loss'][-1]:.4f} (real {metrics['loss'][-1]:.4f}). "
        "`loss_vs_seconds.png` draws both curves.",
    ]
    return studies.write_report(s.workdir, lines)


def main(argv=None) -> None:
    studies.launch(__doc__, FLAGS, SMOKE, run, argv)


if __name__ == "__main__":
    main()
