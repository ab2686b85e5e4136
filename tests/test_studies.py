"""The study scripts: each `--smoke` run in-process, its report's tables, and usage errors.

Each study runs once (a module-scoped fixture) at its smoke sizes; the tests read
the measurements and the report it wrote. One subprocess checks the command-line
contract (one line on stderr, exit status 2).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

import elastic_jax as ej
from experiments import (
    consistency_table,
    convex_rates,
    diloco,
    error_feedback_study,
    flags,
    hypergradients,
    models,
    record_async,
    studies,
    time_to_accuracy,
)
from experiments import topologies as topologies_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(module, workdir, **overrides):
    return studies.validate(module.FLAGS, {"workdir": str(workdir), "smoke": True, **overrides},
                            smoke=module.SMOKE)


def _table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header starts with `| first_header |`: header, rows."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))

    def cells(line):
        return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def _number(cell: str) -> float:
    """The leading number of a cell (`1.2 ± 0.3` -> 1.2)."""
    return float(cell.split(" ")[0])


def _no_temporary_files(directory):
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ------------------------------------------------------------------ flags


def test_validate_applies_smoke_sizes_unless_given():
    s = _smoke(convex_rates, "/tmp/unused", rounds=7)
    assert s.rounds == 7 and s.num_seeds == convex_rates.SMOKE["num_seeds"]
    assert s.problems == convex_rates.PROBLEMS


@pytest.mark.parametrize("module,values,flag", [
    (convex_rates, {"rounds": 0}, "rounds"),
    (convex_rates, {"problems": "least_squares,quadratic"}, "problems"),
    (convex_rates, {"workdir": ""}, "workdir"),
    (error_feedback_study, {"k_fractions": "0.1,0.1"}, "k_fractions"),
    (error_feedback_study, {"k_fractions": "0,0.1"}, "k_fractions"),
    (error_feedback_study, {"delays": "P-1,Q"}, "delays"),
    (error_feedback_study, {"workers": "4,x"}, "workers"),
    (error_feedback_study, {"momenta": "0,1"}, "momenta"),
    (consistency_table, {"learning_rate": float("nan")}, "learning_rate"),
    (consistency_table, {"nonsense": 1}, "nonsense"),
    (topologies_study, {"topologies": "ring,ring"}, "topologies"),
    (topologies_study, {"topologies": "ring,mesh"}, "topologies"),
    (topologies_study, {"workers": "1"}, "workers"),
    (diloco, {"arms": "diloco_4,diloco_8"}, "arms"),
    (diloco, {"models": "resnet20"}, "models"),
])
def test_bad_flags_are_one_line_usage_errors(module, values, flag):
    with pytest.raises(flags.UsageError) as excinfo:
        studies.validate(module.FLAGS, {"workdir": "/tmp/unused", **values})
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"--{flag}: got ")


def test_delays_are_written_in_terms_of_the_worker_count():
    s = studies.validate(error_feedback_study.FLAGS,
                         {"workdir": "/tmp/unused", "delays": "P-1,2P,3,P+2"})
    assert [d(8) for d in s.delays] == [7, 16, 3, 10]
    assert [str(d) for d in s.delays] == ["P-1", "2P", "3", "P+2"]
    short = s._replace(delays=s.delays[2:3])  # 3 < P - 1 for P = 8
    with pytest.raises(flags.UsageError, match=r"^--delays: got '3'; expected"):
        error_feedback_study.check(short)


def test_command_line_errors_exit_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.convex_rates", f"--workdir={tmp_path}",
         "--num_workers=8", "--max_delay=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "--max_delay: got 3; expected an integer >= num_workers - 1 = 7"]
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("module", [convex_rates, consistency_table, error_feedback_study,
                                    hypergradients, topologies_study, time_to_accuracy,
                                    record_async, diloco])
def test_help_and_an_unwritable_workdir(module, capsys, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        module.main(["--helpfull"])
    out = capsys.readouterr().out
    assert excinfo.value.code == 0
    assert re.findall(r"^  --(\w+)  \(default", out, re.MULTILINE) == [
        f.name for f in module.FLAGS]
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as excinfo:
        module.main([f"--workdir={tmp_path / 'file' / 'run'}", "--smoke"])
    err = capsys.readouterr().err.splitlines()
    assert excinfo.value.code == flags.EXIT_USAGE and len(err) == 1, err
    assert err[0].startswith(f"--workdir: got '{tmp_path / 'file' / 'run'}'; expected a "
                             "directory this process can create and write (") and (
        "Not a directory)" in err[0])


def test_progress_lines_give_the_elapsed_time_and_an_eta(caplog):
    progress = studies.Progress(4)
    with caplog.at_level("INFO", logger="experiments"):
        progress.step("first")
        progress.step("second")
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"\[1/4\] first: \d+\.\d s; elapsed 0:\d\d, ETA 0:\d\d", lines[0])
    assert lines[1].startswith("[2/4] second: ")


def test_markdown_table_escapes_pipes():
    lines = studies.markdown_table(("a", "||x||"), [(1, "|y|")])
    assert lines == ["| a | \\|\\|x\\|\\| |", "|---|---|", "| 1 | \\|y\\| |"]


# ------------------------------------------------- error feedback study


@pytest.fixture(scope="module")
def ef_study(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ef")
    s = _smoke(error_feedback_study, directory)
    outcomes = error_feedback_study.run_grid(s)
    path = error_feedback_study.write(s, outcomes, 0.0, ["--smoke"])
    return s, outcomes, path


def test_ef_study_runs_both_arms_of_every_configuration(ef_study):
    s, outcomes, path = ef_study
    grid = error_feedback_study.grid(s)
    assert [o.point for o in outcomes] == grid
    pairs = {p._replace(feedback=None) for p in grid}
    assert len(grid) == 2 * len(pairs)
    # The momentum arm (async, workers) and the sync panel (EF14, EF21; server).
    assert {(p.algorithm, p.momentum, p.feedback) for p in grid} == {
        ("async", 0.9, "none"), ("async", 0.9, "EF14"), ("sync", 0.9, "EF14"),
        ("sync", 0.9, "EF21")}
    for o in outcomes:
        assert len(o.final_loss) == s.num_seeds
        assert all(math.isfinite(x) and x > 0 for x in o.final_loss)
        assert all(0.0 <= a <= 1.0 for a in o.test_accuracy)
        # Stale reads and EF14's residuals: views differ from x; EF21's views are x.
        assert all((b > 0) == (o.point.feedback != "EF21") for b in o.max_b_hat), o.point
        assert o.curves.shape == (s.num_seeds, len(o.eval_rounds))
        assert o.eval_rounds[-1] == s.rounds
        np.testing.assert_allclose(o.curves[:, -1], o.final_loss)
    # Seeds differ (each seed initialises its own model).
    assert len(set(outcomes[0].final_loss)) == s.num_seeds


def test_ef_study_report_has_one_row_per_configuration(ef_study):
    s, outcomes, path = ef_study
    text = open(path).read()
    for needle in ("- Date: ", "- Machine: ", "- Code: git commit ",
                   "python -m experiments.error_feedback_study",
                   "## The paper's finding, measured", "Settings:"):
        assert needle in text
    # The smoke grid's MLP: every sweep (both async arms; each sync arm) batched, by the rule.
    assert {o.execution for o in outcomes} == {"batched"}
    assert "they ran as one batched program by the library's rule" in text
    _, every = _table(text.split("## Every configuration")[1], "dataset")
    assert len(every) == len(outcomes)
    arms = {}
    for row in every:
        arms.setdefault(tuple(row[:6]), []).append(row[6])
    both = {"async": ["EF14", "none"], "sync": ["EF14", "EF21"]}  # both arms, every config
    assert all(sorted(v) == both[key[1]] for key, v in arms.items())
    for row in every:
        assert math.isfinite(_number(row[7])) and math.isfinite(_number(row[8]))
    for section, algorithm in (("## EF against no EF", "async"),
                               ("## Synchronous panel", "sync")):
        _, comparison = _table(text.split(section)[1], "dataset")
        assert len(comparison) == sum(o.point.algorithm == algorithm for o in outcomes) // 2
        assert all(r[-1] in ("lower", "higher", "within") for r in comparison)
    for name in ("loss_digits.png", "final_loss_digits.png", "final_loss_sync_digits.png"):
        assert os.path.getsize(os.path.join(s.workdir, name)) > 0
    _no_temporary_files(s.workdir)


def test_ef_verdict_uses_the_seeds_spread(ef_study):
    _, outcomes, _ = ef_study
    off, on = outcomes[0], outcomes[1]
    assert (off.point.feedback, on.point.feedback) == ("none", "EF14")

    def verdict(loss_off, loss_on):
        return error_feedback_study.compare(
            [off._replace(final_loss=loss_off), on._replace(final_loss=loss_on)])[0].verdict

    assert verdict([2.0, 2.2], [1.0, 1.2]) == "lower"
    assert verdict([1.0, 1.2], [2.0, 2.2]) == "higher"
    assert verdict([1.0, 2.0], [1.4, 1.6]) == "within"


# ------------------------------------------------------ consistency table


@pytest.fixture(scope="module")
def consistency(tmp_path_factory):
    directory = tmp_path_factory.mktemp("consistency")
    s = _smoke(consistency_table, directory)
    results = consistency_table.measure_all(s)
    path = consistency_table.write(s, results, 0.0, None)
    return s, results, path


def test_every_theory_row_is_measured_and_deterministic_bounds_hold(consistency):
    s, results, path = consistency
    configs = consistency_table.configurations(s)
    assert len(results) == len(configs) >= 17
    assert len({c.row for c in configs}) == len(configs)  # smoke: one point per row
    text = open(path).read()
    _, per_row = _table(text, "docs/theory.md row")
    assert len(per_row) == len({c.row for c in configs})
    _, rows = _table(text, "#")
    assert len(rows) == len(results)
    for row, r in zip(rows, results, strict=True):
        assert row[1] == r.config.row
        if r.kind == "deterministic":
            assert row[-1] == "yes", row
        if r.kind == "none":
            assert row[-1] == "n/a (no bound)" and row[7] == "inf"
        assert math.isfinite(_number(row[5])) and math.isfinite(_number(row[6]))
        if r.max_bound == 0:  # B = 0: the views are the auxiliary model itself
            assert r.max_b_hat == 0
        else:  # a measurement stuck at zero would pass `held` vacuously
            assert r.max_b_hat > 0, r.config
        if r.recomputed is not None and math.isfinite(r.max_bound):
            np.testing.assert_allclose(r.recomputed, r.max_bound, rtol=1e-5)
    assert os.path.getsize(os.path.join(s.workdir, "ratios.png")) > 0
    _no_temporary_files(s.workdir)


def test_a_too_small_bound_would_be_reported_as_violated(consistency):
    _, results, _ = consistency
    r = next(r for r in results if r.config.row == "async, consistent reads")
    broken = r.run._replace(bound=r.run.bound * 0.5)
    assert consistency_table.summarize(r.config, r.config.make(), broken).held is False


def test_drift_fit_tells_a_random_walk_from_a_stationary_process():
    rng = np.random.default_rng(0)
    walk = np.linalg.norm(np.cumsum(rng.normal(size=(64, 400, 3)), axis=1), axis=2)
    slope, r2, _ = consistency_table.drift_fit(walk)
    assert slope == pytest.approx(3.0, rel=0.2) and r2 > 0.9  # E ||w_t||^2 = 3 t
    slope, r2, level = consistency_table.drift_fit(3.0 + rng.normal(size=(64, 400)))
    assert abs(slope) < 1e-3 and r2 < 0.1 and level == pytest.approx(10.0, rel=0.05)


# ------------------------------------------------------------- convex rates


@pytest.fixture(scope="module")
def convex(tmp_path_factory):
    directory = tmp_path_factory.mktemp("convex")
    s = _smoke(convex_rates, directory)
    rows = convex_rates.measure_all(s)
    path = convex_rates.write(s, rows, 0.0, None)
    return s, rows, path


def test_convex_suboptimality_decreases_and_stays_below_the_bounds(convex):
    s, rows, path = convex
    assert len(rows) == len(s.problems) * len(s.variants)
    for r in rows:
        sub = r.curves.suboptimality.mean(0)
        assert np.all(np.isfinite(sub)) and np.all(sub >= -1e-12)
        # Decreasing: the last tenth of the run is well below the first tenth and f(x_0) - f*.
        tenth = max(1, sub.size // 10)
        assert sub[-tenth:].mean() < 0.5 * sub[:tenth].mean() < r.f0_gap
        biased = r.variant.compressed and not r.variant.error_feedback
        assert (r.subopt_bound is None) == biased
        if not biased:
            assert sub[-1] <= r.subopt_bound
            assert r.curves.distance[:, -1].mean() <= r.distance_bound
        assert r.curves.grad_sq.mean() <= r.nonconvex_bound
    text = open(path).read()
    _, summary = _table(text, "variant")
    assert len(summary) == len(rows)
    _, table = _table(text.split("## Strongly convex bound")[1], "variant")
    assert len(table) == len(rows)
    assert all(row[8] in ("yes", "n/a") and row[-1] in ("yes", "n/a") for row in table)
    assert all(row[4] in ("yes", "n/a") and row[-1] == "yes" for row in summary)
    assert os.path.getsize(os.path.join(s.workdir, "suboptimality.png")) > 0
    _no_temporary_files(s.workdir)


def test_convex_bound_formula_matches_theory():
    # (1 - c eta)^T d0 + eta M^2 / c + eta^2 L^2 B^2 / c^2 at hand-picked numbers.
    got = convex_rates.strongly_convex_bound(0.5, 2.0, 0.1, 10, 3.0, 4.0, 5.0)
    want = 0.95**10 * 3.0 + 0.1 * 16 / 0.5 + 0.01 * 4 * 25 / 0.25
    np.testing.assert_allclose(got, want)
    assert convex_rates.nonconvex_bound(1.0, 2.0, 3.0, 4.0, 100, 0.5) == pytest.approx(
        (1.0 / 0.5 + 2 * 3 * 4 + 2 * 9 / (2 * 0.5)) / 10)


# ------------------------------------------------- topologies study


def test_topologies_study_refuses_a_hypercube_of_six_nodes():
    s = _smoke(topologies_study, "/tmp/unused", topologies="hypercube", workers="6")
    with pytest.raises(flags.UsageError, match=r"^--workers: got 6; expected powers of two"):
        topologies_study.check(s)


@pytest.fixture(scope="module")
def topologies_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("topologies")
    s = _smoke(topologies_study, directory)
    outcomes = topologies_study.run_grid(s)
    path = topologies_study.write(s, outcomes, 0.0, ["--smoke"])
    return s, outcomes, path


def test_topologies_study_measures_every_configuration(topologies_run):
    s, outcomes, path = topologies_run
    assert [o.point for o in outcomes] == topologies_study.grid(s)
    d = models.num_params(models.make_model("mlp", 10, (8, 8, 1))[1](jax.random.key(0)))
    for o in outcomes:
        p = o.point.num_workers
        records = o.curves.x["round"]
        assert set(o.curves.x) == set(topologies_study.AXES)
        assert o.curves.loss.shape == o.curves.accuracy.shape == (s.num_seeds, len(records))
        # Every round mixes: each node sends its model, 32 d bits, to its deg neighbours
        # after its gradient (docs/theory.md section 11).
        np.testing.assert_array_equal(o.curves.x["bits"], records * p * 32 * d)
        deg = ej.topologies.degree(ej.topologies.mixing(o.point.topology, p))
        np.testing.assert_allclose(o.curves.x["seconds"], records * (
            s.compute_mean + s.latency + deg * 32 * d / s.bandwidth), rtol=1e-5)
        gaps = ej.topologies.gaps(ej.topologies.mixing(o.point.topology, p))
        np.testing.assert_allclose((o.spectral_gap, o.norm_gap), gaps, rtol=1e-6)
        if o.point.topology == "random_matching":
            assert o.bound == math.inf
        else:  # a deterministic bound, above every b_hat of the run
            assert 0 < max(o.max_b_hat) <= o.bound < math.inf
    text = open(path).read()
    header, rows = _table(text, "model")
    assert [(r[0], r[1], int(r[2]), r[3]) for r in rows] == [o.point for o in outcomes]
    column = header.index("seconds to target")
    assert header[column - 2:column] == ["rounds to target", "bits to target"]
    for o, row in zip(outcomes, rows, strict=True):
        assert row[column] == studies.reached_text(
            topologies_study.first_reached(o, "seconds", s.target_loss))
    assert text.count("\n- mlp, iid, P = 8:") == 1 and "spectral gap" in text
    # A target every record reaches: the topologies tie in rounds, and the one with the
    # fewest neighbours (random matching, 1; the ring 2) is first in seconds.
    easy = s._replace(target_loss=float(max(o.curves.loss.max() for o in outcomes)) + 1.0)
    [line] = topologies_study.findings(outcomes, easy)
    assert ("first to the target in simulated seconds: random_matching (" in line
            and "seconds, mean over seeds; every other beyond the seeds' spread)" in line)
    assert "**A reduced grid**" in text
    for name in ("loss_mlp_iid.png", "accuracy_mlp_iid.png", "consistency.png"):
        assert os.path.getsize(os.path.join(s.workdir, name)) > 0
    for what in ("loss", "accuracy"):  # a panel per axis, the simulated seconds' included
        assert (f"![{what} against rounds, bits and simulated seconds, mlp, iid]"
                f"({what}_mlp_iid.png)") in text
        width = matplotlib.image.imread(os.path.join(s.workdir, f"{what}_mlp_iid.png")).shape[1]
        assert width > 5.5 * 100 * (len(topologies_study.AXES) - 0.5)
    _no_temporary_files(s.workdir)


def test_topology_ordering_counts_pairs_beyond_the_seeds_spread():
    def outcome(topology, gap, losses):
        losses = np.asarray(losses, float)[:, None]
        curves = topologies_study.Curves({"round": np.array([10.0])}, losses, losses,
                                         losses)
        point = topologies_study.Point("mlp", "iid", 8, topology)
        return topologies_study.Outcome(point, curves, [0.0], 1.0, 1.0, gap, gap, 0.0)

    group = [outcome("a", 0.9, [1.0, 1.1]), outcome("b", 0.5, [2.0, 2.1]),
             outcome("c", 0.1, [2.05, 2.0]), outcome("d", 0.5, [0.1, 0.2])]
    got = topologies_study.ordering(group, 0.01, "spectral gap")  # final losses compared
    # a-b, a-c, d-c ordered (the wider gap, the lower loss); a-d reversed (d's gap is
    # narrower, its loss lower); b-c within the spread; b-d have equal gaps (no pair).
    assert got == topologies_study.Ordering(3, 1, 1, "final training loss", ("d ahead of a",))


# --------------------------------------------------------- time to accuracy


@pytest.fixture(scope="module")
def tta(tmp_path_factory):
    """The study at its smoke sizes, one system (a 5x straggler) and one sweep bandwidth."""
    workdir = tmp_path_factory.mktemp("tta")
    s = _smoke(time_to_accuracy, workdir, rounds=4, scenarios="straggler", bandwidths="1e6")
    outcomes, sweep = time_to_accuracy.run_grid(s)
    report = time_to_accuracy.write(s, outcomes, sweep, seconds=0.0)
    return s, outcomes, sweep, open(report).read()


def test_time_to_accuracy_times_each_variant_on_its_clock(tta):
    s, outcomes, sweep, _ = tta
    by = {o.config.variant: o for o in outcomes}
    assert set(by) == {"sync", "async"} and all(o.scenario == "straggler" for o in outcomes)
    # Sync waits for the straggler every round: 5 compute_mean, plus its all-reduce.
    per_round = by["sync"].seconds[:, -1] / s.rounds
    assert np.all(per_round > 5 * s.compute_mean) and np.all(per_round < 5.2 * s.compute_mean)
    # Async never waits for the straggler: its 4 steps (of 3 or 4 writes) take about as
    # long as one synchronous round.
    assert np.all(by["async"].seconds[:, -1] < 0.3 * by["sync"].seconds[:, -1])
    assert 0 < np.mean(by["async"].masked) < 1
    # The sweep at 1e6 bit/s: dense updates pay 2 (P - 1) / P 32 d bits of all-reduce.
    dense, top = sorted(sweep, key=lambda o: o.config.compressed)
    assert np.all(dense.seconds[:, -1] > 4 * top.seconds[:, -1])


def test_time_to_accuracy_report_says_what_ran(tta):
    s, outcomes, _, text = tta
    assert "**A smoke-sized run**" in text
    header, rows = _table(text, "system")
    assert len(rows) == len(outcomes) and header[2] == "seconds to target"
    _, sweep_rows = _table(text, "bandwidth (bit/s)")
    assert [r[0] for r in sweep_rows] == ["1e+06"]
    assert "- straggler: against synchronous SGD's time to the target loss, async: " in text
    assert os.path.getsize(os.path.join(s.workdir, "loss_vs_seconds.png")) > 0
    _no_temporary_files(s.workdir)


# ---------------------------------------------------------------- DiLoCo study


@pytest.fixture(scope="module")
def diloco_run(tmp_path_factory):
    """Three arms (sync, PowerSGD rank 1, DiLoCo H = 4), P = 4, 8 rounds, two seeds."""
    s = _smoke(diloco, tmp_path_factory.mktemp("diloco"))
    outcomes = diloco.run_grid(s)
    return s, outcomes, open(diloco.write(s, outcomes, 0.0, ["--smoke"])).read()


def test_diloco_study_counts_bits_and_seconds_as_each_arm_communicates(diloco_run):
    s, outcomes, text = diloco_run
    assert [o.point for o in outcomes] == diloco.grid(s)
    params = models.make_model("mlp", 10, (8, 8, 1))[1](jax.random.key(0))
    d, p = models.num_params(params), s.workers
    by = {o.point.arm: o for o in outcomes}
    rounds = by["sync_momentum"].curves.x["round"][0]
    np.testing.assert_array_equal(rounds, [4, 8])
    # Sync: every round, 32 d bits a worker; PowerSGD: its factors and dense leaves;
    # DiLoCo with H = 4: the pseudo-gradient once every 4 rounds.
    for arm, per_round in (("sync_momentum", 32 * d), ("powersgd_1", ej.powersgd(1).bits(params)),
                           ("diloco_4", 32 * d / 4)):
        np.testing.assert_array_equal(by[arm].curves.x["bits"],
                                      np.broadcast_to(rounds * p * per_round, (s.num_seeds, 2)))
    assert ej.powersgd(1).bits(params) < 32 * d / 10
    # Seconds: compute plus each arm's collectives; DiLoCo pays one all-reduce in 4 rounds.
    seconds = {a: o.curves.x["seconds"][0, -1] for a, o in by.items()}
    assert seconds["diloco_4"] < seconds["sync_momentum"]
    assert np.all(np.isfinite(by["sync_momentum"].curves.loss))
    assert by["diloco_4"].max_ratio is not None and 0 < by["diloco_4"].max_ratio <= 1
    _, rows = _table(text, "model")
    assert [(r[0], r[1]) for r in rows] == [tuple(o.point) for o in outcomes]
    assert "**A reduced grid**" in text and "- mlp: " in text
    for name in ("loss_mlp.png", "accuracy_mlp.png"):
        assert os.path.getsize(os.path.join(s.workdir, name)) > 0
    _no_temporary_files(s.workdir)


def test_a_grid_at_its_reference_values_is_not_called_reduced():
    from experiments import diloco

    settings = studies.validate(diloco.FLAGS, {"workdir": "/tmp/unused"})
    assert diloco.reductions(settings) == []
    fewer = studies.validate(diloco.FLAGS, {"workdir": "/tmp/unused", "workers": 4})
    assert diloco.reductions(fewer) == ["--workers=4 instead of 8"]
