r"""Peak memory and time of `ej.analysis.hypergradient` against the undifferentiated run.

    python -m benchmarks.hypergradient_memory [--rounds=1000,10000] [--configs=run,reverse_sqrt,...]

The workload is the project's default update rule on the default data: the MLP
(one hidden layer of 128, 9,610 parameters) on the bundled 8x8 digits,
`ej.async_sgd(0.05, 8, max_delay=8, reads="inconsistent",
compressor=ej.top_k(fraction=0.01), error_feedback=beta)`, batch 32 per worker,
`R` rounds (each of `--rounds`), and the final test loss of the auxiliary model
as the objective. Each configuration runs in its own Python process, so that
the peak resident set size (`resource.getrusage(...).ru_maxrss`, Linux
kilobytes) is that configuration's alone:

    run             the same scan of `ej.make_step` and final loss, jitted: no derivative
    forward         hypergradient(mode="forward"): d loss / d beta by jax.jvp
    reverse_sqrt    hypergradient(mode="reverse", remat="sqrt"): two-level checkpointing,
                    segments of ceil(sqrt(R)) rounds
    reverse_round   hypergradient(mode="reverse", remat="round"): each round rematerialised
    reverse_none    hypergradient(mode="reverse", remat="none")

Memory columns: **above the plain run**, the configuration's peak RSS minus the
`run` configuration's peak RSS at the same `R` (both processes load the same
data and compile one program of the same run, so the difference is what the
derivative costs); XLA's own account of the compiled program's working buffers
(`compiled.memory_analysis().temp_size_in_bytes`: what the run needs beyond
its inputs and outputs, exact and independent of the allocator); the process's
peak RSS, with its RSS after loading the data (before compiling) and its peak
after compiling (before running) for reference; and, where the device reports
memory statistics (GPUs, TPUs; not the CPU), its `peak_bytes_in_use`. A
configuration whose XLA temporaries exceed `--memory-budget-gib` is compiled
but not run (reverse_none at R = 10,000 needs about 20 GiB). Times:
ahead-of-time compilation, and the best of `--repeats` runs of the compiled
program, with the ratio to the undifferentiated run. The markdown tables (one
per `R`) go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = ("run", "forward", "reverse_sqrt", "reverse_round", "reverse_none")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(config: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import elastic_jax as ej
    from experiments import data as data_lib
    from experiments import models as models_lib

    rounds, workers, batch = args.rounds, args.num_workers, args.batch_size
    data = data_lib.load_digits(seed=0)
    module = models_lib.MLP(num_classes=data.num_classes)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    loss_fn = models_lib.classification_loss(module)
    part = data_lib.partition(data.y_train, workers, seed=0)
    rng = np.random.default_rng(0)
    positions = rng.integers(0, part.counts[None, :, None], (rounds, workers, batch))
    rows = np.take_along_axis(part.indices[None], positions, axis=2)
    batches = {"x": jnp.asarray(data.x_train[rows]), "y": jnp.asarray(data.y_train[rows])}
    eval_batch = {"x": jnp.asarray(data.x_test), "y": jnp.asarray(data.y_test)}
    jax.block_until_ready((batches, params))
    setup_rss = _current_rss_mib()

    def make(beta):
        return ej.async_sgd(0.05, workers, workers, reads="inconsistent",
                            compressor=ej.top_k(fraction=0.01), error_feedback=beta)

    if config == "run":
        # The same program as the objective, without derivatives: one scan.
        def program(params, batches, eval_batch):
            alg = make(1.0)
            step = ej.make_step(alg, loss_fn, has_aux=True)
            state, _ = jax.lax.scan(lambda st, b: (step(st, b)[0], None),
                                    alg.init(params, jax.random.key(0)), batches)
            return loss_fn(ej.params(state), eval_batch)[0]
    else:
        mode = "forward" if config == "forward" else "reverse"
        remat = config.removeprefix("reverse_") if mode == "reverse" else "none"

        def program(params, batches, eval_batch):
            return ej.analysis.hypergradient(
                make, loss_fn, params, batches, {"beta": 1.0}, key=0, eval_batch=eval_batch,
                has_aux=True, mode=mode, remat=remat)

    inputs = (params, batches, eval_batch)
    start = time.perf_counter()
    compiled = jax.jit(program).lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    compile_rss = _rss_mib()
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    if temp is not None and temp > args.memory_budget_gib * 2**30:
        return {"config": config, "rounds": rounds,
                "error": f"not run: XLA temporaries {temp / 2**30:.1f} GiB > budget "
                         f"{args.memory_budget_gib:g} GiB"}
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*inputs))
        best = min(best, time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    value = out if config == "run" else out[0]
    return {
        "config": config, "rounds": rounds, "peak_rss_mib": _rss_mib(),
        "setup_rss_mib": setup_rss,
        "compile_rss_mib": compile_rss,
        "temp_mib": None if temp is None else temp / 2**20,
        "device_peak_mib": (stats["peak_bytes_in_use"] / 2**20
                            if "peak_bytes_in_use" in stats else None),
        "compile_s": compile_s, "best_s": best, "value": float(value),
        "device": str(jax.devices()[0].device_kind),
    }


def _run_child(config: str, rounds: int, args) -> dict:
    argv = [sys.executable, "-m", "benchmarks.hypergradient_memory", f"--child={config}",
            f"--rounds={rounds}", f"--num_workers={args.num_workers}",
            f"--batch_size={args.batch_size}", f"--repeats={args.repeats}",
            f"--memory-budget-gib={args.memory_budget_gib}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": config, "rounds": rounds, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _table(results: list[dict], rounds: int, args) -> str:
    base = next((r for r in results if r["config"] == "run" and "error" not in r), None)
    lines = [
        f"R = {rounds:,} rounds, P = {args.num_workers}, batch {args.batch_size}, "
        f"device: {next((r['device'] for r in results if 'device' in r), '?')}",
        "",
        "| configuration | peak RSS above the plain run (MiB) | XLA temp (MiB) | peak RSS "
        "(MiB) | after setup | after compile | device peak (MiB) | compile (s) | run (s) | "
        "time / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} | | | | | | | | |")
            continue
        ratio = f"{r['best_s'] / base['best_s']:.2f}" if base else "n/a"
        above = f"{r['peak_rss_mib'] - base['peak_rss_mib']:.0f}" if base else "n/a"
        lines.append(
            f"| {r['config']} | {above} | {fmt(r['temp_mib'], '.0f')} | "
            f"{r['peak_rss_mib']:.0f} | {r['setup_rss_mib']:.0f} | "
            f"{r['compile_rss_mib']:.0f} | {fmt(r['device_peak_mib'], '.0f')} | "
            f"{r['compile_s']:.1f} | {r['best_s']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", default="1000,10000",
                        help="rounds R of the run: one table per comma-separated value")
    parser.add_argument("--num_workers", type=int, default=8, help="P; max_delay = P")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per worker")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after compiling")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"a comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--memory-budget-gib", type=float, default=8.0,
                        help="run no configuration whose XLA temporaries exceed this")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        counts = [int(x) for x in args.rounds.split(",") if x]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        print(f"--rounds: got {args.rounds!r}; expected comma-separated integers >= 1",
              file=sys.stderr)
        return 2
    for name in ("num_workers", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            print(f"--{name}: got {getattr(args, name)}; expected an integer >= 1",
                  file=sys.stderr)
            return 2
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs + ([args.child] if args.child else []) if c not in CONFIGS]
    if bad:
        print(f"--configs: got {bad[0]!r}; expected a subset of {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    if args.child:
        args.rounds = counts[0]
        print(json.dumps(_child(args.child, args)))
        return 0
    for rounds in counts:
        print(_table([_run_child(config, rounds, args) for config in configs], rounds, args))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
