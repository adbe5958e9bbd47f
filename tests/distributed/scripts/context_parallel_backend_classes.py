"""The documented backend classes take the sequence axis from their config (tests/distributed/
test_context_parallel.py): the chunkwise and the Triton backend inside shard_map over 2 devices equal the whole call.

usage: context_parallel_backend_classes.py (no arguments); prints two "ok" lines."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import assert_trees_close
from tests.support.helpers import make_inputs
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend

mesh = jax.make_mesh((2,), ("sp",), devices=jax.devices()[:2])
x = make_inputs(9, 1, 2, 40, 16, 16, with_state=True)
spec = {n: P() if n.endswith("_initial") else P(None, None, "sp") for n in x}
args = {n: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec[n])) for n, a in x.items()}
plain = {n: jnp.asarray(a) for n, a in x.items()}
for name, extra in (("chunkwise", {}), ("triton_kernels", {"backend_name": "max_triton_xlchunksize"})):
    split = create_mlstm_backend(name, chunk_size=16, sequence_axis_name="sp", **extra)
    whole = create_mlstm_backend(name, chunk_size=16, **extra)
    run = jax.shard_map(lambda a: split(**a, return_last_states=True), mesh=mesh, in_specs=(spec,),
                        out_specs=(P(None, None, "sp"), (P(), P(), P())))
    assert_trees_close(jax.jit(run)(args), whole(**plain, return_last_states=True), rtol=2e-5, what=name)
    print("ok", name, flush=True)
