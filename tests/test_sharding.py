"""Sharded inputs under jit. Auto mesh axes (4 fake CPU devices, data x heads): every backend gives the values and
gradients of the unsharded call; the native backends and the custom_partitioning wrapper of the Triton core
(kernels/sharding.py, checked here on XLA functions: on the CPU the Triton kernels run in host callbacks, which a
partitioned body cannot hold) keep the sharding and compile without an all-gather. Explicit mesh axes (8 devices,
data x heads x sp, the sequence split too): every backend gives the unsharded values and gradients, B and NH stay
sharded, and the chunkwise backends keep S split (context parallelism). Auto mesh axes with the sequence split: the
unsharded values without `mesh_axes` (the split sequence is gathered), the same with `mesh_axes` under `jax.set_mesh`
(S stays split for the chunkwise backends), and `mesh_axes` errors."""

from devices import run_on_devices

SCRIPT = """
import os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import BACKENDS, sharded_matches_plain
from helpers import make_inputs, make_weights

auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=auto)
x = make_inputs(5, 2, 4, 40, 16, 16, with_state=True)
w = make_weights(5, x)
plain = {{n: jnp.asarray(a) for n, a in x.items()}}
sharded = {{n: jax.device_put(a, NamedSharding(mesh, P("data", "heads"))) for n, a in plain.items()}}
for backend in BACKENDS:
    step, ((_, (h, states)), grads) = sharded_matches_plain(backend, sharded, plain, w)
    if backend.startswith("native"):
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
    run_on_devices(SCRIPT.format(), 4, oks=6)


SPLIT_SEQUENCE = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import BACKENDS, sharded_matches_plain
from helpers import make_inputs, make_weights
from xlstm_jax import mlstm
from xlstm_jax.mlstm.api import IMPLEMENTATIONS

mesh = jax.make_mesh((2, 2, 2), ("data", "heads", "sp"), axis_types=(jax.sharding.AxisType.{axis_type},) * 3)
x = make_inputs(7, 2, 4, {S}, 16, 16, with_state=True)
w = make_weights(7, x)
plain = {{n: jnp.asarray(a) for n, a in x.items()}}
specs = {{n: P("data", "heads") if n.endswith("_initial") else P("data", "heads", "sp") for n in x}}
sharded = {{n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in plain.items()}}
"""  # the mesh (data x heads x sp, 8 devices) and the inputs with the sequence split, for the scripts below

EXPLICIT_SCRIPT = SPLIT_SEQUENCE + """
for backend in BACKENDS:
    _, ((_, (h, states)), grads) = sharded_matches_plain(backend, sharded, plain, w)
    seq = "sp" if IMPLEMENTATIONS[backend].context_parallel else None
    assert h.sharding.spec[:3] == ("data", "heads", seq), (backend, h.sharding)
    for state in states:
        assert state.sharding.spec[:2] == ("data", "heads"), (backend, state.sharding)
    print("ok", backend, flush=True)
"""


def test_explicit_mesh_axes_with_the_sequence_split():
    run_on_devices(EXPLICIT_SCRIPT.format(axis_type="Explicit", S=40), 8, oks=5)


AUTO_SEQUENCE_SCRIPT = SPLIT_SEQUENCE + """
for backend in BACKENDS:
    sharded_matches_plain(backend, sharded, plain, w)  # no mesh_axes: gathered where needed, the same values
    with jax.set_mesh(mesh):
        _, ((_, (h, states)), grads) = sharded_matches_plain(backend, sharded, plain, w,
                                                             mesh_axes=("data", "heads", "sp"))
    seq = "sp" if IMPLEMENTATIONS[backend].context_parallel else None
    assert (tuple(h.sharding.spec) + (None,) * 3)[:3] == ("data", "heads", seq), (backend, h.sharding)
    print("ok", backend, flush=True)

q, k, v, i, f = (plain[n] for n in "qkvif")
def refused(match, **kw):
    try:
        mlstm(q, k, v, i, f, backend="native_chunkwise", chunk_size=16, **kw)
    except ValueError as err:
        assert match in str(err), str(err)
    else:
        raise AssertionError(f"no error for {{kw}}")
refused("mesh_axes needs a mesh", mesh_axes=("data", None, None))
with jax.set_mesh(mesh):
    refused("['batch'] are not axes of the mesh", mesh_axes=("batch", None, None))
    refused("three entries", mesh_axes=("data", "heads"))
    refused("B=2 is not divisible by the size 8", mesh_axes=(("data", "heads", "sp"), None, None))
    refused("not both", mesh_axes=("data", None, None), sequence_axis_name="sp")
print("ok errors", flush=True)
"""


def test_auto_mesh_axes_with_the_sequence_split():
    run_on_devices(AUTO_SEQUENCE_SCRIPT.format(axis_type="Auto", S=32), 8, oks=6)
