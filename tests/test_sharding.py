"""Sharded inputs under jit. Auto mesh axes (4 fake CPU devices, data x heads): every backend gives the values and
gradients of the unsharded call; the native backends and the custom_partitioning wrapper of the Triton core
(kernels/sharding.py, checked here on XLA functions: on the CPU the Triton kernels run in host callbacks, which a
partitioned body cannot hold) keep the sharding and compile without an all-gather. Explicit mesh axes (8 devices,
data x heads x sp, the sequence split too): every backend gives the unsharded values and gradients, B and NH stay
sharded, and the chunkwise backends keep S split (context parallelism)."""

import os
import subprocess
import sys

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import BACKENDS, assert_trees_close, default_chunk
from helpers import _loss, make_inputs, make_weights
import xlstm_jax

auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=auto)
x = make_inputs(5, 2, 4, 40, 16, 16, with_state=True)
w = make_weights(5, x)
plain = {{n: jnp.asarray(a) for n, a in x.items()}}
sharded = {{n: jax.device_put(a, NamedSharding(mesh, P("data", "heads"))) for n, a in plain.items()}}
for backend in BACKENDS:
    fn = functools.partial(xlstm_jax.mlstm, backend=backend, chunk_size=default_chunk(backend),
                           return_last_states=True)

    def loss(a):
        h, states = fn(**a)
        return _loss(h, states, w), (h, states)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    got, want = step(sharded), step(plain)
    assert_trees_close(got, want, rtol=2e-5, what=backend)
    if backend.startswith("native"):
        (_, (h, states)), grads = got
        for leaf in (h, *states, *grads.values()):
            assert leaf.sharding.spec[:2] == ("data", "heads"), (backend, leaf.sharding)
        assert "all-gather" not in step.lower(sharded).compile().as_text(), backend
    print("ok", backend, flush=True)

# the wrapper itself, around an XLA function with the Triton core's calling convention
os.environ["XLSTM_JAX_TRITON_INTERPRET"] = "0"
from xlstm_jax.kernels.sharding import per_batch_head

def rows(scale, a, b):
    return a * scale + jnp.sum(b, axis=-1), jnp.cumsum(a, axis=2)

wrapped = per_batch_head(rows, n_static=1)
a = jnp.arange(4 * 4 * 8 * 3, dtype=jnp.float32).reshape(4, 4, 8, 3)
b = jnp.ones((4, 4, 8, 3, 5))
put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data", "heads")))
call = jax.jit(lambda a, b: wrapped(2.0, a, b))
out = call(put(a), put(b))
assert "all-gather" not in call.lower(put(a), put(b)).compile().as_text()
for got, want in zip(out, rows(2.0, a, b)):
    assert got.sharding.spec[:2] == ("data", "heads"), got.sharding
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
mapped = jax.vmap(lambda a: wrapped(2.0, a, b))(jnp.stack([a, a + 1.0]))
np.testing.assert_allclose(np.asarray(mapped[1][1]), np.asarray(rows(2.0, a + 1.0, b)[1]), rtol=1e-6)
print("ok wrapper", flush=True)
"""


def test_batch_and_head_sharding_under_jit():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], capture_output=True, text=True,
                            env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("ok") == 6, result.stdout


EXPLICIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import functools
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import BACKENDS, assert_trees_close, default_chunk
from helpers import _loss, make_inputs, make_weights
import xlstm_jax
from xlstm_jax.mlstm.api import IMPLEMENTATIONS

mesh = jax.make_mesh((2, 2, 2), ("data", "heads", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
x = make_inputs(7, 2, 4, 40, 16, 16, with_state=True)
w = make_weights(7, x)
plain = {{n: jnp.asarray(a) for n, a in x.items()}}
specs = {{n: P("data", "heads") if n.endswith("_initial") else P("data", "heads", "sp") for n in x}}
sharded = {{n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in plain.items()}}
for backend in BACKENDS:
    fn = functools.partial(xlstm_jax.mlstm, backend=backend, chunk_size=default_chunk(backend),
                           return_last_states=True)

    def loss(a):
        h, states = fn(**a)
        return _loss(h, states, w), (h, states)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    got, want = step(sharded), step(plain)
    assert_trees_close(got, want, rtol=2e-5, what=backend)
    (_, (h, states)), grads = got
    seq = "sp" if IMPLEMENTATIONS[backend].context_parallel else None
    assert h.sharding.spec[:3] == ("data", "heads", seq), (backend, h.sharding)
    for state in states:
        assert state.sharding.spec[:2] == ("data", "heads"), (backend, state.sharding)
    print("ok", backend, flush=True)
"""


def test_explicit_mesh_axes_with_the_sequence_split():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", EXPLICIT_SCRIPT.format(tests=tests)], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("ok") == 5, result.stdout
