"""Backward per-chunk Triton kernels of the limit-chunk family, dq and dk/dv, or all three in one kernel (the exact
gradient of docs/math.md; the state cotangents: ../recurrence_kernels.py).

The denominator is differentiated as an extra value column of ones: the output cotangent is
(dh / norm, dden) with norm = max(|den|, lower) + eps and dden from common.output_cotangents (BH, S) float32.
Layouts as in fw_kernels; dC (BH, NC + 1, DHQK, DHHV) in the state-buffer dtype (only ever a matmul operand) and
dn (BH, NC + 1, DHQK) float32 hold the gradient w.r.t. each chunk-border state (index 0: the initial state, also
written in float32 to dC_0 (BH, DHQK, DHHV)). dq, dk, dv are written in their output buffers' dtype (the gradient
dtype) together with the float32 row dot products q_t·dq_t and k_t·dk_t (BH, S) the gate gradients need.
The dq and dk/dv kernels transpose no dot result (transposed operands are loaded transposed from memory); the
kernel of all three transposes the score cotangent once, for dq. TMA: the token tiles of q, k, v and dh through
TMA tensor descriptors (tile_ops.token_rows, which the helpers below take as their rows; launch table field
limit.tma), else pointer loads.
"""

import triton
import triton.language as tl

from xlstm_jax.kernels.triton.tile_ops import dot_in, log_decay, row_tile, row_tile_t, token_rows


@triton.jit
def _chunk_rows(VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, NC: tl.constexpr, L: tl.constexpr):
    """Grid (BH, NC): the program's bh, chunk kc, in-chunk positions rt, token indices tok and their per-token
    vectors (L,): vecB, vecB_lo, i, m_t, norm, dden."""
    bh = tl.program_id(0).to(tl.int64)
    kc = tl.program_id(1)
    S: tl.constexpr = NC * L
    rt = tl.arange(0, L)
    tok = kc * L + rt
    rows = bh * S + tok
    return (bh, kc, rt, tok, tl.load(VEC_B + rows), tl.load(VEC_BL + rows), tl.load(I + rows), tl.load(M_OUT + rows),
            tl.load(NORM + rows), tl.load(DDEN + rows))


@triton.jit
def _rows_times_state_t(
    X, norm, STATE, t0, rk, mk,
    L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DIVIDE: tl.constexpr, dtype: tl.constexpr, TMA: tl.constexpr,
):
    """(L, BK) float32 = X[t0:t0+L, :] @ STATE[rk, :]^T over the DHHV axis, for the token rows X (S, DHHV) of
    `token_rows` (divided by norm (L,) first if DIVIDE: the dh / norm of the numerator cotangent) and one state
    STATE (DHQK, DHHV) loaded transposed; operands rounded to `dtype`."""
    acc = tl.zeros((L, BK), dtype=tl.float32)
    for jv in range(tl.cdiv(DHHV, BV)):
        rv = jv * BV + tl.arange(0, BV)
        mv = rv < DHHV
        x = row_tile(X, t0, jv * BV, DHHV, L, BV, TMA)
        if DIVIDE:
            x = x.to(tl.float32) / norm[:, None]
        s_t = tl.load(STATE + rk[None, :] * DHHV + rv[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        acc += dot_in(x, s_t, dtype)
    return acc


@triton.jit
def _gradient_rows(
    A, X, OUT, ROW_DOT, ds, coef, n_scale, ROWS, norm, STATE, VEC, t0, tok,
    L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, DIVIDE: tl.constexpr, dtype: tl.constexpr, TMA: tl.constexpr,
):
    """The q (or k) gradient rows of one chunk (first token t0, token indices tok), block by block of DHQK:
    out = (ds @ A) · QK_SCALE + coef · (ROWS @ STATEᵀ + n_scale · VEC) for the token rows A (S, DHQK) and
    ROWS (S, DHHV) of `token_rows` (ROWS divided by norm if DIVIDE), one state STATE (DHQK, DHHV) and VEC (DHQK,);
    stores out to OUT (S, DHQK) and the row dots X_t·out_t (X: the token rows of q or k) to ROW_DOT (S,)."""
    row_dot = tl.zeros((L,), dtype=tl.float32)
    for jk in range(tl.cdiv(DHQK, BK)):
        rk = jk * BK + tl.arange(0, BK)
        mk = rk < DHQK
        a = row_tile(A, t0, jk * BK, DHQK, L, BK, TMA)
        out = dot_in(ds, a, dtype) * QK_SCALE
        rs = _rows_times_state_t(ROWS, norm, STATE, t0, rk, mk, L, DHQK, DHHV, BK, BV, DIVIDE, dtype, TMA)
        vec = tl.load(VEC + rk, mask=mk, other=0.0)
        out += coef[:, None] * (rs + n_scale[:, None] * vec[None, :])
        x = row_tile(X, t0, jk * BK, DHQK, L, BK, TMA)
        row_dot += tl.sum(x.to(tl.float32) * out, axis=1)
        tl.store(OUT + tok[:, None] * DHQK + rk[None, :], out.to(OUT.dtype.element_ty), mask=mk[None, :])
    tl.store(ROW_DOT + tok, row_dot)


@triton.jit
def _value_gradient_rows(
    K_ROWS, DH_ROWS, OUT, sd_t, abar, norm, DSTATE, t0, tok,
    L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    dtype: tl.constexpr, TMA: tl.constexpr,
):
    """The v gradient rows of one chunk, block by block of DHHV: out = sd_t @ (dh / norm) + abar · (k @ dC) for the
    token rows of k and dh (`token_rows`) and the cotangent DSTATE (DHQK, DHHV) of the state after the chunk;
    stores out to OUT (S, DHHV)."""
    for jv in range(tl.cdiv(DHHV, BV)):
        rv = jv * BV + tl.arange(0, BV)
        mv = rv < DHHV
        dh = row_tile(DH_ROWS, t0, jv * BV, DHHV, L, BV, TMA)
        dv = dot_in(sd_t, dh.to(tl.float32) / norm[:, None], dtype)
        kdc = tl.zeros((L, BV), dtype=tl.float32)
        for jk in range(tl.cdiv(DHQK, BK)):
            rk = jk * BK + tl.arange(0, BK)
            mk = rk < DHQK
            k = row_tile(K_ROWS, t0, jk * BK, DHQK, L, BK, TMA)
            dc = tl.load(DSTATE + rk[:, None] * DHHV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            kdc += dot_in(k, dc, dtype)
        dv += abar[:, None] * kdc
        tl.store(OUT + tok[:, None] * DHHV + rv[None, :], dv.to(OUT.dtype.element_ty), mask=mv[None, :])


@triton.jit
def _transposed_tiles(
    Q_ROWS, K_ROWS, V_ROWS, DH_ROWS, t0, rt, b, bl, ig, m_t, norm, dden,
    L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, dtype: tl.constexpr, TMA: tl.constexpr,
):
    """The chunk's (L, L) tiles with key positions s as rows and query positions t as columns, float32: the score
    cotangent ds_t = (v_s·dh_t / norm_t + dden_t) · D_ts and the weighted scores sd_t = (k_s·q_t) · QK_SCALE ·
    D_ts, with D_ts = exp(F_ts + i_s - m_t) on the causal entries (t >= s) and 0 elsewhere."""
    s_t = tl.zeros((L, L), dtype=tl.float32)
    for jk in range(tl.cdiv(DHQK, BK)):
        k = row_tile(K_ROWS, t0, jk * BK, DHQK, L, BK, TMA)
        q_t = row_tile_t(Q_ROWS, t0, jk * BK, DHQK, L, BK, TMA)
        s_t += tl.dot(k, q_t, input_precision="ieee")
    dp_t = tl.zeros((L, L), dtype=tl.float32)
    for jv in range(tl.cdiv(DHHV, BV)):
        v = row_tile(V_ROWS, t0, jv * BV, DHHV, L, BV, TMA)
        dh_t = row_tile_t(DH_ROWS, t0, jv * BV, DHHV, L, BV, TMA)
        dp_t += dot_in(v, dh_t.to(tl.float32) / norm[None, :], dtype)
    causal_t = rt[None, :] >= rt[:, None]
    log_d_t = log_decay(b[None, :], b[:, None], (ig - bl)[:, None], causal_t)
    d_t = tl.exp(log_d_t - (m_t - bl)[None, :])
    return (dp_t + dden[None, :]) * d_t, s_t * QK_SCALE * d_t


@triton.jit
def mlstm_bw_dq_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, C_ALL, N_ALL, M_ALL,
    DQ, QDQ,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, TMA: tl.constexpr = False,
):
    """Grid (BH, NC): dq of one chunk and q_t·dq_t, rows = query positions t."""
    bh, kc, rt, tok, b, bl, ig, m_t, norm, dden = _chunk_rows(VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, NC, L)
    S: tl.constexpr = NC * L
    dtype = K.dtype if TMA else K.dtype.element_ty  # a descriptor's dtype is its elements'
    dh_rows = token_rows(DH, bh, S, DHHV, TMA)
    v_rows = token_rows(V, bh, S, DHHV, TMA)

    dp = tl.zeros((L, L), dtype=tl.float32)
    for jv in range(tl.cdiv(DHHV, BV)):
        dh = row_tile(dh_rows, kc * L, jv * BV, DHHV, L, BV, TMA)
        v_t = row_tile_t(v_rows, kc * L, jv * BV, DHHV, L, BV, TMA)
        dp += dot_in(dh.to(tl.float32) / norm[:, None], v_t, dtype)
    causal = rt[:, None] >= rt[None, :]
    log_d = log_decay(b[:, None], b[None, :], (ig - bl)[None, :], causal)
    ds = (dp + dden[:, None]) * tl.exp(log_d - (m_t - bl)[:, None])
    _query_gradients(Q, K, DH, C_ALL, N_ALL, M_ALL, DQ, QDQ, ds, bh, kc, tok, b, m_t, norm, dden, NC, NS, L, DHQK,
                     DHHV, BK, BV, QK_SCALE, TMA)


@triton.jit
def _query_gradients(
    Q, K, DH, C_ALL, N_ALL, M_ALL, DQ, QDQ, ds, bh, kc, tok, b, m_t, norm, dden,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, QK_SCALE: tl.constexpr, TMA: tl.constexpr,
):
    """dq and q_t·dq_t of chunk kc of row bh from its score cotangent ds (L, L) float32 (query rows) and the state
    before the chunk."""
    S: tl.constexpr = NC * L
    before = bh * NS + kc
    inter = tl.exp(b + tl.load(M_ALL + bh * (NC + 1) + kc) - m_t) * QK_SCALE
    _gradient_rows(token_rows(K, bh, S, DHQK, TMA), token_rows(Q, bh, S, DHQK, TMA),
                   DQ + bh * S * DHQK, QDQ + bh * S, ds, inter, dden, token_rows(DH, bh, S, DHHV, TMA), norm,
                   C_ALL + before * DHQK * DHHV, N_ALL + before * DHQK, kc * L, tok, L, DHQK, DHHV, BK, BV, QK_SCALE,
                   True, (K.dtype if TMA else K.dtype.element_ty), TMA)


@triton.jit
def _key_gradients(
    Q, K, V, DH, VEC_A, M_ALL, DC_ALL, DN_ALL, DK, DV, KDK, bh, kc, rt, tok, b, bl, ig, m_t, norm, dden,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, TMA: tl.constexpr,
):
    """dk, dv and k_s·dk_s of chunk kc of row bh (rows = key positions s, every L x L tile built transposed);
    returns the score cotangent ds_t (L, L) float32, whose transpose is dq's."""
    S: tl.constexpr = NC * L
    dtype = K.dtype if TMA else K.dtype.element_ty  # a descriptor's dtype is its elements'
    after = bh * (NC + 1) + kc + 1  # the state after the chunk, whose cotangent dk and dv take
    abar = tl.exp(tl.load(VEC_A + bh * S + tok) - tl.load(M_ALL + after))
    q_rows = token_rows(Q, bh, S, DHQK, TMA)
    k_rows = token_rows(K, bh, S, DHQK, TMA)
    v_rows = token_rows(V, bh, S, DHHV, TMA)
    dh_rows = token_rows(DH, bh, S, DHHV, TMA)
    ds_t, sd_t = _transposed_tiles(q_rows, k_rows, v_rows, dh_rows, kc * L, rt, b, bl, ig, m_t, norm, dden, L, DHQK,
                                   DHHV, BK, BV, QK_SCALE, dtype, TMA)
    _gradient_rows(q_rows, k_rows, DK + bh * S * DHQK, KDK + bh * S, ds_t, abar, tl.full((L,), 1.0, tl.float32),
                   v_rows, norm, DC_ALL + after * DHQK * DHHV, DN_ALL + after * DHQK, kc * L, tok, L, DHQK, DHHV,
                   BK, BV, QK_SCALE, False, dtype, TMA)
    _value_gradient_rows(k_rows, dh_rows, DV + bh * S * DHHV, sd_t, abar, norm, DC_ALL + after * DHQK * DHHV, kc * L,
                         tok, L, DHQK, DHHV, BK, BV, dtype, TMA)
    return ds_t


@triton.jit
def mlstm_bw_dkdv_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL, DN_ALL,
    DK, DV, KDK,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, TMA: tl.constexpr = False,
):
    """Grid (BH, NC): dk, dv and k_s·dk_s of one chunk (`_key_gradients`)."""
    bh, kc, rt, tok, b, bl, ig, m_t, norm, dden = _chunk_rows(VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, NC, L)
    _key_gradients(Q, K, V, DH, VEC_A, M_ALL, DC_ALL, DN_ALL, DK, DV, KDK, bh, kc, rt, tok, b, bl, ig, m_t, norm, dden,
                   NC, L, DHQK, DHHV, BK, BV, QK_SCALE, TMA)


@triton.jit
def mlstm_bw_gradients_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL, DN_ALL, C_ALL, N_ALL,
    DQ, DK, DV, QDQ, KDK,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, TMA: tl.constexpr = False,
):
    """Grid (BH, NC): dq, dk, dv, q_t·dq_t and k_s·dk_s of one chunk in one program (launch table field
    limit.fused_bw): dk and dv as the dk/dv kernel forms them, then dq from the transpose of their score
    cotangent, so the q, k, v and dh tiles are read and the (L, L) tile v·dhᵀ is formed once for all three."""
    bh, kc, rt, tok, b, bl, ig, m_t, norm, dden = _chunk_rows(VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, NC, L)
    ds_t = _key_gradients(Q, K, V, DH, VEC_A, M_ALL, DC_ALL, DN_ALL, DK, DV, KDK, bh, kc, rt, tok, b, bl, ig, m_t,
                          norm, dden, NC, L, DHQK, DHHV, BK, BV, QK_SCALE, TMA)
    _query_gradients(Q, K, DH, C_ALL, N_ALL, M_ALL, DQ, QDQ, tl.trans(ds_t), bh, kc, tok, b, m_t, norm, dden, NC, NS,
                     L, DHQK, DHHV, BK, BV, QK_SCALE, TMA)
