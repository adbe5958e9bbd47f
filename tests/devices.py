"""Tests on many fake CPU devices: a script run in a fresh Python whose XLA_FLAGS ask for them (the flag must be set
before jax is imported, so not in this process)."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the checkout under test, ahead of any installed copy


def run_on_devices(script: str, devices: int, oks: int = 1) -> str:
    """Run `script` on `devices` CPU devices; assert it exits 0 and prints `oks` lines starting with "ok"."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == oks, result.stdout
    return result.stdout
