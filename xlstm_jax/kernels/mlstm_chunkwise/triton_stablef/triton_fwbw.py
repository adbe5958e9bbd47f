"""Triton limit-chunk mLSTM ("stablef" family, seed 001): forward and a fused, true-derivative backward.

Notation: B batch, NH heads, S sequence length, DHQK q/k head dim, DHHV v/h head dim, NC number of chunks,
L chunk size. Kernels: fw_kernels.py (chunk-border states, outputs), bw_kernels.py (dC recurrence, dq, dk/dv); gate
gradients in XLA (common.gate_gradients). All launches go through xlstm_jax.kernels.launch.

Differences from the upstream port, on purpose: states and m are in natural-log units (interchangeable with every
other backend); any S (neutral padding); the denominator, initial states (C, n, m) and the last-state cotangents
are differentiated exactly (DESIGN.md §2); h is returned in q's dtype; every argument below is honoured.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.bw_kernels import (
    mlstm_bw_dkdv_kernel,
    mlstm_bw_dq_kernel,
    mlstm_bw_recurrent_kernel,
)
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.fw_kernels import mlstm_fw_parallel_kernel, mlstm_fw_recurrent_kernel
from xlstm_jax.kernels.mlstm_chunkwise.common import chunk_gates, denominator_cotangent, gate_gradients
from xlstm_jax.mlstm.base import (
    MLSTMShape,
    check_chunk_size,
    check_inputs,
    initial_states_or_zeros,
    pad_to_multiple,
    qk_scale,
    resolve_compute_dtype,
)

MAX_HEAD_DIM = 512
CHUNK_SIZES = (16, 128)


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    chunk_size: int
    eps: float
    norm_val: float
    stabilize_correctly: bool
    compute_dtype: str
    recompute_states_in_bw: bool
    reduce_slicing: bool


# Launch parameters from an H100 sweep (docs/benchmarks.md): head-dim block caps, warps of the recurrent
# kernels, and warps of the per-chunk (parallel) kernels for chunks up to 64 / of 128. The dq kernel always runs
# 8 warps: with 4, triton 3.6 on H100 miscompiles it for bf16 at L=64, DHQK=128, DHHV=256 (dq 80% off, silently;
# caught by test_gpu_parity_realistic_shape).
LAUNCH = {
    "block": 64, "out_v_block": 128, "recurrent_warps": 4, "parallel_warps": 4, "parallel_warps_l128": 8,
    "dq_warps": 8,
}


def _parallel_warps(chunk_size: int) -> int:
    return LAUNCH["parallel_warps"] if chunk_size <= 64 else LAUNCH["parallel_warps_l128"]


def _block(dim: int, cap: int | None = None) -> int:
    return min(cap or LAUNCH["block"], max(16, 1 << (dim - 1).bit_length()))


def _check_head_dims(shape: MLSTMShape) -> None:
    for name, dim in (("DHQK (q, k last axis)", shape.DHQK), ("DHHV (v last axis)", shape.DHHV)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be <= {MAX_HEAD_DIM} for the Triton limit-chunk kernels, got {dim}.")


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _gates(i: jax.Array, f: jax.Array, L: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """vecB, vecA (BH, S) and scaG (BH, NC) float32 from (BH, S) gates."""
    vec_b, vec_a, sca_g = chunk_gates(i[None], f[None], L)
    return vec_b[0].reshape(i.shape), vec_a[0].reshape(i.shape), sca_g[0]


def _chunk_states(k, v, vec_a, sca_g, c0, n0, m0, cfg: _KernelConfig):
    """Chunk-border states C (BH, NC+1, DHQK, DHHV), n (BH, NC+1, DHQK), m (BH, NC+1), float32."""
    BH, S, DHQK = k.shape
    DHHV = v.shape[-1]
    L = cfg.chunk_size
    NC = S // L
    BK, BV = _block(DHQK), _block(DHHV)
    grid = (-(-DHQK // BK) * -(-DHHV // BV),)
    return launch(
        mlstm_fw_recurrent_kernel,
        [k, v, vec_a, sca_g, c0, n0, m0],
        [
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHHV), jnp.float32),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), jnp.float32),
            jax.ShapeDtypeStruct((BH, NC + 1), jnp.float32),
        ],
        grid=grid, num_warps=LAUNCH["recurrent_warps"], NC=NC, L=L, DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV,
    )


def _kernel_states(c_all, n_all, cfg: _KernelConfig):
    """The state buffers the output / dq kernels read: whole (reduce_slicing) or without the last state."""
    if cfg.reduce_slicing:
        return c_all, n_all
    return c_all[:, :-1], n_all[:, :-1]


def _forward(q, k, v, i, f, c0, n0, m0, cfg: _KernelConfig):
    """Padded, flattened forward. Returns h (BH, S, DHHV) in q's dtype, den, m_out (BH, S) and the states."""
    BH, S, DHQK = q.shape
    DHHV = v.shape[-1]
    L = cfg.chunk_size
    NC = S // L
    BK, BV = _block(DHQK), _block(DHHV, LAUNCH["out_v_block"])
    dt = jnp.dtype(cfg.compute_dtype)
    qc, kc, vc = q.astype(dt), k.astype(dt), v.astype(dt)
    vec_b, vec_a, sca_g = _gates(i, f, L)
    c_all, n_all, m_all = _chunk_states(kc, vc, vec_a, sca_g, c0, n0, m0, cfg)
    c_in, n_in = _kernel_states(c_all, n_all, cfg)
    h, den, m_out = launch(
        mlstm_fw_parallel_kernel,
        [qc, kc, vc, vec_b, i, c_in, n_in, m_all],
        [
            jax.ShapeDtypeStruct((BH, S, DHHV), q.dtype),
            jax.ShapeDtypeStruct((BH, S), jnp.float32),
            jax.ShapeDtypeStruct((BH, S), jnp.float32),
        ],
        grid=(NC, -(-DHHV // BV)), num_warps=_parallel_warps(L),
        NC=NC, NS=c_in.shape[1], L=L, DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV, QK_SCALE=qk_scale(DHQK), EPS=cfg.eps,
        NORM_VAL=cfg.norm_val, STABILIZE_CORRECTLY=cfg.stabilize_correctly,
    )
    return h, den, m_out, (c_all, n_all, m_all)


def _pad_flat(q, k, v, i, f, L):
    q, k, v, i, f = pad_to_multiple(q, k, v, i, f, L)
    return tuple(_flat(x) for x in (q, k, v, i, f))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mlstm_core(q, k, v, i, f, c0, n0, m0, cfg: _KernelConfig):
    """(B, NH, ...) inputs, float32 gates and states -> (h, C_last, n_last, m_last)."""
    return _core_fwd(q, k, v, i, f, c0, n0, m0, cfg)[0]


def _core_fwd(q, k, v, i, f, c0, n0, m0, cfg: _KernelConfig):
    B, NH, S, _ = q.shape
    qf, kf, vf, i_f, f_f = _pad_flat(q, k, v, i, f, cfg.chunk_size)
    h, den, m_out, (c_all, n_all, m_all) = _forward(qf, kf, vf, i_f, f_f, _flat(c0), _flat(n0), _flat(m0), cfg)
    out = (
        h.reshape(B, NH, -1, h.shape[-1])[:, :, :S],
        c_all[:, -1].reshape(c0.shape),
        n_all[:, -1].reshape(n0.shape),
        m_all[:, -1].reshape(m0.shape),
    )
    states = None if cfg.recompute_states_in_bw else (c_all, n_all)
    residuals = (q, k, v, i, f, c0, n0, m0, h, den, m_out, m_all, states)
    return out, residuals


def _core_bwd(cfg: _KernelConfig, residuals, cotangents):
    q, k, v, i, f, c0, n0, m0, h, den, m_out, m_all, states = residuals
    dh, dc_last, dn_last, dm_last = cotangents
    B, NH, S, DHQK = q.shape
    DHHV = v.shape[-1]
    L = cfg.chunk_size
    BK, BV = _block(DHQK), _block(DHHV)
    dt = jnp.dtype(cfg.compute_dtype)
    qf, kf, vf, i_f, f_f = _pad_flat(q.astype(dt), k.astype(dt), v.astype(dt), i, f, L)
    BH, S_pad = i_f.shape
    NC = S_pad // L
    dh = _flat(jnp.pad(dh, ((0, 0), (0, 0), (0, S_pad - S), (0, 0))))
    c0f, n0f, m0f = _flat(c0), _flat(n0), _flat(m0)
    vec_b, vec_a, sca_g = _gates(i_f, f_f, L)
    if states is None:
        c_all, n_all, _ = _chunk_states(kf, vf, vec_a, sca_g, c0f, n0f, m0f, cfg)
    else:
        c_all, n_all = states
    lower = cfg.norm_val * jnp.exp(-m_out) if cfg.stabilize_correctly else jnp.full_like(m_out, cfg.norm_val)
    norm, dden = denominator_cotangent(dh, h, den, lower, cfg.eps)
    dc_lastf, dn_lastf = _flat(dc_last.astype(jnp.float32)), _flat(dn_last.astype(jnp.float32))
    consts = dict(NC=NC, L=L, DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV, QK_SCALE=qk_scale(DHQK))
    dc_all, dn_all = launch(
        mlstm_bw_recurrent_kernel,
        [qf, dh, vec_b, m_out, norm, dden, sca_g, m_all, dc_lastf, dn_lastf],
        [
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHHV), jnp.float32),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), jnp.float32),
        ],
        grid=(-(-DHQK // BK) * -(-DHHV // BV),), num_warps=LAUNCH["recurrent_warps"], **consts,
    )
    c_in, n_in = _kernel_states(c_all, n_all, cfg)
    (dq,) = launch(
        mlstm_bw_dq_kernel,
        [kf, vf, dh, vec_b, i_f, m_out, norm, dden, c_in, n_in, m_all],
        [jax.ShapeDtypeStruct((BH, S_pad, DHQK), jnp.float32)],
        grid=(NC,), num_warps=LAUNCH["dq_warps"], NS=c_in.shape[1], **consts,
    )
    dk, dv = launch(
        mlstm_bw_dkdv_kernel,
        [qf, kf, vf, dh, vec_b, vec_a, i_f, m_out, norm, dden, m_all, dc_all, dn_all],
        [jax.ShapeDtypeStruct((BH, S_pad, DHQK), jnp.float32), jax.ShapeDtypeStruct((BH, S_pad, DHHV), jnp.float32)],
        grid=(NC,), num_warps=_parallel_warps(L), **consts,
    )
    first_dot = jnp.sum(c0f * dc_all[:, 0], axis=(-2, -1)) + jnp.sum(n0f * dn_all[:, 0], axis=-1)
    last_dot = jnp.sum(c_all[:, -1] * dc_lastf, axis=(-2, -1)) + jnp.sum(n_all[:, -1] * dn_lastf, axis=-1)
    di, df, dm0 = gate_gradients(
        qf, dq, kf, dk, i_f, f_f, m0f, first_state_dot=first_dot, last_state_dot=last_dot,
        dm_last=_flat(dm_last.astype(jnp.float32)),
    )

    def unflat(x, like):
        return x.reshape(B, NH, *x.shape[1:])[:, :, :S].astype(like.dtype)

    return (
        unflat(dq, q), unflat(dk, k), unflat(dv, v), unflat(di, i), unflat(df, f),
        dc_all[:, 0].reshape(c0.shape).astype(c0.dtype),
        dn_all[:, 0].reshape(n0.shape).astype(n0.dtype),
        dm0.reshape(m0.shape).astype(m0.dtype),
    )


_mlstm_core.defvjp(_core_fwd, _core_bwd)


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
        vecI, vecF, shape = check_inputs(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial)
        _check_head_dims(shape)
        cfg = _KernelConfig(
            chunk_size=chunk_size, eps=float(eps), norm_val=float(norm_val),
            stabilize_correctly=bool(stabilize_correctly),
            compute_dtype=resolve_compute_dtype(autocast_kernel_dtype, matQ.dtype, "autocast_kernel_dtype").name,
            recompute_states_in_bw=bool(recompute_states_in_bw), reduce_slicing=bool(reduce_slicing),
        )
        c0, n0, m0 = initial_states_or_zeros(matC_initial, vecN_initial, scaM_initial, shape)
        h, c, n, m = _mlstm_core(
            matQ, matK, matV, vecI.astype(jnp.float32), vecF.astype(jnp.float32), c0, n0, m0, cfg
        )
        if not return_last_states:
            return h, None, None, None
        return h, c, n, m

    return forward


@functools.lru_cache(maxsize=None)
def _cached_generator(autocast_name: str | None, **kwargs: Any):
    return _mlstm_chunkwise_fwbw_generator(autocast_kernel_dtype=autocast_name, **kwargs)


def _get_chunkwise_fwbw_kernel(autocast_kernel_dtype: Any, **kwargs: Any):
    """The (cached) forward function of `_mlstm_chunkwise_fwbw_generator(autocast_kernel_dtype, **kwargs)`."""
    name = None if autocast_kernel_dtype is None else jnp.dtype(autocast_kernel_dtype).name
    return _cached_generator(name, **kwargs)


def mlstm_chunkwise_triton_stablef(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    autocast_kernel_dtype: Any = jnp.float32,
    stabilize_correctly: bool = True,
    norm_val: float = 1.0,
    reduce_slicing: bool = True,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Chunkwise mLSTM with the Triton limit-chunk kernels; differentiable (custom fused backward), vmappable.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) (or (B, NH, S, 1)); optional c_initial
    (B, NH, DHQK, DHHV), n_initial (B, NH, DHQK), m_initial (B, NH) — all three or none. Any S; chunk_size a power
    of two in 16..128; head dims up to 512. See `_mlstm_chunkwise_fwbw_generator` for the other arguments.
    Returns h (B, NH, S, DHHV) in q's dtype, or `(h, (C, n, m))` with float32 states (m in natural-log units).
    """
    fwd = _get_chunkwise_fwbw_kernel(
        autocast_kernel_dtype, return_last_states=bool(return_last_states), chunk_size=chunk_size, eps=eps,
        stabilize_correctly=stabilize_correctly, norm_val=norm_val, reduce_slicing=reduce_slicing,
    )
    h, c, n, m = fwd(q, k, v, i, f, c_initial, n_initial, m_initial)
    return (h, (c, n, m)) if return_last_states else h


def mlstm_triton_limit_chunk(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
    return_last_states=False, eps=1e-6, chunk_size=64, autocast_dtype=None,
):
    """`xlstm_jax.mlstm(backend="triton_limit_chunk")`: the standard denominator, compute dtype = q's unless set."""
    return mlstm_chunkwise_triton_stablef(
        q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states, eps=eps,
        chunk_size=chunk_size, autocast_kernel_dtype=autocast_dtype,
    )
