"""The fused Triton mLSTM step (`xlstm_jax.mlstm_step(backend="triton")`); the math is in native.py. The kernel
reads C once and writes C' once (a grid of B·NH × DHHV/BV programs, each walking DHQK in BK rows), which is all the
memory traffic a step needs; C' takes C's buffer (input/output aliasing: updated in place when the caller does not
keep C, e.g. a donated pool or a decode loop's carry; XLA copies C first otherwise).
Shapes: q, k (B, NH, DHQK); v (B, NH, DHHV); C (B, NH, DHQK, DHHV); n (B, NH, DHQK); m and the gates (B, NH).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from xlstm_jax.kernels.base import log_forget_floor, qk_scale
from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.sharding import per_batch_head


@triton.jit
def _step_kernel(Q, K, V, C, N, M, I, F, C_OUT, H, N_OUT, M_OUT, SCALE: tl.constexpr, EPS: tl.constexpr,
                 FLOOR: tl.constexpr, DHQK: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid (BH, cdiv(DHHV, BV)): program (bh, j) forms the gate factors of (b, h), updates C's columns j·BV.. in
    place and writes their h; the programs j = 0 also write n' and m'. C_OUT is aliased to C and starts as C (the
    launch layer's convention: C itself is not read)."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.load(I + bh).to(tl.float32)
    f = tl.load(F + bh).to(tl.float32)
    m = tl.load(M + bh)
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # log σ(f), floored as base.log_forget
    log_f = tl.where(log_f < FLOOR, FLOOR, log_f)
    m_new = tl.maximum(log_f + m, i)
    f_bar = tl.exp(log_f + m - m_new)
    i_bar = tl.exp(i - m_new)
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
        c = tl.load(C_OUT + at, mask=ok, other=0.0).to(tl.float32)
        c = f_bar * c + i_bar * (k[:, None] * v[None, :])
        tl.store(C_OUT + at, c.to(C_OUT.dtype.element_ty), mask=ok)
        num += tl.sum(q[:, None] * c, axis=0)
        n = f_bar * tl.load(N + bh * DHQK + rows, mask=row_ok, other=0.0).to(tl.float32) + i_bar * k
        qn += q * n
        if j == 0:
            tl.store(N_OUT + bh * DHQK + rows, n.to(N_OUT.dtype.element_ty), mask=row_ok)
    if j == 0:
        tl.store(M_OUT + bh, m_new)
    den = tl.maximum(tl.abs(tl.sum(qn, axis=0)), tl.exp(tl.minimum(-m_new, 87.0))) + EPS
    tl.store(H + bh * DHHV + cols, (num / den).to(H.dtype.element_ty), mask=col_ok)


def _block(dim: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(dim)))


def _step_arrays(eps: float, tiles: tuple[int, int, int, int], q, k, v, c, n, m, i, f):
    """The launch on arrays that all lead with (B, NH) (so `per_batch_head` can split them); tiles: (block_v,
    block_k, num_warps, num_stages)."""
    B, NH, DHQK = q.shape
    DHHV = v.shape[-1]
    BH = B * NH
    block_v, block_k, num_warps, num_stages = tiles
    BV, BK = _block(DHHV, block_v), _block(DHQK, block_k)
    flat = [a.reshape(BH, *a.shape[2:]) for a in (q, k, v, c, n, m)] + [g.reshape(BH) for g in (i, f)]
    c_new, h, n_new, m_new = launch(
        _step_kernel, flat,
        [jax.ShapeDtypeStruct((BH, DHQK, DHHV), c.dtype), jax.ShapeDtypeStruct((BH, DHHV), q.dtype),
         jax.ShapeDtypeStruct((BH, DHQK), n.dtype), jax.ShapeDtypeStruct((BH,), jnp.float32)],
        grid=(triton.cdiv(DHHV, BV),), num_warps=num_warps, num_stages=num_stages, aliases={3: 0},
        SCALE=qk_scale(DHQK), EPS=float(eps), FLOOR=log_forget_floor(jnp.float32), DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV,
    )
    return h.reshape(B, NH, DHHV), c_new.reshape(c.shape), n_new.reshape(n.shape), m_new.reshape(m.shape)


_step = per_batch_head(_step_arrays, n_static=2)


def step_triton(q, k, v, c, n, m, i, f, eps: float, *, block_v: int = 64, block_k: int = 64, num_warps: int = 4,
                num_stages: int = 1):
    """The fused step, gate factors included (one launch); same contract as `step_native`. block_v / block_k: the
    tile of C a program updates per iteration (columns, rows; capped at the head dims). Under jit, inputs split
    over B and/or NH run where they are (`per_batch_head`)."""
    h, c_new, n_new, m_new = _step(float(eps), (block_v, block_k, num_warps, num_stages), q, k, v, c, n, m, i, f)
    return h, (c_new, n_new, m_new)
