"""`x @ w` for a few rows x (M <= MAX_ROWS) against a large weight w: decoding's projections, bound by reading w
once. A grid of (column blocks × SPLIT slices of K) programs streams w in (BK, BN) tiles, each multiplied on the
tensor cores with x's rows padded to 16; the SPLIT partial sums (float32) are added in XLA. The reference is
reference.py. Shapes: x (M, K), w (K, N), one dtype; the result (M, N) float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from xlstm_jax.kernels.launch import launch

MAX_ROWS = 16  # rows of x one program multiplies (tl.dot's smallest tile)


@dataclasses.dataclass(frozen=True)
class SkinnyLaunch:
    """Output columns and K rows of a program's tile, K slices, warps and pipelining stages."""

    block_n: int = 128
    block_k: int = 128
    split: int = 8
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _skinny_kernel(X, W, OUT, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, KS: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """Grid (1, cdiv(N, BN), SPLIT): program (n, s) adds x[:, s·KS:(s+1)·KS] @ w[s·KS:(s+1)·KS, n·BN..] into
    OUT[s] (SPLIT, M, N) float32."""
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    rm = tl.arange(0, 16)
    rn = pn * BN + tl.arange(0, BN)
    rm_ok = rm < M
    rn_ok = rn < N
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for k0 in range(0, KS, BK):
        rk = ps * KS + k0 + tl.arange(0, BK)
        rk_ok = (rk < K) & (k0 + tl.arange(0, BK) < KS)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=rm_ok[:, None] & rk_ok[None, :], other=0.0)
        w = tl.load(W + rk[:, None].to(tl.int64) * N + rn[None, :], mask=rk_ok[:, None] & rn_ok[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    tl.store(OUT + (ps * M + rm[:, None]) * N + rn[None, :], acc, mask=rm_ok[:, None] & rn_ok[None, :])


def skinny_matmul_triton(x: jax.Array, w: jax.Array, p: SkinnyLaunch = SkinnyLaunch()) -> jax.Array:
    """x (M, K) @ w (K, N) -> (M, N) float32 for M <= MAX_ROWS; x and w in one dtype."""
    M, K = x.shape
    N = w.shape[1]
    if M > MAX_ROWS:
        raise ValueError(f"the skinny matmul takes at most {MAX_ROWS} rows of x, got {M}.")
    if w.shape[0] != K or w.dtype != x.dtype:
        raise ValueError(f"x {x.shape} {x.dtype} and w {w.shape} {w.dtype} do not multiply.")
    BK = min(p.block_k, max(16, triton.next_power_of_2(triton.cdiv(K, p.split))))
    KS = triton.cdiv(triton.cdiv(K, p.split), BK) * BK  # K rows per slice, whole tiles
    split = triton.cdiv(K, KS)
    (parts,) = launch(_skinny_kernel, [x[None], w[None]], [jax.ShapeDtypeStruct((1, split, M, N), jnp.float32)],
                      grid=(triton.cdiv(N, p.block_n), split), num_warps=p.num_warps, num_stages=p.num_stages,
                      M=M, K=K, N=N, KS=KS, BN=p.block_n, BK=BK)
    return jnp.sum(parts[0], axis=0)
