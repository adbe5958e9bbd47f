"""Forward output kernel of the limit-chunk family (the chunk-border states: ../recurrence_kernels.py).

Layouts (BH = B·NH flattened, S = NC·L padded, all contiguous):
q, k (BH, S, DHQK), v (BH, S, DHHV) in the compute dtype; vecA, vecB, vecB_lo (BH, S) and scaG (BH, NC) float32
gate cumsums (chunk_math.chunk_gates); states C (BH, NS, DHQK, DHHV) in the state-buffer dtype (the compute dtype, float32
for float16), n (BH, NS, DHQK) float32 where NS = NC + 1 (index k: state before chunk k, index NC: last state) or
NS = NC (last state sliced off); m (BH, NC + 1) float32.
The output kernels write h (BH, S, DHHV), the signed denominator q̂·ñ and the stabilizer m_t (BH, S) float32: one
program a chunk (`mlstm_fw_parallel_kernel`), or one program walking several chunks in a software-pipelined loop
(`mlstm_fw_chunk_loop_kernel`; launch table field limit.chunks_per_program).
Addressing: every per-(b, h) base offset is int64. TMA: the q, k and v tiles through TMA tensor descriptors
(tile_ops.token_rows; launch table field limit.tma), else pointer loads.
"""

import triton
import triton.language as tl

from xlstm_jax.kernels.triton.tile_ops import (dot_in, finite_values, log_decay, normalized, row_tile,
                                               row_tile_t, token_rows)


@triton.jit
def mlstm_fw_parallel_kernel(
    Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL,
    H, DEN, M_OUT,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, EPS: tl.constexpr, NORM_VAL: tl.constexpr,
    STABILIZE_CORRECTLY: tl.constexpr, MAX_STATE: tl.constexpr = True, TMA: tl.constexpr = False,
):
    """Grid (BH, NC, cdiv(DHHV, BV)): the (L, BV) output tile of one chunk, intra-chunk L x L tile in registers.
    A NaN or inf in any input at token s reaches no earlier token: every chunk takes the careful path of tile_ops
    (acausal entries selected away, non-finite value rows zeroed and their query rows set to NaN). Unlike the xl
    kernels this one has no per-chunk branch between a plain and a careful body: with that branch around its
    pipelined loop (num_stages 2, triton 3.6) one executable gave different h from call to call on the H200
    (docs/kernels.md, non-finite inputs); the xl kernels' branch (num_stages 1) did not. Without MAX_STATE
    the row stabilizer is the chunk's incoming m (no row max: mLSTMsig, whose weights are all <= 1)."""
    bh = tl.program_id(0).to(tl.int64)
    kc = tl.program_id(1)
    iv = tl.program_id(2)
    S: tl.constexpr = NC * L
    rt = tl.arange(0, L)
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < DHHV
    tok = kc * L + rt
    state = bh * NS + kc
    q_rows = token_rows(Q, bh, S, DHQK, TMA)
    k_rows = token_rows(K, bh, S, DHQK, TMA)

    s_qk = tl.zeros((L, L), dtype=tl.float32)
    qc = tl.zeros((L, BV), dtype=tl.float32)
    qn = tl.zeros((L,), dtype=tl.float32)
    for jk in range(tl.cdiv(DHQK, BK)):
        s_qk, qc, qn = _head_block(s_qk, qc, qn, q_rows, k_rows, C_ALL, N_ALL, state, kc, jk, rv, mv, L, DHQK, DHHV,
                                   BK, TMA)
    _chunk_output(s_qk, qc, qn, V, VEC_B, VEC_BL, I, M_ALL, H, DEN, M_OUT, bh, kc, iv, rt, tok, rv, mv, NC, L, DHHV,
                  BV, QK_SCALE, EPS, NORM_VAL, STABILIZE_CORRECTLY, MAX_STATE, TMA)


@triton.jit
def mlstm_fw_chunk_loop_kernel(
    Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL,
    H, DEN, M_OUT,
    NC: tl.constexpr, NS: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr, EPS: tl.constexpr, NORM_VAL: tl.constexpr,
    STABILIZE_CORRECTLY: tl.constexpr, MAX_STATE: tl.constexpr = True, TMA: tl.constexpr = False,
    CHUNKS: tl.constexpr = 2, STAGES: tl.constexpr = 2,
):
    """Grid (BH, cdiv(NC, CHUNKS), cdiv(DHHV, BV)): `mlstm_fw_parallel_kernel`'s tiles of CHUNKS consecutive chunks
    in one program. The loop over chunks is software-pipelined over STAGES (the head-dim loop inside is unrolled,
    so the next chunk's q, k, C and v tiles load while this chunk's are used): the one-chunk kernel exposes each
    chunk's load latency, with at most two programs an SM at its register count."""
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(2)
    S: tl.constexpr = NC * L
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < DHHV
    q_rows = token_rows(Q, bh, S, DHQK, TMA)
    k_rows = token_rows(K, bh, S, DHQK, TMA)
    first = tl.program_id(1) * CHUNKS
    for kc in tl.range(first, tl.minimum(first + CHUNKS, NC), num_stages=STAGES):
        state = bh * NS + kc
        s_qk = tl.zeros((L, L), dtype=tl.float32)
        qc = tl.zeros((L, BV), dtype=tl.float32)
        qn = tl.zeros((L,), dtype=tl.float32)
        for jk in tl.static_range((DHQK + BK - 1) // BK):
            s_qk, qc, qn = _head_block(s_qk, qc, qn, q_rows, k_rows, C_ALL, N_ALL, state, kc, jk, rv, mv, L, DHQK,
                                       DHHV, BK, TMA)
        rt = tl.arange(0, L)
        _chunk_output(s_qk, qc, qn, V, VEC_B, VEC_BL, I, M_ALL, H, DEN, M_OUT, bh, kc, iv, rt, kc * L + rt, rv, mv, NC,
                      L, DHHV, BV, QK_SCALE, EPS, NORM_VAL, STABILIZE_CORRECTLY, MAX_STATE, TMA)


@triton.jit
def _chunk_output(
    s_qk, qc, qn, V, VEC_B, VEC_BL, I, M_ALL, H, DEN, M_OUT, bh, kc, iv, rt, tok, rv, mv,
    NC: tl.constexpr, L: tl.constexpr, DHHV: tl.constexpr, BV: tl.constexpr, QK_SCALE: tl.constexpr,
    EPS: tl.constexpr, NORM_VAL: tl.constexpr, STABILIZE_CORRECTLY: tl.constexpr, MAX_STATE: tl.constexpr,
    TMA: tl.constexpr,
):
    """Chunk kc's (L, BV) output tile (column block iv; rows rt = arange(L), tokens tok, columns rv, mask mv) from
    its q·k scores s_qk (L, L), q·C (L, BV) and q·n (L,), all float32 and unscaled: the decay weights, the value
    product, the denominator and the stores."""
    S: tl.constexpr = NC * L
    # the per-token gate vectors are loaded after the head-dim loop: live across it they would spill
    b = tl.load(VEC_B + bh * S + tok)
    ic = tl.load(I + bh * S + tok) - tl.load(VEC_BL + bh * S + tok)
    m_prev = tl.load(M_ALL + bh * (NC + 1) + kc)
    causal = rt[:, None] >= rt[None, :]
    # log weights and the stabilizer less bl_t (tile_ops.log_decay); m_t = m_s + bl_t
    log_d = log_decay(b[:, None], b[None, :], ic[None, :], causal)
    if MAX_STATE:
        m_s = tl.maximum(b + m_prev, tl.max(log_d, axis=1))
    else:
        m_s = m_prev - tl.load(VEC_BL + bh * S + tok)
    s_bar = s_qk * QK_SCALE * tl.exp(log_d - m_s[:, None])
    inter = tl.exp(b + m_prev - m_s) * QK_SCALE
    v = row_tile(token_rows(V, bh, S, DHHV, TMA), kc * L, iv * BV, DHHV, L, BV, TMA)
    s_bar = tl.where(causal, s_bar, 0.0)
    v, hit = finite_values(v, causal)
    num = inter[:, None] * qc + dot_in(s_bar, v, v.dtype)
    den = inter * qn + tl.sum(s_bar, axis=1)
    m_t = m_s + tl.load(VEC_BL + bh * S + tok)
    h = normalized(num, den, m_t, NORM_VAL, STABILIZE_CORRECTLY, EPS)
    h = tl.where(hit[:, None] > 0, float("nan"), h)
    tl.store(H + bh * S * DHHV + tok[:, None] * DHHV + rv[None, :], h.to(H.dtype.element_ty), mask=mv[None, :])
    tl.store(DEN + bh * S + tok, den, mask=(rt < L) & (iv == 0))
    tl.store(M_OUT + bh * S + tok, m_t, mask=(rt < L) & (iv == 0))


@triton.jit
def _head_block(
    s_qk, qc, qn, q_rows, k_rows, C_ALL, N_ALL, state, kc, jk, rv, mv,
    L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr,
):
    """Head-dim block jk of chunk kc added to its q·k scores s_qk (L, L), q·C (L, BV) and q·n (L,) (float32) with
    the state before the chunk (index `state` of C_ALL, N_ALL) in the columns rv of the output tile; the products
    in the compute dtype (q's, whether read through a pointer or a descriptor)."""
    rk = jk * BK + tl.arange(0, BK)
    mk = rk < DHQK
    q = row_tile(q_rows, kc * L, jk * BK, DHQK, L, BK, TMA)
    k_t = row_tile_t(k_rows, kc * L, jk * BK, DHQK, L, BK, TMA)
    c = tl.load(C_ALL + state * DHQK * DHHV + rk[:, None] * DHHV + rv[None, :], mask=mk[:, None] & mv[None, :],
                other=0.0)
    n = tl.load(N_ALL + state * DHQK + rk, mask=mk, other=0.0)
    s_qk += tl.dot(q, k_t, input_precision="ieee")
    qc += dot_in(q, c, q.dtype)
    qn += tl.sum(q.to(tl.float32) * n[None, :], axis=1)
    return s_qk, qc, qn
