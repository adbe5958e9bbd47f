"""What keeps a training run from losing work: an exclusive lock on its output directory, SIGINT / SIGTERM turned
into a checkpoint and a clean stop, and the errors a run ends with when it cannot go on (`RunError`: divergence,
an interruption, a write that failed), each one line for the CLI.

docs/distributed.md, "What happens when a run is interrupted", tells the whole story.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
from typing import Any

LOCK_FILE = ".xlstm-jax.lock"


class RunError(Exception):
    """A run that stopped and cannot go on by itself: `exit_status` for the CLI, `str()` one line saying what
    happened and what to do."""

    exit_status = 1


class Diverged(RunError):
    """The loss or the gradient norm was not finite: nothing after the last finite checkpoint was saved."""


class Interrupted(RunError):
    """SIGINT or SIGTERM: the run wrote a checkpoint of the step it finished and stopped (exit 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class WriteFailed(RunError):
    """A checkpoint, metrics or export write failed (a full disk, no permission): the last good checkpoint stays."""


def os_reason(err: BaseException) -> str:
    """The most telling line of an I/O failure: the OS error's text, or the line of a (TensorStore / orbax) chain
    that says what could not be written, else the first line."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            where = f" ({seen.filename})" if seen.filename else ""
            return f"{seen.strerror}{where}"
        seen = seen.__cause__ or seen.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for needle in ("No space left", "Error writing", "Permission denied", "Read-only file system", "OUT_OF_RANGE"):
        for line in lines:
            if needle in line:
                return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]


class RunLock:
    """An exclusive `flock` on `output_dir/.xlstm-jax.lock` for the life of a run: a second trainer on the same
    directory is refused at once. The kernel drops the lock when the process ends, however it ends, so a dead
    trainer leaves no stale lock (the file stays, naming the last holder)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fh = None

    def acquire(self) -> None:
        """Take the lock; RuntimeError naming the holder when another process has it."""
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RuntimeError(f"another trainer ({holder}) is running in {os.path.dirname(self.path)!r}; wait "
                               "for it to finish or stop it, or choose another --output-dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class StopSignals:
    """Within `with StopSignals():`, the first SIGINT or SIGTERM only sets `signum` (the loop finishes its step,
    checkpoints and stops); a second one gets the default action (the process ends at once). Outside the main
    thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
