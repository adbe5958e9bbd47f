"""Triton limit-chunk mLSTM, a documented module (upstream calls the family "stablef"): a thin translator from the
documented functions' arguments onto the limit family (kernels/triton/limit/, core in kernels/triton/core.py).
Nothing inside xlstm_jax imports this module; the op and the backend classes reach the kernels through
`xlstm_jax.mlstm`.

Differences from the upstream port, on purpose: states and m are in natural-log units (interchangeable with every
other backend); any S (neutral padding); the denominator, initial states (C, n, m) and the last-state cotangents
are differentiated exactly (docs/math.md §5); h is returned in q's dtype; every argument below is honoured.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import check_chunk_size, validated
from xlstm_jax.kernels.triton.families import run
from xlstm_jax.kernels.triton.tuning import TritonTuning

CHUNK_SIZES = (16, 128)


def _mlstm_chunkwise_fwbw_generator(
    autocast_kernel_dtype: Any = jnp.bfloat16,
    return_last_states: bool = False,
    recompute_states_in_bw: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
    stabilize_correctly: bool = True,
    norm_val: float = 1.0,
    reduce_slicing: bool = True,
):
    """Generate the forward function of the chunkwise mLSTM with its custom (fused Triton) backward.

    autocast_kernel_dtype: matmul operand dtype ("float32" | "bfloat16" | "float16", the jnp types, or None for
    q's dtype); q, k, v are cast to it, gates and states stay float32. recompute_states_in_bw: recompute the
    chunk-border states in the backward (True) or keep them as residuals. stabilize_correctly / norm_val: the
    denominator is max(|q̂·ñ|, norm_val·e^{-m}) (True) or max(|q̂·ñ|, norm_val) (False, m-dependent); eps is added
    after the max. reduce_slicing: pass whole state buffers to the kernels (True) or slice the last state off first.

    Returns forward(matQ (B, NH, S, DHQK), matK, matV (B, NH, S, DHHV), vecI (B, NH, S), vecF (B, NH, S),
    matC_initial=None (B, NH, DHQK, DHHV), vecN_initial=None (B, NH, DHQK), scaM_initial=None (B, NH))
    -> (h, C_last, n_last, m_last), the last three None unless return_last_states.
    """
    chunk_size = check_chunk_size(chunk_size, minimum=CHUNK_SIZES[0], maximum=CHUNK_SIZES[1])

    def forward(matQ, matK, matV, vecI, vecF, matC_initial=None, vecN_initial=None, scaM_initial=None):
        x, o = validated(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
                         return_last_states=True, eps=eps, autocast_dtype=autocast_kernel_dtype,
                         dtype_name="autocast_kernel_dtype", norm_val=norm_val,
                         stabilize_correctly=stabilize_correctly)
        tuning = TritonTuning(reduce_slicing=bool(reduce_slicing), recompute_states_in_bw=bool(recompute_states_in_bw))
        h, (c, n, m) = run("limit", x, o, chunk_size, tuning)
        return (h, c, n, m) if return_last_states else (h, None, None, None)

    return forward


@functools.lru_cache(maxsize=None)
def _cached_generator(autocast_name: str | None, **kwargs: Any):
    return _mlstm_chunkwise_fwbw_generator(autocast_kernel_dtype=autocast_name, **kwargs)


def _get_chunkwise_fwbw_kernel(autocast_kernel_dtype: Any, **kwargs: Any):
    """The (cached) forward function of `_mlstm_chunkwise_fwbw_generator(autocast_kernel_dtype, **kwargs)`."""
    name = None if autocast_kernel_dtype is None else jnp.dtype(autocast_kernel_dtype).name
    return _cached_generator(name, **kwargs)


def mlstm_chunkwise_triton_stablef(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states: bool = False,
    eps: float = 1e-6, chunk_size: int = 64, autocast_kernel_dtype: Any = jnp.float32, stabilize_correctly: bool = True,
    norm_val: float = 1.0, reduce_slicing: bool = True,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Chunkwise mLSTM with the Triton limit-chunk kernels; differentiable (custom fused backward), vmappable.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) (or (B, NH, S, 1)); optional c_initial
    (B, NH, DHQK, DHHV), n_initial (B, NH, DHQK), m_initial (B, NH) — all three or none. Any S; chunk_size a power
    of two in 16..128; head dims up to 1024. See `_mlstm_chunkwise_fwbw_generator` for the other arguments.
    Returns h (B, NH, S, DHHV) in q's dtype, or `(h, (C, n, m))` with float32 states (m in natural-log units).
    """
    fwd = _get_chunkwise_fwbw_kernel(
        autocast_kernel_dtype, return_last_states=bool(return_last_states), chunk_size=chunk_size, eps=eps,
        stabilize_correctly=stabilize_correctly, norm_val=norm_val, reduce_slicing=reduce_slicing,
    )
    h, c, n, m = fwd(q, k, v, i, f, c_initial, n_initial, m_initial)
    return (h, (c, n, m)) if return_last_states else h
