"""Calls on arrays whose types carry a sharding (meshes with explicit axes, `jax.make_mesh`'s default): the op runs
itself under `shard_map` over that mesh, each device on its (B, NH) block, and a sharded sequence axis becomes
context parallelism (context_parallel.py). So under `jit`, inputs sharded over B, NH and/or S just work.

q's type decides the layout (B, NH, S axes); the other inputs are resharded to it where they differ. Head dims are
never split (a kernel needs whole rows of q, k and v). A sequence axis with a backend that cannot split a sequence
(native_parallel, native_recurrent) is gathered first.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xlstm_jax.kernels.base import MLSTMInputs, MLSTMOptions
from xlstm_jax.mlstm import context_parallel


def layout(x: MLSTMInputs) -> tuple[Any, tuple[Any, Any, Any]] | None:
    """(mesh, (B axes, NH axes, S axes)) from q's type, or None when q's type names no mesh axis."""
    sharding = getattr(jax.typeof(x.q), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ())) + (None,) * 4
    if sharding is None or sharding.mesh.empty or all(a is None for a in spec[:4]):
        return None
    return sharding.mesh, spec[:3]


def run(impl, x: MLSTMInputs, o: MLSTMOptions, chunk_size, mesh, axes, combine: str):
    """`impl.run` per device under shard_map over `mesh`, with B, NH and S split along `axes`."""
    b, h, s = axes
    if s is not None and not impl.context_parallel:
        s = None
    gate, token = P(b, h, s), P(b, h, s, None)
    state = (P(b, h, None, None), P(b, h, None), P(b, h))
    specs = MLSTMInputs(token, token, token, gate, gate, *(state if x.c_initial is not None else (None,) * 3))
    x = MLSTMInputs(*(None if a is None else jax.sharding.reshard(a, NamedSharding(mesh, spec))
                      for a, spec in zip(x, specs)))

    def local(x):
        if s is None:
            return impl.run(x, o, chunk_size)
        return context_parallel.run(impl, x, o, chunk_size, s, combine)

    out_specs = (token, state) if o.return_last_states else token
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs)(x)
