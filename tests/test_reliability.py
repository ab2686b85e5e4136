"""Reliability: bad input, faults during a run, and nothing lost.

- The reference table `docs/arguments.md` is the generator's output, and its library
  part names exactly each factory's arguments with the ranges the factories enforce.
- Fuzzed command lines validate or cost one line and exit status 2 (in-process through
  the launcher's parser and validation, plus a few real launches).
- Corrupt data files: one line naming the file, exit status 2.
- The divergence guard (`--on_nonfinite`): a NaN loss stops the run at its round with
  exit status 3 and a resumable last checkpoint; `skip_round` drops the round and
  finishes; a finite run is bitwise the same under either mode.
- Crash safety: SIGKILL at random moments (one of them inside a checkpoint write) and
  SIGTERM / SIGINT, each followed by `--resume`, end with exactly the final state and
  `metrics.jsonl` of an uninterrupted run; the workdir lock.
- Library edge cases: zero gradients, ties in Top-k, `k = 1`, `k = d`, one worker,
  bfloat16 parameters, for the compressors, error feedback, sync and async SGD.

The launches use the smallest configuration that exercises the whole state (async SGD,
P = 2, Top-k with error feedback, a least-squares problem in 8 dimensions), so each
subprocess spends its few seconds on start-up rather than training.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elastic_jax as ej
from elastic_jax import validation
from elastic_jax.compressors import top_k
from experiments import arguments, config, flags, safety, train, workdir
from tests import helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = (safety.NONFINITE_HOOK, workdir.KILL_HOOK)

# ------------------------------------------------------------ reference table


def test_arguments_doc_is_generated_from_the_code():
    with open(os.path.join(ROOT, "docs", "arguments.md")) as f:
        committed = f.read()
    assert committed == arguments.markdown(), (
        "docs/arguments.md is stale: python -m experiments.arguments > docs/arguments.md")
    for module, table in (("experiments.train", config.FLAGS), *arguments.PROGRAMS):
        section = committed.split(f"## Flags of `python -m {module}`")[1].split("\n## ")[0]
        for spec in table:
            assert f"`--{spec.name}`" in section, (module, spec.name)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "(docs/arguments.md)" in f.read()


# Public functions of `ej` that build nothing a user configures.
NOT_FACTORIES = {"make_step", "run", "sweep", "params", "model", "derive_key",
                 "compression_info", "views", "update",
                 "chain"}  # its arguments are links; the factories check it as `rule`
DELAY_LAWS = {"fixed", "uniform", "geometric", "trace"}
CLOCK_PARTS = {"constant", "exponential", "lognormal", "pareto", "trace", "network", "system",
               "replay"}


def _factory(name):
    target = ej
    for part in name.split("."):
        target = getattr(target, part)
    return target


def test_library_table_names_every_argument_of_every_factory():
    table = validation.FACTORY_ARGUMENTS
    functions = {n for n in ej.__all__ if inspect.isfunction(getattr(ej, n))}
    assert functions - NOT_FACTORIES == {n for n in table if "." not in n}
    assert {f"delays.{n}" for n in DELAY_LAWS} | {f"clock.{n}" for n in CLOCK_PARTS} == {
        n for n in table if "." in n}
    for name, specs in table.items():
        parameters = list(inspect.signature(_factory(name)).parameters)
        assert [s.name for s in specs] == parameters, name
        for spec in specs:
            assert spec.kind in ("int", "real", "choice", "text")
            assert spec.expected


# Arguments that make every factory valid, and one value the table says is invalid
# for each argument described in words.
BASE = {
    "sync_sgd": {"learning_rate": 0.1, "num_workers": 1},
    "async_sgd": {"learning_rate": 0.1, "num_workers": 1, "max_delay": 0},
    "message_passing_sgd": {"learning_rate": 0.1, "num_workers": 1},
    "elastic_scheduling": {"learning_rate": 0.1, "num_workers": 1, "max_outstanding": 0},
    "local_sgd": {"learning_rate": 0.1, "num_workers": 1, "period": 1},
    "gossip_sgd": {"learning_rate": 0.1, "num_workers": 1, "topology": "ring"},
    "diloco": {"learning_rate": 0.1, "num_workers": 1, "period": 1},
    "powersgd": {"rank": 1},
    "identity": {}, "scaled_sign": {},
    "top_k": {"k": 1}, "random_k": {"k": 1}, "qsgd": {"levels": 1},
    "error_feedback": {"compressor": top_k(k=1)},
    "clip": {"max_norm": 1.0}, "sgd": {}, "ef21": {"compressor": top_k(k=1)},
    "weight_decay": {"decay": 0.1}, "adamw": {}, "from_optax": {"tx": optax.scale_by_adam()},
    "delays.fixed": {}, "delays.uniform": {}, "delays.geometric": {},
    "delays.trace": {"lags": np.zeros((1, 1), np.int32)},
    "clock_async_sgd": {"learning_rate": 0.1, "num_workers": 1,
                        "system": ej.clock.system(ej.clock.constant(1.0), rounds=1)},
    "clock.constant": {"seconds": 1.0}, "clock.exponential": {"mean": 1.0},
    "clock.lognormal": {"mean": 1.0, "sigma": 0.5}, "clock.pareto": {"mean": 1.0, "shape": 2.0},
    "clock.trace": {"seconds": np.ones((1, 1))}, "clock.network": {},
    "clock.system": {"compute": ej.clock.constant(1.0), "rounds": 1},
    "clock.replay": {"events": [{"writer": 0, "count": 0, "read": 0, "written": 1,
                                 "read_s": 0.0, "computed_s": 1.0, "written_s": 1.0}]},
}
BAD_TEXT = {
    "compressor": {"compressor": "top_k"},
    "error_feedback": {"error_feedback": 1.5},
    "delay": {"delay": "poisson"},
    "retransmit": {"retransmit": 1},
    "crashes": {"num_workers": 2, "crashes": [(5, 1)]},
    "crash_horizon": {"num_workers": 2, "crashes": 1, "crash_horizon": 1},
    "k": {"k": 0},
    "scaled": {"scaled": 1},
    "key": {"key": "seed"},
    "levels": {"levels": 0},
    "lags": {"lags": np.zeros(3)},
    "rule": {"rule": "sgd"},
    "nesterov": {"nesterov": 1},
    "tx": {"tx": top_k(k=1)},
    "topology": {"num_workers": 2, "topology": [[1.0, 0.0], [0.5, 0.5]]},
    "gossip_compressor": {"gossip_compressor": "top_k"},
    "system": {"system": "fast"},
    "max_delay": {"staleness_policy": "drop", "max_delay": -1},
    "seconds": {"seconds": np.zeros(3)},
    "bandwidth": {"bandwidth": 0.0},
    "compute": {"compute": "fast"},
    "network": {"network": "fast"},
    "slowdown": {"slowdown": [0.0]},
    "events": {"events": []},
    "outer_optimizer": {"outer_optimizer": "sgd"},
    "outer_compressor": {"outer_compressor": "top_k"},
}
ERROR_FEEDBACK_BAD = {"compressor": ej.qsgd(2)}


def _calls(factory, spec):
    """`(kwargs, valid)` probes at and beyond the ends of `spec`'s range."""
    base = dict(BASE[factory])
    if spec.name == "fraction":
        base.pop("k")
    if spec.kind == "choice":
        return [({**base, spec.name: c}, True) for c in spec.choices] + [
            ({**base, spec.name: "bogus"}, False)]
    if spec.kind == "text":
        bad = ERROR_FEEDBACK_BAD if (factory, spec.name) in (("error_feedback", "compressor"),
                                                             ("ef21", "compressor")) \
            else BAD_TEXT[spec.name]
        return [({**base, **bad}, False)]
    step = 1 if spec.kind == "int" else 0.5
    probes = []
    if spec.lo is not None:
        probes += [(spec.lo, not spec.lo_open), (spec.lo - step, False)]
    if spec.hi is not None:
        probes += [(spec.hi, not spec.hi_open), (spec.hi + step, False)]
    return [({**base, spec.name: value}, valid) for value, valid in probes]


PROBES = [(factory, spec) for factory, specs in validation.FACTORY_ARGUMENTS.items()
          for spec in specs]


@pytest.mark.parametrize("factory, spec", PROBES, ids=[f"{f}.{s.name}" for f, s in PROBES])
def test_library_table_ranges_are_the_enforced_ones(factory, spec):
    make = _factory(factory)
    make(**BASE[factory])
    for kwargs, valid in _calls(factory, spec):
        if valid:
            make(**kwargs)
            continue
        with pytest.raises(ValueError) as excinfo:
            make(**kwargs)
        message = str(excinfo.value)
        assert "\n" not in message
        assert message.startswith(f"{spec.reported_as or spec.name}: got "), (kwargs, message)
        if spec.kind != "text" and (factory, spec.name) not in WORDED_OTHERWISE:
            head = spec.expected.split(";")[0].split(" or ")[0].split(" and ")[0]
            assert f"; expected {head}" in message, (head, message)


# Ranges whose error message words them in its own way (same range).
WORDED_OTHERWISE: set = set()


# ------------------------------------------------------- fuzzed command lines


def _flag_value(spec: flags.Flag):
    """Command-line text for a flag: valid values and several kinds of wrong ones."""
    wrong = st.sampled_from(["", "abc", "1e999", "nan", "-1", "2.5", "[1]"])
    if spec.kind == "bool":
        return st.sampled_from(["true", "false", "1", "0", "maybe", ""])
    if spec.kind == "enum":
        return st.one_of(st.sampled_from(spec.choices), wrong)
    if spec.kind in ("str", "path"):
        return st.sampled_from(["", "w", "some/dir"])
    lo = spec.lo if spec.lo is not None else -5
    hi = spec.hi if spec.hi is not None else 10
    if spec.kind == "int":
        numbers = st.integers(int(lo) - 2, min(int(lo) + 12, int(hi) + 2)).map(str)
    else:
        numbers = st.floats(lo - 1.0, min(hi, 100.0) + 1.0, allow_nan=False).map(repr)
    return st.one_of(numbers, wrong)


COMMAND_LINES = st.lists(
    st.one_of(
        st.sampled_from(config.FLAGS).flatmap(
            lambda s: _flag_value(s).map(lambda v, s=s: f"--{s.name}={v}")),
        st.sampled_from(["--bogus=1", "--num_workers", "positional", "--noresume"]),
    ),
    max_size=6,
)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(argv=COMMAND_LINES)
def test_fuzzed_command_lines_validate_or_cost_one_line(argv):
    """What `python -m experiments.train` does with a command line, up to compiling."""
    try:
        cfg = config.validate(flags.parse_argv(config.FLAGS, ["--workdir=w", *argv]))
    except flags.UsageError as e:
        message = str(e)
        assert "\n" not in message and ": got " in message and "; expected " in message, message
        return
    assert isinstance(cfg.algorithm, ej.Algorithm)


def _env(**hooks):
    env = {k: v for k, v in os.environ.items() if k not in HOOKS}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in hooks.items()})
    return env


def _popen(args, **hooks):
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                            env=_env(**hooks), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _assert_one_line_exit_2(result, starts=None):
    code, out, err = result
    assert code == flags.EXIT_USAGE, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == "", err
    if starts is not None:
        assert err.startswith(starts), err


def test_a_few_real_launches_of_bad_configurations(tmp_path):
    rng = random.Random(8)
    bad = {"num_workers": ["0", "x", "1e3"], "learning_rate": ["nan", "-1", "inf"],
           "k_fraction": ["0", "2"], "algorithm": ["adam"], "rounds": ["0", "1.5"],
           "ef_beta": ["1.01"], "on_nonfinite": ["retry"]}
    argvs = []
    for _ in range(3):
        flag = rng.choice(sorted(bad))
        argvs.append([f"--{flag}={rng.choice(bad[flag])}"])
    argvs.append(["--num_workers=8", "--max_delay=3"])  # refused by the library factory
    procs = [_popen([f"--workdir={tmp_path / str(i)}", *argv]) for i, argv in enumerate(argvs)]
    for proc, argv in zip(procs, argvs, strict=True):
        _assert_one_line_exit_2(_finish(proc, timeout=60), starts=argv[-1].split("=")[0] + ":")
    assert not any((tmp_path / str(i)).exists() for i in range(len(argvs)))


# ------------------------------------------------------------ corrupt data


def _mnist(root, labels_magic=2049, truncate=0):
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 16), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        blob = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
        blob += images.tobytes()
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(blob[:len(blob) - truncate])
        blob = labels_magic.to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes()
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(blob)


def _cifar(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (2, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, 2)
        if name == "data_batch_2.bin":
            records[1, 0] = 11
        (root / name).write_bytes(records.tobytes())


def test_corrupt_data_files_cost_one_line_and_exit_2(tmp_path):
    _mnist(tmp_path / "truncated", truncate=5)
    _mnist(tmp_path / "magic", labels_magic=2051)
    _cifar(tmp_path / "label")
    cases = [
        ("mnist", "truncated", "train-images-idx3-ubyte", "truncated or corrupt"),
        ("mnist", "magic", "train-labels-idx1-ubyte", "wrong magic number 2051; expected 2049"),
        ("cifar10", "label", "data_batch_2.bin", "label 11 out of range"),
    ]
    procs = [_popen([f"--workdir={tmp_path / ('work_' + d)}", f"--dataset={dataset}",
                     f"--data_dir={tmp_path / d}", "--model=mlp"])
             for dataset, d, _, _ in cases]
    for proc, (_, d, name, what) in zip(procs, cases, strict=True):
        result = _finish(proc, timeout=60)
        _assert_one_line_exit_2(result, starts=f"{tmp_path / d / name}: ")
        assert what in result[2]
        assert not (tmp_path / ("work_" + d)).exists()


def test_a_checkpoint_holding_a_pickle_is_refused_unread(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    saved = config.validate({**FAST, "workdir": str(tmp_path)}).saved
    workdir.write_json(str(tmp_path / workdir.CONFIG), saved)
    with open(tmp_path / workdir.CHECKPOINT, "wb") as out:
        np.savez(out, meta=np.asarray(json.dumps({"round": 1, "num_leaves": 1})),
                 leaf_0000=np.asarray([{"a": 1}], dtype=object))
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    with pytest.raises(flags.UsageError) as excinfo:
        train.train(config.validate({**saved, "resume": True}))
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path / workdir.CHECKPOINT}: cannot read the checkpoint")
    assert "\n" not in message


# ------------------------------------------------------------- launches


FAST = {  # async P = 2, Top-k with error feedback, least squares in 8 dimensions
    "algorithm": "async", "num_workers": 2, "max_delay": 2, "reads": "consistent",
    "compressor": "top_k", "k_fraction": 0.25, "dataset": "least_squares",
    "convex_samples": 64, "convex_dim": 8, "batch_size": 4, "learning_rate": 0.05,
    "log_every": 5, "eval_every": 100, "checkpoint_every": 10,
}
ROUNDS = 500


def _argv(directory, **overrides):
    values = {**FAST, "rounds": ROUNDS, "workdir": str(directory), **overrides}
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no'}{name}")
        else:
            out.append(f"--{name}={value}")
    return out


def _last_round(path):
    """The round of the last complete line of a metrics file (0 if none)."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["round"] if lines else 0


def _wait_for_round(proc, directory, target, timeout=90):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and _last_round(directory / workdir.METRICS) < target:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)


def _leaves(directory):
    with np.load(directory / workdir.CHECKPOINT) as data:
        meta = json.loads(str(data["meta"]))
        return [data[f"leaf_{i:04d}"] for i in range(meta["num_leaves"])], meta


def _assert_same_run(directory, reference):
    """Final state bitwise and deterministic metrics text equal the reference run's."""
    (got, got_meta), (want, want_meta) = _leaves(directory), _leaves(reference)
    assert got_meta == want_meta
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert (directory / workdir.METRICS).read_text() == (reference / workdir.METRICS).read_text()
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted launch of the fast configuration."""
    directory = tmp_path_factory.mktemp("reference")
    code, _, err = _finish(_popen(_argv(directory)))
    assert code == 0, err
    return directory


def test_sigkill_at_random_moments_then_resume_is_exact(reference, tmp_path):
    rng = random.Random(2026)
    moments = [(rng.randrange(5, ROUNDS - 50), rng.uniform(0.0, 0.02)) for _ in range(2)]
    codes = []
    for i, (target, extra) in enumerate(moments):
        directory = tmp_path / f"kill{i}"
        proc = _popen(_argv(directory))
        _wait_for_round(proc, directory, target)
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        code, _, err = _finish(proc)
        codes.append((target, code))
        code, _, err = _finish(_popen(_argv(directory, resume=True)))
        assert code == 0, err
        _assert_same_run(directory, reference)
    # The moments fall inside the training loop (a run may rarely finish first).
    assert sum(code == -signal.SIGKILL for _, code in codes) >= 1, codes

    # The third moment: inside the write of a checkpoint, after its temporary file is
    # complete and before it replaces the previous checkpoint.
    every = FAST["checkpoint_every"]
    target = rng.randrange(2, ROUNDS // every) * every
    directory = tmp_path / "in_checkpoint"
    code, _, err = _finish(_popen(_argv(directory), **{workdir.KILL_HOOK: target}))
    assert code == -signal.SIGKILL, err
    assert workdir.checkpoint_round(str(directory / workdir.CHECKPOINT)) == target - every
    assert [n for n in os.listdir(directory) if n.startswith(workdir.CHECKPOINT + ".")]
    assert _last_round(directory / workdir.METRICS) == target
    code, _, err = _finish(_popen(_argv(directory, resume=True)))
    assert code == 0, err
    _assert_same_run(directory, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_write_a_final_checkpoint(reference, tmp_path, signum):
    proc = _popen(_argv(tmp_path))
    _wait_for_round(proc, tmp_path, 20)
    proc.send_signal(signum)
    code, out, err = _finish(proc)
    assert code == config.EXIT_SIGNAL + signum, err
    last = err.strip().split("\n")[-1]
    assert last.startswith(f"{signal.Signals(signum).name}: saved the checkpoint of round ")
    saved = workdir.checkpoint_round(str(tmp_path / workdir.CHECKPOINT))
    assert f"round {saved} in" in last and 20 <= saved < ROUNDS
    records = [json.loads(line) for line in (tmp_path / workdir.METRICS).read_text().split("\n")
               if line]
    assert records[-1]["round"] == saved - saved % FAST["log_every"]  # all lines up to it
    assert "Traceback" not in err
    code, _, err = _finish(_popen(_argv(tmp_path, resume=True)))
    assert code == 0, err
    _assert_same_run(tmp_path, reference)


def test_workdir_lock(tmp_path):
    directory = tmp_path / "run"
    held = workdir.lock_workdir(str(directory))
    try:
        for resume in (False, True):
            result = _finish(_popen(_argv(directory, resume=resume, rounds=5)), timeout=60)
            _assert_one_line_exit_2(result, starts=f"--workdir: got '{directory}'; expected ")
            assert "running" in result[2]
        assert os.listdir(directory) == []
    finally:
        held.release()
    # A lock whose process is dead does not block.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments import workdir; "
         "workdir.lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(directory)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(flags.UsageError, match="running"):
            workdir.lock_workdir(str(directory))
    finally:
        holder.kill()
        holder.wait()
    workdir.lock_workdir(str(directory)).release()


# ------------------------------------------------------- divergence guard

TINY = {**FAST, "log_every": 2, "checkpoint_every": 4, "eval_every": 0}
TINY_ROUNDS = 12


def _run(directory, **overrides):
    values = {**TINY, "rounds": TINY_ROUNDS, "workdir": str(directory), **overrides}
    return train.train(config.validate(values))


def _records(directory):
    with open(directory / workdir.METRICS) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    directory = tmp_path_factory.mktemp("whole")
    _run(directory)
    return directory


def test_nan_loss_stops_at_its_round_and_the_checkpoint_resumes(whole, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv(safety.NONFINITE_HOOK, "7")
    with pytest.raises(safety.NonFiniteError) as excinfo:
        _run(tmp_path)
    message = str(excinfo.value)
    assert message.startswith("round 7: non-finite loss; stopped (--on_nonfinite=stop); "
                              "kept the last checkpoint, round 4")
    assert "\n" not in message
    assert [r["round"] for r in _records(tmp_path)] == [2, 4, 6]
    leaves, meta = _leaves(tmp_path)
    assert meta["round"] == 4 and meta["records"]["guard"] == {"skipped": 0, "first": None}
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
    monkeypatch.delenv(safety.NONFINITE_HOOK)
    _run(tmp_path, resume=True)
    _assert_same_run(tmp_path, whole)


def test_skip_round_drops_the_update_and_finishes(whole, tmp_path, monkeypatch):
    monkeypatch.setenv(safety.NONFINITE_HOOK, "7")
    # The state after the skipped round 7 is the state after round 6 with round = 7.
    before, after = tmp_path / "six", tmp_path / "seven"
    _run(before, rounds=6)
    _run(after, rounds=7, on_nonfinite="skip_round")
    (six, _), (seven, meta) = _leaves(before), _leaves(after)
    differ = [i for i, (a, b) in enumerate(zip(six, seven, strict=True))
              if not np.array_equal(a, b)]
    assert len(differ) == 1 and (six[differ[0]], seven[differ[0]]) == (6, 7)
    assert meta["records"]["guard"] == {"skipped": 1, "first": [7, "loss"]}
    # A whole run finishes, and reports the skipped round from round 7 on.
    last = _run(tmp_path / "all", on_nonfinite="skip_round")
    records = _records(tmp_path / "all")
    assert [r["nonfinite/skipped_rounds"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert last["nonfinite/skipped_rounds"] == 1 and np.isfinite(last["loss"])
    leaves, _ = _leaves(tmp_path / "all")
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
    # Without a non-finite value, skip_round is bitwise the default run.
    monkeypatch.delenv(safety.NONFINITE_HOOK)
    # A resume under stop keeps the count but is not stopped by the round skipped before.
    last = _run(tmp_path / "all", rounds=TINY_ROUNDS + 4, resume=True)
    assert last["round"] == TINY_ROUNDS + 4 and last["nonfinite/skipped_rounds"] == 1
    _run(tmp_path / "finite", on_nonfinite="skip_round")
    _assert_same_run(tmp_path / "finite", whole)


def test_nan_launch_exits_3_with_one_line(tmp_path):
    args = _argv(tmp_path, rounds=20, log_every=5, checkpoint_every=4, eval_every=0)
    code, out, err = _finish(_popen(args, **{safety.NONFINITE_HOOK: 13}))
    assert code == config.EXIT_NONFINITE, err
    assert err.endswith(f"round 13: non-finite loss; stopped (--on_nonfinite=stop); kept the "
                        f"last checkpoint, round 12, in {tmp_path}\n")
    assert "Traceback" not in err and out == ""
    assert workdir.checkpoint_round(str(tmp_path / workdir.CHECKPOINT)) == 12


# ------------------------------------------------------- library edge cases


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.inexact))


D = h.DIM_A + int(np.prod(h.DIM_B))  # 20 entries in two leaves


def _inputs(dtype):
    zeros = jax.tree.map(jnp.zeros_like, h.params0(dtype))
    return {"zeros": zeros, "tied": jax.tree.map(lambda x: jnp.ones_like(x) * -2, zeros),
            "mixed": h.params0(dtype)}


COMPRESSORS = [ej.identity(), ej.top_k(k=1), ej.top_k(k=D), ej.top_k(k=1, scope="per_leaf"),
               ej.random_k(k=1), ej.random_k(k=D), ej.qsgd(1), ej.scaled_sign()]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("compressor", COMPRESSORS, ids=repr)
def test_compressors_on_zero_tied_and_low_precision_inputs(compressor, dtype):
    compress = jax.jit(compressor.spec.compress)
    key = jax.random.key(3) if compressor.spec.stochastic else None
    for name, tree in _inputs(dtype).items():
        out = compress(tree, key)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(
            lambda x: (x.shape, x.dtype), tree)
        assert _finite(out), name
        flat_in, flat_out = h.flat(tree).astype(np.float32), h.flat(out).astype(np.float32)
        if name == "zeros":
            np.testing.assert_array_equal(flat_out, 0.0)
        spec_name, info = compressor.spec.name, ej.compression_info(compressor, tree)
        if spec_name in ("top_k", "random_k"):
            kept = np.flatnonzero(flat_out)
            assert set(kept) <= set(np.flatnonzero(flat_in))
            np.testing.assert_array_equal(flat_out[kept], flat_in[kept])  # selected, exact
            if name != "zeros":
                assert kept.size == info.k
        if spec_name == "top_k" and info.k == D or spec_name == "identity":
            jax.tree.map(np.testing.assert_array_equal, out, tree)  # k = d: the identity
        if spec_name == "top_k" and name == "tied":  # ties: the lowest index of each unit
            starts = np.cumsum([0] + [x.size for x in jax.tree.leaves(tree)])[:-1]
            expected = starts if compressor.description.endswith("'per_leaf')") else [0]
            if info.k < D:
                np.testing.assert_array_equal(np.flatnonzero(flat_out), expected)


@pytest.mark.parametrize("compressor", [ej.top_k(k=1), ej.top_k(k=D), ej.random_k(k=1),
                                        ej.scaled_sign(), ej.identity()], ids=repr)
def test_error_feedback_on_zero_tied_and_bfloat16_updates(compressor):
    wrapped = ej.error_feedback(compressor)
    update = jax.jit(wrapped.update)
    params = h.params0(jnp.bfloat16)
    state = wrapped.init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.residual))
    inputs = _inputs(jnp.bfloat16)
    for name in ("zeros", "tied", "mixed", "zeros", "tied"):
        sent, new = update(inputs[name], state, key=jax.random.key(1))
        assert jax.tree.map(lambda x: x.dtype, sent) == jax.tree.map(lambda x: x.dtype, params)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.residual))
        assert _finite(sent) and _finite(new.residual)
        # Mass is conserved in float32: sent + new residual = old residual + update.
        if compressor.spec.name != "scaled_sign":
            lhs = h.flat(sent).astype(np.float32) + h.flat(new.residual)
            rhs = h.flat(state.residual) + h.flat(inputs[name]).astype(np.float32)
            np.testing.assert_array_equal(lhs, rhs)
        if name == "zeros" and not np.any(h.flat(state.residual)):
            np.testing.assert_array_equal(h.flat(sent).astype(np.float32), 0.0)
        state = new


ROUNDS_EDGE = 4


def _algorithms(num_workers, k):
    rule = {"compressor": ej.top_k(k=k), "error_feedback": True}
    return {
        "sync": ej.sync_sgd(0.1, num_workers, **rule),
        "async": ej.async_sgd(0.1, num_workers, num_workers, **rule),
    }


@pytest.mark.parametrize("k", [1, D], ids=["k=1", "k=d"])
@pytest.mark.parametrize("num_workers", [1, 2], ids=["P=1", "P=2"])
@pytest.mark.parametrize("name", ["sync", "async"])
def test_algorithms_with_bfloat16_parameters_zero_and_tied_gradients(name, num_workers, k):
    """`checks=True` asserts, every round, a finite state and metrics and b_hat <= bound."""
    alg = _algorithms(num_workers, k)[name]
    params = h.params0(jnp.bfloat16)
    state0 = alg.init(params, jax.random.key(0))
    residual = alg.info.rule.pending  # the EF14 residuals of a worker-stacked chain state
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(residual(state0.workers.rule)))

    def batches(value):
        return jax.tree.map(lambda x: jnp.full((ROUNDS_EDGE, num_workers) + x.shape, value,
                                               x.dtype), params)

    noise = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), (
        ROUNDS_EDGE, num_workers) + x.shape).astype(x.dtype), params)
    for kind, data in (("zero", batches(0.0)), ("tied", batches(1.0)), ("noise", noise)):
        state, metrics = ej.run(alg, h.linear, state0, data, checks=True)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
            lambda x: (x.shape, x.dtype), state0)
        assert _finite(state) and _finite(ej.params(state)), kind
        assert _finite({n: v for n, v in metrics.items() if n != "consistency/bound"})
        if kind == "zero":  # Nothing moves; nothing is measured.
            jax.tree.map(np.testing.assert_array_equal, ej.params(state), params)
            np.testing.assert_array_equal(h.flat(residual(state.workers.rule)), 0.0)
            for metric in ("consistency/b_hat", "update_norm", "ef/residual_norm"):
                np.testing.assert_array_equal(np.asarray(metrics[metric], np.float32), 0.0)
        else:
            assert not np.array_equal(h.flat(ej.params(state)), h.flat(params))
        if k == D:  # Top-d sends everything: the residual stays zero.
            np.testing.assert_array_equal(h.flat(residual(state.workers.rule)), 0.0)
