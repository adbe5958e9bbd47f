"""The base install has no triton (it is the `triton` / `gpu` / `test` extras' dependency): the package, the CLI
with every subcommand and the serving engine import, and the XLA backends run, when importing triton fails. The
README's first command (`pip install -e . && xlstm-jax train`) broke this way: the prefill op imported the Triton
prefill kernel's module for a constant."""

import subprocess
import sys

PROBE = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on a base install
import jax.numpy as jnp
import xlstm_jax, xlstm_jax.cli, xlstm_jax.serve.engine, xlstm_jax.serve.app
from xlstm_jax.mlstm.prefill import mlstm_prefill
q = jnp.ones((1, 1, 5, 16)); v = jnp.ones((1, 1, 5, 16)); g = jnp.zeros((1, 1, 5))
h, _ = mlstm_prefill(q, q, v, g, g, backend="native")
h2 = xlstm_jax.mlstm(q, q, v, g, g, backend="native_chunkwise", chunk_size=16)
assert h.shape == h2.shape == (1, 1, 5, 16)
print("ok")
"""


def test_the_package_imports_and_runs_xla_backends_without_triton():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
