"""The fused Triton mLSTM prefill: a short sequence (S <= MAX_PREFILL tokens) from given states, forward only, in one
launch (`xlstm_jax.mlstm_prefill(backend="triton")`; the same result as `mlstm` with chunk_size = S).

Serving prefills prompts in chunks of a few hundred tokens for one sequence at a time, beside the decode step of
the slot pool (`xlstm_jax.serve.steps`). The chunkwise training kernels split such a chunk into several launches
(gate preprocessing, the state recurrence, the outputs) and run a backward that serving never needs; here one
grid of B·NH × DHHV/BV × S/LQ programs does everything: program (bh, j, t) computes the outputs of query rows
t·LQ.. for value columns j·BV.., and the programs of the last row tile also write the last state's columns.

Math (exp input gate, one chunk from the state (C₀, n₀, m₀); docs/math.md): with b_t = Σ_{s≤t} log σ(f_s),
m_t = b_t + max(m₀, max_{s≤t}(i_s − b_s)) and w_ts = exp(b_t − b_s + i_s − m_t) for s ≤ t,

    h_t = (e^{b_t + m₀ − m_t} q̂_t C₀ + Σ_s w_ts (q̂_t·k_s) v_s) / (max(|e^{b_t + m₀ − m_t} q̂_t·n₀ + Σ_s w_ts q̂_t·k_s|,
          e^{−m_t}) + eps),
    C_S = e^{b_S + m₀ − m_S} C₀ + Σ_s w_Ss k_s v_sᵀ,   n_S likewise with k_s,   m_S.

Shapes: q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S); C (B, NH, DHQK, DHHV); n (B, NH, DHQK); m (B, NH).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from xlstm_jax.kernels.base import MAX_PREFILL, log_forget_floor, qk_scale
from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.sharding import per_batch_head


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _log_forget(F, at, FLOOR: tl.constexpr):
    f = tl.load(F + at).to(tl.float32)
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # log σ(f), floored as base.log_forget
    return tl.where(log_f < FLOOR, FLOOR, log_f)


@triton.jit
def _gate_sums(I, F, bh, t0, X: tl.constexpr, S: tl.constexpr, FLOOR: tl.constexpr):
    """(b, i, g) of the tokens t0..t0+X-1: b the inclusive prefix sum of log σ(f), i the input gate, g the running
    max of i_s − b_s over s <= t. What lies before t0 enters as two scalars (a masked sum and max over the whole
    sequence), so a tile costs O(S + X), and every tile's b is formed the same way."""
    t = tl.arange(0, S)
    log_f_all = _log_forget(F + bh * S, t, FLOOR)
    b_all = tl.cumsum(log_f_all, 0)
    before = t < t0
    b_before = tl.sum(tl.where(before, log_f_all, 0.0), 0)
    i_all = tl.load(I + bh * S + t).to(tl.float32)
    g_before = tl.max(tl.where(before, i_all - b_all, float("-inf")), 0)
    at = t0 + tl.arange(0, X)
    b = b_before + tl.cumsum(_log_forget(F + bh * S, at, FLOOR), 0)
    i = tl.load(I + bh * S + at).to(tl.float32)
    g = tl.maximum(g_before, tl.associative_scan(i - b, 0, _max))
    return b, i, g


@triton.jit
def _prefill_kernel(Q, K, V, I, F, C, N, M, H, C_OUT, N_OUT, M_OUT, SCALE: tl.constexpr, EPS: tl.constexpr,
                    FLOOR: tl.constexpr, S: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, LQ: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """Grid (BH, cdiv(DHHV, BV) · S/LQ); see the module docstring."""
    bh = tl.program_id(0)
    NQ: tl.constexpr = S // LQ
    j = tl.program_id(1) // NQ
    tq = tl.program_id(1) % NQ
    m0 = tl.load(M + bh)
    cols = j * BV + tl.arange(0, BV)
    col_ok = cols < DHHV
    rows = tq * LQ + tl.arange(0, LQ)
    b_q, _, g_q = _gate_sums(I, F, bh, tq * LQ, LQ, S, FLOOR)
    m_q = b_q + tl.maximum(m0, g_q)
    inter = tl.exp(b_q + m0 - m_q)
    qk_base = bh * S * DHQK
    # the part from the state: q̂ C₀ and q̂·n₀
    num = tl.zeros((LQ, BV), dtype=tl.float32)
    qn = tl.zeros((LQ,), dtype=tl.float32)
    for r0 in range(0, DHQK, BK):
        dims = r0 + tl.arange(0, BK)
        dim_ok = dims < DHQK
        q = tl.load(Q + qk_base + rows[:, None] * DHQK + dims[None, :], mask=dim_ok[None, :], other=0.0)
        c = tl.load(C + bh * DHQK * DHHV + dims[:, None] * DHHV + cols[None, :],
                    mask=dim_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        n = tl.load(N + bh * DHQK + dims, mask=dim_ok, other=0.0).to(tl.float32)
        num += tl.dot(q.to(tl.float32), c)
        qn += tl.sum(q.to(tl.float32) * n[None, :], 1)
    num = num * (SCALE * inter)[:, None]
    qn = qn * (SCALE * inter)
    # the part within the sequence, key tiles up to the diagonal
    for s0 in range(0, (tq + 1) * LQ, LQ):
        keys = s0 + tl.arange(0, LQ)
        b_k, i_k, _ = _gate_sums(I, F, bh, s0, LQ, S, FLOOR)
        scores = tl.zeros((LQ, LQ), dtype=tl.float32)
        for r0 in range(0, DHQK, BK):
            dims = r0 + tl.arange(0, BK)
            dim_ok = dims < DHQK
            q = tl.load(Q + qk_base + rows[:, None] * DHQK + dims[None, :], mask=dim_ok[None, :], other=0.0)
            k = tl.load(K + qk_base + keys[:, None] * DHQK + dims[None, :], mask=dim_ok[None, :], other=0.0)
            scores += tl.dot(q, tl.trans(k))
        causal = keys[None, :] <= rows[:, None]
        log_w = tl.where(causal, b_q[:, None] - b_k[None, :] + i_k[None, :] - m_q[:, None], float("-inf"))
        p = scores * SCALE * tl.exp(log_w)
        qn += tl.sum(p, 1)
        v = tl.load(V + bh * S * DHHV + keys[:, None] * DHHV + cols[None, :], mask=col_ok[None, :], other=0.0)
        num += tl.dot(p.to(v.dtype), v)
    den = tl.maximum(tl.abs(qn), tl.exp(tl.minimum(-m_q, 87.0))) + EPS
    tl.store(H + bh * S * DHHV + rows[:, None] * DHHV + cols[None, :], (num / den[:, None]).to(H.dtype.element_ty),
             mask=col_ok[None, :])
    if tq == NQ - 1:  # the last state's columns j·BV..: C_S = e^{b_S + m₀ − m_S} C₀ + Σ_s w_Ss k_s v_sᵀ
        last = tl.arange(0, LQ) == LQ - 1  # the last row of this (the last) tile
        b_last = tl.sum(tl.where(last, b_q, 0.0), 0)
        m_last = tl.sum(tl.where(last, m_q, 0.0), 0)
        decay = tl.exp(b_last + m0 - m_last)
        for r0 in range(0, DHQK, BK):
            dims = r0 + tl.arange(0, BK)
            dim_ok = dims < DHQK
            at = bh * DHQK * DHHV + dims[:, None] * DHHV + cols[None, :]
            ok = dim_ok[:, None] & col_ok[None, :]
            c = decay * tl.load(C + at, mask=ok, other=0.0).to(tl.float32)
            n = decay * tl.load(N + bh * DHQK + dims, mask=dim_ok, other=0.0).to(tl.float32)
            for s0 in range(0, S, LQ):
                keys = s0 + tl.arange(0, LQ)
                b_k, i_k, _ = _gate_sums(I, F, bh, s0, LQ, S, FLOOR)
                w = tl.exp(b_last - b_k + i_k - m_last)
                k = tl.load(K + qk_base + keys[:, None] * DHQK + dims[None, :], mask=dim_ok[None, :],
                            other=0.0).to(tl.float32) * w[:, None]
                v = tl.load(V + bh * S * DHHV + keys[:, None] * DHHV + cols[None, :], mask=col_ok[None, :],
                            other=0.0).to(tl.float32)
                c += tl.dot(tl.trans(k), v)
                n += tl.sum(k, 0)
            tl.store(C_OUT + at, c.to(C_OUT.dtype.element_ty), mask=ok)
            if j == 0:
                tl.store(N_OUT + bh * DHQK + dims, n.to(N_OUT.dtype.element_ty), mask=dim_ok)
        if j == 0:
            tl.store(M_OUT + bh, m_last)


def _block(dim: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(dim)))


def _prefill_arrays(eps: float, tiles: tuple[int, int, int, int, int], q, k, v, i, f, c, n, m):
    """The launch on arrays that all lead with (B, NH); tiles: (rows, block_v, block_k, num_warps, num_stages)."""
    B, NH, S, DHQK = q.shape
    DHHV = v.shape[-1]
    BH = B * NH
    rows, block_v, block_k, num_warps, num_stages = tiles
    LQ, BV, BK = min(rows, S), _block(DHHV, block_v), _block(DHQK, block_k)
    flat = [a.reshape(BH, *a.shape[2:]) for a in (q, k, v, i, f, c, n, m)]
    h, c_new, n_new, m_new = launch(
        _prefill_kernel, flat,
        [jax.ShapeDtypeStruct((BH, S, DHHV), q.dtype), jax.ShapeDtypeStruct((BH, DHQK, DHHV), c.dtype),
         jax.ShapeDtypeStruct((BH, DHQK), n.dtype), jax.ShapeDtypeStruct((BH,), jnp.float32)],
        grid=(triton.cdiv(DHHV, BV) * (S // LQ),), num_warps=num_warps, num_stages=num_stages,
        SCALE=qk_scale(DHQK), EPS=float(eps), FLOOR=log_forget_floor(jnp.float32), S=S, DHQK=DHQK, DHHV=DHHV,
        LQ=LQ, BK=BK, BV=BV,
    )
    return h.reshape(B, NH, S, DHHV), c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape)


_prefill = per_batch_head(_prefill_arrays, n_static=2)


def prefill_triton(q, k, v, i, f, c, n, m, eps: float, *, rows: int = 64, block_v: int = 64, block_k: int = 64,
                   num_warps: int = 4, num_stages: int = 1):
    """The fused prefill (one launch): (h (B, NH, S, DHHV) in q's dtype, (C, n, m) in the states' dtypes). S a power
    of two in [16, MAX_PREFILL]; rows: the query (and key) rows of a tile; block_v / block_k: value columns and
    head-dim rows per step."""
    h, c_new, n_new, m_new = _prefill(float(eps), (rows, block_v, block_k, num_warps, num_stages),
                                      q, k, v, i, f, c, n, m)
    return h, (c_new, n_new, m_new)
