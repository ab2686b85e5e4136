r"""Trains a model with a distributed SGD variant and records elastic consistency.

    python -m experiments.train --workdir=/tmp/ej_default

runs the defaults: async SGD with inconsistent reads (P = 8, staleness uniform up to
8 updates), Top-1% compression with error feedback, the SmallCNN on the bundled
digits, 500 rounds; `--algorithm=X` alone runs every variant. `--help` lists every
flag with its range and where it applies (`config.FLAGS`; docs/arguments.md).
A refusal before anything compiles (a bad flag, a flag given that does not apply,
a bad data file, a workdir that cannot be created or written, holds a run or is in
use) is one line on stderr and exit status 2; later, 3 for a non-finite value, 4
for a refused write (the last checkpoint intact), 128 + the signal number after
SIGTERM or SIGINT (a final checkpoint written). `--resume` continues exactly after
any of these, and after SIGKILL.

The workdir receives `config.json` (the flags that apply), `metrics.jsonl`,
`timing.jsonl`, `checkpoint.npz` and plots (`workdir.py`). A metrics line, at
multiples of `--log_every` and `--eval_every` and at the last round, holds the
round's library metrics (`loss`, `aux/accuracy`: training loss and accuracy at the
workers' views), the actual model's `test/*` (convex: `full/loss`,
`full/suboptimality`) on evaluation rounds, the largest `b_hat` and `b_hat / bound`
since the previous line with their rounds (`consistency/b_hat_peak[_round]`,
`consistency/ratio_peak[_round]`), and `consistency/bound_violations`, the rounds
so far with `b_hat > bound` (deterministic bounds).

Rounds run through `ej.run(..., batch_fn=...)` in calls of at most 16 rounds ending
at every logged, evaluated and checkpointed round: the library derives each
worker's batch key from the state's key, the round and the worker, and a run split
into calls of any lengths is bitwise the same, so a resume is exact.
`--num_seeds=S` vmaps `ej.run` over seeds `seed .. seed + S - 1` (model keys
`fold_in(key(s), 0)`, algorithm keys `fold_in(key(s), 1)`; one data split): metrics
are means with `<name>/std`, peaks over seeds and rounds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

import elastic_jax as ej
from experiments import config as config_lib
from experiments import flags, safety
from experiments import plots as plots_lib
from experiments import problem as problem_lib
from experiments import workdir as workdir_lib
from experiments.config import Config
from experiments.flags import IOFailure, log


def summarize(values: Mapping[str, Any], num_seeds: int) -> dict[str, float]:
    """Host scalars per metric (`[S]` arrays); over seeds, the mean and `<name>/std`."""
    out = {}
    for name in sorted(values):
        v = np.asarray(values[name], np.float64)
        out.update({name: float(np.mean(v))} | ({f"{name}/std": float(np.std(v))}
                                                 if num_seeds > 1 else {}))
    return out


class Peaks:
    """The largest `b_hat` and `b_hat / bound` since the previous logged round, and the
    rounds of the whole run in which `b_hat` exceeded a deterministic bound."""

    def __init__(self, deterministic: bool, saved: dict | None = None):
        # since: [[b_hat, round], [ratio, round]]; worst: [ratio, round] over the run.
        self.since, self.violations, self.first_violation, self.worst = [None, None], 0, None, None
        vars(self).update(saved or {})
        self.deterministic = deterministic

    def record(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "deterministic"}

    def update(self, m: Mapping[str, np.ndarray], r0: int) -> None:
        """Takes in the metrics (`[S, n]`) of rounds `r0 + 1 .. r0 + n`."""
        b, bound = m["consistency/b_hat"], m["consistency/bound"]
        rounds = r0 + 1 + np.arange(b.shape[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.isfinite(bound) & (bound > 0), b / bound,
                             np.where((bound == 0) & (b > 0), np.inf, np.nan))
        for i, values in enumerate((b, ratio)):
            per_round = np.max(np.where(np.isnan(values), -np.inf, values), axis=0)
            j = int(np.argmax(per_round))
            if per_round[j] > -np.inf and (self.since[i] is None or
                                           per_round[j] > self.since[i][0]):
                self.since[i] = [float(per_round[j]), int(rounds[j])]
        top = self.since[1]
        if top is not None and (self.worst is None or top[0] > self.worst[0]):
            self.worst = list(top)
        if self.deterministic:
            held = np.asarray(ej.checks.bound_holds(b, bound, 0.0, m["learning_rate"]))
            bad = np.any(np.isfinite(b) & ~held, axis=0)
            if bad.any() and self.first_violation is None:
                self.first_violation = int(rounds[np.argmax(bad)])
            self.violations += int(bad.sum())

    def flush(self, reset: bool) -> dict[str, Any]:
        """The record's fields; `reset` starts a new interval (a round on the log grid)."""
        (b, b_round), (ratio, ratio_round) = [x or [None, None] for x in self.since]
        out = {"consistency/b_hat_peak": b, "consistency/b_hat_peak_round": b_round,
               "consistency/ratio_peak": ratio, "consistency/ratio_peak_round": ratio_round}
        if self.deterministic:
            out["consistency/bound_violations"] = self.violations
        if reset:
            self.since = [None, None]
        return out

    def verdict(self) -> str:
        if not self.deterministic:
            return "b_hat's bound here is not a per-round bound (see docs/theory.md section 5)"
        if self.violations:
            return (f"b_hat exceeded its bound in {self.violations} round(s), the first: "
                    f"round {self.first_violation}")
        worst = "" if self.worst is None else (f" (the largest b_hat / bound: "
                                               f"{self.worst[0]:.3g}, round {self.worst[1]})")
        return f"b_hat <= bound held in every round{worst}"


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the configured run in `--workdir`; returns the last metrics record.

    Raises:
      UsageError: before anything is compiled: bad data files, a compressor that
        does not fit the model, or a workdir that cannot be used.
      safety.NonFiniteError, IOFailure, safety.Interrupted: see the module docstring.
    """
    session = problem_lib.session(cfg)
    try:
        abstract = jax.eval_shape(session.init)  # Traces init (checks k <= d ...).
    except ValueError as e:
        raise config_lib.from_library_error(e) from None
    mesh = _mesh(cfg.flags)
    wd = cfg.flags["workdir"]
    try:
        lock = workdir_lib.lock_workdir(wd)
    except IOFailure as e:
        raise _unwritable(wd, e) from None
    try:
        with safety.Signals() as signals:
            return _train_locked(cfg, session, abstract, mesh, signals)
    finally:
        lock.release()


def _unwritable(wd: str, error: IOFailure) -> flags.UsageError:
    return flags.usage("workdir", wd, f"a directory this process can create and write "
                       f"({error})")


def _train_locked(cfg: Config, session, abstract, mesh, signals: safety.Signals):
    f = cfg.flags
    num_seeds, rounds, wd = f["num_seeds"], f["rounds"], f["workdir"]
    start = workdir_lib.check_workdir(cfg, abstract)
    metrics_path = os.path.join(wd, workdir_lib.METRICS)
    try:  # Nothing is compiled yet: a refused write is a usage error.
        workdir_lib.remove_stale_temporaries(wd)
        workdir_lib.write_json(os.path.join(wd, workdir_lib.CONFIG), cfg.saved)
        workdir_lib.rewrite_jsonl(metrics_path, start.records)
        timing = workdir_lib.JsonlWriter(os.path.join(wd, workdir_lib.TIMING))
        metrics_file = workdir_lib.JsonlWriter(metrics_path)
        timing.write({"event": "start", "round": start.round, "unix_time": time.time()})
    except IOFailure as e:
        raise _unwritable(wd, e) from None
    records = list(start.records)
    t0 = time.perf_counter()
    loop = config_lib.resolve_loop(f, jax.devices()[0].platform)

    def run(state, n):
        return ej.run(session.algorithm, session.problem.loss_fn, state,
                      batch_fn=session.problem.batch_fn, rounds=n,
                      has_aux=session.problem.has_aux, loop=loop, mesh=mesh,
                      worker_loop=f["worker_loop"])

    seeded = num_seeds > 1
    guard = safety.Guard((lambda state, n: jax.vmap(lambda s: run(s, n))(state)) if seeded
                         else run, f["on_nonfinite"], seeded, wd, start.running.get("guard"))
    if start.state is not None:
        guard.checkpoint_round = start.round
    peaks = Peaks(session.algorithm.info.bound_kind == "deterministic",
                  start.running.get("peaks"))
    title = config_lib.describe(f)
    log.info("%s: %d rounds from round %d (%s loop); workdir %s", title, rounds, start.round,
             loop, wd)
    r = start.round
    try:
        state = session.init() if start.state is None else start.state
        last_r, last_t = r, time.perf_counter()
        while r < rounds:
            if signals.received is not None:  # The state is that after round r.
                if guard.checkpoint_round != r:
                    _checkpoint(wd, state, r, metrics_file, guard, peaks)
                raise safety.Interrupted(signals.received, r, wd)
            end = _chunk_end(r, f)
            state, metrics = guard.advance(state, r, end - r)
            peaks.update(metrics, r)
            r = end
            on_grid = workdir_lib.on_grid(r, f)
            if r == rounds or on_grid:
                record = {"round": r, **summarize({k: v[:, -1] for k, v in metrics.items()},
                                                  num_seeds),
                          "nonfinite/skipped_rounds": guard.skipped, **peaks.flush(on_grid)}
                if r == rounds or (f["eval_every"] and r % f["eval_every"] == 0):
                    record.update(_evaluate(session.problem, state, num_seeds))
                record.update(targets(records + [record], f))
                metrics_file.write(record)
                records.append(record)
                now = time.perf_counter()
                rate = (r - last_r) / max(now - last_t, 1e-9)
                last_r, last_t = r, now
                timing.write({"round": r, "elapsed_s": now - t0, "rounds_per_s": rate})
                _log_progress(record, rounds, rate)
            if r == rounds or (f["checkpoint_every"] and r % f["checkpoint_every"] == 0):
                _checkpoint(wd, state, r, metrics_file, guard, peaks)
        wall = time.perf_counter() - t0
        timing.write({"event": "end", "round": rounds, "elapsed_s": wall})
        plots_lib.write_plots(wd, records, title)
    except IOFailure as e:
        kept = ("no checkpoint was written yet" if guard.checkpoint_round is None else
                f"the last checkpoint, round {guard.checkpoint_round}, is intact; --resume "
                "continues from it")
        raise IOFailure(f"{e}; stopped at round {r}; {kept}") from None
    finally:
        metrics_file.close()
        timing.close()
    guard.report_end()
    log.info("done: round %d in %s (wall, this session); %s%s", rounds, flags.clock(wall),
             peaks.verdict(), _describe_targets(records[-1] if records else {}, f))
    return records[-1] if records else {}


TARGETS = (  # flag, metric, whether a value reaches the target
    ("target_loss", "loss", lambda value, target: value <= target),
    ("target_accuracy", "test/accuracy", lambda value, target: value >= target),
)


def targets(records, f: Mapping[str, Any]) -> dict[str, Any]:
    """`target/<name>_round` and `target/<name>_seconds` (simulated, where the clock runs):
    the first record reaching `--target_loss` (training loss at the views) or
    `--target_accuracy` (test accuracy), None until one does; nothing without a target."""
    out = {}
    for flag, metric, reached in TARGETS:
        target = f[flag]
        if not target or (flag == "target_accuracy" and f["dataset"] not in
                          config_lib.IMAGE_DATASETS):
            continue
        hit = next((r for r in records if r.get(metric) is not None
                    and reached(r[metric], target)), None)
        name = flag.removeprefix("target_")
        out[f"target/{name}_round"] = hit and hit["round"]
        out[f"target/{name}_seconds"] = hit and hit.get("time/elapsed")
    return out


def _describe_targets(record: Mapping[str, Any], f: Mapping[str, Any]) -> str:
    parts = []
    for flag, metric, _ in TARGETS:
        name = flag.removeprefix("target_")
        if f"target/{name}_round" not in record:
            continue
        where = record[f"target/{name}_round"]
        seconds = record.get(f"target/{name}_seconds")
        parts.append(f"{metric} {f[flag]:g} " + ("not reached" if where is None else
                     f"reached at round {where}" + (f" ({seconds:.4g} simulated s)"
                                                    if seconds is not None else "")))
    return "; " + "; ".join(parts) if parts else ""


def _chunk_end(r: int, f: Mapping[str, Any]) -> int:
    """The round an `ej.run` call from round `r` ends at: the next logged, evaluated or
    checkpointed round, the last round, or `r + CHUNK`, whichever comes first."""
    ends = [f["rounds"], r + config_lib.CHUNK]
    ends += [(r // f[k] + 1) * f[k] for k in ("log_every", "eval_every", "checkpoint_every")
             if f[k] > 0]
    return min(ends)


def _mesh(f: Mapping[str, Any]):
    """The `workers` mesh of `--num_devices` (over every process's devices), or None."""
    if not f["num_devices"]:
        return None
    if f["num_devices"] > jax.device_count():
        raise flags.usage("num_devices", f["num_devices"], f"at most the "
                          f"{jax.device_count()} {jax.devices()[0].platform} device(s) of this "
                          "run (N simulated CPU devices: launch with XLA_FLAGS="
                          "--xla_force_host_platform_device_count=N)")
    return ej.parallel.make_mesh(f["num_devices"])


def _log_progress(record: Mapping[str, Any], rounds: int, rate: float) -> None:
    evals = "".join(f" | {k} {v:.4f}" for k, v in record.items()
                    if k.startswith(("test/", "full/")) and not k.endswith("/std")
                    and v is not None)
    loss = record.get("loss")
    log.info("round %d/%d | %.1f rounds/s | ETA %s | training loss at the views %s | peak "
             "b_hat %.4g (round %s)%s", record["round"], rounds, rate,
             flags.clock((rounds - record["round"]) / rate),
             f"{_or_nan(loss):.4f}",
             _or_nan(record["consistency/b_hat_peak"]),
             record["consistency/b_hat_peak_round"], evals)


def _or_nan(x):
    return math.nan if x is None else x


def _checkpoint(wd: str, state, round_: int, metrics_file, guard, peaks) -> None:
    """Saves the state after the metrics up to `round_` are on disk."""
    metrics_file.sync()
    workdir_lib.save_checkpoint(os.path.join(wd, workdir_lib.CHECKPOINT), state, round_,
                                records={"guard": guard.record(), "peaks": peaks.record()})
    guard.checkpoint_round = round_


_MODEL = jax.jit(ej.model)


def _evaluate(problem: problem_lib.Problem, state, num_seeds: int) -> dict[str, float]:
    if num_seeds == 1:
        return problem.evaluate(_MODEL(state))
    per_seed = [problem.evaluate(_MODEL(jax.tree.map(lambda x, s=s: x[s], state)))
                for s in range(num_seeds)]
    return summarize({k: [d[k] for d in per_seed] for k in per_seed[0]}, num_seeds)


def _run(given: dict, argv: list) -> None:
    del argv
    cfg = config_lib.validate(given)
    if cfg.flags["num_processes"] > 1:
        jax.distributed.initialize(cfg.flags["coordinator"], cfg.flags["num_processes"],
                                   cfg.flags["process_id"])
    train(cfg)


def main(argv: list[str] | None = None) -> None:
    flags.main(__doc__, config_lib.FLAGS, _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
