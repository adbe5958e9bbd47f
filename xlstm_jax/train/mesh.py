"""Training on a device mesh: `--mesh data=2,fsdp=2,tensor=2` names the axis sizes, and the rules below place
parameters, optimizer states and batches on it (XLA partitions the step; docs/distributed.md).

- data: the batch is split;
- fsdp: the batch is split, and every large parameter (with its gradient and optimizer state) is split along its
  embedding dimension D;
- tensor: the heads and the FFN hidden dimension are split: q, k, v, the gates and the FFN up-projections by output
  column, the mLSTM and FFN output projections by input row (Megatron-style), the vocabulary of the embedding and
  the LM head;
- sequence: reserved for the context-parallel mLSTM (not yet run by `train`).

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
_ROW_SPLIT = {"out_proj", "proj_down"}  # kernels (heads or FFN hidden, D): split rows over tensor


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
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"axis {name!r} needs a positive size, got {value!r} in {text!r}.")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def check_mesh(sizes: dict[str, int], *, devices: int, num_heads: int) -> None:
    """ValueError unless the sizes fit the devices and the heads."""
    total = math.prod(sizes.values())
    if total != devices:
        raise ValueError(f"the axis sizes multiply to {total}, but there are {devices} devices.")
    if sizes["sequence"] > 1:
        raise ValueError("the sequence axis is not run by train yet; use data, fsdp and tensor (the model takes "
                         "sequence_axis_name inside shard_map).")
    if num_heads % sizes["tensor"]:
        raise ValueError(f"tensor={sizes['tensor']} must divide num_heads={num_heads}.")


def build_mesh(sizes: dict[str, int]) -> Mesh:
    """The mesh over every device, axes in AXES order (Auto axis types: XLA propagates the shardings)."""
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def param_spec(path: tuple[Any, ...], shape: tuple[int, ...], sizes: dict[str, int]) -> P:
    """The PartitionSpec of the parameter at `path` (its keys) with `shape`."""
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    names = [n for n in names if n not in (".value", "value")]
    module, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
    if leaf == "kernel" and len(shape) == 2:
        axes = ("tensor", "fsdp") if module in _ROW_SPLIT else ("fsdp", "tensor")
    elif module == "embeddings" and leaf == "weight" and len(shape) == 2:
        axes = ("tensor", "fsdp")  # (V, D)
    else:
        return P()
    return P(*(a if sizes[a] > 1 and n % sizes[a] == 0 else None for a, n in zip(axes, shape)))


def param_shardings(params: Any, mesh: Mesh, sizes: dict[str, int]) -> Any:
    """NamedShardings for a tree of parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, np.shape(x), sizes)), params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over data and fsdp along their first axis."""
    return NamedSharding(mesh, P(BATCH))
