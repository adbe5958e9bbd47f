"""The state recurrences both Triton chunkwise families run (kernels of no family): the chunk-border states of
the forward and their cotangents in the backward, one (BK, BV) tile of C per program, looping over the chunks.

Layouts (BH = B·NH flattened, S = NC·L padded, all contiguous): k, q (BH, S, DHQK), v, dh (BH, S, DHHV) in the
compute dtype; the gate vectors (BH, S) and chunk totals (BH, NC) float32 (chunk_math.chunk_gates at the recurrence's
granularity L); states and their cotangents C (BH, NS, DHQK, DHHV) in the state-buffer dtype, n (BH, NS, DHQK) and
m float32. Addressing: every per-(b, h) base offset is int64.
"""

import dataclasses

import triton
import triton.language as tl

from xlstm_jax.kernels.triton.launch_table import LaunchParams, param
from xlstm_jax.kernels.triton.tile_ops import dot_in, row_tile, row_tile_t, state_tile, token_rows


@dataclasses.dataclass(frozen=True)
class RecurrentLaunch(LaunchParams):
    """Launch of the state recurrences (forward states, backward state cotangents), the table's "recurrent"
    section: head-dim tile (BK = BV), warps, software-pipelining stages, how many programs the sequence groups
    aim for (a sequence is split into groups of chunks walked at once until B·NH·tiles·groups reaches this many;
    sequence_groups.py; 1: one walk per sequence), and whether the token tiles (k, v; q, dh) are read through TMA
    tensor descriptors where the GPU and toolchain have them (core.tma_usable; 0: pointer loads)."""

    block: int = param("tile")
    warps: int = param("warps")
    stages: int = param("stages")
    programs: int = param("count")
    tma: int = param("flag")


@triton.jit
def mlstm_fw_recurrent_kernel(
    K, V, VEC_A, SCA_G, C0, N0, M0,
    C_ALL, N_ALL, M_ALL, C_LAST,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SAVE_EVERY: tl.constexpr = 1, GROUPS: tl.constexpr = 1, MAX_STATE: tl.constexpr = True, TMA: tl.constexpr = False,
):
    """Grid (BH, GROUPS, cdiv(DHQK, BK) * cdiv(DHHV, BV)): one (BK, BV) tile of C walks over the NC / GROUPS chunks
    of length L of its group, from the group's incoming state C0, N0 (BH, GROUPS, ...), M0 (BH, GROUPS). Without
    MAX_STATE the stabilizer stays at M0 (mLSTMsig: log gates <= 0 and M0 = 0, nothing grows).

    C and n are stored before every SAVE_EVERY-th chunk and at the end (NC // SAVE_EVERY + 1 states), m at every
    chunk border (NC + 1): the xl-chunk family runs this kernel on sub-chunks of its chunks. Each border is stored
    by the group that starts there, the last one by the last group. C is accumulated in float32 and stored in
    C_ALL's dtype (the parallel kernels only use C as a matmul operand); the last C is also written in float32 to
    C_LAST (BH, DHQK, DHHV). TMA: k and v tiles through tensor descriptors.
    """
    bh, grp, k0, v0, first_col, first_tile = state_tile(GROUPS, DHHV, BK, BV)
    S: tl.constexpr = NC * L
    NCG: tl.constexpr = NC // GROUPS
    is_last = grp == GROUPS - 1
    rt = tl.arange(0, L)
    rk = k0 + tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    mk = rk < DHQK
    c_off = rk[:, None] * DHHV + rv[None, :]
    c_mask = mk[:, None] & (rv < DHHV)[None, :]
    n_mask = mk & first_col

    start = bh * GROUPS + grp
    c = tl.load(C0 + start * DHQK * DHHV + c_off, mask=c_mask, other=0.0)
    n = tl.load(N0 + start * DHQK + rk, mask=mk, other=0.0)
    m = tl.load(M0 + start)
    k_rows = token_rows(K, bh, S, DHQK, TMA)
    v_rows = token_rows(V, bh, S, DHHV, TMA)
    NSAVE: tl.constexpr = NC // SAVE_EVERY + 1
    for j in range(NCG):
        kc = grp * NCG + j
        save = kc % SAVE_EVERY == 0
        tl.store(C_ALL + (bh * NSAVE + kc // SAVE_EVERY) * DHQK * DHHV + c_off, c.to(C_ALL.dtype.element_ty),
                 mask=c_mask & save)
        tl.store(N_ALL + (bh * NSAVE + kc // SAVE_EVERY) * DHQK + rk, n, mask=n_mask & save)
        tl.store(M_ALL + bh * (NC + 1) + kc, m, mask=first_tile)
        a = tl.load(VEC_A + bh * S + kc * L + rt)
        g = tl.load(SCA_G + bh * NC + kc)
        if MAX_STATE:
            m_new = tl.maximum(g + m, tl.max(a, axis=0))
        else:
            m_new = m
        k_t = row_tile_t(k_rows, kc * L, k0, DHQK, L, BK, TMA)
        v_c = row_tile(v_rows, kc * L, v0, DHHV, L, BV, TMA)
        kbar_t = k_t.to(tl.float32) * tl.exp(a - m_new)[None, :]
        decay = tl.exp(g + m - m_new)
        c = decay * c + dot_in(kbar_t, v_c, v_c.dtype)
        n = decay * n + tl.sum(kbar_t, axis=1)
        m = m_new
    tl.store(C_ALL + (bh * NSAVE + NSAVE - 1) * DHQK * DHHV + c_off, c.to(C_ALL.dtype.element_ty),
             mask=c_mask & is_last)
    tl.store(C_LAST + bh * DHQK * DHHV + c_off, c, mask=c_mask & is_last)
    tl.store(N_ALL + (bh * NSAVE + NSAVE - 1) * DHQK + rk, n, mask=n_mask & is_last)
    tl.store(M_ALL + bh * (NC + 1) + NC, m, mask=first_tile & is_last)


@triton.jit
def mlstm_bw_recurrent_kernel(
    Q, DH, VEC_B, M_OUT, NORM, DDEN, SCA_G, M_ALL, DC_LAST, DN_LAST,
    DC_ALL, DN_ALL, DC_FIRST,
    NC: tl.constexpr, L: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    QK_SCALE: tl.constexpr, SAVE_EVERY: tl.constexpr = 1, GROUPS: tl.constexpr = 1, TMA: tl.constexpr = False,
):
    """Grid (BH, GROUPS, cdiv(DHQK, BK) * cdiv(DHHV, BV)): one (BK, BV) tile of dC walks backwards over the
    NC / GROUPS chunks of length L of its group, from the cotangents DC_LAST, DN_LAST (BH, GROUPS, ...) at the
    group's end; dC, dn are stored after every SAVE_EVERY-th chunk and at the start (NC // SAVE_EVERY + 1 states),
    each border by the group that ends there, the first by the first group. dC is accumulated in float32 and stored
    in DC_ALL's dtype; the initial state's dC also in float32 to DC_FIRST (BH, DHQK, DHHV). TMA: q and dh tiles
    through tensor descriptors."""
    bh, grp, k0, v0, first_col, first_tile = state_tile(GROUPS, DHHV, BK, BV)
    S: tl.constexpr = NC * L
    NCG: tl.constexpr = NC // GROUPS
    is_first = grp == 0
    rt = tl.arange(0, L)
    rk = k0 + tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    mk = rk < DHQK
    mv = rv < DHHV
    c_off = rk[:, None] * DHHV + rv[None, :]
    c_mask = mk[:, None] & mv[None, :]
    n_mask = mk & first_col

    end = bh * GROUPS + grp
    dc = tl.load(DC_LAST + end * DHQK * DHHV + c_off, mask=c_mask, other=0.0)
    dn = tl.load(DN_LAST + end * DHQK + rk, mask=mk, other=0.0)
    q_rows = token_rows(Q, bh, S, DHQK, TMA)
    dh_rows = token_rows(DH, bh, S, DHHV, TMA)
    NSAVE: tl.constexpr = NC // SAVE_EVERY + 1
    for j in range(NCG):
        kc = grp * NCG + NCG - 1 - j
        save = (kc + 1) % SAVE_EVERY == 0
        tl.store(DC_ALL + (bh * NSAVE + (kc + 1) // SAVE_EVERY) * DHQK * DHHV + c_off, dc.to(DC_ALL.dtype.element_ty),
                 mask=c_mask & save)
        tl.store(DN_ALL + (bh * NSAVE + (kc + 1) // SAVE_EVERY) * DHQK + rk, dn, mask=n_mask & save)
        tok = kc * L + rt
        m_prev = tl.load(M_ALL + bh * (NC + 1) + kc)
        m_next = tl.load(M_ALL + bh * (NC + 1) + kc + 1)
        g = tl.load(SCA_G + bh * NC + kc)
        w = tl.exp(tl.load(VEC_B + bh * S + tok) + m_prev - tl.load(M_OUT + bh * S + tok)) * QK_SCALE
        q_t = row_tile_t(q_rows, kc * L, k0, DHQK, L, BK, TMA)
        qbar_t = q_t.to(tl.float32) * w[None, :]
        norm = tl.load(NORM + bh * S + tok)
        dh = row_tile(dh_rows, kc * L, v0, DHHV, L, BV, TMA).to(tl.float32) / norm[:, None]
        decay = tl.exp(g + m_prev - m_next)
        dc = decay * dc + dot_in(qbar_t, dh, q_t.dtype)
        dn = decay * dn + tl.sum(qbar_t * tl.load(DDEN + bh * S + tok)[None, :], axis=1)
    tl.store(DC_ALL + bh * NSAVE * DHQK * DHHV + c_off, dc.to(DC_ALL.dtype.element_ty), mask=c_mask & is_first)
    tl.store(DC_FIRST + bh * DHQK * DHHV + c_off, dc, mask=c_mask & is_first)
    tl.store(DN_ALL + bh * NSAVE * DHQK + rk, dn, mask=n_mask & is_first)
