"""The experiments.train launcher: outputs, exact resume, seed batches, usage errors.

Training runs use tiny settings (the MLP or a small least-squares problem, P = 2, a
few rounds) and run in-process, where `experiments.problem.session` shares one
compiled round between a run and its resumption; two launches go through a
subprocess, for the exit status and stderr. Validation is fuzzed without compiling.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elastic_jax as ej
from elastic_jax import base
from experiments import config, problem, registry, train, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # Consistent reads: the async round then compiles about twice as fast.
    "model": "mlp", "num_workers": 2, "max_delay": 2, "reads": "consistent", "batch_size": 8,
    "k_fraction": 0.05, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
}
OUTPUTS = ("config.json", "metrics.jsonl", "timing.jsonl", "checkpoint.npz", "loss.png",
           "accuracy.png", "consistency.png")
WHOLE_ROUNDS = 12
MESSAGE = re.compile(r"^--(\w+): got .+")


def _run(directory, **overrides):
    return train.train(config.validate({**TINY, "workdir": str(directory), **overrides}))


def _strict_records(path):
    """Parses a JSONL file, refusing the non-standard NaN / Infinity tokens."""

    def refuse(token):
        raise AssertionError(f"{path}: non-strict JSON token {token}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def _state_arrays(directory):
    """The final checkpoint's leaves as NumPy arrays, and its round."""
    with np.load(os.path.join(directory, workdir.CHECKPOINT)) as data:
        meta = json.loads(str(data["meta"]))
        return [data[f"leaf_{i:04d}"] for i in range(meta["num_leaves"])], meta["round"]


def _snapshot(directory):
    """Every file's bytes, by name."""
    snapshot = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            snapshot[name] = f.read()
    return snapshot


def _one_line_usage(excinfo, flag=None):
    message = str(excinfo.value)
    assert "\n" not in message
    if flag is not None:
        assert message.startswith(f"--{flag}: got "), message
    return message


# ------------------------------------------------------------------------ runs


def test_shortened_default_run_writes_every_output_and_learns(tmp_path):
    # The default algorithm, compressor and model (async Top-1% + EF, SmallCNN, P = 8),
    # with consistent reads: per-coordinate lags triple the CNN round's compile time.
    overrides = {"rounds": 30, "log_every": 5, "eval_every": 15, "checkpoint_every": 15,
                 "reads": "consistent"}
    last = train.train(config.validate({"workdir": str(tmp_path), **overrides}))
    for name in OUTPUTS:
        assert os.path.getsize(tmp_path / name) > 0, name
    records = _strict_records(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [5, 10, 15, 20, 25, 30]
    for name in ("loss", "consistency/b_hat", "consistency/bound", "grad_norm/max",
                 "update_norm", "comm/bits", "learning_rate", "delay/mean", "ef/residual_norm",
                 "aux/accuracy", "nonfinite/skipped_rounds"):
        assert name in records[0], name
    assert "test/accuracy" in records[2] and "test/accuracy" not in records[1]
    assert records[-1] == last
    assert all(r["nonfinite/skipped_rounds"] == 0 for r in records)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["test/accuracy"] > 0.8
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {**config.DEFAULTS, "workdir": str(tmp_path), **overrides}
    timing = _strict_records(tmp_path / "timing.jsonl")
    assert all("rounds_per_s" in t for t in timing if "event" not in t)
    assert _state_arrays(tmp_path)[1] == 30
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # atomic writes


def test_records_are_strict_json():
    line = workdir.dumps({"round": np.int32(3), "a": float("nan"), "b": np.float32(np.inf),
                          "c": np.float32(0.5)})
    assert line == '{"round": 3, "a": null, "b": null, "c": 0.5}'


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted tiny run of 12 rounds (async Top-k with error feedback, the MLP)."""
    directory = tmp_path_factory.mktemp("whole")
    _run(directory, rounds=WHOLE_ROUNDS)
    return directory


def test_resume_after_interruption_equals_uninterrupted_run(whole, tmp_path):
    part = tmp_path / "part"
    _run(part, rounds=7)  # Checkpoints at 4 and 7 (its last round, off the log grid).
    # A crash after writing lines past the checkpoint, the last one torn mid-write.
    with open(part / "metrics.jsonl", "a") as f:
        for line in (whole / "metrics.jsonl").read_text().splitlines():
            if json.loads(line)["round"] > 7:
                f.write(line + "\n")
        f.write('{"round": 11, "loss"')
    with open(part / "timing.jsonl", "a") as f:
        f.write('{"round": 9, "elapsed')  # torn too: the resumed run's lines start anew
    _run(part, rounds=WHOLE_ROUNDS, resume=True)
    assert _strict_records(part / "metrics.jsonl") == _strict_records(whole / "metrics.jsonl")
    assert (part / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    (got, got_round), (want, want_round) = _state_arrays(part), _state_arrays(whole)
    assert got_round == want_round == WHOLE_ROUNDS
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    starts = [t for t in _strict_records(part / "timing.jsonl") if t.get("event") == "start"]
    assert [t["round"] for t in starts] == [0, 7]


CONVEX = {"algorithm": "sync", "compressor": "none", "error_feedback": False,
          "dataset": "least_squares", "learning_rate": 0.1, "convex_samples": 256,
          "convex_dim": 8, "rounds": 8}


def _host_leaves(state):
    return [np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else np.asarray(x) for x in jax.tree.leaves(state)]


def test_convex_run_is_ej_run_and_trains_a_linear_model(tmp_path):
    """With `--loop=python` a single-seed run follows `ej.run(..., loop="python")`
    bitwise; the default (`auto`: chunks for a linear model) agrees with it to rounding."""
    assert problem.DATA_TAG == base.TAG_DATA
    last = _run(tmp_path / "python", **CONVEX, loop="python")
    lines = _strict_records(tmp_path / "python" / "metrics.jsonl")
    assert "test/accuracy" not in last and "full/loss" in last
    assert lines[-1]["full/suboptimality"] < lines[1]["full/suboptimality"]
    assert os.path.exists(tmp_path / "python" / "suboptimality.png")

    cfg = config.validate({**TINY, **CONVEX, "workdir": str(tmp_path), "loop": "python"})
    loaded, init, _ = problem.session(cfg)  # The run's, already loaded.
    state, _ = ej.run(cfg.algorithm, loaded.loss_fn, init(), batch_fn=loaded.batch_fn,
                      rounds=CONVEX["rounds"], has_aux=loaded.has_aux, loop="python")
    leaves, round_ = _state_arrays(tmp_path / "python")
    expected = _host_leaves(state)
    assert round_ == CONVEX["rounds"] and len(leaves) == len(expected)
    for got, want in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(got, want)

    assert config.resolve_loop(config.validate({**CONVEX, "workdir": "w"}).flags,
                               "cpu") == "chunks"
    chunked = _run(tmp_path / "chunks", **CONVEX)
    chunked_lines = _strict_records(tmp_path / "chunks" / "metrics.jsonl")
    assert [r["round"] for r in chunked_lines] == [r["round"] for r in lines]
    for got, want in zip(chunked_lines, lines, strict=True):
        assert set(got) == set(want)
        for name, value in want.items():
            if isinstance(value, float):
                np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    assert chunked["round"] == last["round"]
    for got, want in zip(_state_arrays(tmp_path / "chunks")[0], leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_chunks_end_at_every_logged_evaluated_and_checkpointed_round():
    f = {"rounds": 45, "log_every": 10, "eval_every": 25, "checkpoint_every": 0}
    ends, r = [], 0
    while r < f["rounds"]:
        r = train._chunk_end(r, f)
        ends.append(r)
    assert ends == [10, 20, 25, 30, 40, 45]
    f = {"rounds": 100, "log_every": 50, "eval_every": 0, "checkpoint_every": 40}
    ends, r = [], 7  # A resume from round 7.
    while r < f["rounds"]:
        r = train._chunk_end(r, f)
        ends.append(r)
    assert ends == [23, 39, 40, 50, 66, 80, 96, 100]
    assert all(b - a <= config.CHUNK for a, b in zip([7] + ends[:-1], ends, strict=True))


@pytest.mark.parametrize("overrides,platform,loop", [
    ({}, "cpu", "python"),  # the default cnn
    ({}, "gpu", "chunks"),
    ({"model": "resnet20", "dataset": "cifar10"}, "cpu", "python"),
    ({"model": "mlp"}, "cpu", "chunks"),
    ({"model": "cnn", "dataset": "logistic"}, "cpu", "chunks"),  # a linear model
    ({"model": "mlp", "num_devices": 1}, "cpu", "python"),
    ({"model": "cnn", "loop": "chunks"}, "cpu", "chunks"),
    ({"model": "mlp", "loop": "python"}, "gpu", "python"),
])
def test_auto_loop_is_chunks_but_for_convolutions_on_the_cpu(overrides, platform, loop):
    f = {**config.DEFAULTS, "workdir": "w", **overrides}
    assert config.resolve_loop(f, platform) == loop


def test_seed_batch_reports_mean_and_spread_and_resume_starts_fresh(tmp_path, caplog):
    with caplog.at_level("INFO"):
        last = _run(tmp_path, **{**CONVEX, "rounds": 4}, num_seeds=3, resume=True)
    assert "starting from round 0" in caplog.text
    for name in ("loss", "consistency/b_hat", "full/loss", "full/suboptimality"):
        assert name + "/std" in last, name
    assert last["loss/std"] > 0 and last["full/loss/std"] > 0
    leaves, _ = _state_arrays(tmp_path)
    assert all(x.shape[0] == 3 for x in leaves)


# ------------------------------------------------------------- usage errors


def test_existing_run_is_refused_and_left_untouched(whole):
    before = _snapshot(whole)
    with pytest.raises(config.UsageError) as excinfo:
        _run(whole, rounds=WHOLE_ROUNDS)
    assert "--resume" in _one_line_usage(excinfo, "workdir")
    with pytest.raises(config.UsageError) as excinfo:
        _run(whole, rounds=20, resume=True, learning_rate=0.5)
    assert "0.05" in _one_line_usage(excinfo, "learning_rate")
    with pytest.raises(config.UsageError) as excinfo:
        _run(whole, rounds=5, resume=True)
    _one_line_usage(excinfo, "rounds")
    assert _snapshot(whole) == before


def test_config_saved_before_the_loop_flag_resumes_with_the_python_loop(whole, tmp_path):
    directory = tmp_path / "legacy"
    directory.mkdir()
    for name in os.listdir(whole):
        (directory / name).write_bytes((whole / name).read_bytes())
    saved = json.loads((directory / "config.json").read_text())
    del saved["loop"]  # As written before --loop existed: those runs were Python loops.
    saved["workdir"] = str(directory)
    (directory / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config.UsageError) as excinfo:
        _run(directory, rounds=WHOLE_ROUNDS, resume=True)
    assert "'python', the value saved in" in _one_line_usage(excinfo, "loop")
    last = _run(directory, rounds=WHOLE_ROUNDS, resume=True, loop="python")
    assert last["round"] == WHOLE_ROUNDS


def test_decaying_schedule_over_rounds_pins_rounds_on_resume(tmp_path):
    f = config.validate({**TINY, "workdir": str(tmp_path), "schedule": "cosine"}).flags
    os.makedirs(tmp_path, exist_ok=True)
    workdir.write_json(str(tmp_path / "config.json"), f)
    with pytest.raises(config.UsageError) as excinfo:
        _run(tmp_path, schedule="cosine", rounds=f["rounds"] + 1, resume=True)
    _one_line_usage(excinfo, "rounds")
    # A fixed horizon (--schedule_rounds) frees --rounds again.
    fixed = {**f, "schedule_rounds": 100}
    assert config.semantic_differences({**fixed, "rounds": 3}, fixed) == []
    assert config.semantic_differences({**f, "rounds": 3}, f) == ["rounds"]


def test_corrupt_checkpoint_is_refused(tmp_path):
    f = config.validate({**TINY, "workdir": str(tmp_path)}).flags
    workdir.write_json(str(tmp_path / "config.json"), f)
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file")
    before = _snapshot(tmp_path)
    with pytest.raises(config.UsageError) as excinfo:
        _run(tmp_path, resume=True)
    assert _one_line_usage(excinfo).startswith(str(tmp_path / "checkpoint.npz") + ": ")
    assert _snapshot(tmp_path) == before


def test_missing_and_corrupt_data_files(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    work = tmp_path / "work"
    with pytest.raises(config.UsageError) as excinfo:
        _run(work, dataset="mnist", data_dir=str(data_dir))
    assert _one_line_usage(excinfo).startswith(str(data_dir / "train-images-idx3-ubyte"))
    (data_dir / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    (data_dir / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(config.UsageError) as excinfo:
        _run(work, dataset="mnist", data_dir=str(data_dir))
    assert _one_line_usage(excinfo).startswith(str(data_dir / "train-images-idx3-ubyte") + ":")
    with pytest.raises(config.UsageError) as excinfo:
        _run(work, dataset="cifar10", data_dir=str(tmp_path / "absent"))
    assert _one_line_usage(excinfo).startswith(str(tmp_path / "absent") + ":")
    assert not work.exists()


@pytest.mark.parametrize("overrides, flag", [
    ({"num_workers": 8, "max_delay": 6}, "max_delay"),  # async: max_delay >= P - 1
    ({"compressor": "qsgd"}, "compressor"),  # error feedback needs a contraction
    ({"compressor": "scaled_random_k"}, "compressor"),
    ({"algorithm": "sync", "crashes": 1}, "crashes"),  # only message passing crashes
    ({"num_workers": 0}, "num_workers"),
    ({"k_fraction": 1.5}, "k_fraction"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"ef_beta": -0.1}, "ef_beta"),
    ({"rounds": True}, "rounds"),
    ({"dataset": "mnist"}, "data_dir"),
    ({"dataset": "least_squares", "partition": "dirichlet"}, "partition"),
    ({"schedule": "exponential", "final_lr_fraction": 0.0}, "final_lr_fraction"),
    ({"workdir": ""}, "workdir"),
    ({"bogus": 1}, "bogus"),
])
def test_validation_names_the_flag(overrides, flag):
    with pytest.raises(config.UsageError) as excinfo:
        config.validate({"workdir": "w", **overrides})
    _one_line_usage(excinfo, flag)


def test_crash_count_needs_a_horizon():
    with pytest.raises(config.UsageError) as excinfo:
        config.validate({"workdir": "w", "algorithm": "message_passing", "crashes": 2})
    _one_line_usage(excinfo, "crash_horizon")
    config.validate({"workdir": "w", "algorithm": "message_passing", "crashes": 2,
                     "crash_horizon": 50})


def _flag_strategy(spec: config.FlagSpec):
    wrong = st.sampled_from([None, "3", [1]])
    if spec.kind == "bool":
        return st.one_of(st.booleans(), st.sampled_from([0, 1, "yes"]))
    if spec.kind == "enum":
        return st.one_of(st.sampled_from(spec.choices), st.sampled_from(["bogus", 3]))
    if spec.kind == "string":
        return st.sampled_from(["", "some/dir", 3])
    lo = int(spec.lo) if spec.lo is not None else -5
    if spec.kind == "int":
        return st.one_of(st.integers(lo - 2, lo + 12), st.sampled_from([int(spec.hi) + 1, 2.0]),
                         st.booleans(), wrong)
    hi = spec.hi if spec.hi is not None else 10.0
    return st.one_of(st.floats(lo - 1.0, hi + 1.0), st.sampled_from([lo, hi, 1]),
                     st.sampled_from([float("nan"), float("inf")]), wrong)


FLAG_DICTS = st.fixed_dictionaries(
    {"workdir": st.just("w")},
    optional={s.name: _flag_strategy(s) for s in config.FLAG_SPECS if s.name != "workdir"}
    | {"bogus": st.just(1)},
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=FLAG_DICTS)
def test_validation_fuzz_validates_or_names_one_flag(values):
    try:
        cfg = config.validate(values)
    except config.UsageError as e:
        message = str(e)
        assert "\n" not in message
        match = MESSAGE.match(message)
        assert match and match.group(1) in (*config.SPECS, "bogus"), message
    else:
        assert isinstance(cfg.algorithm, ej.Algorithm)
        assert set(cfg.flags) == set(config.SPECS)


# ---------------------------------------------------------- absl and processes


def test_every_flag_is_declared_with_its_range():
    for spec in config.FLAG_SPECS:
        flag = train.FLAGS[spec.name]
        assert flag.default == spec.default and spec.help in flag.help, spec.name
        if spec.kind in ("int", "float"):
            assert f"Range: {spec.expected}." in flag.help
        if spec.kind == "enum":
            assert list(flag.parser.enum_values) == list(spec.choices)
    assert set(registry.ALGORITHMS) >= {"sync", "async"}


def test_flag_parsing_errors_are_one_line(capsys):
    absl_level = logging.getLogger("absl").level  # Parsing --verbosity changes it.
    try:
        with pytest.raises(SystemExit) as excinfo:
            train.parse_flags(["train", "--num_workers=abc"])
        assert excinfo.value.code == 2
        err = capsys.readouterr().err
        assert err == "--num_workers: got 'abc'; expected an integer in [1, 4096]\n"
        train.parse_flags(["train", "--workdir=w", "--algorithm=sync", "--error_feedback",
                           "--compressor=qsgd"])
        with pytest.raises(SystemExit) as excinfo:
            train.main([])
        assert excinfo.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("--compressor: got qsgd")
    finally:
        train.FLAGS.unparse_flags()
        logging.getLogger("absl").setLevel(absl_level)


def _launch(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, flag", [
    (["--num_workers=8", "--max_delay=3"], "--max_delay: "),  # found by the factory
    (["--resume=maybe"], "--resume: "),  # found by absl's parser
])
def test_launch_usage_error_exits_2_with_one_line(tmp_path, args, flag):
    (tmp_path / "config.json").write_text("{}")
    before = _snapshot(tmp_path)
    result = _launch(f"--workdir={tmp_path}", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(flag), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _snapshot(tmp_path) == before
