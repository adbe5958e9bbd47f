"""A documented module: the xl-chunk parallel forward kernel (H intra + inter, kernels/triton/xl/kernels.py) as a
standalone function. Nothing inside xlstm_jax imports it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import check_chunk_size
from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.native.chunk_math import chunk_log_forget, nonfinite_chunks, split_cumsum
from xlstm_jax.kernels.triton.xl.kernels import mlstm_xl_fw_parallel_kernel


def _pow2_block(name: str, value: int, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}.")
    if limit is not None and value > limit:
        raise ValueError(f"{name}={value} must not exceed chunk_size={limit}.")
    return int(value)


def mlstm_chunkwise__parallel_fw_Hintra(
    matQ: jax.Array,
    matK: jax.Array,
    matV: jax.Array,
    vecI: jax.Array,
    vecF: jax.Array,
    matC_all: jax.Array,
    vecN_all: jax.Array,
    scaM_all: jax.Array,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    output_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Execute the parallel forward kernel for the H computation in the mLSTM chunkwise formulation.

    matQ, matK (B, NH, S, DHQK); matV (B, NH, S, DHHV); vecI (B, NH, NC, L) or (B, NH, S); vecF (B, NH, S) forget
    gate pre-activations; matC_all (B, NH, (NC+1)·DHQK, DHHV), vecN_all (B, NH, (NC+1)·DHQK), scaM_all (B, NH, NC+1)
    the float32 states at the chunk borders (index k: before chunk k). S = NC·chunk_size. Block sizes: siz_b_LQ
    query rows per program, siz_b_LKV key rows per loop step, siz_b_DHQK / siz_b_DHHV head-dim blocks (None:
    min(64, ·) / min(128, ·)); powers of two >= 16, the L blocks dividing chunk_size. qk_scale None -> DHQK**-0.5.
    Returns H (B, NH, S, DHHV) in matQ's dtype, the normalizer max(|q·n|, e^{-m}) (without eps) and the stabilizer
    m (B, NH, S), both in output_dtype.
    """
    B, NH, S, DHQK = matQ.shape
    DHHV = matV.shape[-1]
    L = check_chunk_size(chunk_size, minimum=16, maximum=2048)
    if S % L:
        raise ValueError(f"S={S} must be a multiple of chunk_size={L} (pad with neutral steps first).")
    NC = S // L
    expected = {
        "matK": (matK, (B, NH, S, DHQK)), "vecF": (vecF, (B, NH, S)),
        "matC_all": (matC_all, (B, NH, (NC + 1) * DHQK, DHHV)), "vecN_all": (vecN_all, (B, NH, (NC + 1) * DHQK)),
        "scaM_all": (scaM_all, (B, NH, NC + 1)),
    }
    for name, (x, shape) in expected.items():
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {x.shape}.")
    if matV.shape[:3] != (B, NH, S) or vecI.size != B * NH * S:
        raise ValueError(f"matV must be (B, NH, S, DHHV) and vecI (B, NH, S) or (B, NH, NC, L), got {matV.shape}, "
                         f"{vecI.shape}.")
    LQ = _pow2_block("siz_b_LQ", siz_b_LQ, L)
    LKV = _pow2_block("siz_b_LKV", siz_b_LKV, L)
    BK = (_pow2_block("siz_b_DHQK", siz_b_DHQK) if siz_b_DHQK is not None
          else min(64, max(16, 1 << (DHQK - 1).bit_length())))
    BV = (_pow2_block("siz_b_DHHV", siz_b_DHHV) if siz_b_DHHV is not None
          else min(128, max(16, 1 << (DHHV - 1).bit_length())))
    warps = num_warps if num_warps is not None else (4 if BK >= 64 else 2)
    i = vecI.reshape(B, NH, S).astype(jnp.float32)
    vec_b, vec_bl = split_cumsum(chunk_log_forget(vecF, L))
    flat = lambda x: x.reshape(B * NH, *x.shape[2:])  # noqa: E731
    c_all = matC_all.reshape(B * NH, NC + 1, DHQK, DHHV).astype(jnp.float32)
    n_all = vecN_all.reshape(B * NH, NC + 1, DHQK).astype(jnp.float32)
    h, den, m = launch(
        mlstm_xl_fw_parallel_kernel,
        [flat(matQ), flat(matK), flat(matV.astype(matQ.dtype)), vec_b.reshape(B * NH, S), vec_bl.reshape(B * NH, S),
         flat(i), c_all, n_all, flat(scaM_all).astype(jnp.float32), nonfinite_chunks(c_all, n_all)],
        [jax.ShapeDtypeStruct((B * NH, S, DHHV), matQ.dtype), jax.ShapeDtypeStruct((B * NH, S), jnp.float32),
         jax.ShapeDtypeStruct((B * NH, S), jnp.float32)],
        grid=(NC * (L // LQ), -(-DHHV // BV)), num_warps=warps, num_stages=num_stages or 1,
        NC=NC, NS=NC + 1, L=L, DHQK=DHQK, DHHV=DHHV, LQ=LQ, LKV=LKV, BK=BK, BV=BV,
        QK_SCALE=float(DHQK**-0.5 if qk_scale is None else qk_scale), EPS=float(eps), NORM_VAL=1.0,
        STABILIZE_CORRECTLY=True,
    )
    norm = jnp.maximum(jnp.abs(den), jnp.exp(-m))
    return (h.reshape(B, NH, S, DHHV), norm.reshape(B, NH, S).astype(output_dtype),
            m.reshape(B, NH, S).astype(output_dtype))
