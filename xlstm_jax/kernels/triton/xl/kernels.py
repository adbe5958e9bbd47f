"""Tiled (TFLA "xl-chunk") Triton kernels for the parallel parts of the chunkwise mLSTM: chunks of any size, tiled
into (LQ, LKV) blocks of queries and keys.

Layouts (BH = B·NH flattened, S = NC·L padded, contiguous): q, k (BH, S, DHQK), v, dh (BH, S, DHHV); vecB, vecB_lo
(BH, S) the two-float within-chunk cumsum of log forget gates, vecA (BH, S) log weight of each token in its chunk's
end state, i, m_t, den, norm, dden (BH, S) float32; chunk-border states C (BH, NS, DHQK, DHHV) in the state-buffer
dtype (the compute dtype, float32 for float16), n (BH, NS, DHQK) and m (BH, NC + 1) float32, and their gradients
dC (BH, NC + 1, DHQK, DHHV) in the state-buffer dtype, dn (BH, NC + 1, DHQK) float32. dq, dk, dv are written in
their output buffers' dtype (the gradient dtype); the dq and dk kernels also write the float32 row dot products
q_t·dq_t, k_s·dk_s of their head-dim block, (BH, n_blocks, S).
A program id over (chunk, row block) is `kc * NB + jb`. CAREFUL (BH, NC) int32 marks the chunks whose k or v hold a
NaN or inf (chunk_math.nonfinite_chunks; see tile_ops).
The forward keeps a running max (starting from the inter-chunk log weight b_t + m_{k-1}, always finite, so a
fully masked tile row cannot produce NaN) less the row's vecB_lo (tile_ops.log_decay); the backward uses the stored
per-token stabilizer m_t, shifted the same way for the intra-chunk weights.
"""

import triton
import triton.language as tl

from xlstm_jax.kernels.triton.tile_ops import column_blocks_adjacent, dot_in, finite_values, log_decay, normalized


@triton.jit
def _log_decay(rq, rs, b_q, VEC_B, VEC_BL, I, bh, S: tl.constexpr):
    """(LQ, LKV) log weights F_{t,s} + i_s of key rows rs in query rows rq of one chunk less the rows' vecB_lo
    (tile_ops.log_decay); -inf above the diagonal."""
    rows = bh * S + rs
    ic = tl.load(I + rows) - tl.load(VEC_BL + rows)
    return log_decay(b_q[:, None], tl.load(VEC_B + rows)[None, :], ic[None, :], rq[:, None] >= rs[None, :])


@triton.jit
def _xl_fw_tile(
    S_QK, num, den, m_run, hit, b_q, rq, rs, V, VEC_B, VEC_BL, I, bh, rv, mv,
    S: tl.constexpr, DHHV: tl.constexpr, QK_SCALE: tl.constexpr, CAREFUL: tl.constexpr, MAX_STATE: tl.constexpr,
):
    """Fold one (LQ, LKV) tile of q·k scores S_QK into the running (num, den, m_run) with the online max (m_run:
    the running max less the rows' vecB_lo; without MAX_STATE a fixed stabilizer); CAREFUL (see tile_ops): select
    acausal entries away and mark in `hit` the query rows that see a value row holding a NaN or inf."""
    log_d = _log_decay(rq, rs, b_q, VEC_B, VEC_BL, I, bh, S)
    if MAX_STATE:
        m_new = tl.maximum(m_run, tl.max(log_d, axis=1))
        alpha = tl.exp(m_run - m_new)
    else:
        m_new = m_run
    s_bar = S_QK * QK_SCALE * tl.exp(log_d - m_new[:, None])
    v = tl.load(V + bh * S * DHHV + rs[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
    if CAREFUL:
        causal = rq[:, None] >= rs[None, :]
        s_bar = tl.where(causal, s_bar, 0.0)
        v, tile_hit = finite_values(v, causal)
        hit = tl.maximum(hit, tile_hit)
    if MAX_STATE:
        num = num * alpha[:, None]
        den = den * alpha
    num += dot_in(s_bar, v, v.dtype)
    den += tl.sum(s_bar, axis=1)
    return num, den, m_new, hit


@triton.jit
def mlstm_xl_fw_parallel_kernel(
    Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL, CAREFUL,
    H, DEN, M_OUT,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, EPS: tl.constexpr, NORM_VAL: tl.constexpr, STABILIZE_CORRECTLY: tl.constexpr,
    MAX_STATE: tl.constexpr = True,
):
    """Grid (BH, NC * L / LQ, cdiv(DHHV, BV)): one (LQ, BV) output tile; loops over key tiles up to the diagonal.
    Chunks marked in CAREFUL run the careful variant of the body (see tile_ops), the others the plain one; each is
    compiled on its own. Without MAX_STATE the rows' stabilizer is the chunk's incoming m, not a running max."""
    if tl.load(CAREFUL + tl.program_id(0).to(tl.int64) * NC + tl.program_id(1) // (L // LQ)) != 0:
        _xl_fw_output_tile(Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL, H, DEN, M_OUT, NC, NS, L, DHQK, DHHV, LQ,
                           LKV, BK, BV, QK_SCALE, EPS, NORM_VAL, STABILIZE_CORRECTLY, True, MAX_STATE)
    else:
        _xl_fw_output_tile(Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL, H, DEN, M_OUT, NC, NS, L, DHQK, DHHV, LQ,
                           LKV, BK, BV, QK_SCALE, EPS, NORM_VAL, STABILIZE_CORRECTLY, False, MAX_STATE)


@triton.jit
def _xl_fw_output_tile(
    Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL, H, DEN, M_OUT,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, EPS: tl.constexpr, NORM_VAL: tl.constexpr, STABILIZE_CORRECTLY: tl.constexpr,
    CAREFUL: tl.constexpr, MAX_STATE: tl.constexpr,
):
    """The body of mlstm_xl_fw_parallel_kernel. The first key tile shares its q loads with the inter-chunk part q·C,
    q·n."""
    bh = tl.program_id(0).to(tl.int64)
    kc = tl.program_id(1) // (L // LQ)
    jq = tl.program_id(1) % (L // LQ)
    iv = tl.program_id(2)
    S: tl.constexpr = NC * L
    rq = kc * L + jq * LQ + tl.arange(0, LQ)
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < DHHV
    state = bh * NS + kc

    num = tl.zeros((LQ, BV), dtype=tl.float32)
    den = tl.zeros((LQ,), dtype=tl.float32)
    hit = tl.zeros((LQ,), dtype=tl.int32)
    rs = kc * L + tl.arange(0, LKV)
    s_qk = tl.zeros((LQ, LKV), dtype=tl.float32)
    for jk in range(tl.cdiv(DHQK, BK)):
        rk = jk * BK + tl.arange(0, BK)
        mk = rk < DHQK
        q = tl.load(Q + bh * S * DHQK + rq[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
        c = tl.load(
            C_ALL + state * DHQK * DHHV + rk[:, None] * DHHV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        )
        k_t = tl.load(K + bh * S * DHQK + rs[None, :] * DHQK + rk[:, None], mask=mk[:, None], other=0.0)
        num += dot_in(q, c, q.dtype)
        den += tl.sum(q.to(tl.float32) * tl.load(N_ALL + state * DHQK + rk, mask=mk, other=0.0)[None, :], axis=1)
        s_qk += tl.dot(q, k_t, input_precision="ieee")
    num = num * QK_SCALE
    den = den * QK_SCALE
    b_q = tl.load(VEC_B + bh * S + rq)  # loaded after the loop: live across it, it would spill
    m_prev = tl.load(M_ALL + bh * (NC + 1) + kc)
    if MAX_STATE:
        m_run = b_q + m_prev
    else:  # the inter-chunk part weighs e^{b_t} (b_t = vecB_t + vecB_lo_t) against the fixed stabilizer
        bl_q = tl.load(VEC_BL + bh * S + rq)
        m_run = m_prev - bl_q
        inter = tl.exp(b_q + bl_q)
        num = num * inter[:, None]
        den = den * inter
    num, den, m_run, hit = _xl_fw_tile(s_qk, num, den, m_run, hit, b_q, rq, rs, V, VEC_B, VEC_BL, I, bh, rv, mv,
                                       S, DHHV, QK_SCALE, CAREFUL, MAX_STATE)

    for jkv in range(1, ((jq + 1) * LQ + LKV - 1) // LKV):
        rs = kc * L + jkv * LKV + tl.arange(0, LKV)
        s_qk = tl.zeros((LQ, LKV), dtype=tl.float32)
        for jk in range(tl.cdiv(DHQK, BK)):
            rk = jk * BK + tl.arange(0, BK)
            mk = rk < DHQK
            q = tl.load(Q + bh * S * DHQK + rq[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
            k_t = tl.load(K + bh * S * DHQK + rs[None, :] * DHQK + rk[:, None], mask=mk[:, None], other=0.0)
            s_qk += tl.dot(q, k_t, input_precision="ieee")
        num, den, m_run, hit = _xl_fw_tile(s_qk, num, den, m_run, hit, b_q, rq, rs, V, VEC_B, VEC_BL, I, bh, rv, mv,
                                           S, DHHV, QK_SCALE, CAREFUL, MAX_STATE)

    m_t = m_run + tl.load(VEC_BL + bh * S + rq)
    h = normalized(num, den, m_t, NORM_VAL, STABILIZE_CORRECTLY, EPS)
    if CAREFUL:
        h = tl.where(hit[:, None] > 0, float("nan"), h)
    tl.store(H + bh * S * DHHV + rq[:, None] * DHHV + rv[None, :], h.to(H.dtype.element_ty), mask=mv[None, :])
    tl.store(DEN + bh * S + rq, den, mask=iv == 0)
    tl.store(M_OUT + bh * S + rq, m_t, mask=iv == 0)


@triton.jit
def mlstm_xl_bw_dq_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, I, M_OUT, NORM, DDEN, C_ALL, N_ALL, M_ALL,
    DQ, QDQ,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr,
):
    """Grid (BH, NC * L / LQ, cdiv(DHQK, BK)): one (LQ, BK) tile of dq and its part of q_t·dq_t; loops over key
    tiles up to the diagonal."""
    bh, row_block, jb = column_blocks_adjacent()
    kc = row_block // (L // LQ)
    jq = row_block % (L // LQ)
    S: tl.constexpr = NC * L
    rq = kc * L + jq * LQ + tl.arange(0, LQ)
    rk = jb * BK + tl.arange(0, BK)
    mk = rk < DHQK
    b_q = tl.load(VEC_B + bh * S + rq)
    m_q = tl.load(M_OUT + bh * S + rq)
    m_shift = m_q - tl.load(VEC_BL + bh * S + rq)
    norm = tl.load(NORM + bh * S + rq)
    dden = tl.load(DDEN + bh * S + rq)
    m_prev = tl.load(M_ALL + bh * (NC + 1) + kc)
    state = bh * NS + kc
    dtype = K.dtype.element_ty

    dq = tl.zeros((LQ, BK), dtype=tl.float32)
    for jkv in range(((jq + 1) * LQ + LKV - 1) // LKV):
        rs = kc * L + jkv * LKV + tl.arange(0, LKV)
        dp = tl.zeros((LQ, LKV), dtype=tl.float32)
        for jv in range(tl.cdiv(DHHV, BV)):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < DHHV
            dh = tl.load(DH + bh * S * DHHV + rq[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
            v_t = tl.load(V + bh * S * DHHV + rs[None, :] * DHHV + rv[:, None], mask=mv[:, None], other=0.0)
            dp += dot_in(dh.to(tl.float32) / norm[:, None], v_t, dtype)
        log_d = _log_decay(rq, rs, b_q, VEC_B, VEC_BL, I, bh, S)
        ds = (dp + dden[:, None]) * tl.exp(log_d - m_shift[:, None])
        k = tl.load(K + bh * S * DHQK + rs[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
        dq += dot_in(ds, k, dtype)

    hc = tl.zeros((LQ, BK), dtype=tl.float32)
    for jv in range(tl.cdiv(DHHV, BV)):
        rv = jv * BV + tl.arange(0, BV)
        mv = rv < DHHV
        dh = tl.load(DH + bh * S * DHHV + rq[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
        c_t = tl.load(
            C_ALL + state * DHQK * DHHV + rk[None, :] * DHHV + rv[:, None], mask=mk[None, :] & mv[:, None], other=0.0
        )
        hc += dot_in(dh.to(tl.float32) / norm[:, None], c_t, dtype)
    n = tl.load(N_ALL + state * DHQK + rk, mask=mk, other=0.0)
    inter = tl.exp(b_q + m_prev - m_q)
    dq = (dq + inter[:, None] * (hc + dden[:, None] * n[None, :])) * QK_SCALE
    q = tl.load(Q + bh * S * DHQK + rq[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
    tl.store(DQ + bh * S * DHQK + rq[:, None] * DHQK + rk[None, :], dq.to(DQ.dtype.element_ty), mask=mk[None, :])
    tl.store(QDQ + (bh * tl.num_programs(2) + jb) * S + rq, tl.sum(q.to(tl.float32) * dq, axis=1))


@triton.jit
def _xl_dkdv_tile(
    Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL, DN_ALL,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr,
    WANT_DK: tl.constexpr, BO: tl.constexpr,
):
    """Grid (BH, NC * L / LKV, cdiv(D_out, BO)): the program's (LKV, BO) float32 tile of dk (WANT_DK) or dv, with
    bh, its key rows rs, output columns ro and column block jb (programs renumbered: tile_ops.column_blocks_adjacent);
    loops over query tiles from the diagonal to the chunk end; every L x L tile is built transposed."""
    bh, row_block, jb = column_blocks_adjacent()
    kc = row_block // (L // LKV)
    jkv = row_block % (L // LKV)
    S: tl.constexpr = NC * L
    D_OUT: tl.constexpr = DHQK if WANT_DK else DHHV
    rs = kc * L + jkv * LKV + tl.arange(0, LKV)
    ro = jb * BO + tl.arange(0, BO)
    mo = ro < D_OUT
    b_s = tl.load(VEC_B + bh * S + rs)
    ic_s = tl.load(I + bh * S + rs) - tl.load(VEC_BL + bh * S + rs)
    state = bh * (NC + 1) + kc + 1
    dtype = K.dtype.element_ty

    acc = tl.zeros((LKV, BO), dtype=tl.float32)
    for jq in range((jkv * LKV) // LQ, L // LQ):
        rq = kc * L + jq * LQ + tl.arange(0, LQ)
        m_q = tl.load(M_OUT + bh * S + rq)
        norm = tl.load(NORM + bh * S + rq)
        causal_t = rq[None, :] >= rs[:, None]
        m_shift = m_q - tl.load(VEC_BL + bh * S + rq)
        d_t = tl.exp(log_decay(tl.load(VEC_B + bh * S + rq)[None, :], b_s[:, None], ic_s[:, None], causal_t)
                     - m_shift[None, :])
        w_t = tl.zeros((LKV, LQ), dtype=tl.float32)
        if WANT_DK:  # dS^T = (V dH^T / norm + dden) * D^T, then dS^T @ Q
            for jv in range(tl.cdiv(DHHV, BV)):
                rv = jv * BV + tl.arange(0, BV)
                mv = rv < DHHV
                v = tl.load(V + bh * S * DHHV + rs[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
                dh_t = tl.load(DH + bh * S * DHHV + rq[None, :] * DHHV + rv[:, None], mask=mv[:, None], other=0.0)
                w_t += dot_in(v, dh_t.to(tl.float32) / norm[None, :], dtype)
            w_t = (w_t + tl.load(DDEN + bh * S + rq)[None, :]) * d_t
            x = tl.load(Q + bh * S * DHQK + rq[:, None] * DHQK + ro[None, :], mask=mo[None, :], other=0.0)
        else:  # (S * D)^T @ dH / norm
            for jk in range(tl.cdiv(DHQK, BK)):
                rk = jk * BK + tl.arange(0, BK)
                mk = rk < DHQK
                k = tl.load(K + bh * S * DHQK + rs[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
                q_t = tl.load(Q + bh * S * DHQK + rq[None, :] * DHQK + rk[:, None], mask=mk[:, None], other=0.0)
                w_t += tl.dot(k, q_t, input_precision="ieee")
            w_t = w_t * d_t
            x = tl.load(DH + bh * S * DHHV + rq[:, None] * DHHV + ro[None, :], mask=mo[None, :], other=0.0)
            x = x.to(tl.float32) / norm[:, None]
        acc += dot_in(w_t, x, dtype)
    acc = acc * QK_SCALE

    inter = tl.zeros((LKV, BO), dtype=tl.float32)
    if WANT_DK:  # e^{a_s - m_k} (V dC^T + dn)
        for jv in range(tl.cdiv(DHHV, BV)):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < DHHV
            v = tl.load(V + bh * S * DHHV + rs[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
            dc_t = tl.load(DC_ALL + state * DHQK * DHHV + ro[None, :] * DHHV + rv[:, None],
                           mask=mo[None, :] & mv[:, None], other=0.0)
            inter += dot_in(v, dc_t, dtype)
        inter += tl.load(DN_ALL + state * DHQK + ro, mask=mo, other=0.0)[None, :]
    else:  # e^{a_s - m_k} K dC
        for jk in range(tl.cdiv(DHQK, BK)):
            rk = jk * BK + tl.arange(0, BK)
            mk = rk < DHQK
            k = tl.load(K + bh * S * DHQK + rs[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
            dc = tl.load(DC_ALL + state * DHQK * DHHV + rk[:, None] * DHHV + ro[None, :],
                         mask=mk[:, None] & mo[None, :], other=0.0)
            inter += dot_in(k, dc, dtype)
    abar = tl.exp(tl.load(VEC_A + bh * S + rs) - tl.load(M_ALL + bh * (NC + 1) + kc + 1))
    return acc + abar[:, None] * inter, bh, rs, ro, jb


@triton.jit
def mlstm_xl_bw_dk_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL, DN_ALL,
    DK, KDK,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, BO: tl.constexpr,
):
    """Grid (BH, NC * L / LKV, cdiv(DHQK, BO)): one (LKV, BO) tile of dk and its part of k_s·dk_s."""
    dk, bh, rs, ro, jb = _xl_dkdv_tile(Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL,
                                       DN_ALL, NC, L, DHQK, DHHV, LQ, LKV, BK, BV, QK_SCALE, True, BO)
    S: tl.constexpr = NC * L
    mo = ro < DHQK
    k = tl.load(K + bh * S * DHQK + rs[:, None] * DHQK + ro[None, :], mask=mo[None, :], other=0.0)
    tl.store(DK + bh * S * DHQK + rs[:, None] * DHQK + ro[None, :], dk.to(DK.dtype.element_ty), mask=mo[None, :])
    tl.store(KDK + (bh * tl.num_programs(2) + jb) * S + rs, tl.sum(k.to(tl.float32) * dk, axis=1))


@triton.jit
def mlstm_xl_bw_dv_kernel(
    Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL, DN_ALL,
    DV,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    LQ: tl.constexpr, LKV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, BO: tl.constexpr,
):
    """Grid (BH, NC * L / LKV, cdiv(DHHV, BO)): one (LKV, BO) tile of dv."""
    dv, bh, rs, ro, _ = _xl_dkdv_tile(Q, K, V, DH, VEC_B, VEC_BL, VEC_A, I, M_OUT, NORM, DDEN, M_ALL, DC_ALL,
                                      DN_ALL, NC, L, DHQK, DHHV, LQ, LKV, BK, BV, QK_SCALE, False, BO)
    S: tl.constexpr = NC * L
    tl.store(DV + bh * S * DHHV + rs[:, None] * DHHV + ro[None, :], dv.to(DV.dtype.element_ty),
             mask=(ro < DHHV)[None, :])
