"""Run benchmark cases in a separate Python process, so that a crash, a hang or an out-of-memory in one
implementation (a Triton compiler abort, a peer library's bug) cannot stop the sweep.

    python -m xlstm_jax.bench.worker

The child reads one spec per line (JSON) on stdin, calls `spec["target"]` (a "module:function" measurement, see
`xlstm_jax.bench.measure`) and prints one line `RESULT_TAG <json>` per spec with its result, or with
{"error": ...} when the measurement raised. One child serves many cases, so its imports (jax, torch, the peer
package) and its compilation caches are paid once per peer, not once per case; a child that crashes or hangs is
killed, its case reported, and the next case gets a fresh child.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

RESULT_TAG = "XLSTM_JAX_BENCH_RESULT"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class Worker:
    """A child process that measures specs one at a time; restarted after a crash or a timeout. `crashes` holds
    the notes of the cases whose child crashed."""

    def __init__(self) -> None:
        self.crashes: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._buffer = b""

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
        self._stderr = tempfile.TemporaryFile()
        self._buffer = b""
        return subprocess.Popen([sys.executable, "-m", "xlstm_jax.bench.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def _read_result(self, proc: subprocess.Popen, timeout: float) -> dict[str, Any] | None:
        """The child's next tagged result, or None when it exits first; TimeoutError past `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if text.startswith(RESULT_TAG):
                        return json.loads(text[len(RESULT_TAG):])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if selector.select(left):
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        return None
                    self._buffer += chunk

    def _crash_note(self, proc: subprocess.Popen) -> str:
        code = proc.wait()
        how = f"exit code {code}"
        if code < 0:
            how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
        self._stderr.seek(0)
        detail = _last_line(self._stderr.read().decode(errors="replace")) or \
            _last_line(self._buffer.decode(errors="replace"))
        return f"crashed ({how}): {detail}" if detail else f"crashed ({how})"

    def measure(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Measure `spec` in the child. Returns the measurement dict with "status": "ok", or {"status": "failed"
        | "timeout", "note": why} when the child raised, crashed or ran past `timeout` seconds."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write((json.dumps(spec) + "\n").encode())
            proc.stdin.flush()
            result = self._read_result(proc, timeout)
        except TimeoutError:
            self.close()
            return {"status": "timeout", "note": f"killed after {timeout:g} s"}
        except BrokenPipeError:
            result = None
        if result is None:
            note = self._crash_note(proc)
            self.crashes.append(note)
            self.close()
            return {"status": "failed", "note": note}
        if "error" in result:
            return {"status": "failed", "note": result["error"]}
        return {"status": "ok", **result}

    def close(self) -> None:
        """Stop the child (if any)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure one spec in a fresh child (exact peak memory), see `Worker.measure`."""
    with Worker() as worker:
        return worker.measure(spec, timeout)


def main() -> int:
    """Child side: measure each spec read from stdin and print its tagged result line."""
    from xlstm_jax.bench.measure import load

    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            result = load(spec["target"])(spec)
        except Exception as exc:  # reported to the parent as a failed case
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
