r"""Trains a model with a distributed SGD variant and records elastic consistency.

    python -m experiments.train --workdir=/tmp/ej_default

runs the defaults: asynchronous SGD with inconsistent reads (P = 8 workers,
staleness uniform up to 8 updates), Top-1% compression with error feedback, the
SmallCNN on the bundled 8x8 digits, 500 rounds. `--helpfull` lists every flag
with its meaning and range (`experiments/config.py` declares them).

Everything is checked before anything compiles or is written: a bad flag, an
inconsistent combination, a missing or corrupt data file, or a workdir that
already holds a run prints one line (`--<flag>: got <value>; expected <range>`,
or a line starting with the file's path) on stderr and exits with status 2.

The workdir (see `experiments/workdir.py`) receives `config.json`,
`metrics.jsonl` (one line per logged round: every library metric, the training
loss `loss` and accuracy `aux/accuracy` at the workers' views, and on evaluation
rounds `test/loss` and `test/accuracy` of the actual model `ej.model(state)`;
the convex datasets report `full/loss` and `full/suboptimality`, `f(X) - f*`, over
the whole training set), `timing.jsonl`, `checkpoint.npz` and PNG plots.

Semantics worth knowing:

- Round `r` in the record is the state after `r` rounds. Lines are written at
  multiples of `--log_every` and `--eval_every` and at the last round.
- Data lives on the device; worker `p` samples its round-`r` batch from its shard
  with `ej.derive_key(base, TAG_DATA, r, p)`, `base` the state's key, exactly as
  `ej.run(..., batch_fn=...)` does, so the trajectory depends on nothing but the
  config and the round.
- `--resume` continues from the checkpoint to `--rounds`, dropping metrics lines
  past the checkpoint (and an earlier run's off-grid last line), so the final
  state and `metrics.jsonl` equal an uninterrupted run's exactly. Only the
  non-semantic flags (`--rounds`, `--workdir`, `--data_dir`, `--checkpoint_every`,
  `--resume`) may differ from `config.json`; `--rounds` may not when a decaying
  schedule spans it (`--schedule_rounds=0`).
- `--num_seeds=S` runs seeds `seed .. seed + S - 1` as one `vmap`ped batch (the
  partition and a convex problem are drawn from `--seed` and shared); every
  metric is then the mean over seeds and `<metric>/std` the (population) standard
  deviation. Seed `s` initialises the model with `fold_in(key(s), 0)` and the
  algorithm with `fold_in(key(s), 1)`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import elastic_jax as ej
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import plots as plots_lib
from experiments import workdir as workdir_lib
from experiments.config import Config, UsageError

FLAGS = flags.FLAGS

# The purpose tag of per-worker batch sampling: elastic_jax.core.TAG_DATA, which
# the public API does not export; `ej.run(batch_fn=...)` derives the same keys.
DATA_TAG = 3


def _define_flags() -> None:
    for spec in config_lib.FLAG_SPECS:
        help_text = f"{spec.help} Range: {spec.expected}."
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


# --------------------------------------------------------------------- problem


class Problem(NamedTuple):
    """What the loop needs from the data and the model."""

    loss_fn: Callable  # (params, batch) -> loss, or (loss, aux) with has_aux
    has_aux: bool
    batch_fn: Callable  # (round, worker_keys [P]) -> batch [P, b, ...]
    init_params: Callable  # key -> params
    evaluate: Callable  # params -> {name: float}
    title: str


def _data_error(error: Exception) -> UsageError:
    if isinstance(error, data_lib.DataError):  # Its message starts with the path.
        return UsageError(" ".join(str(error).split()))
    return config_lib.from_library_error(error)


def load_problem(f: Mapping[str, Any]) -> Problem:
    """Loads the dataset, partitions it and builds the model; compiles nothing.

    Raises:
      UsageError: a missing or corrupt data file (the line starts with its path),
        or a partition the data cannot give (e.g. more workers than samples).
    """
    num_workers, seed = f["num_workers"], f["seed"]
    try:
        if f["dataset"] in config_lib.CONVEX_DATASETS:
            make = (data_lib.least_squares if f["dataset"] == "least_squares"
                    else data_lib.logistic_regression)
            problem = make(f["convex_samples"], f["convex_dim"], seed=seed)
            x, y = problem.a.astype(np.float32), problem.b.astype(np.float32)
            labels = (problem.b > 0).astype(np.int32)
        else:
            dataset = data_lib.load_dataset(f["dataset"], f["data_dir"] or None)
            x, y, labels = dataset.x_train, dataset.y_train, dataset.y_train
        shards = data_lib.partition(labels, num_workers, kind=f["partition"],
                                    alpha=f["dirichlet_alpha"], seed=seed)
        batch_fn = data_lib.make_batch_fn(x, y, *shards, batch_size=f["batch_size"])
    except ValueError as e:
        raise _data_error(e) from None
    title = f"{f['algorithm']} P={num_workers} on {f['dataset']}"

    if f["dataset"] in config_lib.CONVEX_DATASETS:
        dim, f_star = f["convex_dim"], problem.f_star
        full_loss = jax.jit(problem.full_loss)

        def evaluate_convex(params) -> dict[str, float]:
            value = float(full_loss(params))
            return {"full/loss": value, "full/suboptimality": value - f_star}

        def init_linear(key):
            del key  # The linear model starts at zero.
            return {"w": jnp.zeros((dim,), jnp.float32)}

        return Problem(problem.loss_fn, False, batch_fn, init_linear, evaluate_convex, title)

    module, init_params = models_lib.make_model(f["model"], dataset.num_classes,
                                                dataset.x_train.shape[1:])

    def evaluate_images(params) -> dict[str, float]:
        loss, accuracy = models_lib.evaluate(module, params, dataset.x_test, dataset.y_test)
        return {"test/loss": loss, "test/accuracy": accuracy}

    return Problem(models_lib.classification_loss(module), True, batch_fn, init_params,
                   evaluate_images, f"{title}, {f['model']}")


def make_init(cfg: Config, problem: Problem) -> Callable[[], Any]:
    """`() -> state`: the initial state, stacked over seeds when `--num_seeds > 1`."""
    alg, f = cfg.algorithm, cfg.flags

    def one(seed: int):
        base = jax.random.key(seed)
        params = problem.init_params(jax.random.fold_in(base, 0))
        return alg.init(params, jax.random.fold_in(base, 1))

    def init():
        if f["num_seeds"] == 1:
            return one(f["seed"])
        states = [one(f["seed"] + s) for s in range(f["num_seeds"])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    return init


def make_round(cfg: Config, problem: Problem) -> Callable:
    """`state -> (state, metrics)`: one round with its batches sampled on the device.

    The same computation as `ej.run(alg, loss_fn, state, batch_fn=..., rounds=1)`;
    `vmap`ped over the leading seed axis when `--num_seeds > 1`.
    """
    alg = cfg.algorithm
    step = ej.make_step(alg, problem.loss_fn, has_aux=problem.has_aux)
    workers = jnp.arange(alg.num_workers)

    def sampled_round(state):
        shared = state.shared
        keys = jax.vmap(lambda p: ej.derive_key(shared.key, DATA_TAG, shared.round, p))(workers)
        return step(state, problem.batch_fn(shared.round, keys))

    return jax.vmap(sampled_round) if cfg.flags["num_seeds"] > 1 else sampled_round


# --------------------------------------------------------------------- workdir


class Start(NamedTuple):
    """Where a run starts: its state (None: fresh) and round, and the records kept."""

    state: Any
    round: int
    records: list  # metrics records to keep (resume), else []


def on_grid(round_: int, f: Mapping[str, Any]) -> bool:
    """Whether an uninterrupted run logs `round_` before its last round."""
    return round_ % f["log_every"] == 0 or (f["eval_every"] > 0 and round_ % f["eval_every"] == 0)


def check_workdir(cfg: Config, abstract_state) -> Start:
    """Checks the workdir against the flags and loads what a resume needs; writes nothing.

    Raises:
      UsageError: the workdir is a file, holds a run without `--resume`, or
        (with `--resume`) holds a different config, a corrupt checkpoint, or a
        checkpoint past `--rounds`.
    """
    f = cfg.flags
    wd = f["workdir"]
    if os.path.exists(wd) and not os.path.isdir(wd):
        raise config_lib.usage("workdir", wd, "a directory (this is a file)")
    existing = [n for n in workdir_lib.RUN_FILES if os.path.exists(os.path.join(wd, n))]
    if not f["resume"]:
        if existing:
            raise config_lib.usage("workdir", wd, f"a directory without a run (it holds "
                                   f"{existing[0]}); pass --resume to continue it")
        return Start(None, 0, [])
    config_path = os.path.join(wd, workdir_lib.CONFIG)
    if not os.path.exists(config_path):
        if existing:
            raise UsageError(f"{os.path.join(wd, existing[0])}: a run without "
                             f"{workdir_lib.CONFIG}; expected a workdir written by "
                             "experiments.train")
        logging.info("--resume: %s holds no run yet; starting from round 0", wd)
        return Start(None, 0, [])
    saved = workdir_lib.read_json(config_path)
    diffs = config_lib.semantic_differences(saved, f)
    if diffs:
        name = diffs[0]
        raise config_lib.usage(name, f[name], f"{saved.get(name, 'nothing')!r}, the value "
                               f"saved in {config_path} (a resumed run keeps its config)")
    checkpoint = os.path.join(wd, workdir_lib.CHECKPOINT)
    if not os.path.exists(checkpoint):
        logging.info("--resume: %s has no checkpoint yet; starting from round 0", wd)
        return Start(None, 0, [])
    state, round_ = workdir_lib.restore_checkpoint(checkpoint, abstract_state)
    if round_ > f["rounds"]:
        raise config_lib.usage("rounds", f["rounds"], f"an integer >= {round_}, the round "
                               f"of {checkpoint}")
    records = workdir_lib.read_jsonl(os.path.join(wd, workdir_lib.METRICS))
    keep = [r for r in records
            if r.get("round", math.inf) <= round_
            and (on_grid(r["round"], f) or r["round"] == f["rounds"])]
    logging.info("--resume: continuing %s from round %d", wd, round_)
    return Start(state, round_, keep)


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
        compressor that does not fit the model, or a workdir that cannot be used.
    """
    f = cfg.flags
    num_seeds, rounds = f["num_seeds"], f["rounds"]
    problem = load_problem(f)
    init = make_init(cfg, problem)
    try:
        abstract = jax.eval_shape(init)  # Traces init (checks k <= d ...); compiles nothing.
    except ValueError as e:
        raise config_lib.from_library_error(e) from None
    start = check_workdir(cfg, abstract)

    # ---- Past this point the flags are valid: write.
    wd = f["workdir"]
    os.makedirs(wd, exist_ok=True)
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
    model_fn = jax.jit(jax.vmap(ej.model) if num_seeds > 1 else ej.model)
    n_params = sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(problem.init_params, jax.random.key(0))))
    logging.info("%s (%d parameters); %d rounds from round %d; workdir %s", problem.title,
                 n_params, rounds, start.round, wd)
    try:
        if start.round < rounds:
            tc = time.perf_counter()
            compiled = jax.jit(make_round(cfg, problem), donate_argnums=0).lower(state).compile()
            compile_s = time.perf_counter() - tc
            timing.write({"event": "compiled", "round": start.round, "elapsed_s": compile_s})
            logging.info("compiled the round in %.1f s", compile_s)
        last_r, last_t = start.round, time.perf_counter()
        for r in range(start.round + 1, rounds + 1):
            state, metrics = compiled(state)
            if r == rounds or on_grid(r, f):
                record = {"round": r, **summarize(jax.device_get(metrics), num_seeds)}
                if r == rounds or (f["eval_every"] > 0 and r % f["eval_every"] == 0):
                    record.update(_evaluate(problem, model_fn(state), num_seeds))
                metrics_file.write(record)
                records.append(record)
                now = time.perf_counter()
                rate = (r - last_r) / max(now - last_t, 1e-9)
                last_r, last_t = r, now
                timing.write({"round": r, "elapsed_s": now - t0, "rounds_per_s": rate})
                _log_progress(record, rounds, rate)
            if r == rounds or (f["checkpoint_every"] and r % f["checkpoint_every"] == 0):
                _checkpoint(wd, state, r, metrics_file)
        wall = time.perf_counter() - t0
        timing.write({"event": "end", "round": rounds, "elapsed_s": wall})
    finally:
        metrics_file.close()
        timing.close()
    plots_lib.write_plots(wd, records, problem.title)
    logging.info("done: round %d in %s (wall, this session)", rounds, _fmt_time(wall))
    return records[-1] if records else {}


def _log_progress(record: Mapping[str, Any], rounds: int, rate: float) -> None:
    evals = "".join(f" | {k} {v:.4f}" for k, v in record.items()
                    if k.startswith(("test/", "full/")) and not k.endswith("/std")
                    and v is not None)
    loss = record.get("loss")
    logging.info("round %d/%d | %.1f rounds/s | ETA %s | loss %s%s", record["round"], rounds,
                 rate, _fmt_time((rounds - record["round"]) / rate),
                 "nan" if loss is None or not math.isfinite(loss) else f"{loss:.4f}", evals)


def _checkpoint(wd: str, state, round_: int, metrics_file) -> None:
    """Saves the state after the metrics up to `round_` are on disk."""
    metrics_file.sync()
    workdir_lib.save_checkpoint(os.path.join(wd, workdir_lib.CHECKPOINT), state, round_)


def _evaluate(problem: Problem, params, num_seeds: int) -> dict[str, float]:
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
    sys.exit(2)


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
    try:
        train(config_lib.validate(flag_values()))
    except UsageError as e:
        _exit_usage(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
