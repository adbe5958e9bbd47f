"""GPU kernel times from a JAX profiler trace: the device events of a Perfetto trace, and one callable traced.

Used by the decode scripts (scripts/profile_decode.py, scripts/decode_bench.py) to time kernels without the host
work around them.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
from typing import Any, Callable

import jax


def device_events(trace_dir: str) -> list[dict]:
    """Complete ("X") events on the GPU's stream lines (not its per-op summary lines) of the newest Perfetto trace
    under `trace_dir`; every event of the trace when it has no GPU (a CPU run)."""
    path = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e.get("pid") in gpu_pids and "stream" in str(e.get("args", {}).get("name", "")).lower()}
    return [e for e in events if e.get("ph") == "X" and (not gpu_pids or (e["pid"], e.get("tid")) in streams
                                                         or (not streams and e["pid"] in gpu_pids))]


def traced_events(run: Callable[[], Any], trace_dir: str | None = None) -> list[dict]:
    """The device events of one `run()` (already compiled: call it once before), traced into `trace_dir` (a fresh
    temporary folder when None)."""
    if trace_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            return traced_events(run, scratch)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(run())
    return device_events(trace_dir)
