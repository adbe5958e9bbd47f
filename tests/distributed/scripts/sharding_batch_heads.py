"""Batch and head sharding under jit on 4 devices, auto mesh axes data x heads (tests/distributed/test_sharding.py):
every backend gives the values and gradients of the unsharded call; the native backends and the custom_partitioning
wrapper of the Triton core (checked on XLA functions) keep the sharding and compile without an all-gather.

usage: sharding_batch_heads.py (no arguments); prints one "ok" line per backend and one for the wrapper."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import BACKENDS, sharded_matches_plain
from tests.support.helpers import make_inputs, make_weights

auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=auto)
x = make_inputs(5, 2, 4, 40, 16, 16, with_state=True)
w = make_weights(5, x)
plain = {n: jnp.asarray(a) for n, a in x.items()}
sharded = {n: jax.device_put(a, NamedSharding(mesh, P("data", "heads"))) for n, a in plain.items()}
for backend in BACKENDS:
    step, ((_, (h, states)), grads) = sharded_matches_plain(backend, sharded, plain, w)
    if backend.startswith("native"):
        for leaf in (h, *states, *grads.values()):
            assert leaf.sharding.spec[:2] == ("data", "heads"), (backend, leaf.sharding)
        assert "all-gather" not in step.lower(sharded).compile().as_text(), backend
    print("ok", backend, flush=True)

# the wrapper itself, around an XLA function with the Triton core's calling convention
os.environ["XLSTM_JAX_TRITON_INTERPRET"] = "0"
from xlstm_jax.kernels.sharding import per_batch_head  # noqa: E402  (after the interpreter is switched off)


def rows(scale, a, b):
    return a * scale + jnp.sum(b, axis=-1), jnp.cumsum(a, axis=2)


wrapped = per_batch_head(rows, n_static=1)
a = jnp.arange(4 * 4 * 8 * 3, dtype=jnp.float32).reshape(4, 4, 8, 3)
b = jnp.ones((4, 4, 8, 3, 5))
put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data", "heads")))  # noqa: E731
call = jax.jit(lambda a, b: wrapped(2.0, a, b))
out = call(put(a), put(b))
assert "all-gather" not in call.lower(put(a), put(b)).compile().as_text()
for got, want in zip(out, rows(2.0, a, b)):
    assert got.sharding.spec[:2] == ("data", "heads"), got.sharding
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
mapped = jax.vmap(lambda a: wrapped(2.0, a, b))(jnp.stack([a, a + 1.0]))
np.testing.assert_allclose(np.asarray(mapped[1][1]), np.asarray(rows(2.0, a + 1.0, b)[1]), rtol=1e-6)
print("ok wrapper", flush=True)
