"""Tests on many devices: a script run in a fresh Python. By default on fake CPU devices, whose XLA_FLAGS must be set
before jax is imported (so not in this process). With XLSTM_JAX_TEST_DEVICES=real (a machine with several GPUs,
issue 22) the same scripts run on the machine's own devices, NCCL's NVLink multicast kept off."""

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the checkout under test, ahead of any installed copy
REAL = os.environ.get("XLSTM_JAX_TEST_DEVICES") == "real"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _environment(devices: int) -> dict[str, str]:
    path = os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")])
    if not REAL:
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    import jax

    if len(jax.devices()) < devices:
        pytest.skip(f"needs {devices} devices; this machine has {len(jax.devices())}")
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    return {**env, **NO_MULTICAST, "PYTHONPATH": path}


def run_on_devices(script: str, devices: int, oks: int = 1) -> str:
    """Run `script` on `devices` devices; assert it exits 0 and prints `oks` lines starting with "ok"."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_environment(devices),
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == oks, result.stdout
    return result.stdout
