"""The experiments.train launcher: outputs, exact resume, seed batches, flags, usage errors.

Training runs use tiny settings (the MLP or a small least-squares problem, P = 2, a
few rounds) and run in-process, where `experiments.problem.session` shares the
problem and algorithm, and with them `ej.run`'s compiled programs, between a run
and its resumption; two launches go through a subprocess, for the exit status
and stderr. Validation is table-driven and fuzzed without compiling.
"""

from __future__ import annotations

import errno
import functools
import json
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
from experiments import config, flags, problem, train, workdir
from tests import helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # Consistent reads: the async round then compiles about twice as fast.
    "model": "mlp", "num_workers": 2, "max_delay": 2, "reads": "consistent", "batch_size": 8,
    "k_fraction": 0.05, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
}
OUTPUTS = ("config.json", "metrics.jsonl", "timing.jsonl", "checkpoint.npz", "loss.png",
           "accuracy.png", "consistency.png")
WHOLE_ROUNDS = 12
MESSAGE = re.compile(r"^--(\w+): got .+; expected .+")


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


def _main(capsys, *argv):
    """`python -m experiments.train` in-process: (exit status, stdout, stderr lines)."""
    with pytest.raises(SystemExit) as excinfo:
        train.main(list(argv))
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err.splitlines()


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
                 "aux/accuracy", "nonfinite/skipped_rounds", "consistency/b_hat_peak",
                 "consistency/ratio_peak", "consistency/bound_violations"):
        assert name in records[0], name
    assert "test/accuracy" in records[2] and "test/accuracy" not in records[1]
    assert records[-1] == last
    assert all(r["nonfinite/skipped_rounds"] == 0 for r in records)
    assert all(r["consistency/bound_violations"] == 0 for r in records)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["test/accuracy"] > 0.8
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == flags.effective(config.FLAGS, {**config.DEFAULTS, "workdir": str(tmp_path),
                                                   **overrides})
    assert "period" not in saved and "max_outstanding" not in saved  # async does not use them
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
          "convex_dim": 8, "rounds": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4}


def _host_leaves(state):
    return [np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else np.asarray(x) for x in jax.tree.leaves(state)]


def test_convex_run_is_ej_run_and_trains_a_linear_model(tmp_path):
    """With `--loop=python` a single-seed run is `ej.run(..., loop="python")` bitwise; the
    default (`auto`: chunks for a linear model) agrees with it to rounding."""
    python = tmp_path / "python"
    last = train.train(config.validate({**CONVEX, "workdir": str(python), "loop": "python"}))
    lines = _strict_records(python / "metrics.jsonl")
    assert "test/accuracy" not in last and "full/loss" in last
    assert lines[-1]["full/suboptimality"] < lines[1]["full/suboptimality"]
    assert os.path.exists(python / "suboptimality.png")

    session = problem.session(config.validate({**CONVEX, "workdir": "w", "loop": "python"}))
    state, _ = ej.run(session.algorithm, session.problem.loss_fn, session.init(),
                      batch_fn=session.problem.batch_fn, rounds=CONVEX["rounds"], loop="python")
    leaves, round_ = _state_arrays(python)
    expected = _host_leaves(state)
    assert round_ == CONVEX["rounds"] and len(leaves) == len(expected)
    for got, want in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(got, want)

    assert config.resolve_loop(config.validate({**CONVEX, "workdir": "w"}).flags,
                               "cpu") == "chunks"
    chunked = train.train(config.validate({**CONVEX, "workdir": str(tmp_path / "chunks")}))
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


def test_calls_end_at_every_logged_evaluated_and_checkpointed_round():
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
        last = train.train(config.validate({**CONVEX, "workdir": str(tmp_path), "rounds": 4,
                                            "num_seeds": 3, "resume": True}))
    assert "starting from round 0" in caplog.text
    for name in ("loss", "consistency/b_hat", "full/loss", "full/suboptimality"):
        assert name + "/std" in last, name
    assert last["loss/std"] > 0 and last["full/loss/std"] > 0
    leaves, _ = _state_arrays(tmp_path)
    assert all(x.shape[0] == 3 for x in leaves)


# --------------------------------------------------- algorithms and their flags

SMALL = {"dataset": "least_squares", "convex_samples": 64, "convex_dim": 8, "num_workers": 2,
         "batch_size": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 2}


# What an algorithm needs besides its defaults: clock-driven async, a compute-time law.
NEEDS = {"clock_async": {"compute": "constant"}}


@pytest.mark.parametrize("algorithm", list(config.ALGORITHMS))
def test_every_algorithm_runs_on_its_defaults_and_resumes(algorithm, tmp_path):
    needs = NEEDS.get(algorithm, {})
    cfg = config.validate({"workdir": "w", "algorithm": algorithm, **needs})  # the defaults
    assert isinstance(cfg.algorithm, ej.Algorithm)
    _check_uses(cfg.saved, algorithm)
    values = {**SMALL, "workdir": str(tmp_path), "algorithm": algorithm, **needs}
    train.train(config.validate({**values, "rounds": 2}))
    saved = json.loads((tmp_path / "config.json").read_text())
    _check_uses(saved, algorithm)
    last = train.train(config.validate({**values, "rounds": 4, "resume": True}))
    assert last["round"] == 4 and np.isfinite(last["loss"])


def test_server_momentum_resumes_exactly(tmp_path):
    """The server's optimizer state (one copy, in the shared state) is checkpointed too."""
    values = {**SMALL, "algorithm": "sync", "momentum": 0.9, "nesterov": True,
              "weight_decay": 1e-3, "optimizer_placement": "server", "rounds": 4}
    train.train(config.validate({**values, "workdir": str(tmp_path / "whole")}))
    part = str(tmp_path / "part")
    train.train(config.validate({**values, "workdir": part, "rounds": 2}))
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    assert saved["optimizer_placement"] == "server" and saved["momentum"] == 0.9
    train.train(config.validate({**values, "workdir": part, "resume": True}))
    (got, _), (want, _) = _state_arrays(part), _state_arrays(tmp_path / "whole")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(flags.UsageError) as excinfo:  # momentum is semantic
        train.train(config.validate({**values, "workdir": part, "momentum": 0.5,
                                     "rounds": 6, "resume": True}))
    _one_line_usage(excinfo, "momentum")


def _check_uses(saved, algorithm):
    """`saved` holds the flags of `algorithm` and none of the others'."""
    rule = {"compressor", "error_feedback"}
    outer = {"outer_learning_rate", "outer_momentum", "outer_nesterov", "fragments",
             "outer_compressor"}
    own = {"sync": rule | {"optimizer_placement"}, "async": rule | {"reads", "max_delay"},
           "message_passing": rule | {"max_delay", "drop_prob", "crashes"},
           "elastic_scheduling": {"max_outstanding", "mode", "delay"},
           "local_sgd": {"period"},
           "gossip": {"topology", "local_steps", "gossip_compressor"},
           "clock_async": rule | {"staleness_policy", "slots", "compute_mean"},
           "diloco": {"period"} | outer}[algorithm]
    specific = {"reads", "max_delay", "drop_prob", "crashes", "max_outstanding", "mode",
                "period", "optimizer_placement", "topology", "local_steps",
                "gossip_compressor", "staleness_policy", "slots"} | rule | outer
    assert own <= set(saved) and not (specific - own) & set(saved), (algorithm, sorted(saved))


# A valid value other than the default, for every flag: a new flag needs one here.
NON_DEFAULT = {
    "num_workers": 4, "max_delay": 12, "delay": "geometric", "reads": "consistent",
    "compressor": "random_k", "k_fraction": 0.05, "qsgd_levels": 8, "error_feedback": False,
    "ef_beta": 0.5, "clip_norm": 1.0, "drop_prob": 0.1, "retransmit": False, "crashes": 1,
    "crash_horizon": 50, "max_outstanding": 4, "mode": "variance", "period": 2,
    "optimizer": "adamw", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
    "optimizer_placement": "server",
    "topology": "torus", "local_steps": 2, "gossip_compressor": "top_k",
    "gossip_k_fraction": 0.05, "gossip_gamma": 0.25,
    "learning_rate": 0.1, "schedule": "cosine", "schedule_rounds": 100,
    "final_lr_fraction": 0.5, "batch_size": 16, "rounds": 20, "model": "mlp",
    "dataset": "logistic", "data_dir": "/data", "convex_samples": 512, "convex_dim": 16,
    "partition": "dirichlet", "dirichlet_alpha": 2.0, "seed": 3, "num_seeds": 2,
    "workdir": "elsewhere", "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
    "resume": True, "on_nonfinite": "skip_round", "worker_loop": "vmap", "loop": "python",
    "num_devices": 2, "num_processes": 2, "coordinator": "10.0.0.1:1234", "process_id": 1,
    "staleness_policy": "drop", "staleness_cap": 12, "slots": 2, "compute": "exponential",
    "compute_mean": 0.1, "compute_shift": 0.01, "compute_sigma": 1.0, "pareto_shape": 3.0,
    "stragglers": 1, "straggler_slowdown": 3.0, "latency": 1e-4, "bandwidth": 1e9,
    "jitter": 0.01, "system_seed": 3, "target_loss": 0.5, "target_accuracy": 0.9,
    "powersgd_rank": 2, "outer_learning_rate": 1.0, "outer_momentum": 0.5,
    "outer_nesterov": False, "fragments": 2, "outer_compressor": "qsgd",
    "outer_k_fraction": 0.05, "outer_powersgd_rank": 2,
}


def test_every_flag_given_alone_is_used_or_refused_with_one_line():
    assert set(NON_DEFAULT) | {"algorithm"} == set(config.TABLE)
    used = {}
    for algorithm in config.ALGORITHMS:
        for name, value in NON_DEFAULT.items():
            assert value != config.DEFAULTS[name], name
            values = {"workdir": "w", "algorithm": algorithm, name: value}
            try:
                saved = config.validate(values).saved
            except flags.UsageError as e:
                assert "\n" not in str(e) and MESSAGE.match(str(e)), str(e)
                continue
            assert saved[name] == value, (algorithm, name)  # used: in the effective config
            used.setdefault(name, set()).add(algorithm)
    # Where the flag applies, it is used (with the companion it needs, if any).
    assert used["reads"] == {"async"} and used["period"] == {"local_sgd", "diloco"}
    assert used["outer_learning_rate"] == used["outer_momentum"] == used["fragments"] == {
        "diloco"} == used["outer_nesterov"] == used["outer_compressor"]
    # Each needs its compressor named first.
    assert not {"powersgd_rank", "outer_k_fraction", "outer_powersgd_rank"} & set(used)
    assert used["topology"] == used["local_steps"] == used["gossip_compressor"] == {"gossip"}
    assert used["drop_prob"] == {"message_passing"}
    assert used["max_delay"] == {"async", "message_passing"}
    assert used["delay"] == {"async", "message_passing", "elastic_scheduling"}
    assert used["compressor"] == used["error_feedback"] == {"sync", "async", "message_passing"}
    # Clock-driven async needs --compute: alone, every other flag is refused with it.
    every = set(config.ALGORITHMS) - {"clock_async"}
    assert used["clip_norm"] == used["learning_rate"] == every
    assert used["optimizer"] == used["momentum"] == used["weight_decay"] == every
    assert used["optimizer_placement"] == {"sync"} and "nesterov" not in used  # needs momentum
    # The clock: for every variant but the round model of async SGD (clock_async needs it).
    assert used["compute"] == set(config.ALGORITHMS) - {"async"}


@pytest.mark.parametrize("values, flag, needs", [
    ({"algorithm": "sync", "max_delay": 3}, "max_delay", "--algorithm=async or message_passing"),
    ({"algorithm": "sync", "reads": "consistent"}, "reads", "--algorithm=async"),
    ({"period": 10}, "period", "--algorithm=local_sgd"),
    ({"max_outstanding": 3}, "max_outstanding", "--algorithm=elastic_scheduling"),
    ({"mode": "variance"}, "mode", "--algorithm=elastic_scheduling"),
    ({"retransmit": False}, "retransmit", "--algorithm=message_passing and --drop_prob > 0"),
    ({"error_feedback": False, "ef_beta": 0.5}, "ef_beta", "--error_feedback"),
    ({"compressor": "qsgd", "k_fraction": 0.5}, "k_fraction",
     "--compressor=top_k, random_k or scaled_random_k"),
    ({"qsgd_levels": 16}, "qsgd_levels", "--compressor=qsgd"),
    ({"dirichlet_alpha": 2.0}, "dirichlet_alpha", "--partition=dirichlet"),
    ({"final_lr_fraction": 0.5}, "final_lr_fraction", "--schedule=cosine, linear or exponential"),
    ({"algorithm": "local_sgd", "delay": "geometric"}, "delay",
     "--algorithm=async, message_passing or elastic_scheduling"),
    ({"drop_prob": 0.5}, "drop_prob", "--algorithm=message_passing"),
    ({"algorithm": "local_sgd", "compressor": "top_k"}, "compressor", "--algorithm=sync"),
    ({"dataset": "least_squares", "model": "mlp"}, "model", "--dataset=digits, mnist or cifar10"),
    ({"coordinator": "h:1"}, "coordinator", "--num_processes > 1"),
    ({"optimizer": "adamw", "momentum": 0.9}, "momentum", "--optimizer=sgd (here"),
    ({"optimizer": "adamw", "nesterov": True}, "nesterov",
     "--optimizer=sgd and --momentum > 0 (here --optimizer=adamw)"),
    ({"nesterov": True}, "nesterov", "--momentum > 0 (here --momentum=0.0)"),
    ({"optimizer_placement": "server"}, "optimizer_placement", "--algorithm=sync (here"),
    ({"algorithm": "local_sgd", "topology": "ring"}, "topology", "--algorithm=gossip"),
    ({"algorithm": "gossip", "gossip_gamma": 0.5}, "gossip_gamma",
     "--algorithm=gossip and --gossip_compressor=identity, top_k, random_k or scaled_sign"),
    ({"algorithm": "sync", "staleness_policy": "drop"}, "staleness_policy",
     "--algorithm=clock_async"),
    ({"compute_mean": 0.1}, "compute_mean", "--compute=constant, exponential, lognormal or pareto"),
    ({"compute": "constant", "straggler_slowdown": 2.0}, "straggler_slowdown", "--stragglers > 0"),
    ({"algorithm": "message_passing", "compute": "constant", "delay": "fixed"}, "delay",
     "--compute=none"),
    ({"outer_learning_rate": 1.0}, "outer_learning_rate", "--algorithm=diloco (here"),
    ({"algorithm": "local_sgd", "outer_momentum": 0.5}, "outer_momentum", "--algorithm=diloco"),
    ({"algorithm": "sync", "outer_nesterov": False}, "outer_nesterov",
     "--algorithm=diloco and --outer_momentum > 0"),
    ({"algorithm": "diloco", "outer_momentum": 0.0, "outer_nesterov": True}, "outer_nesterov",
     "--outer_momentum > 0 (here --outer_momentum=0.0)"),
    ({"algorithm": "local_sgd", "fragments": 2}, "fragments", "--algorithm=diloco"),
    ({"algorithm": "sync", "outer_compressor": "top_k"}, "outer_compressor",
     "--algorithm=diloco"),
    ({"algorithm": "diloco", "outer_k_fraction": 0.1}, "outer_k_fraction",
     "--outer_compressor=top_k"),
    ({"algorithm": "diloco", "outer_powersgd_rank": 2}, "outer_powersgd_rank",
     "--outer_compressor=powersgd"),
    ({"algorithm": "sync", "powersgd_rank": 2}, "powersgd_rank", "--compressor=powersgd"),
])
def test_a_flag_that_does_not_apply_is_refused_naming_what_would(values, flag, needs):
    with pytest.raises(flags.UsageError) as excinfo:
        config.validate({"workdir": "w", **values})
    message = _one_line_usage(excinfo, flag)
    assert f"expected --{flag} only with " in message and needs in message, message


def test_a_clocked_run_plots_against_seconds_and_reports_time_to_target(tmp_path):
    values = {**SMALL, "workdir": str(tmp_path), "algorithm": "sync", "rounds": 6,
              "compute": "exponential", "stragglers": 1, "latency": 0.01,
              "bandwidth": 1e5, "target_loss": 1e9}
    last = train.train(config.validate(values))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["time/elapsed"] for r in records]
    assert np.all(np.diff(elapsed) > 0) and 0 < last["time/idle_fraction"] < 1
    # Every logged round reaches the (huge) target: the first one, with its seconds.
    assert last["target/loss_round"] == records[0]["round"] == 2
    assert last["target/loss_seconds"] == elapsed[0]
    for name in ("loss_seconds.png", "suboptimality_seconds.png", "utilisation.png"):
        assert (tmp_path / name).stat().st_size > 0, name


# ------------------------------------------- make_algorithm: a sweep's points over the flags

SWEPT = {"workdir": "w", "algorithm": "async", "num_workers": 2, "max_delay": 2,
         "reads": "consistent", "k_fraction": 0.2}  # Top-4 of 20 parameters


def _four_rounds(alg):
    """Four rounds of `alg` on the noisy quadratic, from `ej.sweep`'s keys of seed 0."""
    state = jax.jit(alg.init)(h.params0(), ej.sweeps.seed_keys(0)[1])
    return ej.run(alg, h.noisy_quadratic, state, batch_fn=h.noise_batch_fn(h.params0()),
                  rounds=4)


def test_make_algorithm_puts_a_swept_value_in_place_of_its_flag():
    f = config.validate({**SWEPT, "momentum": 0.5, "ef_beta": 0.5}).flags
    # beta 0 is the run without error feedback, beta 1 EF14; one run after another, each
    # point is bitwise its own ej.run.
    result = ej.sweep(functools.partial(config.make_algorithm, f), h.noisy_quadratic,
                      h.params0(), {"beta": (0.0, 1.0)}, batch_fn=h.noise_batch_fn(h.params0()),
                      rounds=4, execution="sequential")
    without = config.validate({**SWEPT, "momentum": 0.5, "error_feedback": False}).algorithm
    ef14 = config.validate({**SWEPT, "momentum": 0.5, "ef_beta": 1.0}).algorithm
    for i, alg in enumerate((without, ef14)):
        state, metrics = _four_rounds(alg)
        np.testing.assert_array_equal(
            h.flat(ej.params(jax.tree.map(lambda x: x[0], result.states[i]))),
            h.flat(ej.params(state)))
        for name in ("loss", "consistency/b_hat"):
            np.testing.assert_array_equal(result.metrics[name][i, 0], metrics[name])
    # The learning rate and the momentum likewise.
    got = config.make_algorithm(f, learning_rate=0.01, momentum=0.9)
    want = config.validate({**SWEPT, "ef_beta": 0.5, "learning_rate": 0.01,
                            "momentum": 0.9}).algorithm
    np.testing.assert_array_equal(h.flat(ej.params(_four_rounds(got)[0])),
                                  h.flat(ej.params(_four_rounds(want)[0])))


@pytest.mark.parametrize("values, hparams, match", [
    ({}, {"gamma": 0.5}, r"^hparams: got 'gamma'; expected one of 'learning_rate', 'beta', "
                         r"'momentum'$"),
    ({"error_feedback": False}, {"beta": 0.5}, r"^hparams: got 'beta'; expected --ef_beta "
                                               r"only with .* --error_feedback \(here "
                                               r"--noerror_feedback\)$"),
    ({"optimizer": "adamw"}, {"momentum": 0.9},
     r"^hparams: got 'momentum'; expected --momentum only with --optimizer=sgd \(here "
     r"--optimizer=adamw\)$"),
    ({}, {"momentum": 1.0}, r"^momentum: got 1.0; expected a finite number in \[0.0, 1.0\)$"),
])
def test_make_algorithm_refuses_a_value_for_no_flag_of_the_run(values, hparams, match):
    f = config.validate({**SWEPT, **values}).flags
    with pytest.raises(ValueError, match=match):
        config.make_algorithm(f, **hparams)


# ------------------------------------------------------------- b_hat's peaks


def test_a_peak_between_logged_rounds_is_in_metrics(tmp_path):
    """Local SGD with H = 8 logged every 10 rounds: b_hat peaks before each average."""
    local = {**SMALL, "algorithm": "local_sgd", "period": 8, "rounds": 30, "eval_every": 0,
             "checkpoint_every": 0}
    train.train(config.validate({**local, "workdir": str(tmp_path / "every"), "log_every": 1}))
    train.train(config.validate({**local, "workdir": str(tmp_path / "ten"), "log_every": 10}))
    every = _strict_records(tmp_path / "every" / "metrics.jsonl")
    ten = _strict_records(tmp_path / "ten" / "metrics.jsonl")
    b_hat = {r["round"]: r["consistency/b_hat"] for r in every}
    ratio = {r["round"]: r["consistency/b_hat"] / r["consistency/bound"] for r in every}
    assert [r["round"] for r in ten] == [10, 20, 30]
    for start, record in zip((0, 10, 20), ten, strict=True):
        window = range(start + 1, record["round"] + 1)
        peak = max(window, key=b_hat.get)
        assert record["consistency/b_hat_peak"] == b_hat[peak]
        assert record["consistency/b_hat_peak_round"] == peak
        assert record["consistency/ratio_peak_round"] == max(window, key=ratio.get)
        assert record["consistency/b_hat_peak"] > record["consistency/b_hat"]  # between logs
    assert all(r["consistency/bound_violations"] == 0 for r in ten)


def test_rounds_over_the_bound_are_counted_and_reported():
    peaks = train.Peaks(deterministic=True)
    m = {"consistency/b_hat": np.array([[1.0, 3.0, 2.0]]),
         "consistency/bound": np.array([[2.0, 2.5, 2.0]]), "learning_rate": np.full((1, 3), 0.1)}
    peaks.update(m, 10)
    fields = peaks.flush(reset=True)
    assert fields["consistency/b_hat_peak"] == 3.0 and fields["consistency/b_hat_peak_round"] == 12
    assert fields["consistency/ratio_peak"] == 1.2 and fields["consistency/bound_violations"] == 1
    assert peaks.verdict() == "b_hat exceeded its bound in 1 round(s), the first: round 12"
    assert train.Peaks(True).verdict() == "b_hat <= bound held in every round"


# ------------------------------------------------------------- usage errors


def test_existing_run_is_refused_and_left_untouched(whole):
    before = _snapshot(whole)
    with pytest.raises(flags.UsageError) as excinfo:
        _run(whole, rounds=WHOLE_ROUNDS)
    assert "--resume" in _one_line_usage(excinfo, "workdir")
    with pytest.raises(flags.UsageError) as excinfo:
        _run(whole, rounds=20, resume=True, learning_rate=0.5)
    assert "0.05" in _one_line_usage(excinfo, "learning_rate")
    with pytest.raises(flags.UsageError) as excinfo:
        _run(whole, rounds=20, resume=True, ef_beta=0.5)
    assert "0.5" in _one_line_usage(excinfo, "ef_beta")
    with pytest.raises(flags.UsageError) as excinfo:
        _run(whole, rounds=5, resume=True)
    _one_line_usage(excinfo, "rounds")
    assert _snapshot(whole) == before


def test_a_config_saved_with_every_flag_resumes(whole, tmp_path):
    """Configs saved every flag before only the effective ones were saved, and none recorded
    `--loop` before it existed: those runs were Python loops."""
    directory = tmp_path / "legacy"
    directory.mkdir()
    for name in os.listdir(whole):
        (directory / name).write_bytes((whole / name).read_bytes())
    saved = {**config.DEFAULTS, **TINY, "workdir": str(directory), "rounds": WHOLE_ROUNDS,
             "compressor": "top_k", "period": 7}  # an unused value no longer blocks a resume
    del saved["loop"]
    (directory / "config.json").write_text(json.dumps(saved))
    with pytest.raises(flags.UsageError) as excinfo:
        _run(directory, rounds=WHOLE_ROUNDS, resume=True)
    assert "'python', the value saved in" in _one_line_usage(excinfo, "loop")
    last = _run(directory, rounds=WHOLE_ROUNDS + 2, resume=True, loop="python")
    assert last["round"] == WHOLE_ROUNDS + 2


def test_decaying_schedule_over_rounds_pins_rounds_on_resume(tmp_path):
    cfg = config.validate({**TINY, "workdir": str(tmp_path), "schedule": "cosine"})
    os.makedirs(tmp_path, exist_ok=True)
    workdir.write_json(str(tmp_path / "config.json"), cfg.saved)
    with pytest.raises(flags.UsageError) as excinfo:
        _run(tmp_path, schedule="cosine", rounds=cfg.flags["rounds"] + 1, resume=True)
    _one_line_usage(excinfo, "rounds")
    # A fixed horizon (--schedule_rounds) frees --rounds again.
    fixed = {**cfg.flags, "schedule_rounds": 100}
    assert config.semantic_differences({**fixed, "rounds": 3}, fixed) == []
    assert config.semantic_differences({**cfg.saved, "rounds": 3}, cfg.flags) == [
        ("rounds", 3, 500)]


def test_corrupt_checkpoint_is_refused(tmp_path):
    workdir.write_json(str(tmp_path / "config.json"),
                       config.validate({**TINY, "workdir": str(tmp_path)}).saved)
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file")
    before = _snapshot(tmp_path)
    with pytest.raises(flags.UsageError) as excinfo:
        _run(tmp_path, resume=True)
    assert _one_line_usage(excinfo).startswith(str(tmp_path / "checkpoint.npz") + ": ")
    assert _snapshot(tmp_path) == before


def test_missing_and_corrupt_data_files(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    work = tmp_path / "work"
    with pytest.raises(flags.UsageError) as excinfo:
        _run(work, dataset="mnist", data_dir=str(data_dir))
    assert _one_line_usage(excinfo).startswith(str(data_dir / "train-images-idx3-ubyte"))
    (data_dir / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    (data_dir / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(flags.UsageError) as excinfo:
        _run(work, dataset="mnist", data_dir=str(data_dir))
    assert _one_line_usage(excinfo).startswith(str(data_dir / "train-images-idx3-ubyte") + ":")
    with pytest.raises(flags.UsageError) as excinfo:
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
    ({"num_processes": 2}, "coordinator"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    # PowerSGD is a collective compressor: sync SGD (and DiLoCo's outer step) only.
    ({"algorithm": "async", "compressor": "powersgd"}, "compressor"),
    ({"algorithm": "sync", "compressor": "powersgd", "powersgd_rank": 0}, "powersgd_rank"),
    ({"algorithm": "sync", "compressor": "powersgd", "ef_beta": 0.5}, "ef_beta"),
    ({"algorithm": "diloco", "fragments": 3}, "fragments"),  # not a divisor of --period=4
    ({"algorithm": "diloco", "outer_learning_rate": 0.0}, "outer_learning_rate"),
])
def test_validation_names_the_flag(overrides, flag):
    with pytest.raises(flags.UsageError) as excinfo:
        config.validate({"workdir": "w", **overrides})
    _one_line_usage(excinfo, flag)


def test_more_fragments_than_leaves_are_refused_before_compiling(tmp_path):
    """The launcher traces the initial state (shapes only) before it compiles anything."""
    with pytest.raises(flags.UsageError) as excinfo:
        train.train(config.validate({**SMALL, "workdir": str(tmp_path), "algorithm": "diloco",
                                     "fragments": 2, "period": 4}))
    assert "at most the model's 1 leaves" in _one_line_usage(excinfo, "fragments")
    assert not os.listdir(tmp_path)


def test_diloco_flags_build_the_outer_step_and_sync_takes_powersgd():
    alg = config.validate({"workdir": "w", "algorithm": "diloco", "optimizer": "adamw",
                           "outer_compressor": "top_k", "period": 16}).algorithm
    assert alg.info.name == "diloco" and "adamw" in repr(alg.info.rule)
    f = config.validate({"workdir": "w", "algorithm": "diloco", "outer_compressor":
                         "powersgd", "outer_powersgd_rank": 2}).flags
    assert config.make_outer_compressor(f) == ej.powersgd(2)
    assert "outer PowerSGD rank 2" in config.describe(f)
    sync = config.validate({"workdir": "w", "algorithm": "sync", "compressor": "powersgd",
                            "powersgd_rank": 3, "error_feedback": False})
    assert sync.algorithm.info.bound_kind == "deterministic"
    assert config.make_compressor(sync.flags) == ej.powersgd(3, error_feedback=False)


def test_error_feedback_with_an_unbiased_compressor_names_the_way_out():
    with pytest.raises(flags.UsageError) as excinfo:
        config.validate({"workdir": "w", "compressor": "qsgd"})
    assert _one_line_usage(excinfo, "compressor").endswith("(or --noerror_feedback)")
    config.validate({"workdir": "w", "compressor": "qsgd", "error_feedback": False})


def test_crash_count_needs_a_horizon():
    with pytest.raises(flags.UsageError) as excinfo:
        config.validate({"workdir": "w", "algorithm": "message_passing", "crashes": 2})
    _one_line_usage(excinfo, "crash_horizon")
    config.validate({"workdir": "w", "algorithm": "message_passing", "crashes": 2,
                     "crash_horizon": 50})


def test_too_many_devices_says_how_to_get_more(tmp_path):
    with pytest.raises(flags.UsageError) as excinfo:
        train.train(config.validate({**CONVEX, "workdir": str(tmp_path), "num_devices": 16,
                                     "num_workers": 16}))
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in _one_line_usage(
        excinfo, "num_devices")


def _flag_strategy(spec: flags.Flag):
    wrong = st.sampled_from([None, "x3", [1]])
    if spec.kind == "bool":
        return st.one_of(st.booleans(), st.sampled_from([0, 1, "yes"]))
    if spec.kind == "enum":
        return st.one_of(st.sampled_from(spec.choices), st.sampled_from(["bogus", 3]))
    if spec.kind in ("str", "path"):
        return st.sampled_from(["", "some/dir", 3])
    lo = int(spec.lo) if spec.lo is not None else -5
    if spec.kind == "int":
        return st.one_of(st.integers(lo - 2, lo + 12), st.sampled_from([int(spec.hi) + 1, 2.5]),
                         st.booleans(), wrong)
    hi = spec.hi if spec.hi is not None else 10.0
    return st.one_of(st.floats(lo - 1.0, hi + 1.0), st.sampled_from([lo, hi, 1]),
                     st.sampled_from([float("nan"), float("inf")]), wrong)


FLAG_DICTS = st.fixed_dictionaries(
    {"workdir": st.just("w")},
    optional={s.name: _flag_strategy(s) for s in config.FLAGS if s.name != "workdir"}
    | {"bogus": st.just(1)},
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=FLAG_DICTS)
def test_validation_fuzz_validates_or_names_one_flag(values):
    try:
        cfg = config.validate(values)
    except flags.UsageError as e:
        message = str(e)
        assert "\n" not in message
        match = MESSAGE.match(message)
        assert match and match.group(1) in (*config.TABLE, "bogus"), message
    else:
        assert isinstance(cfg.algorithm, ej.Algorithm)
        assert set(values) <= set(cfg.saved) <= set(config.TABLE)


# ---------------------------------------------------------- command lines


def test_help_exits_0_and_lists_only_the_launchers_flags(capsys):
    for argv in (["--helpfull"], ["--help"], ["--workdir=w", "--helpfull"]):
        code, out, err = _main(capsys, *argv)
        assert code == 0 and not err
        listed = re.findall(r"^  --(\w+)  \(default", out, re.MULTILINE)
        assert listed == [f.name for f in config.FLAGS]
        for spec in config.FLAGS:
            assert f"Valid: {spec.expected}." in out
    assert "Applies with --algorithm=async." in out  # --reads


@pytest.mark.parametrize("argv, line", [
    (["--num_workers=abc"], "--num_workers: got 'abc'; expected an integer in [1, 4096]"),
    (["--workdir=w", "--num_workers"], "--num_workers: got no value; expected an integer in "
     "[1, 4096]"),
    (["--workdir=w", "--bogus=1"], "--bogus: got an unknown flag; expected a flag of this "
     "program (see --help)"),
    (["--workdir=w", "positional"], "argv: got ['positional']; expected no positional "
     "arguments"),
    (["--workdir=w", "--algorithm=sync", "--max_delay", "3"], "--max_delay: got 3; expected "
     "--max_delay only with --algorithm=async or message_passing (here --algorithm=sync)"),
    (["--workdir=w", "--algorithm=sync", "--noerror_feedback", "--ef_beta=0.5"], "--ef_beta: "
     "got 0.5; expected --ef_beta only with --algorithm=sync, async, message_passing or "
     "clock_async and --error_feedback (here --noerror_feedback)"),
    (["--workdir=w", "--resume=maybe"], "--resume: got 'maybe'; expected true or false"),
])
def test_command_line_errors_are_one_line_and_exit_2(capsys, argv, line):
    code, out, err = _main(capsys, *argv)
    assert (code, out, err) == (2, "", [line])


# ---------------------------------------------------------- workdir failures


@pytest.mark.parametrize("path, reason", [
    ("{tmp}/file/run", "Not a directory"),  # a path through a file
    ("/proc/ej_test/run", "No such file or directory"),
    ("/sys/ej_test", "Operation not permitted"),
])
def test_a_workdir_that_cannot_be_created_costs_one_line_and_exit_2(capsys, tmp_path, path,
                                                                   reason):
    (tmp_path / "file").write_text("")
    path = path.format(tmp=tmp_path)
    code, out, err = _main(capsys, f"--workdir={path}", "--dataset=least_squares",
                           "--convex_dim=8", "--convex_samples=64")
    assert code == flags.EXIT_USAGE and out == "" and len(err) == 1, err
    assert err[0].startswith(f"--workdir: got '{path}'; expected a directory this process can "
                             "create and write (") and f": {reason})" in err[0], err


def _failing(monkeypatch, name, code, after=0):
    """Makes the writes of `name` fail with `code` (errno) from its `after`-th on."""
    calls = []

    def fail(path):
        if os.path.basename(path) == name:
            calls.append(path)
            if len(calls) > after:
                raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(workdir, "before_write", fail)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_workdir_that_refuses_writes_costs_one_line_and_exit_2(capsys, monkeypatch, tmp_path,
                                                                 code):
    _failing(monkeypatch, "config.json", code)
    status, out, err = _main(capsys, f"--workdir={tmp_path}", *_argv(SMALL, rounds=4))
    assert status == flags.EXIT_USAGE and out == "" and err == [
        f"--workdir: got '{tmp_path}'; expected a directory this process can create and write "
        f"({tmp_path / 'config.json'}: {os.strerror(code)})"]
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def _argv(values, **overrides):
    return [f"--{k}={v}" for k, v in {**values, **overrides}.items()]


@pytest.mark.parametrize("name, after", [("checkpoint.npz", 1), ("metrics.jsonl", 2)])
def test_a_full_disk_during_a_run_costs_one_line_and_exit_4(capsys, monkeypatch, tmp_path,
                                                            name, after):
    """The second checkpoint (round 4), or the round-4 line (the file's third write), fails."""
    _failing(monkeypatch, name, errno.ENOSPC, after)
    status, out, err = _main(capsys, f"--workdir={tmp_path}", *_argv(SMALL, rounds=8))
    assert status == flags.EXIT_IO and out == "", err
    assert "Traceback" not in "\n".join(err)
    kept = workdir.checkpoint_round(str(tmp_path / workdir.CHECKPOINT))
    assert err[-1] == (f"{tmp_path / name}: No space left on device; stopped at round 4; the "
                       "last checkpoint, round 2, is intact; --resume continues from it")
    assert kept == 2
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    monkeypatch.setattr(workdir, "before_write", lambda path: None)
    status, _, err = _main(capsys, f"--workdir={tmp_path}", *_argv(SMALL, rounds=8),
                           "--resume")
    assert status == 0, err


def _launch(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_launch_usage_error_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    before = _snapshot(tmp_path)
    result = _launch(f"--workdir={tmp_path}", "--num_workers=8", "--max_delay=3")
    assert result.returncode == 2
    assert result.stderr.startswith("--max_delay: ") and result.stderr.count("\n") == 1, (
        result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _snapshot(tmp_path) == before
