"""Where the time of one round goes: its parts timed alone, and a profiler trace summarised.

    python -m benchmarks.profile_round [--models cnn,mlp] [--variants sync,async_topk_ef]

Two views of the same round (P = 8, batch 32 per worker, max_delay 8, Top-1%):

1. *Parts*: each piece of the round jitted on its own and timed interleaved with
   the whole round (`ej.run`, for each `worker_loop`): batch sampling,
   `ej.views`, the `P` gradients (`vmap`, unrolled, `lax.map`), `ej.update`
   (local + combine), the Top-k compression of `P` updates alone, the dispatch
   of a jitted call that takes the state and returns the metrics, a per-round
   fetch of the metrics, and `ej.run`'s final stacking of the per-round metrics.
   Parts jitted alone do not fuse with each other, so they need not add up.
2. *Trace*: `jax.profiler.trace` around rounds of `jax.jit(ej.make_step(...))`
   with the batch sampled by a separate program (what `ej.run` runs), parsed
   with `jax.profiler.ProfileData`; every XLA op's time (summed over threads) is
   attributed through the `op_name` metadata of the compiled HLO to gradients
   (ops under `jvp(`), top-k, random draws, or the algorithm's other work.

Writes `profile.md` and `profile.json` to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from benchmarks import problems, proposal, timing


def _ej_kwargs(loop):
    return {} if loop == "default" else {"worker_loop": loop}


def _time_parts(model, variant_name, num_workers, max_delay, rounds, repeats, loops):
    problem = problems.make_problem(model, num_workers)
    variant = problems.VARIANTS[variant_name]
    alg = variant.make(num_workers, max_delay)
    state, views, batch = problems.sample_views_and_batch(alg, problem, rounds=0)
    grad_fns = {s: jax.jit(proposal.value_and_grads(problem.loss_fn, num_workers, s))
                for s in ("vmap", "unrolled", "map")}
    grads = grad_fns["vmap"](views, batch)[2]
    sample = jax.jit(lambda st: problem.batch_fn(st.shared.round,
                                                 problems.data_keys(st, num_workers)))
    views_fn = jax.jit(functools.partial(ej.views, alg))
    update_fn = jax.jit(functools.partial(ej.update, alg))
    _, metrics = update_fn(state, grads)
    names = sorted(metrics) + ["loss", "aux/accuracy"]
    dispatch = jax.jit(lambda st: {k: st.shared.round.astype(jnp.float32) for k in names})
    history = [jax.tree.map(jnp.copy, metrics) for _ in range(rounds)]

    def loop(fn, *args):
        def go():
            out = None
            for _ in range(rounds):
                out = fn(*args)
            return out

        return go

    fns = {}
    for wl in loops:
        fns[f"round: ej.run[{wl}]"] = (
            lambda wl=wl: ej.run(alg, problem.loss_fn, state, batch_fn=problem.batch_fn,
                                 rounds=rounds, has_aux=True, **_ej_kwargs(wl)))
    fns.update({
        "sample batch (keys + gather)": loop(sample, state),
        "views (ej.views)": loop(views_fn, state),
        "grads: vmap": loop(grad_fns["vmap"], views, batch),
        "grads: unrolled": loop(grad_fns["unrolled"], views, batch),
        "grads: lax.map": loop(grad_fns["map"], views, batch),
        "update (ej.update: local + combine)": loop(update_fn, state, grads),
        "dispatch of a jitted call (state in, metrics out)": loop(dispatch, state),
        "fetch one round's metrics to the host": loop(jax.device_get, metrics),
        "ej.run's final stacking of metrics": lambda: jax.tree.map(
            lambda *xs: jnp.stack(xs), *history),
    })
    if variant.compressed:
        compress = ej.top_k(fraction=problems.FRACTION).spec.compress
        topk = jax.jit(jax.vmap(lambda g: compress(g, None)))
        fns["top-k of P updates (alone)"] = loop(topk, grads)
    samples = timing.measure(fns, repeats=repeats)
    base_name = f"round: ej.run[{loops[-1]}]"
    base = samples[base_name]
    rows = []
    for name, xs in samples.items():
        rows.append({
            "part": name,
            "per_round_s": timing.median(xs) / rounds,
            "share_of_round": timing.paired_ratio(xs, base),
        })
    return {"model": model, "variant": variant_name, "d": problem.d, "parts": rows,
            "reference": base_name}


_RANDOM = re.compile(r"threefry|randint|random_|random_bits")


def _category(op_name: str) -> str:
    """Attributes an op by its jaxpr path (`op_name` metadata)."""
    if "jvp(" in op_name:
        return "gradients (forward + backward of the loss)"
    if "top_k" in op_name or "_mask_of" in op_name:
        return "top-k"
    if _RANDOM.search(op_name):
        return "random draws (lags, delays)"
    return "algorithm (views, local, combine, metrics)"


_CONTROL = ("while", "call", "conditional")


def _hlo_index(hlo_text: str):
    """HLO instruction name -> (opcode, the `op_name`s of the jaxpr ops it computes).

    A fusion (or loop) carries no metadata of its own in the compiled text: it
    gets the `op_name`s of the instructions of the computations it calls.
    """
    comps: dict[str, list[tuple[str, str, str | None, list[str]]]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
            continue
        inst = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+(?: \S+)*? ([\w\-]+)\(", line)
        if inst and current is not None:
            op = re.search(r'op_name="([^"]*)"', line)
            calls = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", line)
            current.append((inst.group(1), inst.group(2), op.group(1) if op else None, calls))
    table = {name: (opcode, op, calls) for body in comps.values()
             for name, opcode, op, calls in body}

    def op_names(name, depth=0):
        opcode, op, calls = table.get(name, ("", None, []))
        if op:
            return [op]
        out = []
        for comp in calls:
            for inner, *_ in comps.get(comp, []):
                if depth < 4:
                    out += op_names(inner, depth + 1)
        return out

    return {name: (table[name][0], op_names(name)) for name in table}


def _event_category(index, op: str) -> str | None:
    """The category of an XLA op event; None for control flow (its body is timed)."""
    opcode, names = index.get(op, ("", []))
    if opcode in _CONTROL:
        return None
    cats = collections.Counter(_category(n) for n in names)
    if not cats:
        return "other"
    best = [c for c, _ in cats.most_common() if c != "other"]
    return best[0] if best else "other"


def _trace(model, variant_name, num_workers, max_delay, rounds, loop):
    """Profiles `rounds` rounds of `jax.jit(ej.make_step(...))`, ej.run's round program."""
    problem = problems.make_problem(model, num_workers)
    alg = problems.VARIANTS[variant_name].make(num_workers, max_delay)
    state = alg.init(problem.params, jax.random.key(0))
    round_fn = ej.make_step(alg, problem.loss_fn, has_aux=True, **_ej_kwargs(loop))

    def step(state, batch):  # named so that its XLA module is told apart from the sampler's
        return round_fn(state, batch)

    step = jax.jit(step, donate_argnums=0)
    sample = jax.jit(lambda st: problem.batch_fn(st.shared.round,
                                                 problems.data_keys(st, num_workers)))

    def run(state):
        for _ in range(rounds):
            state, metrics = step(state, sample(state))
        return timing.block((state, metrics))[0]

    state = run(jax.tree.map(jnp.copy, state))
    index = _hlo_index(step.lower(state, sample(state)).compile().as_text())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp):
            state = run(state)
        wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    per_cat = collections.Counter()
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op is None:
                    continue
                if "step" not in str(stats.get("hlo_module", "")):
                    per_cat["batch sampling program"] += event.duration_ns
                    continue
                category = _event_category(index, op)
                if category is None:
                    continue
                per_cat[category] += event.duration_ns
                op_names = index.get(op, ("", []))[1]
                per_op[(op, op_names[0] if op_names else "")] += event.duration_ns
    busy = sum(per_cat.values())
    return {
        "model": model,
        "variant": variant_name,
        "worker_loop": loop,
        "rounds": rounds,
        "wall_per_round_s_under_profiler": wall / rounds,
        "xla_op_time_per_round_s": busy / 1e9 / rounds,
        "categories": {k: v / 1e9 / rounds for k, v in per_cat.most_common()},
        "top_ops": [
            {"op": op, "op_name": name[-110:], "per_round_s": ns / 1e9 / rounds}
            for (op, name), ns in per_op.most_common(40)
        ],
    }


def lag_draws(num_workers=8, d=25_290, max_delay=8, calls=20, repeats=7):
    """Per-coordinate lags `[P, d]` in `[p, max_delay]`: `randint`, threefry bits
    mapped by a multiply-shift, and the library's law (`ej.delays.uniform`)."""
    keys = jax.random.split(jax.random.key(0), num_workers)
    lo = jnp.arange(num_workers)

    def with_bits(dtype, shift):
        def one(key, low):
            bits = jax.random.bits(key, (d,), dtype).astype(jnp.int32)
            return low + ((bits * (max_delay + 1 - low)) >> shift)

        return jax.jit(jax.vmap(one))

    fns = {
        "jax.random.randint": jax.jit(jax.vmap(
            lambda key, low: jax.random.randint(key, (d,), low, max_delay + 1))),
        "bits uint16, multiply-shift": with_bits(jnp.uint16, 16),
        "bits uint8, multiply-shift": with_bits(jnp.uint8, 8),
        "ej.delays.uniform (keyed counter hash, 16 bits)": jax.jit(jax.vmap(
            lambda key, low: ej.delays.uniform().sample(key, 0, 0, low, max_delay, (d,)))),
    }
    for fn in fns.values():  # every lag lands in [p, max_delay]
        lags = np.asarray(fn(keys, lo))
        assert (lags >= np.asarray(lo)[:, None]).all() and (lags <= max_delay).all()
    samples = timing.measure(
        {k: (lambda f=f: [f(keys, lo) for _ in range(calls)][-1]) for k, f in fns.items()},
        repeats=repeats)
    base = samples["jax.random.randint"]
    return [{"method": k, "per_call_s": timing.median(v) / calls,
             "vs_randint": timing.paired_ratio(v, base), "shape": [num_workers, d]}
            for k, v in samples.items()]


def _markdown(parts, traces) -> str:
    out = ["# Where a round's time goes", ""]
    for res in parts:
        out += [f"## {res['model']} (d = {res['d']:,}), {res['variant']}: parts timed alone", ""]
        rows = [[r["part"], timing.fmt_time(r["per_round_s"]), f"{100 * r['share_of_round']:.0f}%"]
                for r in res["parts"]]
        out += [timing.markdown_table(["part", "time per round",
                                       f"of {res['reference'][7:]}'s round"], rows), ""]
    for res in traces:
        out += [f"## {res['model']}, {res['variant']}: profiler trace of ej.make_step "
                f"(worker_loop={res['worker_loop']})", "",
                f"wall {timing.fmt_time(res['wall_per_round_s_under_profiler'])} per round under "
                "the profiler; XLA ops busy "
                f"{timing.fmt_time(res['xla_op_time_per_round_s'])} per round (summed over "
                "threads)", ""]
        rows = [[k, timing.fmt_time(v), f"{100 * v / res['xla_op_time_per_round_s']:.0f}%"]
                for k, v in res["categories"].items()]
        out += [timing.markdown_table(["category", "op time per round", "share"], rows), ""]
        rows = [[f"`{o['op']}`", f"`{o['op_name']}`", timing.fmt_time(o["per_round_s"])]
                for o in res["top_ops"][:8]]
        out += [timing.markdown_table(["HLO op", "op_name (tail)", "per round"], rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--variants", default="sync,async_topk_ef,message_passing")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--max-delay", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker-loops", default=None,
                        help="ej.run worker_loops to time and trace (default: all supported)")
    parser.add_argument("--quick", action="store_true",
                        help="MLP sync only, 2 rounds x 3 repeats")
    parser.add_argument("--lags-only", action="store_true",
                        help="only the lag-draw micro-benchmark (writes lags.md)")
    args = parser.parse_args(argv)
    from benchmarks.run import worker_loops_supported

    if args.quick:
        args.models, args.variants, args.rounds, args.repeats = "mlp", "sync", 2, 3
    if args.lags_only:
        os.makedirs(args.out, exist_ok=True)
        rows = lag_draws()
        text = "# Per-coordinate lag draws, P = 8, d = 25,290\n\n" + timing.markdown_table(
            ["method", "time per call", "/ randint"],
            [[r["method"], timing.fmt_time(r["per_call_s"]), f"{r['vs_randint']:.2f}"]
             for r in rows]) + "\n"
        with open(os.path.join(args.out, "lags.md"), "w") as f:
            f.write(text)
        print(text)
        return 0

    loops = tuple(args.worker_loops.split(",")) if args.worker_loops else (
        worker_loops_supported())
    os.makedirs(args.out, exist_ok=True)
    parts, traces = [], []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            print(f"[profile] {model} {variant}", file=sys.stderr, flush=True)
            parts.append(_time_parts(model, variant, args.workers, args.max_delay, args.rounds,
                                     args.repeats, loops))
            for loop in loops:
                traces.append(_trace(model, variant, args.workers, args.max_delay, args.rounds,
                                     loop))
    report = {"machine": timing.machine(), "parts": parts, "traces": traces}
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    text = _markdown(parts, traces)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
