"""Top-k over large pytrees on this backend: exact, approximate, by threshold, per leaf.

    python -m benchmarks.topk [--quick]

Four ways to keep the `k` entries of largest magnitude of a pytree (the leaves
concatenated, ties to the lowest index, as `ej.top_k(scope="global")` promises):

- `exact (ej.top_k)`: the library's compressor: concatenate `|a|`, `lax.top_k`,
  scatter the indices into a mask, `where` leaf by leaf;
- `approx_max_k`: `lax.approx_max_k(|a|, k, recall_target=0.95)` in place of
  `lax.top_k` (its recall is reported: it does not promise exactly the top k);
- `threshold (bisection)`: the `k`-th largest magnitude found by bisection on the
  int32 bit patterns of `|a|` (monotone for non-negative floats, so 31 counting
  passes find it exactly), then every entry above it plus the lowest-index
  entries equal to it until there are exactly `k`: the same mask as `lax.top_k`;
- `per leaf (ej.top_k scope="per_leaf")`: one `lax.top_k` per leaf with
  `k_l = fraction d_l` (a different compressor: `delta = min_l k_l / d_l`).

Each is timed jitted on one worker's pytree and vmapped over `P = 8` workers (what a
round does), interleaved; `agrees` checks the mask against the exact one.
Writes `topk.md` and `topk.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

import elastic_jax as ej
from benchmarks import problems, timing


def _flat_abs(tree):
    return jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(tree)])


def _apply_mask(tree, mask):
    leaves, treedef = jax.tree.flatten(tree)
    out, offset = [], 0
    for leaf in leaves:
        out.append(jnp.where(mask[offset:offset + leaf.size].reshape(leaf.shape), leaf, 0))
        offset += leaf.size
    return jax.tree.unflatten(treedef, out)


def threshold_mask(scores: jax.Array, k: int) -> jax.Array:
    """The mask of the `k` largest non-negative `scores`, ties to the lowest index.

    Bisection on the int32 bit patterns (monotone for non-negative floats) finds
    `T`, the bit pattern of the `k`-th largest score, in 31 passes that each
    count `bits >= mid`; the mask is `bits > T` plus the first `k - #(bits > T)`
    entries with `bits == T`, exactly `k` entries, as `lax.top_k` selects.
    """
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)

    def body(_, bounds):
        lo, hi = bounds  # count(bits >= lo) >= k > count(bits >= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(2**31 - 1)))
    above = bits > lo
    ties = bits == lo
    missing = k - jnp.sum(above)
    return above | (ties & (jnp.cumsum(ties) <= missing))


def _k_of(tree, fraction):
    d = problems.num_params(tree)
    return max(1, math.floor(fraction * d))


def methods(fraction):
    """name -> `(tree) -> compressed tree`, and name -> `(tree) -> flat mask`."""
    exact = ej.top_k(fraction=fraction).spec.compress
    per_leaf = ej.top_k(fraction=fraction, scope="per_leaf").spec.compress

    def approx(tree):
        scores = _flat_abs(tree)
        _, idx = lax.approx_max_k(scores, _k_of(tree, fraction), recall_target=0.95)
        return _apply_mask(tree, jnp.zeros(scores.shape, bool).at[idx].set(True))

    def threshold(tree):
        return _apply_mask(tree, threshold_mask(_flat_abs(tree), _k_of(tree, fraction)))

    return {
        "exact (ej.top_k)": lambda t: exact(t, None),
        "approx_max_k": approx,
        "threshold (bisection)": threshold,
        "per leaf (ej.top_k scope='per_leaf')": lambda t: per_leaf(t, None),
    }


def _pytrees(quick):
    mlp = problems.make_problem("mlp", 8).params
    cnn = problems.make_problem("cnn", 8).params
    trees = {"MLP params (9,610)": mlp, "SmallCNN params (25,290)": cnn}
    sizes = [10**5, 10**6] if quick else [10**5, 10**6, 10**7]
    for d in sizes:
        trees[f"one leaf, d = 10^{round(math.log10(d))}"] = {"w": jnp.zeros((d,))}
    trees["100 leaves, d = 10^6"] = {f"l{i:03d}": jnp.zeros((10**4,)) for i in range(100)}
    return trees


def _random_like(tree, seed, workers=None, ties=False):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for x, key in zip(leaves, keys, strict=True):
        shape = x.shape if workers is None else (workers, *x.shape)
        v = jax.random.normal(key, shape, jnp.float32)
        out.append(jnp.round(v * 4) / 4 if ties else v)
    return jax.tree.unflatten(treedef, out)


def _nonzero_mask(tree):
    return jnp.concatenate([(x != 0).ravel() for x in jax.tree.leaves(tree)])


def run(quick=False, fraction=problems.FRACTION, repeats=None):
    repeats = repeats or (3 if quick else 7)
    rows = []
    for tree_name, template in _pytrees(quick).items():
        d = problems.num_params(template)
        k = _k_of(template, fraction)
        big = d >= 10**6
        for workers in ([1] if big else [1, 8]):
            data = _random_like(template, 0, None if workers == 1 else workers)
            tie_data = _random_like(template, 1, None if workers == 1 else workers, ties=True)
            fns, outs = {}, {}
            for name, fn in methods(fraction).items():
                f = jax.jit(fn if workers == 1 else jax.vmap(fn))
                calls = 1 if big else 10
                outs[name] = (f(data), f(tie_data))
                fns[name] = (lambda f=f, x=data, n=calls: [f(x) for _ in range(n)][-1])
            samples = timing.measure(fns, repeats=repeats)
            calls = 1 if big else 10
            ref = samples["exact (ej.top_k)"]
            for name, xs in samples.items():
                agrees, recall = [], []
                for got, want in zip(outs[name], outs["exact (ej.top_k)"], strict=True):
                    g, w = _nonzero_mask(got), _nonzero_mask(want)
                    agrees.append(bool(jnp.all(g == w)))
                    recall.append(float(jnp.sum(g & w) / jnp.maximum(jnp.sum(w), 1)))
                rows.append({
                    "pytree": tree_name, "d": d, "k": k, "workers": workers, "method": name,
                    "time_s": timing.median(xs) / calls,
                    "vs_exact": timing.paired_ratio(xs, ref),
                    "same_mask_as_exact": agrees[0] and agrees[1],
                    "recall": min(recall),
                })
            print(f"[topk] {tree_name} P={workers} done", file=sys.stderr, flush=True)
    return rows


def _markdown(rows) -> str:
    header = ["pytree", "d", "k", "workers", "method", "time", "/ exact", "same mask", "recall"]
    body = [[r["pytree"], f"{r['d']:,}", f"{r['k']:,}", r["workers"], r["method"],
             timing.fmt_time(r["time_s"]), f"{r['vs_exact']:.2f}",
             "yes" if r["same_mask_as_exact"] else "no", f"{r['recall']:.3f}"] for r in rows]
    return "# Top-k on this backend\n\n" + timing.markdown_table(header, body) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fraction", type=float, default=problems.FRACTION)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args.quick, args.fraction)
    with open(os.path.join(args.out, "topk.json"), "w") as f:
        json.dump({"machine": timing.machine(), "fraction": args.fraction, "rows": rows}, f,
                  indent=1)
    text = _markdown(rows)
    with open(os.path.join(args.out, "topk.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

