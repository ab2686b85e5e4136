"""Scaling curves: rounds/s and memory against P, max_delay, d and the Top-k fraction.

    python -m benchmarks.scaling [--quick] [--sweeps P,max_delay,d,fraction] [--workers 1,...]

- `P` from 1 to 1,024 workers on the MLP (`--workers`; max_delay = max(8, P - 1) for
  async SGD, so 1,023 at P = 1,024: 1,024 stored iterates);
- `max_delay` from 0 to 64 on the MLP at P = 8 (async SGD needs max_delay >= P - 1);
- `d` from 10^3 to 10^7 on a sparse linear model at P = 8, max_delay 8;
- the Top-k fraction from 0.1% to 100% on the MLP and the small CNN.

Every point runs in a Python process of its own. For every point: the bytes of
the state (from `jax.eval_shape(alg.init, ...)`, exact and free, so even
configurations too large to run are sized), XLA's temporary allocation of the
compiled round (`memory_analysis()`), and, where state + temporaries fit in
`--memory-budget`, `ej.run`'s rounds/s (median of `--repeats` calls after
compilation) next to the floor (the `P` gradients alone, vmapped), and the
process's peak resident set size (`ru_maxrss`: Python, JAX and the data
included, which a process that only imports them and loads the digits holds,
`--baseline` in the table's header). A point over budget is reported as
skipped, with what it would need.

Writes `scaling.md`, `scaling.json` and one PNG per sweep to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import jax

import elastic_jax as ej
from benchmarks import problems, proposal, timing

# The worker loop used for each model (the fastest measured here, see structures.md).
DEFAULT_LOOPS = {"mlp": "vmap", "linear": "vmap", "cnn": "unroll"}


def _loop_kwargs(model, override):
    loop = override or DEFAULT_LOOPS[model]
    from benchmarks.run import worker_loops_supported

    return ({"worker_loop": loop} if loop in worker_loops_supported() else {}), loop


def point(model, variant_name, *, num_workers, max_delay, fraction=problems.FRACTION, d=None,
          rounds, repeats, budget, loop_override=None):
    """One point of a curve; returns a JSON-able dict."""
    problem = problems.make_problem(model, num_workers, d=d)
    variant = problems.VARIANTS[variant_name]
    alg = variant.make(num_workers, max_delay, fraction)
    key = jax.random.key(0)
    state_shapes = jax.eval_shape(alg.init, problem.params, key)
    kwargs, loop = _loop_kwargs(model, loop_override)
    row = {
        "model": model, "variant": variant_name, "P": num_workers, "max_delay": max_delay,
        "fraction": fraction if variant.compressed else None, "d": problem.d,
        "worker_loop": loop,
        "state_bytes": timing.tree_bytes(state_shapes),
        "param_bytes": timing.tree_bytes(problem.params),
    }
    batch_shapes = jax.eval_shape(problem.batch_fn, 0, jax.random.split(key, num_workers))
    step = ej.make_step(alg, problem.loss_fn, has_aux=True, **kwargs)
    start = time.perf_counter()
    row["temp_bytes"] = timing.compiled_temp_bytes(step, state_shapes, batch_shapes)
    row["aot_compile_s"] = time.perf_counter() - start
    need = row["state_bytes"] * 2 + (row["temp_bytes"] or 0)  # state, its copy, scratch
    if need > budget:
        row["skipped"] = f"needs ~{timing.fmt_bytes(need)} > budget {timing.fmt_bytes(budget)}"
        return row
    state = alg.init(problem.params, key)

    def run():
        return ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn, rounds=rounds,
                      has_aux=True, **kwargs)

    timing.block(run())
    grads = jax.jit(proposal.value_and_grads(problem.loss_fn, num_workers, "vmap"))
    views = jax.jit(functools.partial(ej.views, alg))(state)
    batch = jax.jit(problem.batch_fn)(0, jax.random.split(key, num_workers))
    samples = timing.measure({
        "round": run,
        "floor": lambda: [grads(views, batch) for _ in range(rounds)][-1],
    }, repeats=repeats)
    row["rounds_per_s"] = rounds / timing.median(samples["round"])
    row["floor_rounds_per_s"] = rounds / timing.median(samples["floor"])
    row["round_over_floor"] = timing.paired_ratio(samples["round"], samples["floor"])
    return row


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def isolated(model, variant_name, **kwargs) -> dict:
    """`point(...)` in a Python process of its own, with its peak RSS (`peak_rss_mib`)."""
    spec = json.dumps({"model": model, "variant_name": variant_name, **kwargs})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--child", spec],
                          capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": model, "variant": variant_name, "P": kwargs["num_workers"],
                "max_delay": kwargs["max_delay"], "fraction": kwargs.get("fraction"),
                "d": kwargs.get("d"), "worker_loop": DEFAULT_LOOPS[model], "state_bytes": None,
                "param_bytes": None, "temp_bytes": None,
                "skipped": f"failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def _child(spec: str) -> dict:
    row = point(**json.loads(spec))
    row["peak_rss_mib"] = _peak_rss_mib()
    return row


def _baseline_rss_mib() -> float:
    """Peak RSS of a process that imports JAX and the library and loads the digits."""
    code = ("import resource, elastic_jax; from benchmarks import problems; "
            "problems.make_problem('mlp', 1); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    return float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else float("nan")


WORKERS = (1, 4, 16, 64, 256, 1024)  # the P sweep's worker counts
WORKERS_QUICK = (1, 2, 8, 32)


def _sweep_p(args):
    counts = args.workers or (WORKERS_QUICK if args.quick else WORKERS)
    variants = ["sync", "async_consistent", "async_topk_ef", "message_passing", "local_sgd"]
    rows = []
    for variant in variants:
        for p in counts:
            # Async SGD needs max_delay >= P - 1; the row records the value it ran with.
            max_delay = max(8, p - 1) if variant.startswith("async") else 8
            rows.append(isolated("mlp", variant, num_workers=p, max_delay=max_delay,
                                 rounds=args.rounds, repeats=args.repeats, budget=args.budget))
            _log("P", rows[-1])
    return rows


def _sweep_delay(args):
    delays = [0, 2, 8, 32] if args.quick else [0, 2, 8, 16, 32, 64]
    variants = ["async_consistent", "message_passing", "elastic_scheduling"]
    rows = []
    for variant in variants:
        for delay in delays:
            if variant.startswith("async") and delay < 7:
                continue  # async SGD needs max_delay >= P - 1 = 7
            rows.append(isolated("mlp", variant, num_workers=8, max_delay=delay,
                                 rounds=args.rounds, repeats=args.repeats, budget=args.budget))
            _log("max_delay", rows[-1])
    return rows


def _sweep_d(args):
    sizes = [10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6, 10**7]
    variants = ["sync", "async_consistent", "async_topk_ef", "message_passing"]
    rows = []
    for variant in variants:
        for d in sizes:
            rounds = args.rounds if d < 10**6 else max(2, args.rounds // 5)
            rows.append(isolated("linear", variant, num_workers=8, max_delay=8, d=d,
                                 rounds=rounds, repeats=args.repeats, budget=args.budget))
            _log("d", rows[-1])
    return rows


def _sweep_fraction(args):
    fractions = [0.001, 0.01, 0.1] if args.quick else [0.001, 0.01, 0.1, 1.0]
    rows = []
    for model in ("mlp",) if args.quick else ("mlp", "cnn"):
        for variant in ("async_topk_ef",):
            for fraction in fractions:
                rows.append(isolated(model, variant, num_workers=8, max_delay=8,
                                     fraction=fraction,
                                     rounds=args.rounds if model == "mlp" else 5,
                                     repeats=args.repeats, budget=args.budget))
                _log("fraction", rows[-1])
    return rows


def _log(sweep, row):
    rate = row.get("rounds_per_s")
    print(f"[scaling] {sweep}: {row['model']} {row['variant']} P={row['P']} "
          f"D={row['max_delay']} d={row['d']} frac={row['fraction']}: "
          f"{row.get('skipped', '-') if rate is None else f'{rate:.1f} rounds/s'}, "
          f"state {timing.fmt_bytes(row['state_bytes'])}, peak RSS "
          f"{row.get('peak_rss_mib', float('nan')):.0f} MiB", file=sys.stderr, flush=True)


SWEEPS = {"P": ("P", _sweep_p), "max_delay": ("max_delay", _sweep_delay), "d": ("d", _sweep_d),
          "fraction": ("fraction", _sweep_fraction)}


def _plot(rows, sweep, x_key, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"]), []).append(r)
    for (model, variant), rs in groups.items():
        label = f"{variant}" if sweep != "fraction" else f"{model} {variant}"
        ran = [(r[x_key], r["rounds_per_s"]) for r in rs if "rounds_per_s" in r]
        if ran:
            ax_rate.plot(*zip(*ran, strict=True), marker="o", label=label)
        sized = [(r[x_key], r["state_bytes"] / 2**20) for r in rs if r["state_bytes"]]
        if sized:
            ax_mem.plot(*zip(*sized, strict=True), marker="o", label=label)
    if sweep in ("P", "d"):
        floor = sorted({(r[x_key], r["floor_rounds_per_s"]) for r in rows
                        if "floor_rounds_per_s" in r and r["variant"] == rows[0]["variant"]})
        if floor:
            ax_rate.plot(*zip(*floor, strict=True), "k--", label="floor (P gradients alone)")
    for ax in (ax_rate, ax_mem):
        ax.set_xlabel(x_key)
        ax.set_xscale("symlog" if sweep == "max_delay" else "log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_rate.set_ylabel("rounds / s (ej.run)")
    ax_mem.set_ylabel("state (MiB)")
    ax_rate.legend(fontsize=7)
    ax_mem.legend(fontsize=7)
    fig.suptitle(f"elastic_jax scaling against {x_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results, baseline_mib: float) -> str:
    out = ["# Scaling curves", "",
           f"Peak RSS: each point's own process (`ru_maxrss`); a process that only imports "
           f"JAX and the library and loads the digits peaks at {baseline_mib:.0f} MiB.", ""]
    for sweep, rows in results.items():
        x_key = SWEEPS[sweep][0]
        out += [f"## against {x_key}", "", f"![{sweep}](scaling_{sweep}.png)", ""]
        header = ["model", "variant", x_key, "worker_loop", "rounds/s", "floor rounds/s",
                  "round/floor", "state", "state / params", "XLA temp", "peak RSS"]
        body = []
        for r in rows:
            ran = "rounds_per_s" in r
            sized = r["state_bytes"] is not None
            body.append([
                r["model"], r["variant"], r[x_key] if x_key != "d" else f"{r['d']:,}",
                r["worker_loop"],
                f"{r['rounds_per_s']:,.1f}" if ran else r.get("skipped", "-"),
                f"{r['floor_rounds_per_s']:,.1f}" if ran else "-",
                f"{r['round_over_floor']:.2f}" if ran else "-",
                timing.fmt_bytes(r["state_bytes"]) if sized else "-",
                f"{r['state_bytes'] / r['param_bytes']:.1f}" if sized else "-",
                timing.fmt_bytes(r["temp_bytes"]) if sized else "-",
                f"{r['peak_rss_mib']:,.0f} MiB" if "peak_rss_mib" in r else "-",
            ])
        out += [timing.markdown_table(header, body), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweeps", default="P,max_delay,d,fraction")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-budget-gib", type=float, default=8.0)
    parser.add_argument("--workers", default="",
                        help="the P sweep's worker counts (default: "
                             f"{','.join(map(str, WORKERS))}; --quick: "
                             f"{','.join(map(str, WORKERS_QUICK))})")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child)))
        return 0
    args.workers = tuple(int(p) for p in args.workers.split(",") if p)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.budget = int(args.memory_budget_gib * 2**30)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for sweep in args.sweeps.split(","):
        x_key, fn = SWEEPS[sweep]
        results[sweep] = fn(args)
        _plot(results[sweep], sweep, x_key, os.path.join(args.out, f"scaling_{sweep}.png"))
    baseline = _baseline_rss_mib()
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"machine": timing.machine(), "budget_bytes": args.budget,
                   "baseline_rss_mib": baseline, "sweeps": results}, f, indent=1)
    text = _markdown(results, baseline)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

