"""The loop and the batching: which structure should core.py use for a round?

    python -m benchmarks.structures [--quick]

A. The `P` per-worker gradients of one round, each worker at its own view,
   inside one jitted function: `vmap` over per-worker weights (core.py today),
   a Python `for` over workers unrolled inside `jit`, `lax.map`, and groups of
   `c` workers vmapped with the groups unrolled (`hybrid:c`); time per call and
   compile time, at `P = 8` and larger `P`. Where every view is the same (sync
   SGD): one `vmap` over the batches at the shared view (`shared`), and, for
   reference, one gradient of the mean loss over all `P b` examples (what
   `optax.sgd` computes; it gives no per-worker gradient).
B. The loop over rounds: `ej.run()` with its defaults, `ej.run(loop="chunks")`,
   `ej.run(loop="python")` with each of core.py's
   `worker_loop`s, `ej.run(loop="scan")`, and rounds built here from
   `ej.views` + unrolled gradients + `ej.update`: a Python loop over the
   jitted round with and without donated buffers, jitted chunks of `K` rounds
   (a `lax.scan`, or unrolled inside `jit`), and for sync SGD one `vmap` at the
   shared view; time per round, compile time, and the largest difference of the
   final parameters from the default `ej.run`'s.

Writes `structures.md` and `structures.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import elastic_jax as ej
from benchmarks import problems, proposal, timing


def _perturbed_views(params, num_workers, scale=1e-3):
    """`P` distinct views around `params` (per-worker weights, as under async)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    out = [x[None] + scale * jax.random.normal(k, (num_workers, *x.shape), x.dtype)
           for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, out)


def _compile_seconds(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def gradient_structures(model, worker_counts, *, calls, repeats, max_unrolled):
    """Section A for one model: rows of (P, structure, per-call seconds, compile seconds)."""
    rows = []
    for num_workers in worker_counts:
        problem = problems.make_problem(model, num_workers)
        keys = jax.random.split(jax.random.key(1), num_workers)
        batch = jax.jit(problem.batch_fn)(0, keys)
        views = _perturbed_views(problem.params, num_workers)
        shared_views = jax.tree.map(
            lambda x, n=num_workers: jnp.broadcast_to(x, (n, *x.shape)), problem.params)
        structures = ["vmap", "map", "shared"]
        if num_workers <= max_unrolled:
            structures.insert(1, "unrolled")
        for group in (8, 32):
            if num_workers > group and num_workers % group == 0:
                structures.append(f"hybrid:{group}")
        fns, compile_s = {}, {}
        for structure in structures:
            fn = proposal.value_and_grads(problem.loss_fn, num_workers, structure)
            args = (shared_views if structure == "shared" else views, batch)
            seconds, compiled = _compile_seconds(fn, *args)
            compile_s[structure] = seconds
            fns[structure] = (lambda c=compiled, a=args: [c(*a) for _ in range(calls)][-1])

        def mean_loss(params, batch, loss_fn=problem.loss_fn):
            flat = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), batch)
            return jax.grad(lambda p: loss_fn(p, flat)[0])(params)

        seconds, compiled = _compile_seconds(mean_loss, problem.params, batch)
        compile_s["one gradient of the mean (P b examples)"] = seconds
        fns["one gradient of the mean (P b examples)"] = (
            lambda c=compiled, a=(problem.params, batch): [c(*a) for _ in range(calls)][-1])
        samples = timing.measure(fns, repeats=repeats)
        ref = samples["vmap"]
        for name, xs in samples.items():
            rows.append({
                "model": model, "P": num_workers, "structure": name,
                "per_call_s": timing.median(xs) / calls,
                "vs_vmap": timing.paired_ratio(xs, ref),
                "compile_s": compile_s[name],
            })
        print(f"[structures] {model} P={num_workers} done", file=sys.stderr, flush=True)
    return rows


def _max_diff(a, b):
    return float(max(jnp.max(jnp.abs(x - y)) for x, y in
                     zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))


def loop_structures(model, variant_name, *, rounds, repeats, chunk):
    """Section B for one model and variant at P = 8."""
    num_workers = 8
    problem = problems.make_problem(model, num_workers)
    alg = problems.VARIANTS[variant_name].make(num_workers, 8)
    state = alg.init(problem.params, jax.random.key(0))
    run_kwargs = dict(batch_fn=problem.batch_fn, has_aux=True)

    def ej_run(loop, worker_loop):
        kwargs = {} if worker_loop == "default" else {"worker_loop": worker_loop}
        return lambda: ej.run(alg, problem.loss_fn, state, rounds=rounds, loop=loop,
                              **run_kwargs, **kwargs)

    from benchmarks.run import worker_loops_supported

    worker_loops = worker_loops_supported()
    candidates = {"ej.run() (defaults: loop='auto', worker_loop='auto')": (
        "ej", lambda: ej.run(alg, problem.loss_fn, state, rounds=rounds, **run_kwargs))}
    candidates["ej.run(loop='chunks')"] = ("ej", ej_run("chunks", "default"))
    for wl in worker_loops:
        candidates[f"ej.run(loop='python', worker_loop={wl!r})"] = ("ej", ej_run("python", wl))
    for wl in worker_loops[:2]:
        candidates[f"ej.run(loop='scan', worker_loop={wl!r})"] = ("ej", ej_run("scan", wl))
    configs = [
        ("benchmarks: python loop, unrolled grads, donated", dict(grads="unrolled")),
        ("benchmarks: python loop, unrolled grads, not donated",
         dict(grads="unrolled", donate=False)),
        (f"benchmarks: scan chunks of {chunk}, unrolled grads",
         dict(grads="unrolled", loop="scan", chunk=chunk)),
        (f"benchmarks: unrolled chunks of {chunk}, unrolled grads",
         dict(grads="unrolled", loop="unrolled", chunk=chunk)),
    ]
    if problems.VARIANTS[variant_name].shared_view:
        configs.append(("benchmarks: python loop, one vmap at the shared view",
                        dict(grads="shared")))
    for name, kwargs in configs:
        runner = proposal.make_runner(alg, problem.loss_fn, problem.batch_fn, **kwargs)
        candidates[name] = (runner, lambda r=runner: r(state, rounds))
    compile_s, finals = {}, {}
    for name, (kind, fn) in candidates.items():
        if kind == "ej":
            start = time.perf_counter()
            out = timing.block(fn())
            first = time.perf_counter() - start
        else:
            start = time.perf_counter()
            kind.compiled.lower(state).compile()
            compile_s[name] = time.perf_counter() - start
            out = timing.block(fn())
            first = None
        finals[name] = ej.params(out[0])
        if first is not None:
            compile_s[name] = first  # steady time subtracted below
    samples = timing.measure({k: v[1] for k, v in candidates.items()}, repeats=repeats, warmup=0)
    ref_name = next(iter(candidates))
    ref = samples[ref_name]
    rows = []
    for name, xs in samples.items():
        per_round = timing.median(xs) / rounds
        comp = compile_s[name]
        if candidates[name][0] == "ej":
            comp = max(comp - timing.median(xs), 0.0)
        rows.append({
            "model": model, "variant": variant_name, "loop": name,
            "per_round_s": per_round,
            "vs_ej_run": timing.paired_ratio(xs, ref),
            "compile_s": comp,
            "max_abs_param_diff_vs_ej_run": _max_diff(finals[name], finals[ref_name]),
        })
    print(f"[structures] loops {model} {variant_name} done", file=sys.stderr, flush=True)
    return rows


def _markdown(grad_rows, loop_rows) -> str:
    out = ["# Round structures", "", "## A. The P per-worker gradients (one jitted call)", ""]
    rows = [[r["model"], r["P"], r["structure"], timing.fmt_time(r["per_call_s"]),
             f"{r['vs_vmap']:.2f}", f"{r['compile_s']:.2f} s"] for r in grad_rows]
    out += [timing.markdown_table(["model", "P", "structure", "time per call", "/ vmap",
                                   "compile"], rows), ""]
    out += ["## B. The loop over rounds (P = 8)", ""]
    rows = [[r["model"], r["variant"], r["loop"], timing.fmt_time(r["per_round_s"]),
             f"{r['vs_ej_run']:.2f}", f"{r['compile_s']:.2f} s",
             f"{r['max_abs_param_diff_vs_ej_run']:.1e}"] for r in loop_rows]
    out += [timing.markdown_table(["model", "variant", "loop", "time per round", "/ ej.run",
                                   "compile", "max abs diff of params vs ej.run"], rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sections", default="A,B")
    parser.add_argument("--models", default="cnn,mlp", help="section B's models")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    quick = args.quick
    repeats = 3 if quick else 7
    grad_rows, loop_rows = [], []
    if "A" in args.sections:
        grad_rows += gradient_structures("cnn", [8] if quick else [8, 32, 64], calls=3,
                                         repeats=repeats, max_unrolled=64)
        grad_rows += gradient_structures("mlp", [8] if quick else [8, 64, 256],
                                         calls=3 if quick else 20, repeats=repeats,
                                         max_unrolled=64)
    if "B" in args.sections:
        for model in args.models.split(","):
            for variant in ("sync", "async_topk_ef"):
                # The MLP's rounds are a multiple of ej.run's chunk (no partial chunk).
                rounds = 2 * problems.CHUNK if model == "mlp" and not quick else 10
                loop_rows += loop_structures(model, variant, rounds=rounds,
                                             repeats=3 if quick else 5,
                                             chunk=5 if quick else (16 if rounds == 32 else 10))
    report = {"machine": timing.machine(), "gradients": grad_rows, "loops": loop_rows}
    with open(os.path.join(args.out, "structures.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = _markdown(grad_rows, loop_rows)
    with open(os.path.join(args.out, "structures.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
