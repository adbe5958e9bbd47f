"""The fused Triton mLSTM step (`xlstm_jax.mlstm_step(backend="triton")`); the math is in native.py. The kernel
reads C once and writes C' once (a grid of B·NH × DHHV/BV programs, each walking DHQK in BK rows), which is all the
memory traffic a step needs; C' can take C's buffer (input/output aliasing).
Shapes: q, k (B, NH, DHQK); v (B, NH, DHHV); C (B, NH, DHQK, DHHV); n (B, NH, DHQK); m and the gates (B, NH).
"""

from __future__ import annotations

import jax
import triton
import triton.language as tl

from xlstm_jax.kernels.base import qk_scale
from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.mlstm_step.native import step_gates


@triton.jit
def _step_kernel(Q, K, V, C, N, FB, IB, MN, H, C_OUT, N_OUT, SCALE: tl.constexpr, EPS: tl.constexpr,
                 DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid (BH, cdiv(DHHV, BV)): program (bh, j) updates C's columns j·BV.. of one (b, h) and writes their h; the
    programs j = 0 also write n'."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    f_bar = tl.load(FB + bh)
    i_bar = tl.load(IB + bh)
    m_new = tl.load(MN + bh)
    cols = j * BV + tl.arange(0, BV)
    col_ok = cols < DHHV
    v = tl.load(V + bh * DHHV + cols, mask=col_ok, other=0.0).to(tl.float32)
    num = tl.zeros((BV,), dtype=tl.float32)
    qn = tl.zeros((BK,), dtype=tl.float32)
    for r0 in range(0, DHQK, BK):
        rows = r0 + tl.arange(0, BK)
        row_ok = rows < DHQK
        q = tl.load(Q + bh * DHQK + rows, mask=row_ok, other=0.0).to(tl.float32) * SCALE
        k = tl.load(K + bh * DHQK + rows, mask=row_ok, other=0.0).to(tl.float32)
        at = bh * DHQK * DHHV + rows[:, None] * DHHV + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        c = tl.load(C + at, mask=ok, other=0.0).to(tl.float32)
        c = f_bar * c + i_bar * (k[:, None] * v[None, :])
        tl.store(C_OUT + at, c.to(C_OUT.dtype.element_ty), mask=ok)
        num += tl.sum(q[:, None] * c, axis=0)
        n = f_bar * tl.load(N + bh * DHQK + rows, mask=row_ok, other=0.0).to(tl.float32) + i_bar * k
        qn += q * n
        if j == 0:
            tl.store(N_OUT + bh * DHQK + rows, n.to(N_OUT.dtype.element_ty), mask=row_ok)
    den = tl.maximum(tl.abs(tl.sum(qn, axis=0)), tl.exp(tl.minimum(-m_new, 87.0))) + EPS
    tl.store(H + bh * DHHV + cols, (num / den).to(H.dtype.element_ty), mask=col_ok)


def _block(dim: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(dim)))


def step_triton(q, k, v, c, n, m, i, f, eps: float, *, block_v: int = 64, block_k: int = 64, num_warps: int = 4):
    """The fused step (one launch after the gate factors); same contract as `step_native`. block_v / block_k: the
    tile of C a program updates per iteration (columns, rows; capped at the head dims)."""
    B, NH, DHQK = q.shape
    DHHV = v.shape[-1]
    BH = B * NH
    f_bar, i_bar, m_new = step_gates(i, f, m)
    BV, BK = _block(DHHV, block_v), _block(DHQK, block_k)
    flat = [a.reshape(BH, *a.shape[2:]) for a in (q, k, v, c, n, f_bar, i_bar, m_new)]
    h, c_new, n_new = launch(
        _step_kernel, flat,
        [jax.ShapeDtypeStruct((BH, DHHV), q.dtype), jax.ShapeDtypeStruct((BH, DHQK, DHHV), c.dtype),
         jax.ShapeDtypeStruct((BH, DHQK), n.dtype)],
        grid=(triton.cdiv(DHHV, BV),), num_warps=num_warps, aliases={3: 1},
        SCALE=qk_scale(DHQK), EPS=float(eps), DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV,
    )
    return h.reshape(B, NH, DHHV), (c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.astype(m.dtype))
