"""Training on a device mesh: `--mesh data=2,fsdp=2,tensor=2,sequence=1` names the axis sizes, and the rules below
place parameters, optimizer states and batches on it (XLA partitions the step; docs/distributed.md).

The model's parameters carry logical axis names (Flax NNX sharding metadata; `xlstm_jax.models.xlstm_large.model`);
`LOGICAL_RULES` maps them to mesh axes:
- data: the batch is split;
- fsdp: the batch is split, and every matrix (with its gradient and optimizer state) is split along its embedding
  dimension D ("embed");
- tensor: the heads ("heads": q, k, v, gate and output-gate columns, the mLSTM output projection's rows), the FFN
  hidden dimension ("ffn": up-projection columns, down-projection rows; Megatron-style) and the vocabulary of the
  embedding and the LM head ("vocab");
- sequence: the sequence of every batch is split; the mLSTM cells run context-parallel (`MLSTM_AXES`), everything
  else in a block is per token.

Norm weights and biases stay replicated. A dimension is split only when the axis size divides it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "sequence")
BATCH = ("data", "fsdp")
LOGICAL_RULES = {"embed": "fsdp", "heads": "tensor", "ffn": "tensor", "vocab": "tensor"}
MLSTM_AXES = (BATCH, "tensor", "sequence")  # how the mLSTM cells split (B, NH, S): `mlstm(..., mesh_axes=)`


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1} (axes left out are 1)."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in str(text).split(","):
        name, _, value = part.strip().partition("=")
        if name not in AXES:
            raise ValueError(f"unknown axis {name!r} in {text!r}; axes are {', '.join(AXES)} (e.g. "
                             "data=2,fsdp=2,tensor=2).")
        if name in seen:
            raise ValueError(f"axis {name!r} is given twice in {text!r}.")
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise ValueError(f"axis {name!r} needs a positive size written in digits 0-9 (e.g. {name}=2), got "
                             f"{value!r} in {text!r}.")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def check_mesh(sizes: dict[str, int], *, devices: int, num_heads: int, seq_len: int) -> None:
    """ValueError unless the sizes fit the devices, the heads and the sequence length."""
    total = math.prod(sizes.values())
    if total != devices:
        raise ValueError(f"the axis sizes multiply to {total}, but there are {devices} devices.")
    if num_heads % sizes["tensor"]:
        raise ValueError(f"tensor={sizes['tensor']} must divide num_heads={num_heads}.")
    if seq_len % sizes["sequence"]:
        raise ValueError(f"sequence={sizes['sequence']} must divide the sequence length {seq_len}.")


def build_mesh(sizes: dict[str, int]) -> Mesh:
    """The mesh over every device, axes in AXES order (Auto axis types: XLA propagates the shardings)."""
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_spec(logical: P, shape: tuple[int, ...], sizes: dict[str, int]) -> P:
    """The mesh PartitionSpec for an array of `shape` with logical axis names `logical` (`LOGICAL_RULES`)."""
    names = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
    axes = (LOGICAL_RULES.get(n) if n is not None else None for n in names)
    return P(*(a if a is not None and sizes[a] > 1 and n % sizes[a] == 0 else None for a, n in zip(axes, shape)))


def param_shardings(params: Any, mesh: Mesh, sizes: dict[str, int]) -> Any:
    """NamedShardings for an `nnx.State` of parameters, from their logical axis names."""
    from flax import nnx

    return jax.tree.map(lambda logical, x: NamedSharding(mesh, mesh_spec(logical, np.shape(x), sizes)),
                        nnx.get_partition_spec(params), params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, S) batch arrays: B split over data and fsdp, S over sequence."""
    return NamedSharding(mesh, P(BATCH, "sequence"))
