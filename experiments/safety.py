"""Runs that fail or are stopped: the divergence guard and signal handling.

The guard (`--on_nonfinite`) looks, after every `ej.run` call, at each round's `loss`
and `grad_norm/max` and at the state reached. `stop` raises `NonFiniteError` at the
first non-finite round, before anything of it is written. `skip_round` drops that
round's update; `ej.run` has no notion of a dropped update, so the guard does it
here, only when a round failed: it reruns the rounds before it from the call's input
state (a run split into calls of any lengths is bitwise the same) and keeps, for each
failed seed, the state before the round with its round counter advanced (the next
round draws a new batch, keys and lags and takes its own learning rate; the
algorithm's counters and buffers stay as if nothing was sent). A finite run is
bitwise the unguarded one. `Signals` turns SIGTERM and SIGINT into a flag the loop
polls between calls. Test hook (an environment variable only the tests set):
`EJ_TEST_NONFINITE_AT_ROUND=r` gives round `r` NaN inputs (`poison`).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config as config_lib
from experiments.flags import Failure, log

NONFINITE_HOOK = "EJ_TEST_NONFINITE_AT_ROUND"
QUANTITIES = ("loss", "gradient norm (grad_norm/max)",
              "state (parameters, residuals or buffers)")


def nonfinite_hook_round() -> int | None:
    """The round the test hook `EJ_TEST_NONFINITE_AT_ROUND` poisons, or None."""
    value = os.environ.get(NONFINITE_HOOK, "")
    return int(value) if value else None


def poison(batch, round_: jax.Array, poison_round: int):
    """The test hook: NaN float inputs when `round_ + 1 == poison_round`."""
    hit = round_ + 1 == poison_round
    return jax.tree.map(lambda x: jnp.where(hit, jnp.nan, x).astype(x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, batch)


@functools.partial(jax.jit, static_argnums=1)
def _finite(state, seeded: bool) -> jax.Array:
    """Per seed (`[S]`, or `[1]`), whether every float array of `state` is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    rows = [jnp.isfinite(x.reshape(x.shape[0], -1) if seeded else x.reshape(1, -1)).all(1)
            for x in leaves]
    return jnp.stack(rows).all(0)


def _skip(old, new, failed: np.ndarray, seeded: bool):
    """`new`, except that the seeds in `failed` keep `old` with `new`'s round counter."""
    kept = old.replace(shared=old.shared._replace(round=new.shared.round))

    def pick(o, n):
        if jnp.issubdtype(n.dtype, jax.dtypes.prng_key):
            return n
        mask = jnp.asarray(failed if seeded else failed[0])
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - mask.ndim)), o, n)

    return jax.tree.map(pick, kept, new)


class Guard:
    """`advance` runs rounds through `run(state, n)` under `--on_nonfinite`.

    `skipped` counts the skipped (seed, round) pairs; `first` is `[round, quantity]`
    of the first; `checkpoint_round` (set by the loop) goes into the stop message.
    """

    def __init__(self, run: Callable, on_nonfinite: str, seeded: bool, workdir: str,
                 saved: dict | None = None):
        self.run, self.stop, self.seeded, self.workdir = run, on_nonfinite == "stop", seeded, \
            workdir
        saved = saved or {}
        self.skipped, self.first = saved.get("skipped", 0), saved.get("first")
        self.checkpoint_round = None

    def record(self) -> dict:
        return {"skipped": self.skipped, "first": self.first}

    def advance(self, state, r0: int, n: int):
        """`n` rounds from round `r0`: the state and every round's metrics (host, `[S, n]`)."""
        new, metrics = self.run(state, n)
        metrics = {k: np.asarray(v).reshape(-1, n) for k, v in jax.device_get(metrics).items()}
        hit = self._failure(state, new, metrics, n)
        if hit is None:
            return new, metrics
        i, failed, quantity = hit
        round_ = r0 + i + 1
        if self.stop:
            kept = ("no checkpoint was written yet" if self.checkpoint_round is None else
                    f"kept the last checkpoint, round {self.checkpoint_round}, in {self.workdir}")
            raise NonFiniteError(f"round {round_}: non-finite {quantity}; stopped "
                                 f"(--on_nonfinite=stop); {kept}")
        if i:
            state, _ = self.run(state, i)
        state = _skip(state, self.run(state, 1)[0], failed, self.seeded)
        self.skipped += int(failed.sum())
        self.first = self.first or [round_, quantity]
        seeds = f" in {int(failed.sum())} of {failed.size} seeds" if self.seeded else ""
        log.warning("skipped round %d%s: non-finite %s (--on_nonfinite=skip_round)", round_,
                    seeds, quantity)
        if i + 1 < n:
            state, rest = self.advance(state, round_, n - i - 1)
            metrics = {k: np.concatenate([v[:, :i + 1], rest[k]], 1) for k, v in metrics.items()}
        return state, metrics

    def _failure(self, state, new, metrics, n: int):
        """`(index in the call, failed seeds [S], quantity)` of the first failure, or None."""
        code = np.where(~np.isfinite(metrics["loss"]), 1,
                        np.where(~np.isfinite(metrics["grad_norm/max"]), 2, 0))
        if code.any():
            i = int(np.argmax(code.any(0)))
            failed = code[:, i] > 0
            return i, failed, QUANTITIES[int(code[failed, i].min()) - 1]
        if bool(np.all(_finite(new, self.seeded))):
            return None
        for i in range(n):  # Only the state failed: find its round, one round at a time.
            state, _ = self.run(state, 1)
            finite = np.asarray(_finite(state, self.seeded))
            if not finite.all():
                return i, ~finite, QUANTITIES[2]
        raise AssertionError("a non-finite state that a rerun does not reproduce")

    def report_end(self) -> None:
        if self.skipped:
            log.warning("finished with %d skipped round(s) (--on_nonfinite=skip_round; "
                        "nonfinite/skipped_rounds); the first: round %d, non-finite %s",
                        self.skipped, *self.first)


class NonFiniteError(Failure):
    """`--on_nonfinite=stop` met a non-finite value; the message is one line."""

    status = config_lib.EXIT_NONFINITE


class Interrupted(Failure):
    """SIGTERM or SIGINT arrived; a final checkpoint at `round` was written."""

    def __init__(self, signum: int, round_: int, workdir: str):
        self.round, self.status = round_, config_lib.EXIT_SIGNAL + signum
        super().__init__(f"{signal.Signals(signum).name}: saved the checkpoint of round "
                         f"{round_} in {workdir}; --resume continues the run (exit status "
                         f"{self.status})")


class Signals:
    """While entered (in the main thread), SIGTERM and SIGINT set `received` instead of
    ending the process; a second signal ends it at once (the workdir stays resumable)."""

    def __enter__(self):
        self.received, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle)
                              for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
