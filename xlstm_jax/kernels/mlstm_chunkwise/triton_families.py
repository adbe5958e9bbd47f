"""The Triton chunkwise families by name, and their call configurations. Adding a family: a module with its
kernels and a family object (triton_core.TritonFamily), and one line here."""

from __future__ import annotations

import jax.numpy as jnp

from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize.family import XL
from xlstm_jax.kernels.mlstm_chunkwise.triton_core import KernelConfig
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.family import LIMIT

FAMILIES = {family.name: family for family in (LIMIT, XL)}


def config(family: str, chunk_size: int, compute_dtype, tiles=(None, None, None), **fields) -> KernelConfig:
    """The KernelConfig of a `family` call; `tiles` = (tile_q, tile_kv, inter_chunk_size) of a tiled family (None:
    its default); `fields`: the other KernelConfig fields (eps defaults to 1e-6)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}.")
    chosen = FAMILIES[family]
    return KernelConfig(chunk_size=chunk_size, eps=fields.pop("eps", 1e-6),
                        compute_dtype=jnp.dtype(compute_dtype).name, family=chosen,
                        **chosen.configure(chunk_size, tiles), **fields)
