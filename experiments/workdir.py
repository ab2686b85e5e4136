"""A run's directory: config, metrics, timing and checkpoints, written safely.

Layout of a workdir:

    config.json      the effective configuration: every flag that applies to the run
                     (rewritten on resume: only --rounds and the other non-semantic
                     flags may change)
    metrics.jsonl    one strict-JSON line per logged round; deterministic given the
                     config (non-finite values are written as null)
    timing.jsonl     wall-clock facts (rounds/s, elapsed time), kept apart from the
                     deterministic record so that runs can be compared exactly
    checkpoint.npz   the latest state: its leaves as `leaf_<i>` arrays (typed PRNG
                     keys as their raw key data) and a JSON `meta` entry (the round,
                     and the launcher's running records: skipped rounds, b_hat peaks)
    *.png            plots, redrawn at the end of every run

Whole files are written to a temporary file in the same directory, fsynced and
renamed over the target: a crash leaves the old file or the new one. A checkpoint
is written only after the metrics lines up to its round are fsynced. A write the
operating system refuses (no space, a read-only file system, a path through a
file) raises `IOFailure`, one line naming the file and the reason; the temporary
file is removed, the old file kept.

`check_workdir` decides, before anything is written, where a run starts: a fresh
workdir at round 0; one that holds a run only with `--resume`, which checks the
saved config, restores the checkpoint and keeps the metrics lines an
uninterrupted run would have written up to its round. A running launch holds
`lock_workdir`'s `flock` on the directory, which dies with its process: a second
launch is refused while the first runs, never after.

Test hooks: `EJ_TEST_KILL_IN_CHECKPOINT=r` (an environment variable only the tests
set) SIGKILLs the process while it saves the round-`r` checkpoint, between the
fsync of the temporary file and its rename; `before_write(path)`, called before
every write, is where the tests raise `OSError`s such as `ENOSPC` and `EROFS`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config as config_lib
from experiments.config import Config
from experiments.flags import IOFailure, UsageError, log, usage

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TIMING = "timing.jsonl"
CHECKPOINT = "checkpoint.npz"
RUN_FILES = (CONFIG, METRICS, TIMING, CHECKPOINT)
KILL_HOOK = "EJ_TEST_KILL_IN_CHECKPOINT"  # the test hook (module docstring)


def before_write(path: str) -> None:
    """Called before every write into a workdir (the tests' seam for failing writes)."""


@contextlib.contextmanager
def writing(path: str):
    """Turns an `OSError` while writing `path` into a one-line `IOFailure`."""
    try:
        yield
    except OSError as e:
        if isinstance(e, IOFailure):
            raise
        raise IOFailure(f"{path}: {e.strerror or e}") from None


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # Not every file system lets a directory be fsynced.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", before_replace=None):
    """A temporary file next to `path`, fsynced and renamed to `path` on success
    (`before_replace(tmp_path)` runs between the two)."""
    directory = os.path.dirname(os.path.abspath(path))
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with writing(path):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what `open` would have given.
            with os.fdopen(fd, mode) as f:
                before_write(path)
                yield f
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _plain(value):
    """A JSON-ready value: numbers as Python numbers, non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def dumps(record: Mapping[str, Any]) -> str:
    """Strict JSON on one line (non-finite values become `null`)."""
    return json.dumps(_plain(record), allow_nan=False, separators=(", ", ": "))


def write_json(path: str, record: Mapping[str, Any]) -> None:
    """Writes `record` as indented strict JSON, atomically."""
    with atomic_open(path) as f:
        f.write(json.dumps(_plain(record), allow_nan=False, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> dict[str, Any]:
    """Reads a JSON object; a missing or corrupt file is a one-line `UsageError`."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the saved config ({_one_line(e)})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return record


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i >= len(lines) - 2:  # The last line (possibly before a final newline).
                continue
            raise UsageError(f"{path}: line {i + 1} is not JSON") from None
    return records


def rewrite_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Replaces a JSONL file with `records`, atomically."""
    with atomic_open(path) as f:
        for record in records:
            f.write(dumps(record) + "\n")


class JsonlWriter:
    """Appends one strict-JSON line per record, flushed at once, after dropping a last
    line torn by a crash mid-write."""

    def __init__(self, path: str):
        self.path = path
        with writing(path):
            self._file = open(path, "a+b")  # noqa: SIM115 (closed in `close`)
            self._file.seek(0)
            data = self._file.read()
            if data and not data.endswith(b"\n"):
                self._file.truncate(data.rfind(b"\n") + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        with writing(self.path):
            before_write(self.path)
            self._file.write((dumps(record) + "\n").encode())
            self._file.flush()

    def sync(self) -> None:
        with writing(self.path):
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):  # A failed flush was reported by `write`.
            self._file.close()


def _is_key(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: str, state, round_: int, *, records=None) -> None:
    """Saves `state`'s leaves (typed keys as `jax.random.key_data`), its round and the
    launcher's running `records` (JSON) to `path` (`.npz`), atomically."""
    leaves, treedef = jax.tree.flatten(state)
    leaves = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    if jax.process_count() > 1:
        # Every process gathers the whole state (a collective); each writes its copy.
        from jax.experimental import multihost_utils

        leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
                  for x in leaves]
    leaves = jax.device_get(leaves)
    meta = {
        "round": int(round_),
        "num_leaves": len(leaves),
        "keys": [i for i, x in enumerate(jax.tree.leaves(state)) if _is_key(x)],
        "treedef": str(treedef),
    }
    if records is not None:
        meta["records"] = records
    arrays = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["meta"] = np.asarray(json.dumps(meta))
    with atomic_open(path, "wb", before_replace=_kill_hook(round_)) as f:
        np.savez(f, **arrays)


def _kill_hook(round_: int):
    """The test hook `EJ_TEST_KILL_IN_CHECKPOINT`: SIGKILL between fsync and rename."""
    value = os.environ.get(KILL_HOOK, "")
    if not value or int(value) != round_:
        return None

    def kill(tmp):
        del tmp
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def checkpoint_round(path: str) -> int | None:
    """The round of the checkpoint at `path`, or None when there is none."""
    if not os.path.exists(path):
        return None
    return _read_checkpoint(path)[0]["round"]


def _read_checkpoint(path: str):
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            leaves = [np.asarray(data[f"leaf_{i:04d}"]) for i in range(meta["num_leaves"])]
            int(meta["round"])
    except Exception as e:  # noqa: BLE001 (any failure to read means a corrupt file)
        raise UsageError(f"{path}: cannot read the checkpoint ({_one_line(e)})") from None
    return meta, leaves


def restore(path: str, template):
    """`(state, meta)` of the checkpoint at `path`, in the structure of `template` (a state,
    or its `jax.eval_shape`); keys with the default implementation. `UsageError` for an
    unreadable file or a structure, shape or dtype other than the template's."""
    meta, leaves = _read_checkpoint(path)
    t_leaves, treedef = jax.tree.flatten(template)
    if meta["treedef"] != str(treedef) or len(leaves) != len(t_leaves):
        raise UsageError(f"{path}: the checkpoint's state structure differs from this "
                         "config's (written by another version?)")
    out = []
    for i, (x, t) in enumerate(zip(leaves, t_leaves, strict=True)):
        if _is_key(t):
            want = jax.eval_shape(jax.random.key_data, t)  # `t` may be abstract.
            if x.shape != want.shape or x.dtype != want.dtype:
                raise UsageError(f"{path}: key leaf {i} has shape {x.shape}; expected "
                                 f"{want.shape}")
            out.append(jax.random.wrap_key_data(jnp.asarray(x)))  # the default implementation
            continue
        if x.shape != t.shape or x.dtype != t.dtype:
            raise UsageError(f"{path}: leaf {i} is {x.dtype}{list(x.shape)}; expected "
                             f"{t.dtype}{list(t.shape)}")
        out.append(jnp.asarray(x))
    return jax.tree.unflatten(treedef, out), meta


class Start(NamedTuple):
    """Where a run starts: its state (None: fresh) and round, and what a resume keeps."""

    state: Any
    round: int
    records: list  # metrics records to keep (resume), else []
    running: dict = {}  # the checkpoint's running records (`save_checkpoint`)


class WorkdirLock(NamedTuple):
    """An exclusive `flock` on a workdir, held until `release` or the process's death."""

    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # Closing the descriptor drops the lock.


def lock_workdir(wd: str) -> WorkdirLock:
    """Creates `wd` if needed and `flock`s it (or a `.lock` file in it, where a directory
    cannot be locked). `UsageError` when `wd` is a file or another running process holds
    the lock; `IOFailure` when `wd` cannot be created."""
    if os.path.exists(wd) and not os.path.isdir(wd):
        raise usage("workdir", wd, "a directory (this is a file)")
    with writing(wd):
        os.makedirs(wd, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # No flock (Windows): run unlocked.
        log.warning("cannot lock %s on this platform; do not launch twice on it", wd)
        return WorkdirLock(None)
    fd = None
    for target, flags in ((wd, os.O_RDONLY), (os.path.join(wd, ".lock"), os.O_RDWR | os.O_CREAT)):
        fd = os.open(target, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return WorkdirLock(fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise usage(
                    "workdir", wd, "a workdir no running process is using (another "
                    "experiments.train is running in it; wait for it to stop, then --resume)"
                ) from None
    log.warning("cannot lock %s on this file system; do not launch twice on it", wd)
    return WorkdirLock(None)


_RUN_NAMES = "|".join(re.escape(n) for n in RUN_FILES)
_TEMPORARY = re.compile(rf"^({_RUN_NAMES})\..+\.tmp$")


def remove_stale_temporaries(wd: str) -> None:
    """Removes the temporary files a killed writer left in `wd` (call under the lock)."""
    for name in filter(_TEMPORARY.match, os.listdir(wd)):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(wd, name))


def on_grid(round_: int, f: Mapping[str, Any]) -> bool:
    """Whether an uninterrupted run logs `round_` before its last round."""
    return round_ % f["log_every"] == 0 or (f["eval_every"] > 0 and round_ % f["eval_every"] == 0)


def check_workdir(cfg: Config, abstract_state) -> Start:
    """Where a run in the (locked) workdir starts, and what a resume keeps; writes nothing.
    `UsageError` for a run without `--resume`, or (with it) a different config, a corrupt
    checkpoint or one past `--rounds`."""
    f = cfg.flags
    wd = f["workdir"]
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(wd, n))]
    if not f["resume"]:
        if existing:
            raise usage("workdir", wd, f"a directory without a run (it holds {existing[0]}); "
                        "pass --resume to continue it")
        return Start(None, 0, [])
    config_path = os.path.join(wd, CONFIG)
    if not os.path.exists(config_path):
        if existing:
            raise UsageError(f"{os.path.join(wd, existing[0])}: a run without {CONFIG}; "
                             "expected a workdir written by experiments.train")
        log.info("--resume: %s holds no run yet; starting from round 0", wd)
        return Start(None, 0, [])
    diffs = config_lib.semantic_differences(read_json(config_path), f)
    if diffs:
        name, saved, current = diffs[0]
        if saved is None:
            raise usage(name, current, f"no --{name}: the run saved in {config_path} does "
                        "not use it (a resumed run keeps its config)")
        raise usage(name, current, f"{saved!r}, the value saved in {config_path} (a resumed "
                    "run keeps its config)")
    checkpoint = os.path.join(wd, CHECKPOINT)
    if not os.path.exists(checkpoint):
        log.info("--resume: %s has no checkpoint yet; starting from round 0", wd)
        return Start(None, 0, [])
    state, meta = restore(checkpoint, abstract_state)
    round_ = int(meta["round"])
    if round_ > f["rounds"]:
        raise usage("rounds", f["rounds"], f"an integer >= {round_}, the round of {checkpoint}")
    keep = [r for r in read_jsonl(os.path.join(wd, METRICS))
            if r.get("round", math.inf) <= round_
            and (on_grid(r["round"], f) or r["round"] == f["rounds"])]
    log.info("--resume: continuing %s from round %d", wd, round_)
    return Start(state, round_, keep, meta.get("records", {}))
