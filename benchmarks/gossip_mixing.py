"""The cost of gossip SGD's gathered mixing, at P = 64 on this backend.

    python -m benchmarks.gossip_mixing [--workers 64] [--dim 25290] [--repeats 15]

Every device runs `ej.gossip_sgd`'s `combine` on all `P` gathered models: the
mixing is a fold over each node's `K` neighbour slots (`P K d` multiply-adds;
`K` = 3 on the ring, 5 on the torus, 7 for the exponential graph at `P = 64`,
2 for one-peer graphs and matchings, `P` for the complete graph). This times
one jitted round (`ej.make_step`) of each topology beside `ej.sync_sgd`'s
round, whose `combine` only averages the `P` updates, on a linear loss (the
gradient is the batch, so the gradients cost almost nothing and the rounds
differ by their `combine`): the ratio to sync SGD is the price of gathered
mixing. Interleaved (`benchmarks.timing.measure`); medians. Writes
`gossip_mixing.md` to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

import elastic_jax as ej
from benchmarks import timing

TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "random_matching",
              "complete")


def linear(params, batch):
    return jnp.sum(params["w"] * batch)


def candidates(num_workers: int, dim: int) -> dict:
    """name -> (algorithm, neighbour slots K)."""
    out = {"sync_sgd": (ej.sync_sgd(0.05, num_workers), None)}
    for name in TOPOLOGIES:
        schedule = ej.topologies.mixing(name, num_workers)
        slots = 2 if schedule.matrices is None else max(
            ej.topologies.neighbours(w)[0].shape[1] for w in schedule.matrices)
        out[f"gossip {name}"] = (ej.gossip_sgd(0.05, num_workers, topology=name), slots)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--dim", type=int, default=25_290)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    params = {"w": jnp.zeros(args.dim, jnp.float32)}
    batch = jax.random.normal(jax.random.key(0), (args.workers, args.dim), jnp.float32)
    algs = candidates(args.workers, args.dim)
    calls = {}
    for name, (alg, _) in algs.items():
        step = jax.jit(ej.make_step(alg, linear))
        state = alg.init(params, 0)
        calls[name] = lambda step=step, state=state: step(state, batch)[0]
    load_before = timing.load_average()
    samples = timing.measure(calls, repeats=args.repeats)
    load_after = timing.load_average()
    rows = []
    for name, (_, slots) in algs.items():
        work = "" if slots is None else f"{args.workers * slots * args.dim:,}"
        rows.append([name, "" if slots is None else slots, work,
                     timing.fmt_time(timing.median(samples[name])),
                     f"{timing.paired_ratio(samples[name], samples['sync_sgd']):.2f}"])
    lines = [
        "# Gossip SGD: the cost of gathered mixing", "",
        f"- Date: {timing.utc_now()}; commit {timing.git_commit()}",
        f"- Machine: {timing.machine()}",
        f"- Load average (1 min): {load_before} before, {load_after} after",
        f"- P = {args.workers}, d = {args.dim}, float32, {args.repeats} interleaved repeats "
        "of one jitted round (`ej.make_step`) on a linear loss", "",
        timing.markdown_table(["round", "neighbour slots K", "mixing multiply-adds (P K d)",
                               "median time", "time / sync_sgd's (paired median)"], rows),
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gossip_mixing.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
