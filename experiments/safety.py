"""Runs that fail or are stopped: the divergence guard and signal handling.

The divergence guard (`--on_nonfinite`) has two halves. `guard_step` wraps the
compiled round: it checks the round's loss, its gradient norm and every float
array of the new state, drops a failed round's update under `skip_round`, and
carries a small int32 record (`init_guard`) of what it saw. `GuardKeeper` reads
that record on the host, only when the loop logs or checkpoints, and stops the
run (`NonFiniteError`) or logs the skipped rounds.

`Signals` turns SIGTERM and SIGINT into a flag the loop polls between rounds; the
loop then writes a final checkpoint and raises `Interrupted`.

Test hook: an environment variable that only the tests set.
`EJ_TEST_NONFINITE_AT_ROUND=r` makes round `r` (the one that produces the state
after `r` rounds) read NaN inputs, so its loss, gradients and update are NaN
(`poison`, applied by `experiments.problem.make_round`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import config as config_lib

# Test hook: an environment variable that only the tests set. With
# `EJ_TEST_NONFINITE_AT_ROUND=r`, round `r` (the one that makes the state after `r`
# rounds) samples NaN inputs, so its loss, gradients and update are NaN.
NONFINITE_HOOK = "EJ_TEST_NONFINITE_AT_ROUND"

# What the guard checks, in this order; the guard records the first that fails.
NONFINITE_QUANTITIES = ("loss", "gradient norm (grad_norm/max)",
                        "state (parameters, residuals or buffers)")
# The guard: int32 [skipped rounds, first non-finite round, the quantity it failed
# (1 + an index into NONFINITE_QUANTITIES), last non-finite round]; 0: none yet.
GUARD_SIZE = 4


def nonfinite_hook_round() -> int | None:
    """The round the test hook `EJ_TEST_NONFINITE_AT_ROUND` poisons, or None."""
    value = os.environ.get(NONFINITE_HOOK, "")
    return int(value) if value else None


def init_guard(num_seeds: int = 1) -> jax.Array:
    """A guard with nothing recorded (`[GUARD_SIZE]`, or `[num_seeds, GUARD_SIZE]`)."""
    shape = (GUARD_SIZE,) if num_seeds == 1 else (num_seeds, GUARD_SIZE)
    return jnp.zeros(shape, jnp.int32)


def _all_finite(tree) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def guard_step(step: Callable, on_nonfinite: str) -> Callable:
    """Wraps a round with the divergence guard of `--on_nonfinite`, inside the program.

    `guarded(state, batch, guard) -> (state, metrics, guard)` checks the round's
    `loss`, its `grad_norm/max` and every float array of the new state. With
    `"stop"` the state is the round's, whatever it holds: the launcher reads the
    guard when it logs or checkpoints and ends the run there, before writing
    anything of the failed round or later. With `"skip_round"` a failed round's
    update is dropped: the state after it is the state before it, except that
    `shared.round` advances, so the next round reads the next round's batch, keys,
    lags and learning rate (the run neither repeats the failed draw nor stalls); the
    algorithm's own counters (e.g. async's update count) and buffers stay as they
    were, as if no worker had sent anything that round (so do the quantities an
    algorithm precomputes for the coming round: async SGD's inconsistent views,
    message passing's pending sums and elastic scheduling's outstanding sums; the
    round after a skip reads the failed round's views, and the next `combine`
    recomputes them). Selection is a `jnp.where`,
    exact, so a run without non-finite values is bitwise the unguarded run. The
    metrics gain `nonfinite/skipped_rounds`, the count so far (0 under `"stop"`).
    """
    if on_nonfinite not in ("stop", "skip_round"):
        raise ValueError(f"on_nonfinite: got {on_nonfinite!r}; expected 'stop' or 'skip_round'")
    skip = on_nonfinite == "skip_round"

    def guarded(state, batch, guard):
        new_state, metrics = step(state, batch)
        failed = [~jnp.all(jnp.isfinite(metrics["loss"])),
                  ~jnp.all(jnp.isfinite(metrics.get("grad_norm/max", 0.0))),
                  ~_all_finite(new_state)]
        code = jnp.int32(0)
        for i in reversed(range(len(failed))):  # The first failing quantity wins.
            code = jnp.where(failed[i], jnp.int32(i + 1), code)
        bad = code > 0
        if skip:
            kept = state.replace(shared=state.shared._replace(round=new_state.shared.round))
            new_state = jax.tree.map(
                lambda old, new: new if jnp.issubdtype(new.dtype, jax.dtypes.prng_key)
                else jnp.where(bad, old, new), kept, new_state)
        round_ = jnp.asarray(new_state.shared.round, jnp.int32)
        count, first, first_code, last = guard[0], guard[1], guard[2], guard[3]
        is_first = bad & (first == 0)
        count = count + (bad & skip).astype(jnp.int32)
        guard = jnp.stack([count, jnp.where(is_first, round_, first),
                           jnp.where(is_first, code, first_code), jnp.where(bad, round_, last)])
        metrics = {**metrics, "nonfinite/skipped_rounds": count.astype(jnp.float32)}
        return new_state, metrics, guard

    return guarded


def first_nonfinite(guard) -> tuple[int, str] | None:
    """`(round, quantity)` of the earliest non-finite round a (host) guard records."""
    rows = np.asarray(guard).reshape(-1, GUARD_SIZE)
    hits = rows[rows[:, 1] > 0]
    if not hits.size:
        return None
    row = hits[np.argmin(hits[:, 1])]
    return int(row[1]), NONFINITE_QUANTITIES[int(row[2]) - 1]


def poison(batch, round_: jax.Array, poison_round: int):
    """The test hook: NaN float inputs when `round_ + 1 == poison_round`."""
    hit = round_ + 1 == poison_round
    return jax.tree.map(lambda x: jnp.where(hit, jnp.nan, x).astype(x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, batch)


# ------------------------------------------------------------------------ host


class NonFiniteError(RuntimeError):
    """`--on_nonfinite=stop` met a non-finite value; the message is one line."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a final checkpoint at `round` was written."""

    def __init__(self, signum: int, round_: int, workdir: str):
        self.signum, self.round = signum, round_
        name = signal.Signals(signum).name
        super().__init__(f"{name}: saved the checkpoint of round {round_} in {workdir}; "
                         f"--resume continues the run (exit status {self.exit_status})")

    @property
    def exit_status(self) -> int:
        return config_lib.EXIT_SIGNAL + self.signum


class Signals:
    """While entered, SIGTERM and SIGINT are recorded instead of ending the process.

    The loop then writes a final checkpoint at the next round boundary and raises
    `Interrupted`. A second signal ends the process at once, by the default action
    (the atomic writes leave the workdir resumable either way). Handlers can only be
    installed from the main thread; elsewhere nothing is caught.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.received = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.received is None:
            self.received = signum
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


class GuardKeeper:
    """Reads the divergence guard on the host when the loop logs or checkpoints.

    Under `--on_nonfinite=stop` a recorded non-finite round raises
    `NonFiniteError` before anything of that round (or a later one) is written;
    under `skip_round` newly skipped rounds are logged as a warning.
    """

    def __init__(self, f: Mapping[str, Any], start: Any, wd: str, guard):
        self.stop = f["on_nonfinite"] == "stop"
        self.wd = wd
        self.checkpoint_round = start.round if start.state is not None else None
        self.guard = guard
        self.reported = self.skipped(guard)

    @staticmethod
    def skipped(guard) -> int:
        return int(np.sum(np.asarray(guard).reshape(-1, GUARD_SIZE)[:, 0]))

    def check(self, guard) -> None:
        self.guard = guard
        hit = first_nonfinite(guard)
        if hit is None:
            return
        round_, quantity = hit
        if self.stop:
            kept = ("no checkpoint was written yet" if self.checkpoint_round is None else
                    f"kept the last checkpoint, round {self.checkpoint_round}, in {self.wd}")
            raise NonFiniteError(f"round {round_}: non-finite {quantity}; stopped "
                                 f"(--on_nonfinite=stop); {kept}")
        skipped = self.skipped(guard)
        if skipped > self.reported:
            last = int(np.max(np.asarray(guard).reshape(-1, GUARD_SIZE)[:, 3]))
            logging.warning("skipped %d more round(s)%s with a non-finite value "
                            "(--on_nonfinite=skip_round); the latest: round %d",
                            skipped - self.reported, self._over_seeds(guard), last)
            self.reported = skipped

    @staticmethod
    def _over_seeds(guard) -> str:
        seeds = np.asarray(guard).reshape(-1, GUARD_SIZE).shape[0]
        return f" (summed over {seeds} seeds)" if seeds > 1 else ""

    def report_end(self) -> None:
        skipped = self.skipped(self.guard)
        if skipped:
            hit = first_nonfinite(self.guard)
            first = "" if hit is None else f"; the first: round {hit[0]}, non-finite {hit[1]}"
            logging.warning("finished with %d skipped round(s)%s (--on_nonfinite=skip_round; "
                            "nonfinite/skipped_rounds)%s", skipped, self._over_seeds(self.guard),
                            first)


def resumed_guard(saved, on_nonfinite: str, num_seeds: int) -> jax.Array:
    """The guard a run starts with: fresh, or the checkpoint's record.

    Under `stop` only the count of earlier skipped rounds (a run that used
    `skip_round` before) is kept, so that the rounds it skipped do not stop the run.
    """
    if saved is None:
        return init_guard(num_seeds)
    guard = np.array(saved, np.int32).reshape(init_guard(num_seeds).shape)
    if on_nonfinite == "stop":
        guard[..., 1:] = 0
    return jnp.asarray(guard)
