"""The Triton chunkwise families by name, and `run`: checked inputs, options and tuning -> the family's call.
Importable without Triton (the op's implementation table holds `run`); the kernels load on the first call. Adding a
family: a folder beside limit/ and xl/ with its kernels and a family object (core.TritonFamily) with its typed
launch parameters (launch_table.LaunchParams), its section in every entry of launch_table.json, and one entry in
`families()`."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    MLSTMShape,
    at_zero_stabilizer,
    initial_states_or_zeros,
    resolve_compute_dtype,
)
from xlstm_jax.kernels.triton.tuning import TritonTuning


@functools.cache
def families() -> dict:
    """Family name -> family object (imports the kernels, and checks every entry of the launch table against the
    families' typed launch sections)."""
    from xlstm_jax.kernels.triton import launch_table
    from xlstm_jax.kernels.triton.recurrence_kernels import RecurrentLaunch
    from xlstm_jax.kernels.triton.limit.family import LIMIT
    from xlstm_jax.kernels.triton.xl.family import XL

    launch_table.check_table((("recurrent", RecurrentLaunch), *((f.name, f.launch_type) for f in (LIMIT, XL))))
    return {family.name: family for family in (LIMIT, XL)}


def config(family: str, chunk_size: int, compute_dtype, tiles=(None, None, None), **fields):
    """The core.KernelConfig of a `family` call; `tiles` = (tile_q, tile_kv, inter_chunk_size) of a tiled family
    (None: its default); `fields`: the other KernelConfig fields (eps defaults to 1e-6)."""
    from xlstm_jax.kernels.triton.core import KernelConfig

    if family not in families():
        raise ValueError(f"family must be one of {sorted(families())}, got {family!r}.")
    chosen = families()[family]
    return KernelConfig(chunk_size=chunk_size, eps=fields.pop("eps", 1e-6),
                        compute_dtype=jnp.dtype(compute_dtype).name, family=chosen,
                        **chosen.configure(chunk_size, tiles), **fields)


def table_launch(family: str, DHQK: int, DHHV: int) -> dict[str, int]:
    """The launch table's parameters of a `family` call with these head dims on the default device, flat
    ("section.field" -> value, the names of KernelConfig.launch overrides)."""
    from xlstm_jax.kernels.triton import core, launch_table

    return launch_table.flat(core.launch_params(DHQK, DHHV, config(family, 64, "float32")))


def run(family: str, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int, tuning: TritonTuning | None = None):
    """The `family` kernels on checked inputs: h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) float32. Zero
    initial states where none are given; gates in float32; head dims checked against the kernels' limit."""
    from xlstm_jax.kernels.triton import core

    t = tuning or TritonTuning()
    cfg = config(
        family, chunk_size, resolve_compute_dtype(o.autocast_dtype, x.q.dtype),
        (t.tile_q, t.tile_kv, t.inter_chunk_size), eps=o.eps, norm_val=o.norm_val,
        stabilize_correctly=o.stabilize_correctly, max_state=o.max_state, reduce_slicing=t.reduce_slicing,
        recompute_states_in_bw=t.recompute_states_in_bw,
    )
    if t.num_warps is not None:
        cfg = cfg.with_launch(cfg.family.warps_fields(t.num_warps))
    shape = MLSTMShape(*x.q.shape, x.v.shape[-1])
    core.check_head_dims(shape)
    c0, n0, m0 = initial_states_or_zeros(*x[5:], shape, x[:5])
    if not cfg.max_state:  # the kernels hold m at 0: the same initial states with m = 0 (differentiable here)
        c0, n0, m0 = at_zero_stabilizer(c0, n0, m0)
    h, c, n, m = core.mlstm_triton_core(x.q, x.k, x.v, x.i.astype(jnp.float32), x.f.astype(jnp.float32), c0, n0, m0,
                                        cfg)
    return o.result(h, (c, n, m))
