"""Serving on a device mesh (`xlstm-jax serve --mesh data=2,tensor=4`): where the weights and the slot pool live.

- data: the slot pool is split by slots (each device group decodes its share of the sequences); the weights are
  replicated along it.
- tensor: every per-head weight is split by heads (q, k, v, gate and output-gate columns, the out projection's
  rows; the FFN's hidden dimension; the vocabulary), as in training (`xlstm_jax.train.mesh`), and so is every
  state: C, n, m by heads. The model needs the "single" weight layout for this (the fused layout's columns mix
  q, k, v and o), so a tensor axis loads the weights unfused.

The engine's functions are jitted without a mesh context: XLA partitions them from the placed inputs (the Triton
kernels through `xlstm_jax.kernels.sharding.per_batch_head`, which splits (B, NH) where the inputs are split).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlstm_jax.train.mesh import build_mesh, param_shardings, parse_mesh

SERVE_AXES = ("data", "tensor")


def serving_mesh(text: str, *, num_heads: int, max_slots: int, devices: int | None = None) -> Mesh:
    """The mesh for "data=D,tensor=T" (axes left out are 1); ValueError naming what does not fit: other axes,
    sizes whose product is not the device count, T not dividing the heads, D not dividing `max_slots`."""
    sizes = parse_mesh(text)
    other = [f"{a}={n}" for a, n in sizes.items() if a not in SERVE_AXES and n > 1]
    if other:
        raise ValueError(f"serving splits only {' and '.join(SERVE_AXES)}; got {', '.join(other)}.")
    devices = jax.device_count() if devices is None else devices
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"the axis sizes multiply to {math.prod(sizes.values())}, but there are {devices} "
                         "devices.")
    if num_heads % sizes["tensor"]:
        raise ValueError(f"tensor={sizes['tensor']} must divide the model's num_heads={num_heads}.")
    if max_slots % sizes["data"]:
        raise ValueError(f"data={sizes['data']} must divide --max-slots={max_slots}.")
    return build_mesh(sizes)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def place_params(params: Any, mesh: Mesh) -> Any:
    """The model's parameters (an `nnx.State`) on `mesh`, split by their logical axis names."""
    return jax.device_put(params, param_shardings(params, mesh, mesh_sizes(mesh)))


def place_states(states: list, mesh: Mesh, *, split_rows: bool) -> list:
    """States [(C, n, m) per block] (rows, NH, ...) on `mesh`: heads over tensor, rows over data when
    `split_rows` (the pool; a single request's state is replicated along data)."""
    sharding = NamedSharding(mesh, P("data" if split_rows else None, "tensor"))
    return jax.device_put(states, jax.tree.map(lambda _: sharding, states))
