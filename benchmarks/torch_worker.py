"""The PyTorch baseline in a process of its own, as a researcher's PyTorch script runs.

The benchmark (`benchmarks.run`) never runs PyTorch in its own process: there
PyTorch's intra-op threads would contend with XLA's thread pool, and pinning
PyTorch to one thread to avoid that would handicap it. Instead each PyTorch row
is a long-lived child process (`python -m benchmarks.torch_worker`) that imports
torch but not JAX, builds a `torch_sim.Simulation` when asked, and answers "run
N rounds" with the seconds it measured itself (`time.perf_counter` around the N
rounds). Requests and answers are pickled over the child's stdin and stdout, so
while the child works the parent is blocked reading the pipe, and while the
parent works the child is blocked reading its stdin.

Rows (`ROWS`): PyTorch's default intra-op thread count (the child never calls
`torch.set_num_threads`) and one thread.

Protocol (each message a pickled tuple):

- child -> parent on start: `("ready", info)` with `info` = `{"pid", "threads",
  "torch"}`, or `("unavailable", reason)` where torch cannot be imported;
- `("build", kwargs)` -> `("ok", None)`: a new `torch_sim.Simulation(**kwargs)`;
- `("time", rounds)` -> `("ok", seconds)`: the wall-clock seconds of
  `Simulation.run(rounds)` (`timing.measure`'s untimed first call is the
  warm-up);
- any failure -> `("error", traceback)`; end of stdin -> the child exits.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROW_DEFAULT = "pytorch eager (own process, default threads)"
ROW_ONE_THREAD = "pytorch eager (own process, 1 thread)"
# Row -> intra-op threads (None: PyTorch's default, `set_num_threads` is not called).
ROWS: dict[str, int | None] = {ROW_DEFAULT: None, ROW_ONE_THREAD: 1}

_ROOT = Path(__file__).resolve().parent.parent  # holds the `benchmarks` package
_CLOSE_TIMEOUT_S = 10.0


class TorchUnavailable(RuntimeError):
    """torch cannot be imported in the child; the message says why."""


class TorchProcess:
    """The parent's handle on one PyTorch child process.

    Args:
      threads: intra-op threads for `torch.set_num_threads`; None keeps
        PyTorch's default.

    Raises:
      TorchUnavailable: torch cannot be imported in the child.
    """

    def __init__(self, threads: int | None = None):
        self._proc = subprocess.Popen(_command(threads), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=_ROOT)
        kind, payload = self._receive()
        if kind == "unavailable":
            self.close()
            raise TorchUnavailable(payload)
        self.info: dict[str, Any] = payload  # {"pid", "threads", "torch"}

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.info["pid"]

    @property
    def threads(self) -> int:
        """The child's intra-op thread count (`torch.get_num_threads()` there)."""
        return self.info["threads"]

    def build(self, model: str, variant: str, data: Any, **kwargs: Any) -> None:
        """Builds the child's `torch_sim.Simulation` (replacing any earlier one).

        Args:
          model: `"mlp"` or `"cnn"`.
          variant: a name of `torch_sim.SUPPORTED`.
          data: `(images, labels, indices, counts)`, NumPy arrays.
          **kwargs: the other keyword arguments of `torch_sim.Simulation`.
        """
        self._request("build", {"model": model, "variant": variant, "data": data, **kwargs})

    def time(self, rounds: int) -> float:
        """Seconds the child measured for `rounds` rounds of its simulation."""
        return float(self._request("time", rounds))

    def close(self) -> None:
        """Ends the child (end of its stdin; killed if it does not exit)."""
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()

    def __enter__(self) -> TorchProcess:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _request(self, command: str, payload: Any) -> Any:
        pickle.dump((command, payload), self._proc.stdin)
        self._proc.stdin.flush()
        kind, answer = self._receive()
        if kind != "ok":
            raise RuntimeError(f"the PyTorch process failed on {command!r}:\n{answer}")
        return answer

    def _receive(self) -> tuple[str, Any]:
        try:
            return pickle.load(self._proc.stdout)
        except EOFError:
            code = self._proc.wait()
            raise RuntimeError(f"the PyTorch process exited (code {code})") from None


def start_rows() -> tuple[dict[str, TorchProcess], str]:
    """Starts one child per row of `ROWS`.

    Returns:
      `(row -> process, description)`; `({}, reason)` where torch cannot run.
    """
    procs: dict[str, TorchProcess] = {}
    try:
        for row, threads in ROWS.items():
            procs[row] = TorchProcess(threads)
    except TorchUnavailable as e:
        close_all(procs)
        return {}, str(e)
    return procs, describe(procs)


def close_all(procs: dict[str, TorchProcess]) -> None:
    """Ends every child of `procs`."""
    for proc in procs.values():
        proc.close()


def describe(procs: dict[str, TorchProcess]) -> str:
    """`torch 2.13.0+cpu, eager, each row in its own process: default (2 threads), 1 thread`."""
    version = next(iter(procs.values())).info["torch"]
    rows = [f"default ({p.threads} threads)" if ROWS[row] is None else
            f"{p.threads} thread{'s' if p.threads != 1 else ''}" for row, p in procs.items()]
    return f"torch {version}, eager, each row in its own process: {', '.join(rows)}"


def _command(threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.torch_worker"]
    return command + ([] if threads is None else ["--threads", str(threads)])


# ---------------------------------------------------------------------- the child


def _protocol_streams():
    """The child's request and answer streams; anything else printed goes to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return sys.stdin.buffer, answers


def _send(stream, message) -> None:
    pickle.dump(message, stream)
    stream.flush()


def _timed_run(sim, rounds: int) -> float:
    start = time.perf_counter()
    sim.run(rounds)
    return time.perf_counter() - start


def _build(payload: dict[str, Any]):
    from benchmarks import torch_sim

    return torch_sim.Simulation(**payload)


def serve(requests, answers) -> None:
    """Answers `build` and `time` requests until the end of `requests`."""
    sim = None
    while True:
        try:
            command, payload = pickle.load(requests)
        except EOFError:
            return
        try:
            if command == "build":
                sim, answer = _build(payload), None
            elif command == "time":
                answer = _timed_run(sim, payload)
            else:
                raise ValueError(f"command: got {command!r}; expected 'build' or 'time'")
        except Exception:  # noqa: BLE001  (reported to the parent, which raises)
            _send(answers, ("error", traceback.format_exc()))
            continue
        _send(answers, ("ok", answer))


def main(argv=None) -> int:
    """The child: reports itself, then serves requests until its stdin ends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's own default)")
    args = parser.parse_args(argv)
    requests, answers = _protocol_streams()
    from benchmarks import torch_sim

    ok, why = torch_sim.available()
    if not ok:
        _send(answers, ("unavailable", why))
        return 0
    if args.threads is not None:
        torch_sim.torch.set_num_threads(args.threads)
    torch = torch_sim.torch
    # Plain types only: unpickling `torch.__version__` would import torch in the parent.
    _send(answers, ("ready", {"pid": os.getpid(), "threads": int(torch.get_num_threads()),
                              "torch": str(torch.__version__)}))
    serve(requests, answers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
