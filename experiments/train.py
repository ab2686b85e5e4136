r"""Trains a model with a distributed SGD variant and records elastic consistency.

    python -m experiments.train --workdir=/tmp/ej_default

runs the defaults: asynchronous SGD with inconsistent reads (P = 8 workers,
staleness uniform up to 8 updates), Top-1% compression with error feedback, the
SmallCNN on the bundled 8x8 digits, 500 rounds. `--helpfull` lists every flag
with its meaning and range.

This file is the absl shell and the training loop; the rest lives in
`config.py` (the flags as data, `validate`), `registry.py` (flags -> algorithm),
`problem.py` (data, model, initial state, the compiled round), `workdir.py`
(files, checkpoints, resume, the workdir lock), `safety.py` (the divergence guard,
signals) and `plots.py`.

Everything is checked before anything compiles or is written: a bad flag, an
inconsistent combination, a missing or corrupt data file, a workdir that
already holds a run, or one that another running launch holds locked, prints
one line (`--<flag>: got <value>; expected <range>`, or a line starting with the
file's path) on stderr and exits with status 2. `docs/arguments.md` lists every
flag with its range (`python -m experiments.arguments` writes it).

Exit status:

    0     the run finished (under --on_nonfinite=skip_round, possibly with skipped
          rounds: the log and `nonfinite/skipped_rounds` say how many)
    2     usage error, one line on stderr; nothing written
    3     --on_nonfinite=stop met a non-finite loss, gradient norm (`grad_norm/max`)
          or state (parameters, residuals, buffers): one line on stderr names the
          round and the quantity; the last checkpoint, always finite, is kept
    130   SIGINT  } 128 + the signal number: a final checkpoint at the current
    143   SIGTERM } round was written after the metrics lines up to it

After any of these, and after SIGKILL, `--resume` continues exactly.

The workdir (see `experiments/workdir.py`) receives `config.json`,
`metrics.jsonl` (one line per logged round: every library metric, the training
loss `loss` and accuracy `aux/accuracy` at the workers' views, and on evaluation
rounds `test/loss` and `test/accuracy` of the actual model `ej.model(state)`;
the convex datasets report `full/loss` and `full/suboptimality`, `f(X) - f*`, over
the whole training set), `timing.jsonl`, `checkpoint.npz` and PNG plots.

Semantics worth knowing:

- Round `r` in the record is the state after `r` rounds. Lines are written at
  multiples of `--log_every` and `--eval_every` and at the last round; metrics
  are fetched from the device only for those rounds, so the loop never blocks
  in between.
- Data lives on the device; worker `p` samples its round-`r` batch from its shard
  with `ej.derive_key(base, TAG_DATA, r, p)`, `base` the state's key, exactly as
  `ej.run(..., batch_fn=...)` does, so the trajectory depends on nothing but the
  config and the round. `--loop` picks how rounds run, as `ej.run(loop=...)`
  does: `python`, a Python loop over one compiled round (a single-seed run is
  then bitwise `ej.run(..., loop="python")`), or `chunks`, up to 16 rounds in one
  compiled `lax.while_loop` whose trip count is an argument, each chunk ending at
  the next logged, evaluated or checkpointed round (every round is the same
  loop body, so a resume anywhere is exact). The two agree to rounding. `auto`
  (the default) runs chunks, except a Python loop for the cnn and resnet20 on the
  CPU (XLA:CPU's convolutions are many times slower inside a loop body) and
  with `--num_devices`.
- `--resume` continues from the checkpoint to `--rounds`, dropping metrics lines
  past the checkpoint (and an earlier run's off-grid last line), so the final
  state and `metrics.jsonl` equal an uninterrupted run's exactly. Only the
  non-semantic flags (`--rounds`, `--workdir`, `--data_dir`, `--checkpoint_every`,
  `--resume`, `--on_nonfinite`, the placement flags) may differ from `config.json`;
  `--rounds` may not when a decaying schedule spans it (`--schedule_rounds=0`).
- Divergence guard (`--on_nonfinite`): the compiled round checks the loss, the
  gradient norm and every float array of the new state, and carries a small
  record of the first and last non-finite rounds, read on the host only when the
  loop logs or checkpoints. `stop` ends the run before writing anything of the
  failed round or later. `skip_round` drops a failed round's update: the state
  stays as it was except `round`, which advances, so the next round draws a new
  batch, new keys and lags and takes its own learning rate; the algorithm's own
  counters and buffers (async's update count, message slots) stay as if nothing
  had been sent that round. The count is saved with each checkpoint and reported
  as `nonfinite/skipped_rounds` (0 in every line of a finite run). Selection is
  exact, so a finite run is bitwise the unguarded one.
- SIGTERM or SIGINT: the loop finishes the round (or chunk of rounds) in flight,
  saves a checkpoint at the round it reached and exits with 128 + the signal
  number; a second signal ends the process at once. A running launch holds a
  `flock` on its workdir, which the operating system drops when the process dies.
- Test hooks (environment variables only the tests set):
  `EJ_TEST_NONFINITE_AT_ROUND=r` makes round `r` read NaN inputs
  (`experiments/safety.py`); `EJ_TEST_KILL_IN_CHECKPOINT=r` SIGKILLs the process
  in the middle of saving the round-`r` checkpoint (`experiments/workdir.py`).
- `--num_seeds=S` runs seeds `seed .. seed + S - 1` as one `vmap`ped batch (the
  partition and a convex problem are drawn from `--seed` and shared); every
  metric is then the mean over seeds and `<metric>/std` the (population) standard
  deviation. Seed `s` initialises the model with `fold_in(key(s), 0)` and the
  algorithm with `fold_in(key(s), 1)`.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import elastic_jax as ej
from experiments import config as config_lib
from experiments import plots as plots_lib
from experiments import problem as problem_lib
from experiments import safety
from experiments import workdir as workdir_lib
from experiments.config import Config, UsageError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    for spec in config_lib.FLAG_SPECS:
        help_text = spec.help  # absl lists an enum's choices itself.
        if spec.kind in ("int", "float"):
            help_text += f" Range: {spec.expected}."
        if spec.kind == "int":
            flags.DEFINE_integer(spec.name, spec.default, help_text)
        elif spec.kind == "float":
            flags.DEFINE_float(spec.name, spec.default, help_text)
        elif spec.kind == "bool":
            flags.DEFINE_bool(spec.name, spec.default, help_text)
        elif spec.kind == "enum":
            flags.DEFINE_enum(spec.name, spec.default, list(spec.choices), help_text)
        else:
            flags.DEFINE_string(spec.name, spec.default, help_text)


_define_flags()


# ------------------------------------------------------------------------ loop


def summarize(values: Mapping[str, Any], num_seeds: int) -> dict[str, float]:
    """Host scalars per metric; over seeds, the mean and `<name>/std`."""
    out = {}
    for name in sorted(values):
        v = np.asarray(values[name], np.float64)
        if num_seeds == 1:
            out[name] = float(v)
        else:
            out[name] = float(np.mean(v))
            out[name + "/std"] = float(np.std(v))
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the configured run in `--workdir`.

    Args:
      cfg: a validated config (`experiments.config.validate`).

    Returns:
      The last metrics record (its round is `--rounds`).

    Raises:
      UsageError: before anything is compiled or written, for bad data files, a
        compressor that does not fit the model, or a workdir that cannot be used
        (it holds a run, or another running process holds its lock).
      safety.NonFiniteError: `--on_nonfinite=stop` met a non-finite value (one line).
      safety.Interrupted: SIGTERM or SIGINT arrived; a final checkpoint was written.
    """
    problem, init, compiled = problem_lib.session(cfg)
    try:
        abstract = jax.eval_shape(init)  # Traces init (checks k <= d ...); compiles nothing.
    except ValueError as e:
        raise config_lib.from_library_error(e) from None
    mesh = _mesh(cfg.flags)
    lock = workdir_lib.lock_workdir(cfg.flags["workdir"])
    try:
        with safety.Signals() as signals:
            return _train_locked(cfg, problem, init, compiled, abstract, mesh, signals)
    finally:
        lock.release()


def _train_locked(cfg: Config, problem, init, compiled: list, abstract, mesh,
                  signals: safety.Signals):
    """`train`, once the workdir is locked."""
    f = cfg.flags
    num_seeds, rounds, wd = f["num_seeds"], f["rounds"], f["workdir"]
    start = workdir_lib.check_workdir(cfg, abstract)

    # ---- Past this point the flags are valid: write.
    workdir_lib.remove_stale_temporaries(wd)
    workdir_lib.write_json(os.path.join(wd, workdir_lib.CONFIG), f)
    metrics_path = os.path.join(wd, workdir_lib.METRICS)
    workdir_lib.rewrite_jsonl(metrics_path, start.records)
    records = list(start.records)
    timing = workdir_lib.JsonlWriter(os.path.join(wd, workdir_lib.TIMING))
    metrics_file = workdir_lib.JsonlWriter(metrics_path)
    t0 = time.perf_counter()
    timing.write({"event": "start", "round": start.round, "unix_time": time.time()})

    state = init() if start.state is None else start.state
    state = jax.tree.map(jnp.copy, state)  # Own buffers: the round donates its input.
    guard = safety.resumed_guard(start.guard, f["on_nonfinite"], num_seeds)
    guard_keeper = safety.GuardKeeper(f, start, wd, np.asarray(guard))
    if num_seeds == 1:
        placement = mesh or ej.parallel.make_mesh(1)
        state = ej.parallel.shard_state(state, placement)
        # Replicated over the mesh like the shared state.
        guard = jax.device_put(guard, jax.sharding.NamedSharding(
            placement, jax.sharding.PartitionSpec()))
    model_fn = _MODEL_OF_SEEDS if num_seeds > 1 else _MODEL
    n_params = sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(problem.init_params, jax.random.key(0))))
    logging.info("%s (%d parameters); %d rounds from round %d; workdir %s", problem.title,
                 n_params, rounds, start.round, wd)
    loop = config_lib.resolve_loop(f, jax.devices()[0].platform)
    try:
        if start.round < rounds:
            tc = time.perf_counter()
            if not compiled:
                compiled.append(_compile(cfg, problem, mesh, state, guard, loop))
            compile_s = time.perf_counter() - tc
            timing.write({"event": "compiled", "round": start.round, "elapsed_s": compile_s})
            logging.info("compiled the %s in %.1f s",
                         "round" if loop == "python" else
                         f"chunk of up to {config_lib.CHUNK} rounds", compile_s)
        last_r, last_t = start.round, time.perf_counter()
        r = start.round
        while r < rounds:
            if signals.received is not None:  # The state is that after round r.
                guard_keeper.check(jax.device_get(guard))
                if guard_keeper.checkpoint_round != r:
                    _checkpoint(wd, state, r, metrics_file, guard)
                raise safety.Interrupted(signals.received, r, wd)
            n = 1 if loop == "python" else _chunk_end(r, f) - r
            state, metrics, guard = compiled[0](state, guard, n)
            r += n
            if mesh is not None and mesh.size > 1:
                jax.block_until_ready(state)  # As ej.run does: no overlapping collectives.
            log_now = r == rounds or workdir_lib.on_grid(r, f)
            checkpoint_now = r == rounds or (f["checkpoint_every"]
                                             and r % f["checkpoint_every"] == 0)
            if log_now:
                host_metrics, host_guard = jax.device_get((metrics, guard))
                guard_keeper.check(host_guard)  # Nothing of a failed round is written.
                record = {"round": r, **summarize(host_metrics, num_seeds)}
                if r == rounds or (f["eval_every"] > 0 and r % f["eval_every"] == 0):
                    record.update(_evaluate(problem, model_fn(state), num_seeds))
                metrics_file.write(record)
                records.append(record)
                now = time.perf_counter()
                rate = (r - last_r) / max(now - last_t, 1e-9)
                last_r, last_t = r, now
                timing.write({"round": r, "elapsed_s": now - t0, "rounds_per_s": rate})
                _log_progress(record, rounds, rate)
            if checkpoint_now:
                if not log_now:
                    guard_keeper.check(jax.device_get(guard))
                _checkpoint(wd, state, r, metrics_file, guard)
                guard_keeper.checkpoint_round = r
        wall = time.perf_counter() - t0
        timing.write({"event": "end", "round": rounds, "elapsed_s": wall})
    finally:
        metrics_file.close()
        timing.close()
    guard_keeper.report_end()
    plots_lib.write_plots(wd, records, problem.title)
    logging.info("done: round %d in %s (wall, this session)", rounds, _fmt_time(wall))
    return records[-1] if records else {}


def _compile(cfg: Config, problem, mesh, state, guard, loop: str):
    """`advance(state, guard, n) -> (state, metrics, guard)`, compiled ahead of time.

    With `loop="python"` one round (`n` is 1), its batch sampled by a program of
    its own; with `"chunks"` `n <= config.CHUNK` rounds in one program, the
    metrics those of the last.
    """
    on_nonfinite = cfg.flags["on_nonfinite"]
    if loop == "chunks":
        program = problem_lib.make_chunk(cfg, problem, mesh, on_nonfinite=on_nonfinite)
        program = jax.jit(program, donate_argnums=0).lower(
            state, guard, jnp.zeros((), jnp.int32)).compile()
        return lambda s, g, n: program(s, g, jnp.asarray(n, jnp.int32))
    sample, step = problem_lib.make_round(cfg, problem, mesh, on_nonfinite=on_nonfinite)
    sample = jax.jit(sample).lower(state).compile()
    step = jax.jit(step, donate_argnums=0).lower(state, sample(state), guard).compile()

    def advance(s, g, n):
        del n  # Always 1.
        return step(s, sample(s), g)

    return advance


def _chunk_end(r: int, f: Mapping[str, Any]) -> int:
    """The round a chunk started at round `r` ends at: the next logged, evaluated or
    checkpointed round, the last round, or `r + CHUNK`, whichever comes first."""

    def next_multiple(every: int) -> int:
        return (r // every + 1) * every

    ends = [f["rounds"], r + config_lib.CHUNK, next_multiple(f["log_every"])]
    ends += [next_multiple(f[k]) for k in ("eval_every", "checkpoint_every") if f[k] > 0]
    return min(ends)


def _mesh(f: Mapping[str, Any]):
    """The `workers` mesh of `--num_devices` (over every process's devices), or None."""
    if not f["num_devices"]:
        return None
    if f["num_devices"] > jax.device_count():
        raise UsageError(f"--num_devices: got {f['num_devices']}; expected at most the "
                         f"{jax.device_count()} devices of this run")
    return ej.parallel.make_mesh(f["num_devices"])


def _log_progress(record: Mapping[str, Any], rounds: int, rate: float) -> None:
    evals = "".join(f" | {k} {v:.4f}" for k, v in record.items()
                    if k.startswith(("test/", "full/")) and not k.endswith("/std")
                    and v is not None)
    loss = record.get("loss")
    logging.info("round %d/%d | %.1f rounds/s | ETA %s | loss %s%s", record["round"], rounds,
                 rate, _fmt_time((rounds - record["round"]) / rate),
                 "nan" if loss is None or not math.isfinite(loss) else f"{loss:.4f}", evals)


def _checkpoint(wd: str, state, round_: int, metrics_file, guard) -> None:
    """Saves the state after the metrics up to `round_` are on disk."""
    metrics_file.sync()
    workdir_lib.save_checkpoint(os.path.join(wd, workdir_lib.CHECKPOINT), state, round_,
                                guard=guard)


_MODEL = jax.jit(ej.model)
_MODEL_OF_SEEDS = jax.jit(jax.vmap(ej.model))


def _evaluate(problem: problem_lib.Problem, params, num_seeds: int) -> dict[str, float]:
    if num_seeds == 1:
        return problem.evaluate(params)
    per_seed = [problem.evaluate(jax.tree.map(lambda x, s=s: x[s], params))
                for s in range(num_seeds)]
    return summarize({k: [d[k] for d in per_seed] for k in per_seed[0]}, num_seeds)


# ------------------------------------------------------------------------ main


def flag_values() -> dict[str, Any]:
    """The parsed value of every launcher flag."""
    return {spec.name: FLAGS[spec.name].value for spec in config_lib.FLAG_SPECS}


def _exit_usage(line: str) -> None:
    print(line, file=sys.stderr)
    sys.exit(config_lib.EXIT_USAGE)


def flag_error_line(error: Exception) -> str:
    """One line `--<flag>: got <value>; expected <range>` for an absl parsing error."""
    message = " ".join(str(error).split())
    match = re.match(r"^flag --(\w+)=(.*?): ", message)
    if match and match.group(1) in config_lib.SPECS:
        name, value = match.groups()
        return f"--{name}: got {value!r}; expected {config_lib.SPECS[name].expected}"
    match = re.match(r"^Missing value for flag --(\w+)", message)
    if match:
        name = match.group(1)
        expected = config_lib.SPECS[name].expected if name in config_lib.SPECS else "a value"
        return f"--{name}: got no value; expected {expected}"
    match = re.match(r"^Unknown command line flag '(\w+)'", message)
    if match:
        return (f"--{match.group(1)}: got an unknown flag; expected a flag of "
                "experiments.train (see --helpfull)")
    return message


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors are one line on stderr and exit status 2."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _exit_usage(flag_error_line(e))
    if len(rest) > 1:
        _exit_usage(f"argv: got {rest[1:]!r}; expected no positional arguments")
    return rest


def main(argv: list[str]) -> None:
    del argv
    # JAX reports at INFO level which backends it could not find; keep stderr for
    # what matters (a usage error is its only line).
    std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    try:
        cfg = config_lib.validate(flag_values())
        if cfg.flags["num_processes"] > 1:
            jax.distributed.initialize(cfg.flags["coordinator"], cfg.flags["num_processes"],
                                       cfg.flags["process_id"])
        train(cfg)
    except UsageError as e:
        _exit_usage(str(e))
    except safety.NonFiniteError as e:
        print(str(e), file=sys.stderr)
        sys.exit(config_lib.EXIT_NONFINITE)
    except safety.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
