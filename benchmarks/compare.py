"""Two checkouts of the library, benchmarked in turn: is the newer one slower anywhere?

    python -m benchmarks.compare --old PATH --new PATH [--repeats 5] [--out DIR]
                                 [--models mlp,cnn] [--variants sync,...]

Runs `python -m benchmarks.run --worker-loops auto --no-torch` (the default
`ej.run`, each variant's floor in the same process) from each checkout's own
directory, alternating old, new, old, new, ... `--repeats` times, so that a
drift of the machine's load affects both alike. For every model and variant it
reports the medians over the repeats of `ej.run`'s rounds/s and of its ratio
to the floor (the round over the same `P` gradients alone, measured in the
same process, which cancels most of the load), each checkout's, and new over
old. The 1-minute load average is recorded around every run. Writes
`compare.md` and `compare.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks import timing

ROW = "ej.run[auto]"


def _run(tree: str, out: str, args) -> dict:
    """One `benchmarks.run` of `tree` in a process of its own; its results.json."""
    command = [sys.executable, "-m", "benchmarks.run", "--worker-loops", "auto", "--no-torch",
               "--models", args.models, "--out", out, "--repeats", str(args.inner_repeats)]
    if args.variants:
        command += ["--variants", args.variants]
    env = dict(os.environ, PYTHONPATH=tree)
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _rows(report: dict) -> dict:
    """`{(model, variant): (rounds/s, round/floor)}` of the default `ej.run`."""
    return {(r["model"], r["variant"]): (r["rounds_per_s"][ROW], r["round_over_floor"][ROW])
            for r in report["results"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the older checkout's directory")
    parser.add_argument("--new", default=".", help="the newer checkout's directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner-repeats", type=int, default=3,
                        help="benchmarks.run's own --repeats in each run")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--variants", default="")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: got {args.repeats}; expected an integer >= 1")
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    commits = {name: timing.git_commit(tree) for name, tree in trees.items()}
    samples = {"old": [], "new": []}
    loads = []
    for i in range(args.repeats):
        for name, tree in trees.items():
            before = timing.load_average()
            out = os.path.join(args.out, "compare_runs", f"{name}{i}")
            samples[name].append(_rows(_run(tree, out, args)))
            loads.append({"run": f"{name}{i}", "before": before, "after": timing.load_average()})
    keys = sorted(set(samples["old"][0]) & set(samples["new"][0]))
    table = []
    for key in keys:
        row = {"model": key[0], "variant": key[1]}
        for name in ("old", "new"):
            row[f"{name}_rounds_per_s"] = statistics.median(s[key][0] for s in samples[name])
            row[f"{name}_over_floor"] = statistics.median(s[key][1] for s in samples[name])
        row["new_over_old_rounds_per_s"] = row["new_rounds_per_s"] / row["old_rounds_per_s"]
        row["new_over_old_floor_ratio"] = row["new_over_floor"] / row["old_over_floor"]
        table.append(row)
    report = {"date": timing.utc_now(), "commits": commits, "repeats": args.repeats,
              "load_average": loads, "rows": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        f"# {ROW}: {commits['new']} (new) against {commits['old']} (old)",
        "",
        f"{report['date']}; medians of {args.repeats} interleaved runs of `benchmarks.run` "
        "per checkout; load average (1 min) from "
        f"{min(x['before'] for x in loads):.2f} to {max(x['after'] for x in loads):.2f}.",
        "",
        "| model | variant | old rounds/s | new rounds/s | new / old | old round/floor "
        "| new round/floor | new / old |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['old_rounds_per_s']:.1f} | "
            f"{r['new_rounds_per_s']:.1f} | {r['new_over_old_rounds_per_s']:.2f} | "
            f"{r['old_over_floor']:.2f} | {r['new_over_floor']:.2f} | "
            f"{r['new_over_old_floor_ratio']:.2f} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
