"""`ej.sweep` batched against one run after another: configurations x seeds per second.

    python -m benchmarks.sweep [--models mlp,cnn] [--learning-rates 0.02,0.05]
                               [--betas 0,1] [--seeds 3] [--rounds 16] [--repeats 5]

The measurement behind `ej.sweeps.choose_execution`'s rule. For each model (the
MLP and the small CNN on the digits, P = 8 workers, batch 32 per worker), a grid
of asynchronous SGD, inconsistent reads, max_delay 8, Top-1% with error
feedback, over learning rates x error-feedback damping `beta` (traced
hyperparameters of `ej.async_sgd`) x seeds, is run by `ej.sweep` both ways:
`execution="batched"` (one vmapped program) and `execution="sequential"` (one
`ej.run` after another). The first call of each (compilation included) is timed
apart; then each call continues the sweep by `--rounds` rounds (no new
compilation), timed `--repeats` times, the two executions interleaved. Reported:
the runs of the grid (configurations x seeds) times rounds per second, that is
seed-rounds per second, for each execution (medians), the batched one over the
sequential one (the median of the per-repeat ratios), and what `"auto"`
chose. Writes `sweep.md` and `sweep.json` to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax

import elastic_jax as ej
from benchmarks import problems, timing

NUM_WORKERS, MAX_DELAY = 8, 8


def make_algorithm(num_workers, learning_rate, beta):
    """The benchmarked variant, with its two swept hyperparameters."""
    return ej.async_sgd(learning_rate, num_workers, max(MAX_DELAY, num_workers - 1),
                        reads="inconsistent", compressor=ej.top_k(fraction=problems.FRACTION),
                        error_feedback=beta)


def measure_model(model: str, args) -> dict:
    problem = problems.make_problem(model, args.num_workers)
    make = functools.partial(make_algorithm, args.num_workers)
    grid = {"learning_rate": args.learning_rates, "beta": args.betas}
    seeds = list(range(args.seeds))
    runs = len(args.learning_rates) * len(args.betas) * len(seeds)

    def call(execution, start):
        result = ej.sweep(make, problem.loss_fn, start, grid, seeds=seeds,
                          batch_fn=problem.batch_fn, rounds=args.rounds, has_aux=True,
                          execution=execution)
        jax.block_until_ready(result.metrics)
        return result

    first, current = {}, {}
    for execution in ("batched", "sequential"):
        start = time.perf_counter()
        current[execution] = call(execution, problem.params)
        first[execution] = time.perf_counter() - start

    def timed(execution):
        def fn():
            current[execution] = call(execution, current[execution])
        return fn

    samples = timing.measure({e: timed(e) for e in ("batched", "sequential")},
                             repeats=args.repeats)
    rule = call("auto", current["batched"]).execution  # what the rule picks here
    per_s = {e: runs * args.rounds / timing.median(samples[e]) for e in samples}
    return {
        "model": model, "d": problem.d, "grid": grid, "seeds": len(seeds), "runs": runs,
        "rounds_per_call": args.rounds, "first_call_s": first,
        "seed_rounds_per_s": per_s,
        "batched_over_sequential": timing.paired_ratio(samples["sequential"],
                                                       samples["batched"]),
        "auto": rule, "samples_s": samples,
    }


def markdown(rows: list[dict], args) -> str:
    header = ["model", "d", "grid x seeds", "batched seed-rounds/s",
              "sequential seed-rounds/s", "batched / sequential", "first call: batched, "
              "sequential", "`auto` runs"]
    body = [[r["model"], f"{r['d']:,}",
             f"{len(r['grid']['learning_rate'])} x {len(r['grid']['beta'])} x {r['seeds']}",
             f"{r['seed_rounds_per_s']['batched']:,.1f}",
             f"{r['seed_rounds_per_s']['sequential']:,.1f}",
             f"{r['batched_over_sequential']:.2f}",
             f"{r['first_call_s']['batched']:.1f} s, {r['first_call_s']['sequential']:.1f} s",
             r["auto"]] for r in rows]
    return "\n".join([
        "# ej.sweep: batched against one run after another", "",
        f"Measured {timing.utc_now()}, commit {timing.git_commit()}; async SGD, inconsistent "
        f"reads, max_delay {MAX_DELAY}, Top-1% with error feedback, P = {args.num_workers}, "
        f"{args.rounds} rounds per call, {args.repeats} interleaved repeats (medians).", "",
        timing.markdown_table(header, body), ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--learning-rates", default="0.02,0.05")
    parser.add_argument("--betas", default="0,1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    try:
        args.learning_rates = tuple(float(x) for x in args.learning_rates.split(","))
        args.betas = tuple(float(x) for x in args.betas.split(","))
    except ValueError as e:
        print(f"--learning-rates, --betas: {e}", file=sys.stderr)
        return 2
    rows = []
    for model in args.models.split(","):
        rows.append(measure_model(model, args))
        print(f"[sweep] {model}: {rows[-1]['seed_rounds_per_s']}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"machine": timing.machine(), "results": rows}, f, indent=1)
    text = markdown(rows, args)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
