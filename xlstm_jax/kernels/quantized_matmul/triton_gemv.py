"""The dequantizing skinny matmul for decoding: y (M, N) = x (M, K) @ (wq (K, N) * scale (N,)) for M <= 16 rows,
wq int8 or float8 e4m3. Each program streams a (K range, BN) stripe of wq in (BK, BN) tiles, converts them to
x's dtype (exact: integers up to 127 and e4m3 values fit bfloat16 and float16), accumulates x · wq in float32 and
applies the column scales once at the end (the scale is per output channel, so it factors out of the sum over K).
Grid (1, cdiv(N, BN), SPLIT): SPLIT > 1 splits K (split-K) so that short, wide or narrow weights still give every
SM programs to run; the partial sums (float32) are added in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from xlstm_jax.kernels.launch import launch

MAX_ROWS = 16  # rows of x the kernel takes (decoding batches); more rows run the XLA path
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 / H200 (132 SMs)


@triton.jit
def _widened(w, dtype: tl.constexpr):
    """An int8 or float8 e4m3 tile in `dtype` (exact for float32, bfloat16, float16). int8 goes through the float32
    bit pattern of 2^23 + 128 + w (an integer add and a float subtract) rather than an integer-to-float
    conversion, which sm90 runs at a quarter of the rate of the adds (the CUDA guide's throughput table)."""
    if w.dtype == tl.int8:
        return ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0).to(dtype)
    return w.to(dtype)


@triton.jit
def _gemv_kernel(X, W, S, Y, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, K_SPLIT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (0, j, s): columns j·BN.. of rows k in [s·K_SPLIT, (s + 1)·K_SPLIT) ∩ [0, K); writes Y[s] (scaled).
    BM (16) rows through tl.dot, rows >= M masked, for one row too: on an H100 the 16-row tensor-core path took
    2.4-3.6x less time at M = 16 than a multiply-and-reduce over one row took at M = 1 (docs/benchmarks.md,
    "Weight-only int8 / fp8 matmuls")."""
    j = tl.program_id(1)
    s = tl.program_id(2)
    cols = j * BN + tl.arange(0, BN)
    col_ok = cols < N
    rows = tl.arange(0, BM)
    row_ok = rows < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(s * K_SPLIT, s * K_SPLIT + K_SPLIT, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        w = tl.load(W + ks.to(tl.int64)[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, _widened(w, X.dtype.element_ty), input_precision="ieee")
    scale = tl.load(S + cols, mask=col_ok, other=0.0)
    at = s * M * N + rows[:, None] * N + cols[None, :]
    tl.store(Y + at, (acc * scale[None, :]).to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def default_split(K: int, N: int, block_n: int, block_k: int) -> int:
    """Split-K factor that brings cdiv(N, block_n) column programs up to about TARGET_PROGRAMS, each split keeping
    at least 4 tiles of K."""
    columns = triton.cdiv(N, block_n)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, columns), K // (4 * block_k)))


def matmul_triton(x: jax.Array, wq: jax.Array, scale: jax.Array, out_dtype, *, block_n: int = 128,
                  block_k: int | None = None, split_k: int | None = None, num_warps: int = 4,
                  num_stages: int = 3) -> jax.Array:
    """x (M, K) float (M <= 16), wq (K, N) int8 / float8_e4m3fn, scale (N,) float32 -> y (M, N) out_dtype.
    block_k: rows of wq per tile (None: 64); split_k: None picks `default_split`."""
    M, K = x.shape
    N = wq.shape[1]
    BM = MAX_ROWS
    BN = max(16, min(block_n, triton.next_power_of_2(N)))
    BK = max(16, min(block_k or 64, triton.next_power_of_2(K)))
    split = split_k or default_split(K, N, BN, BK)
    k_split = triton.cdiv(triton.cdiv(K, split), BK) * BK  # rows per split, whole tiles
    split = triton.cdiv(K, k_split)
    part_dtype = out_dtype if split == 1 else jnp.float32
    (parts,) = launch(
        _gemv_kernel, [x[None], wq[None], scale.astype(jnp.float32)[None]],
        [jax.ShapeDtypeStruct((1, split, M, N), part_dtype)],
        grid=(triton.cdiv(N, BN), split), num_warps=num_warps, num_stages=num_stages,
        M=M, K=K, N=N, K_SPLIT=k_split, BM=BM, BN=BN, BK=BK,
    )
    return parts[0, 0] if split == 1 else jnp.sum(parts[0], axis=0).astype(out_dtype)
