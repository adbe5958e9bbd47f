"""Run one benchmark case in a fresh Python process, so that a crash, a hang or an out-of-memory in one
implementation (a Triton compiler abort, a peer library's bug) cannot stop the sweep.

    python -m xlstm_jax.bench.worker '<spec as JSON>'

The child calls `spec["target"]` (a "module:function" measurement, see `xlstm_jax.bench.measure`) and prints one
line `RESULT_TAG <json>` with its result, or with {"error": ...} when the measurement raised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

RESULT_TAG = "XLSTM_JAX_BENCH_RESULT"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure `spec` in a subprocess. Returns the measurement dict with "status": "ok", or {"status": "failed"
    | "timeout", "note": why} when the child raised, crashed or ran past `timeout` seconds."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "xlstm_jax.bench.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"killed after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            if "error" in result:
                return {"status": "failed", "note": result["error"]}
            return {"status": "ok", **result}
    code = proc.returncode
    how = f"exit code {code}"
    if code < 0:
        how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
    detail = _last_line(proc.stderr) or _last_line(proc.stdout)
    return {"status": "failed", "note": f"crashed ({how}): {detail}" if detail else f"crashed ({how})"}


def main(argv: list[str]) -> int:
    """Child side: measure the spec given as the one argument and print the tagged result line."""
    from xlstm_jax.bench.measure import load

    spec = json.loads(argv[0])
    try:
        result = load(spec["target"])(spec)
    except Exception as exc:  # reported to the parent as a failed case
        result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
