"""The benchmark suite: every algorithm on the MLP and the small CNN, in one process.

    python -m benchmarks.run [--quick] [--out benchmarks/results] [--models mlp,cnn]
                             [--variants sync,async_topk_ef,...] [--no-torch]
                             [--background-load N]

For each model and variant (P = 8, batch 32 per worker, max_delay 8, Top-1%), all
measured interleaved (see `benchmarks.timing`), JAX in this process:

- `ej.run` rounds/s after compilation: the default (`loop="auto"`,
  `worker_loop="auto"`), jitted chunks of rounds (`loop="chunks"`), and the
  Python loop over one jitted round with each `worker_loop` (`"map"`,
  `"unroll"`, `"vmap"`), and each one's compile time (the first call minus a
  steady round);
- the floor: the same `P` gradient evaluations at the same views and nothing
  else, jitted, as `vmap` and as an unrolled loop, each call waiting for the
  previous one as rounds do (`_chained`); the floor is the faster;
- plain `optax.sgd` on the mean gradient (one gradient of the mean loss over
  all `P b` examples, the batch sampled inside the jitted step);
- the eager PyTorch simulation of `benchmarks.torch_sim`, each row in a process
  of its own (`benchmarks.torch_worker`), as a PyTorch script runs: one with
  PyTorch's default intra-op thread count, one with one thread. Each child times
  its own rounds while this process waits on the pipe, in turn with the other
  candidates of each repetition. Skipped, with the reason, where torch is absent;
- ratios: round / floor, elastic_jax / optax, elastic_jax / PyTorch (rounds/s,
  against each PyTorch row), the share of Top-k in the round (the `P`
  compressions timed alone), and the bytes of the state pytree;
- the simulated clock (`ej.clock`, unless `--no-clock`), per model: synchronous
  SGD with and without a system model (exponential compute times, a 5x
  straggler, a network), interleaved, whose ratio is the clock's cost (the
  project's target: at most 5% on the small CNN), and clock-driven asynchronous
  SGD (`ej.clock_async_sgd`, exponential compute times) against the round
  model (`ej.async_sgd`, consistent reads): its masked-slot fraction and its
  seconds per applied update against the round model's per update.

The date, the git commit and the 1-minute load average before and after the
run are recorded, the load also before and after each variant, and
each ratio to the floor comes with the quartiles of its per-repeat values. The
ratios depend on the machine's load (the floor's convolutions use both cores,
most of the algorithm's work one): `--background-load N` runs `N` busy
processes while measuring, to reproduce a loaded machine.

Writes `results.md` and `results.json` to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import elastic_jax as ej
from benchmarks import problems, proposal, timing, torch_worker

TARGET_PLAIN = 1.15  # round / floor without compression
TARGET_TOPK = 1.3  # round / floor with Top-1%
TARGET_TORCH = 1.5  # small-CNN async Top-1% error feedback: rounds/s over PyTorch's
TARGET_CLOCK = 1.05  # small-CNN sync round with the simulated clock over without
# The elastic_jax / PyTorch fields of each PyTorch row (rounds/s of the fastest
# `ej.run` configuration; the same with `_default_loop` for the default one).
TORCH_FIELDS = {torch_worker.ROW_DEFAULT: "speedup_over_pytorch",
                torch_worker.ROW_ONE_THREAD: "speedup_over_pytorch_1thread"}


def worker_loops_supported() -> tuple[str, ...]:
    """`ej.workers.WORKER_LOOPS`, the default (`"auto"`) first."""
    return tuple(ej.workers.WORKER_LOOPS)


def run_configs() -> tuple[str, ...]:
    """The `ej.run` configurations `run.py` times, the default first.

    `"auto"` is `ej.run`'s default (`loop="auto"`, `worker_loop="auto"`);
    `"chunks"` forces jitted chunks of rounds (`loop="chunks"`); `"map"`,
    `"unroll"` and `"vmap"` are the Python loop with that `worker_loop`.
    """
    return ("auto", "chunks") + tuple(loop for loop in ej.workers.WORKER_LOOPS if loop != "auto")


def _ej_run(alg, problem, state, rounds, spec):
    if spec == "auto":
        kwargs = {}
    elif spec == "chunks":
        kwargs = {"loop": "chunks"}
    else:
        kwargs = {"loop": "python", "worker_loop": spec}
    return lambda: ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn, rounds=rounds,
                          has_aux=True, **kwargs)


def _optax_runner(problem, rounds):
    """Plain `optax.sgd` on the gradient of the mean loss over the `P b` sampled examples."""
    tx = optax.sgd(problems.LEARNING_RATE)
    num_workers = problem.num_workers

    def step(carry):
        params, opt_state, round_ = carry
        keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(
            jax.random.key(0), round_), p))(jnp.arange(num_workers))
        batch = problem.batch_fn(round_, keys)
        flat = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), batch)
        (loss, _), grads = jax.value_and_grad(problem.loss_fn, has_aux=True)(params, flat)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, round_ + 1), loss

    jitted = jax.jit(step, donate_argnums=0)

    def run():
        carry = jax.tree.map(jnp.copy, (problem.params, tx.init(problem.params),
                                        jnp.zeros((), jnp.int32)))
        losses = []
        for _ in range(rounds):
            carry, loss = jitted(carry)
            losses.append(loss)
        return carry, losses

    return run


def _chained(fn):
    """`fn(views, batch)` that waits for the previous call: the smallest view
    leaf gets `0 * c`, `c` the previous call's first loss. Rounds are sequential;
    independent calls of a small model overlapped on the two cores here (MLP:
    0.24 ms a call independent, 0.27 ms chained), which no round can do."""

    def one(views, batch, c):
        leaves, treedef = jax.tree.flatten(views)
        i = min(range(len(leaves)), key=lambda j: leaves[j].size)
        leaves[i] = leaves[i] + (0 * c).astype(leaves[i].dtype)
        out = fn(treedef.unflatten(leaves), batch)
        return out, out[0][0]

    return jax.jit(one)


class _Floor:
    """The `P` gradients alone, jitted once per model (shapes do not depend on the variant)."""

    def __init__(self, problem):
        self.vmap = jax.jit(proposal.value_and_grads(problem.loss_fn, problem.num_workers,
                                                     "vmap"))
        self.chained = {s: _chained(proposal.value_and_grads(problem.loss_fn,
                                                             problem.num_workers, s))
                        for s in ("vmap", "unrolled")}

    def fns(self, views, batch, rounds):
        def loop(fn):
            def go():
                c = jnp.zeros((), jnp.float32)
                for _ in range(rounds):
                    out, c = fn(views, batch, c)
                return out

            return go

        return {"floor: vmap": loop(self.chained["vmap"]),
                "floor: unrolled": loop(self.chained["unrolled"])}


def _torch_fns(torch_procs, problem, variant, *, rounds, max_delay, fraction, seed):
    """Row -> callable returning the `SelfTimed` seconds of `rounds` rounds in that row's
    process, each process's simulation built for this configuration first."""
    if problem.data is None:
        return {}
    fns = {}
    for row, proc in torch_procs.items():
        proc.build(problem.name, variant.name, problem.data, num_workers=problem.num_workers,
                   max_delay=max_delay, fraction=fraction, batch_size=problem.batch_size,
                   seed=seed)
        fns[row] = lambda proc=proc: timing.SelfTimed(proc.time(rounds))
    return fns


def _torch_ratios(samples, best, default):
    """The `TORCH_FIELDS` of the PyTorch rows measured: elastic_jax's rounds/s over
    PyTorch's, for the fastest and the default `ej.run` configuration."""
    out = {}
    for row, field in TORCH_FIELDS.items():
        if row in samples:
            out[field] = timing.paired_ratio(samples[row], samples[best])
            out[f"{field}_default_loop"] = timing.paired_ratio(samples[row], samples[default])
    return out


def bench_variant(problem, variant, floor, optax_run, *, rounds, repeats, max_delay, fraction,
                  worker_loops, torch_procs, seed=0):
    """Measures one (model, variant); returns a JSON-able dict.

    `torch_procs` maps PyTorch rows to their `torch_worker.TorchProcess` (empty:
    no PyTorch rows).
    """
    num_workers = problem.num_workers
    alg = variant.make(num_workers, max_delay, fraction)
    state = alg.init(problem.params, jax.random.key(seed))
    _, views, batch = problems.sample_views_and_batch(alg, problem, rounds=0, seed=seed)
    grads = floor.vmap(views, batch)[2]

    load_before = timing.load_average()
    fns, first_call = {}, {}
    for loop in worker_loops:
        name = f"ej.run[{loop}]"
        start = time.perf_counter()
        timing.block(_ej_run(alg, problem, state, 1, loop)())
        first_call[name] = time.perf_counter() - start
        fns[name] = _ej_run(alg, problem, state, rounds, loop)
    fns.update(floor.fns(views, batch, rounds))
    fns["optax.sgd"] = optax_run
    if variant.compressed:
        compress = ej.top_k(fraction=fraction).spec.compress
        topk = jax.jit(jax.vmap(lambda g: compress(g, None)))
        fns["top-k alone"] = lambda: [topk(grads) for _ in range(rounds)][-1]
    fns.update(_torch_fns(torch_procs, problem, variant, rounds=rounds, max_delay=max_delay,
                          fraction=fraction, seed=seed))
    samples = timing.measure(fns, repeats=repeats)

    per_round = {k: timing.median(v) / rounds for k, v in samples.items()}
    floors = (samples["floor: vmap"], samples["floor: unrolled"])
    ej_names = [f"ej.run[{loop}]" for loop in worker_loops]
    best = min(ej_names, key=lambda k: per_round[k])
    default = ej_names[0]
    result = {
        "model": problem.name, "variant": variant.name, "description": variant.description,
        "compressed": variant.compressed, "d": problem.d,
        "per_round_s": per_round,
        "rounds_per_s": {k: 1.0 / v for k, v in per_round.items()},
        "compile_s": {k: max(first_call[k] - per_round[k], 0.0) for k in ej_names},
        "floor_s": min(per_round["floor: vmap"], per_round["floor: unrolled"]),
        "round_over_floor": {k: timing.paired_min_ratio(samples[k], *floors) for k in ej_names},
        # The 25th and 75th percentiles of the per-repeat ratios: the spread of one run.
        "round_over_floor_quartiles": {
            k: timing.quartiles(timing.paired_min_ratios(samples[k], *floors)) for k in ej_names},
        "round_over_floor_vmap": {k: timing.paired_ratio(samples[k], samples["floor: vmap"])
                                  for k in ej_names},
        "default_loop": default,
        "best_loop": best,
        "ej_over_optax": timing.paired_ratio(samples[best], samples["optax.sgd"]),
        "state_bytes": timing.tree_bytes(state),
        "param_bytes": timing.tree_bytes(problem.params),
        "load_average": [load_before, timing.load_average()],
    }
    if variant.compressed:
        result["topk_share_of_round"] = timing.paired_ratio(samples["top-k alone"],
                                                            samples[best])
    result.update(_torch_ratios(samples, best, default))
    return result


def bench_clock(problem, *, rounds, repeats, max_delay, seed=0):
    """The clock's cost on a round, and clock-driven async against the round model.

    Four `ej.run` configurations (the default loops), interleaved: sync SGD
    without and with a system model, `ej.async_sgd` (consistent reads, uniform
    lags up to `max_delay`) and `ej.clock_async_sgd` on exponential compute
    times (no cap). Returns a JSON-able dict.
    """
    p = problem.num_workers
    horizon = 4 * rounds + 8  # every timed call starts from the same state
    straggler = ej.clock.system(ej.clock.exponential(0.05), rounds=horizon,
                                slowdown=[1.0] * (p - 1) + [5.0],
                                network=ej.clock.network(1e-4, 1e9))
    speeds = ej.clock.system(ej.clock.exponential(0.05), rounds=horizon)
    algs = {
        "sync": ej.sync_sgd(problems.LEARNING_RATE, p),
        "sync + clock": ej.sync_sgd(problems.LEARNING_RATE, p, system=straggler),
        "async_sgd (round model)": ej.async_sgd(problems.LEARNING_RATE, p, max(max_delay, p - 1),
                                                reads="consistent"),
        "clock_async_sgd": ej.clock_async_sgd(problems.LEARNING_RATE, p, system=speeds),
    }
    fns, states = {}, {}
    for name, alg in algs.items():
        states[name] = alg.init(problem.params, jax.random.key(seed))
        timing.block(_ej_run(alg, problem, states[name], 1, "auto")())  # compile
        fns[name] = _ej_run(alg, problem, states[name], rounds, "auto")
    samples = timing.measure(fns, repeats=repeats)
    per_round = {k: timing.median(v) / rounds for k, v in samples.items()}
    times = ej.clock.times(algs["clock_async_sgd"], problem.params)
    updates_per_step = float(times["updates"][rounds - 1]) / rounds
    return {
        "model": problem.name, "d": problem.d, "per_round_s": per_round,
        "clock_over_plain": timing.paired_ratio(samples["sync + clock"], samples["sync"]),
        "masked_slot_fraction": float(np.mean(times["updates/masked_fraction"][:rounds])),
        "updates_per_step": updates_per_step,
        "per_update_s": {"async_sgd (round model)": per_round["async_sgd (round model)"] / p,
                         "clock_async_sgd": per_round["clock_async_sgd"] / updates_per_step},
    }


def _clock_lines(clock) -> list[str]:
    if not clock:
        return []
    header = ["model", "sync rounds/s", "sync + clock rounds/s", "clock / plain time",
              "async_sgd s / update", "clock_async_sgd s / update", "clock / round model",
              "masked slots", "updates / step"]
    body = []
    for c in clock:
        per_update = c["per_update_s"]
        round_model, clocked = per_update["async_sgd (round model)"], per_update["clock_async_sgd"]
        body.append([c["model"], _fmt_rate(c["per_round_s"]["sync"]),
                     _fmt_rate(c["per_round_s"]["sync + clock"]), f"{c['clock_over_plain']:.3f}",
                     timing.fmt_time(round_model), timing.fmt_time(clocked),
                     f"{clocked / round_model:.2f}", f"{c['masked_slot_fraction']:.2f}",
                     f"{c['updates_per_step']:.2f}"])
    return ["## The simulated clock", "",
            "Sync SGD with a system model (exponential compute times of mean 0.05 s, one 5x "
            "straggler, 1e-4 s + bits / 1e9 bit/s) against without it; clock-driven async SGD "
            "(exponential compute times, no cap) against the round model (consistent reads, "
            "uniform lags), per applied update. Interleaved, medians.", "",
            timing.markdown_table(header, body), ""]


def _targets(results, clock=()):
    """Which of the performance targets the measured numbers meet."""
    out = []
    for c in clock:
        if c["model"] == "cnn":
            out.append({"target": f"clock adds <= {100 * (TARGET_CLOCK - 1):.0f}% to a round",
                        "model": "cnn", "variant": "sync + clock", "loop": "ej.run[auto]",
                        "value": c["clock_over_plain"],
                        "met": c["clock_over_plain"] <= TARGET_CLOCK})
    for r in results:
        limit = TARGET_TOPK if r["compressed"] else TARGET_PLAIN
        for loop in dict.fromkeys((r["default_loop"], r["best_loop"])):
            ratio = r["round_over_floor"][loop]
            out.append({
                "target": f"round <= {limit}x floor", "model": r["model"],
                "variant": r["variant"], "loop": loop, "value": ratio, "met": ratio <= limit,
                "quartiles": r["round_over_floor_quartiles"][loop],
            })
    for r in results:
        if r["model"] == "cnn" and r["variant"] == "async_topk_ef" and (
                "speedup_over_pytorch" in r):
            pairs = [("speedup_over_pytorch_default_loop", r["default_loop"])]
            if r["best_loop"] != r["default_loop"]:
                pairs.append(("speedup_over_pytorch", r["best_loop"]))
            for key, loop in pairs:
                out.append({
                    "target": f">= {TARGET_TORCH}x PyTorch rounds/s (own process, default "
                              "threads)", "model": "cnn",
                    "variant": "async_topk_ef", "loop": loop, "value": r[key],
                    "met": r[key] >= TARGET_TORCH,
                })
    return out


def _fmt_rounds(rounds: dict) -> str:
    """`32 (mlp), 8 (cnn)`: the rounds per timed sample of each model."""
    return ", ".join(f"{n} ({m})" for m, n in rounds.items())


def _fmt_loads(results) -> str:
    """`a to b` over every variant's readings (before and after it was measured)."""
    loads = [x for r in results for x in r.get("load_average", []) if x is not None]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "n/a"


def _fmt_rate(seconds):
    return f"{1.0 / seconds:,.1f}"


def _fmt_load(load) -> str:
    return "n/a" if load is None else f"{load:.1f}"


def _torch_labels(report) -> dict[str, str]:
    """Row -> its column label, `own process, default 2 threads` / `own process, 1 thread`."""
    procs = report.get("torch_processes", {})
    labels = {}
    for row, threads in torch_worker.ROWS.items():
        n = procs.get(row, {}).get("threads")
        if threads is None:
            labels[row] = f"own process, default {n} threads" if n else "own process, default"
        else:
            labels[row] = f"own process, {threads} thread{'s' if threads != 1 else ''}"
    return labels


def _torch_header(report) -> list[str]:
    labels = _torch_labels(report)
    return ([f"PyTorch rounds/s ({labels[row]})" for row in TORCH_FIELDS]
            + [f"speedup vs PyTorch {labels[row]} (best)" for row in TORCH_FIELDS])


def _torch_cells(result) -> list[str]:
    pr = result["per_round_s"]
    rates = [_fmt_rate(pr[row]) if row in pr else "n/a" for row in TORCH_FIELDS]
    ratios = [f"{result[f]:.2f}x" if f in result else "n/a" for f in TORCH_FIELDS.values()]
    return rates + ratios


def markdown(report) -> str:
    cfg = report["config"]
    out = [
        "# elastic_jax benchmark",
        "",
        f"P = {cfg['workers']}, batch {cfg['batch']} per worker, max_delay {cfg['max_delay']}, "
        f"Top-{100 * cfg['fraction']:g}%; {_fmt_rounds(cfg['rounds'])} rounds x "
        f"{cfg['repeats']} interleaved repeats, medians. Backend {report['machine']['backend']}, "
        f"{report['machine']['cpu_count']} CPUs; PyTorch: {report['torch']}. "
        f"Background load: {cfg.get('background_load', 0)} busy processes; 1-minute load "
        f"average {_fmt_load(report['load_average']['before'])} before the run, "
        f"{_fmt_load(report['load_average']['after'])} after, "
        f"{_fmt_loads(report['results'])} over the variants.",
        "",
        f"Measured {report['date']}, commit `{report['commit'] or 'unknown'}`.",
        "",
        "Ratios are medians of per-repeat ratios (interleaved), so they differ slightly from "
        "ratios of the median times. `floor` = the P gradients alone (faster of vmap and "
        "unrolled). `default` is `ej.run`'s default worker loop; `best` the fastest loop.",
        "",
    ]
    for model in cfg["models"]:
        rows = [r for r in report["results"] if r["model"] == model]
        if not rows:
            continue
        out += [f"## {model} (d = {rows[0]['d']:,})", ""]
        loops = [k for k in rows[0]["per_round_s"] if k.startswith("ej.run")]
        header = (["variant"] + [f"{k} rounds/s" for k in loops]
                  + ["floor rounds/s", "round/floor (default)", "round/floor (best)",
                     "best / optax.sgd time", "optax rounds/s"] + _torch_header(report)
                  + ["Top-k share"])
        body = []
        for r in rows:
            pr = r["per_round_s"]
            body.append(
                [r["variant"]] + [_fmt_rate(pr[k]) for k in loops]
                + [_fmt_rate(r["floor_s"]),
                   f"{r['round_over_floor'][r['default_loop']]:.2f}",
                   f"{r['round_over_floor'][r['best_loop']]:.2f} "
                   f"({r['best_loop'][7:-1]})",
                   f"{r['ej_over_optax']:.2f}", _fmt_rate(pr["optax.sgd"])]
                + _torch_cells(r)
                + [f"{100 * r['topk_share_of_round']:.0f}%" if "topk_share_of_round" in r
                   else "-"])
        out += [timing.markdown_table(header, body), ""]
        header = ["variant", "state bytes", "state / params"] + [f"compile {k}" for k in loops]
        body = [[r["variant"], timing.fmt_bytes(r["state_bytes"]),
                 f"{r['state_bytes'] / r['param_bytes']:.1f}x"]
                + [f"{r['compile_s'][k]:.1f} s" for k in loops] for r in rows]
        out += [timing.markdown_table(header, body), ""]
    out += _clock_lines(report.get("clock", []))
    out += ["## Targets", "",
            "`value` is the median of the per-repeat ratios; `quartiles` their 25th and 75th "
            "percentiles (the spread within this run).", ""]
    body = [[t["target"], t["model"], t["variant"], t["loop"], f"{t['value']:.2f}",
             "-" if "quartiles" not in t else
             f"{t['quartiles'][0]:.2f}-{t['quartiles'][1]:.2f}",
             "met" if t["met"] else "NOT met"] for t in report["targets"]]
    out += [timing.markdown_table(["target", "model", "variant", "loop", "value", "quartiles",
                                   ""], body), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and repeats")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--variants", default=",".join(problems.VARIANTS))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-delay", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=problems.FRACTION)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per timed sample")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker-loops", default=None,
                        help="comma-separated ej.run configurations (default: all of "
                        f"{','.join(run_configs())})")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--no-clock", action="store_true",
                        help="skip the simulated clock's rows (ej.clock)")
    parser.add_argument("--background-load", type=int, default=0,
                        help="busy-looping processes to run while measuring (0: none); "
                        "ratios to the floor depend on the machine's load")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    variants = args.variants.split(",")
    for name in variants:
        if name not in problems.VARIANTS:
            parser.error(f"--variants: got {name!r}; expected names from {list(problems.VARIANTS)}")
    loops = run_configs()
    if args.worker_loops:
        loops = tuple(args.worker_loops.split(","))
    if args.background_load < 0:
        parser.error(f"--background-load: got {args.background_load}; expected an integer >= 0")
    repeats = args.repeats or (3 if args.quick else 9)
    started, load_before = timing.utc_now(), timing.load_average()
    results, clock = [], []
    with contextlib.ExitStack() as stack:
        torch_procs, torch_why = _start_torch(args, stack)
        with timing.BackgroundLoad(args.background_load):
            _measure_all(args, models, variants, loops, repeats, torch_procs, results)
            if not args.no_clock:
                for model in models:
                    print(f"[run] {model} clock", file=sys.stderr, flush=True)
                    clock.append(bench_clock(problems.make_problem(model, args.workers,
                                                                   args.batch),
                                             rounds=_rounds(args, model), repeats=repeats,
                                             max_delay=args.max_delay))
    report = {
        "date": started,
        "commit": timing.git_commit(),
        "load_average": {"before": load_before, "after": timing.load_average()},
        "torch_processes": {row: proc.info for row, proc in torch_procs.items()},
        **_report(args, models, variants, loops, repeats, torch_why, results, clock),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def _rounds(args, model) -> int:
    """Rounds per timed sample: the MLP's a multiple of ej.run's chunk (no partial chunk)."""
    if args.rounds:
        return args.rounds
    if args.quick:
        return 3
    return 2 * problems.CHUNK if model == "mlp" else 8


def _start_torch(args, stack):
    """The PyTorch rows' processes (closed by `stack`) and the report's `torch` line."""
    if args.no_torch:
        return {}, "skipped (--no-torch)"
    procs, why = torch_worker.start_rows()
    stack.callback(torch_worker.close_all, procs)
    return procs, why


def _measure_all(args, models, variants, loops, repeats, torch_procs, results):
    for model in models:
        problem = problems.make_problem(model, args.workers, args.batch)
        rounds = _rounds(args, model)
        floor = _Floor(problem)
        optax_run = _optax_runner(problem, rounds)
        for name in variants:
            print(f"[run] {model} {name}", file=sys.stderr, flush=True)
            results.append(bench_variant(
                problem, problems.VARIANTS[name], floor, optax_run, rounds=rounds,
                repeats=repeats, max_delay=args.max_delay, fraction=args.fraction,
                worker_loops=loops, torch_procs=torch_procs))


def _report(args, models, variants, loops, repeats, torch_why, results, clock=()):
    report = {
        "machine": timing.machine(),
        "torch": torch_why,
        "config": {"models": models, "variants": variants, "workers": args.workers,
                   "batch": args.batch, "max_delay": args.max_delay, "fraction": args.fraction,
                   "rounds": {m: _rounds(args, m) for m in models},
                   "repeats": repeats, "worker_loops": list(loops), "quick": args.quick,
                   "background_load": args.background_load},
        "results": results,
        "clock": list(clock),
    }
    report["targets"] = _targets(results, clock)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
