"""Fused chunkwise mLSTM forward (both Triton families): one program walks the sequence in steps of LS tokens and
keeps its (DHQK, BV) slice of the state C, and n and m, on chip, so the chunk-border states never go to memory.

Each step computes the step's outputs from the state before it (inter part q·C, q·n) and the step's causal LS × LS
tile, then folds the step's keys and values into the state. This is the state recurrence and the per-chunk output
kernel of the limit family run as one, at chunk length LS; h, the signed denominator and the stabilizer m_t do not
depend on the chunk length (m_t is the running max of every log weight so far), so the backward of either family,
at its own chunk size, uses them unchanged. The backward recomputes its chunk-border states
(`recompute_states_in_bw=True`), so the forward stores none.

Layouts (BH = B·NH flattened, S = NS·LS padded, contiguous): q, k (BH, S, DHQK), v (BH, S, DHHV); vecB, vecA (BH, S)
float32 within-step cumsum of log forget gates and log weight of each token in its step's end state, scaG (BH, NS)
float32 total log decay of each step, i (BH, S) float32; initial states C0 (BH, DHQK, DHHV), n0 (BH, DHQK), m0 (BH,)
float32. Outputs: h (BH, S, DHHV) in H's dtype, den and m_t (BH, S) float32, last states C (BH, DHQK, DHHV),
n (BH, DHQK), m (BH,) float32.
"""

import triton
import triton.language as tl


@triton.jit
def mlstm_fused_fw_kernel(
    Q, K, V, VEC_B, VEC_A, SCA_G, I, C0, N0, M0,
    H, DEN, M_OUT, C_LAST, N_LAST, M_LAST,
    NS: tl.constexpr, LS: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, EPS: tl.constexpr, NORM_VAL: tl.constexpr, STABILIZE_CORRECTLY: tl.constexpr,
):
    """Grid (BH, cdiv(DHHV, BV)): one (DHQK, BV) slice of C walks the NS steps; BK >= DHQK (the whole head dim)."""
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    S: tl.constexpr = NS * LS
    rt = tl.arange(0, LS)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DHQK
    mv = rv < DHHV
    first = iv == 0
    c_off = bh * DHQK * DHHV + rk[:, None] * DHHV + rv[None, :]
    c_mask = mk[:, None] & mv[None, :]
    causal = rt[:, None] >= rt[None, :]

    c = tl.load(C0 + c_off, mask=c_mask, other=0.0)
    n = tl.load(N0 + bh * DHQK + rk, mask=mk, other=0.0)
    m = tl.load(M0 + bh)
    for step in range(NS):
        tok = step * LS + rt
        q = tl.load(Q + bh * S * DHQK + tok[:, None] * DHQK + rk[None, :], mask=mk[None, :], other=0.0)
        k_t = tl.load(K + bh * S * DHQK + tok[None, :] * DHQK + rk[:, None], mask=mk[:, None], other=0.0)
        v = tl.load(V + bh * S * DHHV + tok[:, None] * DHHV + rv[None, :], mask=mv[None, :], other=0.0)
        b = tl.load(VEC_B + bh * S + tok)
        a = tl.load(VEC_A + bh * S + tok)
        ig = tl.load(I + bh * S + tok)
        g = tl.load(SCA_G + bh * NS + step)

        # outputs of this step from the state before it and the step's causal tile
        log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :], float("-inf"))
        m_t = tl.maximum(b + m, tl.max(log_d, axis=1))
        s_bar = tl.dot(q, k_t, input_precision="ieee") * QK_SCALE * tl.exp(log_d - m_t[:, None])
        inter = tl.exp(b + m - m_t) * QK_SCALE
        num = inter[:, None] * tl.dot(q, c.to(q.dtype), input_precision="ieee")
        num += tl.dot(s_bar.to(v.dtype), v, input_precision="ieee")
        den = inter * tl.sum(q.to(tl.float32) * n[None, :], axis=1) + tl.sum(s_bar, axis=1)
        if STABILIZE_CORRECTLY:
            lower = NORM_VAL * tl.exp(-m_t)
        else:
            lower = tl.full((LS,), NORM_VAL, tl.float32)
        h = num / (tl.maximum(tl.abs(den), lower) + EPS)[:, None]
        tl.store(H + bh * S * DHHV + tok[:, None] * DHHV + rv[None, :], h.to(H.dtype.element_ty), mask=mv[None, :])
        tl.store(DEN + bh * S + tok, den, mask=first & (rt < LS))
        tl.store(M_OUT + bh * S + tok, m_t, mask=first & (rt < LS))

        # fold the step into the state
        m_new = tl.maximum(g + m, tl.max(a, axis=0))
        kbar_t = k_t.to(tl.float32) * tl.exp(a - m_new)[None, :]
        decay = tl.exp(g + m - m_new)
        c = decay * c + tl.dot(kbar_t.to(v.dtype), v, input_precision="ieee")
        n = decay * n + tl.sum(kbar_t, axis=1)
        m = m_new
    tl.store(C_LAST + c_off, c, mask=c_mask)
    tl.store(N_LAST + bh * DHQK + rk, n, mask=mk & first)
    tl.store(M_LAST + bh, m, mask=first)
