"""Sharded inputs with the sequence split too, on 8 devices, mesh data x heads x sp (tests/distributed/
test_sharding.py).

usage: sharding_split_sequence.py MODE AXIS_TYPE S
  MODE explicit: every backend gives the unsharded values and gradients, B and NH stay sharded, the chunkwise
    backends keep S split; one "ok" line per backend.
  MODE auto: the unsharded values without `mesh_axes` (the split sequence is gathered) and with `mesh_axes` under
    `jax.set_mesh` (S stays split for the chunkwise backends), one "ok" line per backend; then the `mesh_axes`
    errors, one "ok" line.
  AXIS_TYPE: the mesh's axis type (Explicit or Auto); S: the sequence length."""

import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import BACKENDS, sharded_matches_plain
from tests.support.helpers import make_inputs, make_weights
from xlstm_jax import mlstm
from xlstm_jax.mlstm.api import IMPLEMENTATIONS

mode, axis_type, S = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert mode in ("explicit", "auto"), mode

mesh = jax.make_mesh((2, 2, 2), ("data", "heads", "sp"), axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 3)
x = make_inputs(7, 2, 4, S, 16, 16, with_state=True)
w = make_weights(7, x)
plain = {n: jnp.asarray(a) for n, a in x.items()}
specs = {n: P("data", "heads") if n.endswith("_initial") else P("data", "heads", "sp") for n in x}
sharded = {n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in plain.items()}

if mode == "explicit":
    for backend in BACKENDS:
        _, ((_, (h, states)), grads) = sharded_matches_plain(backend, sharded, plain, w)
        seq = "sp" if IMPLEMENTATIONS[backend].context_parallel else None
        assert h.sharding.spec[:3] == ("data", "heads", seq), (backend, h.sharding)
        for state in states:
            assert state.sharding.spec[:2] == ("data", "heads"), (backend, state.sharding)
        print("ok", backend, flush=True)
else:
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
            raise AssertionError(f"no error for {kw}")

    refused("mesh_axes needs a mesh", mesh_axes=("data", None, None))
    with jax.set_mesh(mesh):
        refused("['batch'] are not axes of the mesh", mesh_axes=("batch", None, None))
        refused("three entries", mesh_axes=("data", "heads"))
        refused("B=2 is not divisible by the size 8", mesh_axes=(("data", "heads", "sp"), None, None))
        refused("not both", mesh_axes=("data", None, None), sequence_axis_name="sp")
    print("ok errors", flush=True)
