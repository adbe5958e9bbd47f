"""Tests on many devices: a script file run in a fresh Python. By default on fake CPU devices, whose XLA_FLAGS must be
set before jax is imported (so not in this process). With XLSTM_JAX_TEST_DEVICES=real (a machine with several GPUs,
issue 22) the same scripts run on the machine's own devices, NCCL's NVLink multicast kept off.

The scripts live in tests/distributed/scripts/ and take their parameters from their command line; they import the
shared test code as `tests.support.*` and the package from the checkout under test (ROOT leads PYTHONPATH)."""

import os
import socket
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(TESTS)  # the checkout under test, ahead of any installed copy
SCRIPTS = os.path.join(TESTS, "distributed", "scripts")
REAL = os.environ.get("XLSTM_JAX_TEST_DEVICES") == "real"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def script_path(name: str) -> str:
    """The path of the script `name` in tests/distributed/scripts/."""
    path = os.path.join(SCRIPTS, name)
    assert os.path.isfile(path), path
    return path


def python_path() -> str:
    """PYTHONPATH for a subprocess: the checkout under test first (the package and `tests.support`)."""
    return os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])


def fake_cpu_env(devices: int) -> dict[str, str]:
    """This process's environment for a subprocess on `devices` fake CPU devices."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": python_path()}


def free_port() -> int:
    """A free TCP port on the loopback address (a jax.distributed coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(devices: int) -> dict[str, str]:
    if not REAL:
        return fake_cpu_env(devices)
    import jax

    if len(jax.devices()) < devices:
        pytest.skip(f"needs {devices} devices; this machine has {len(jax.devices())}")
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    return {**env, **NO_MULTICAST, "PYTHONPATH": python_path()}


def run_on_devices(script: str, devices: int, oks: int = 1, args=()) -> str:
    """Run the script `script` of tests/distributed/scripts/ with the command-line arguments `args` on `devices`
    devices; assert it exits 0 and prints `oks` lines starting with "ok"."""
    command = [sys.executable, script_path(script), *(str(arg) for arg in args)]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(devices), timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == oks, result.stdout
    return result.stdout
