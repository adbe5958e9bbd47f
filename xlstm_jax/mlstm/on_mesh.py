"""The op on a device mesh: each device runs the implementation on its (B, NH) block under `shard_map`, and a split
sequence axis becomes context parallelism (context_parallel.py). Two ways in:

- arrays whose types carry a sharding (meshes with explicit axes, `jax.make_mesh`'s default): q's type decides
  the layout, the other inputs are resharded to it (`layout`);
- `mlstm(..., mesh_axes=(B axes, NH axes, S axes))` under a mesh context (`jax.set_mesh`), for meshes with Auto
  axes where XLA propagates shardings (the training job's mesh): the inputs are split as named (`named_layout`).

Head dims are never split (a kernel needs whole rows of q, k and v). A sequence axis with a backend that cannot split
a sequence (native_parallel, native_recurrent) is gathered first.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xlstm_jax.kernels.base import MLSTMInputs, MLSTMOptions
from xlstm_jax.mlstm import context_parallel
from xlstm_jax.mlstm.context_parallel import Kernel


def layout(x: MLSTMInputs) -> tuple[Any, tuple[Any, Any, Any]] | None:
    """(mesh, (B axes, NH axes, S axes)) from q's type, or None when q's type names no mesh axis."""
    sharding = getattr(jax.typeof(x.q), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ())) + (None,) * 4
    if sharding is None or sharding.mesh.empty or all(a is None for a in spec[:4]):
        return None
    return sharding.mesh, spec[:3]


def named_layout(x: MLSTMInputs, mesh_axes: Any) -> tuple[Any, tuple[Any, Any, Any]]:
    """(the context mesh, (B axes, NH axes, S axes)) for `mesh_axes`; ValueError when there is no mesh context, an
    axis is not in it, or a split dimension is not divisible by its axes' sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError("mesh_axes needs a mesh: call under `with jax.set_mesh(mesh):`.")
    axes = tuple(mesh_axes)
    if len(axes) != 3:
        raise ValueError(f"mesh_axes must name the mesh axes of (B, NH, S), three entries, got {mesh_axes!r}.")
    B, NH, S = x.q.shape[:3]
    for dim, size, entry in zip(("B", "NH", "S"), (B, NH, S), axes):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [n for n in names if n not in mesh.axis_names]
        if unknown:
            raise ValueError(f"mesh_axes: {unknown} are not axes of the mesh {tuple(mesh.axis_names)}.")
        parts = math.prod(mesh.shape[n] for n in names)
        if size % parts:
            raise ValueError(f"mesh_axes: {dim}={size} is not divisible by the size {parts} of {entry!r}.")
    return mesh, axes


def run(kernel: Kernel, splits_sequence: bool, x: MLSTMInputs, o: MLSTMOptions, mesh, axes, combine: str):
    """`kernel(x, o)` per device under shard_map over `mesh`, with B, NH and S split along `axes` (S only when the
    kernel `splits_sequence`, as context parallelism; gathered otherwise)."""
    b, h, s = axes
    if s is not None and not splits_sequence:
        s = None
    gate, token = P(b, h, s), P(b, h, s, None)
    state = (P(b, h, None, None), P(b, h, None), P(b, h))
    specs = MLSTMInputs(token, token, token, gate, gate, *(state if x.c_initial is not None else (None,) * 3))
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        x = MLSTMInputs(*(None if a is None else jax.sharding.reshard(a, NamedSharding(mesh, spec))
                          for a, spec in zip(x, specs)))

    if s is None:
        local = functools.partial(kernel, o=o)
    else:
        local = functools.partial(context_parallel.run, kernel, o=o, axis_name=s, combine=combine)
    out_specs = (token, state) if o.return_last_states else token
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs)(x)
