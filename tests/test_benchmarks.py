"""The benchmark machinery on tiny configurations (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import elastic_jax as ej
from benchmarks import problems, proposal, timing, topk, torch_sim, torch_worker
from benchmarks import run as bench_run

requires_torch = pytest.mark.skipif(not torch_sim.available()[0],
                                    reason=torch_sim.NOT_INSTALLED)
TORCH_ROWS = (torch_worker.ROW_DEFAULT, torch_worker.ROW_ONE_THREAD)
TORCH_FIELDS = ("speedup_over_pytorch", "speedup_over_pytorch_default_loop",
                "speedup_over_pytorch_1thread", "speedup_over_pytorch_1thread_default_loop")


def test_run_quick_writes_tables_and_json(tmp_path):
    code = bench_run.main([
        "--quick", "--models", "mlp", "--variants", "sync,sync_topk", "--rounds", "2",
        "--repeats", "2", "--worker-loops", "chunks,vmap", "--no-clock", "--out", str(tmp_path),
    ])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["sync", "sync_topk"]
    for r in report["results"]:
        assert r["model"] == "mlp" and r["d"] == 9610
        assert set(r["per_round_s"]) >= {"ej.run[chunks]", "ej.run[vmap]", "floor: vmap",
                                         "floor: unrolled", "optax.sgd"}
        assert all(v > 0 for v in r["per_round_s"].values())
        assert r["round_over_floor"]["ej.run[vmap]"] > 0
        for loop, (q25, q75) in r["round_over_floor_quartiles"].items():
            assert 0 < q25 <= r["round_over_floor"][loop] <= q75
        assert len(r["load_average"]) == 2
        assert r["state_bytes"] >= r["param_bytes"] > 0
    assert "topk_share_of_round" in report["results"][1]
    assert {t["variant"] for t in report["targets"]} == {"sync", "sync_topk"}
    assert report["date"] and "commit" in report
    assert set(report["load_average"]) == {"before", "after"}
    assert report["clock"] == []  # --no-clock: test_clock_rows
    text = (tmp_path / "results.md").read_text()
    assert "| variant |" in text and "## Targets" in text and "Measured " in text
    if torch_sim.available()[0]:
        _check_torch_rows(report, text)
    else:
        assert report["torch"].startswith(torch_sim.NOT_INSTALLED)
        assert not any(key in r for r in report["results"] for key in TORCH_FIELDS)


def _check_torch_rows(report, text):
    """Both PyTorch rows measured, each in a process other than this one."""
    procs = report["torch_processes"]
    assert os.getpid() not in {procs[row]["pid"] for row in TORCH_ROWS}
    assert procs[torch_worker.ROW_ONE_THREAD]["threads"] == 1
    for r in report["results"]:
        assert all(r["rounds_per_s"][row] > 0 for row in TORCH_ROWS)
        assert all(r[key] > 0 for key in TORCH_FIELDS)
    assert "own process, 1 thread" in text
    assert f"own process, default {procs[torch_worker.ROW_DEFAULT]['threads']} threads" in text


def _default_torch_threads() -> int:
    """`torch.get_num_threads()` in a fresh Python process."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@requires_torch
def test_torch_process_answers_with_default_threads_in_another_process():
    procs, why = torch_worker.start_rows()
    try:
        default, one = procs[torch_worker.ROW_DEFAULT], procs[torch_worker.ROW_ONE_THREAD]
        assert len({os.getpid(), default.pid, one.pid}) == 3
        assert default.threads == _default_torch_threads()
        assert one.threads == 1
        assert f"default ({default.threads} threads)" in why
        problem = problems.make_problem("mlp", 2, batch_size=4)
        for proc in (default, one):
            proc.build("mlp", "async_topk_ef", problem.data, num_workers=2, max_delay=2,
                       batch_size=4)
            assert proc.time(2) > 0
        with pytest.raises(RuntimeError, match="variant: got 'nope'"):
            default.build("mlp", "nope", problem.data)
        assert default.time(1) > 0  # still serving after a failed request
    finally:
        torch_worker.close_all(procs)
    assert [p._proc.returncode for p in procs.values()] == [0, 0]


def test_torch_rows_skip_with_the_reason_where_torch_is_missing(tmp_path, monkeypatch):
    stub = tmp_path / "torch"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('no torch here')\n")
    paths = [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    procs, why = torch_worker.start_rows()
    assert procs == {} and why.startswith(torch_sim.NOT_INSTALLED)


def test_background_load_runs_and_stops_its_processes():
    load = timing.BackgroundLoad(1)
    with load:
        procs = list(load._procs)
        assert len(procs) == 1 and procs[0].is_alive()
    assert not procs[0].is_alive()
    with timing.BackgroundLoad(0) as none:
        assert none._procs == []


def test_quartiles_bracket_the_median():
    xs = [1.0, 2.0, 3.0, 4.0, 100.0]
    q25, q75 = timing.quartiles(xs)
    assert q25 == 2.0 and q75 == 4.0
    assert timing.paired_min_ratios([2.0, 6.0], [1.0, 4.0], [4.0, 3.0]) == [2.0, 2.0]


def test_measure_records_self_timed_seconds():
    samples = timing.measure({"self": lambda: timing.SelfTimed(0.5), "wall": lambda: None},
                             repeats=2)
    assert samples["self"] == [0.5, 0.5]
    assert all(0 <= s < 0.5 for s in samples["wall"])


def test_ej_run_compiles_once_per_configuration():
    problem = problems.make_problem("linear", 2, batch_size=4, d=16)
    # Each traced twice: once for the loop rule and the batch check (shapes only,
    # remembered), once compiled.
    loss_fn = chex.assert_max_traces(problem.loss_fn, n=2)
    batch_fn = chex.assert_max_traces(problem.batch_fn, n=2)
    alg = ej.sync_sgd(0.1, 2, compressor=ej.top_k(k=3), error_feedback=True)
    state = alg.init(problem.params, jax.random.key(0))
    state, metrics = ej.run(alg, loss_fn, state, batch_fn=batch_fn, rounds=3, has_aux=True)
    state, metrics = ej.run(alg, loss_fn, state, batch_fn=batch_fn, rounds=2, has_aux=True)
    fresh = alg.init(problem.params, jax.random.key(1))
    ej.run(alg, loss_fn, fresh, batch_fn=batch_fn, rounds=1, has_aux=True)
    assert metrics["loss"].shape == (2,)


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_mask_is_the_top_k_mask(ties):
    x = jax.random.normal(jax.random.key(3), (1000,))
    scores = jnp.abs(jnp.round(x * 2) / 2 if ties else x)
    for k in (1, 10, 137, 1000):
        _, idx = lax.top_k(scores, k)
        want = jnp.zeros(scores.shape, bool).at[idx].set(True)
        got = jax.jit(topk.threshold_mask, static_argnums=1)(scores, k)
        np.testing.assert_array_equal(got, want)


def test_gradient_structures_agree():
    problem = problems.make_problem("linear", 4, batch_size=3, d=32)
    keys = jax.random.split(jax.random.key(0), 4)
    batch = problem.batch_fn(0, keys)
    views = {"w": jax.random.normal(jax.random.key(1), (4, 32))}
    want = proposal.value_and_grads(problem.loss_fn, 4, "vmap")(views, batch)[2]
    for structure in ("unrolled", "map", "hybrid:2"):
        got = jax.jit(proposal.value_and_grads(problem.loss_fn, 4, structure))(views, batch)[2]
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_tree_bytes_counts_keys_and_shapes():
    tree = {"k": jax.random.key(0), "a": jnp.zeros((3, 4)),
            "s": jax.ShapeDtypeStruct((5,), jnp.float16)}
    assert timing.tree_bytes(tree) == 8 + 48 + 10


@requires_torch
def test_torch_simulation_runs_every_variant():
    problem = problems.make_problem("mlp", 4)
    for variant in torch_sim.SUPPORTED:
        sim = torch_sim.Simulation("mlp", variant, problem.data, num_workers=4, max_delay=4,
                                   batch_size=8)
        losses = sim.run(2)
        assert losses.shape == (2,) and np.all(np.isfinite(losses)), variant


def test_clock_rows():
    """The simulated clock's rows on a tiny linear model: its cost on a round, and
    clock-driven async's masked slots and seconds per update against the round model's."""
    problem = problems.make_problem("linear", 4, 4, d=64)
    clock = bench_run.bench_clock(problem, rounds=2, repeats=1, max_delay=4)
    assert clock["clock_over_plain"] > 0 and set(clock["per_round_s"]) == {
        "sync", "sync + clock", "async_sgd (round model)", "clock_async_sgd"}
    assert 0 <= clock["masked_slot_fraction"] < 1 and 1 <= clock["updates_per_step"] <= 4
    assert all(v > 0 for v in clock["per_update_s"].values())
    lines = bench_run._clock_lines([clock])
    assert lines[0] == "## The simulated clock" and "| linear |" in "\n".join(lines)
    target = bench_run._targets([], [{**clock, "model": "cnn"}])[0]
    assert target["met"] == (clock["clock_over_plain"] <= bench_run.TARGET_CLOCK)
