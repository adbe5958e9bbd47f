"""The LM head's softmax cross-entropy computed in vocabulary blocks: the (N, V) logits are never materialised.

`blocked_cross_entropy` is the training step's loss (`xlstm_jax.train.steps`, `--loss fused`) for the logits the
model forms (`xLSTMLarge.__call__`): `soft_cap(x @ w.T)` with the matmul operands in the compute dtype and float32
accumulation. It scans over blocks of vocabulary columns with an online logsumexp (and a running argmax for the
accuracy), and its backward (`jax.custom_vjp`) recomputes each block's logits instead of keeping them: per block the
memory of one (N, block) float32 tile, against (N, V) float32 logits and their cotangent for the plain loss.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import matmul_precision

BLOCK_ELEMENTS = 2**26  # automatic block width: one block's logits take about 256 MiB of float32
BLOCK_LIMITS = (1024, 8192)  # ... within these widths (a narrower vocabulary is one block)


def vocab_blocks(vocab: int, rows: int, block_size: int | None = None) -> tuple[int, int]:
    """(blocks, width) of the scan over `vocab` columns for `rows` rows: at most `block_size` columns a block
    (None: 2^26 / rows, within 1024..8192), widths above 128 rounded up to a multiple of 128, the last block
    shifted left to end at `vocab` (it then repeats columns of the one before, which it leaves out)."""
    if block_size is None:
        block_size = min(max(BLOCK_ELEMENTS // max(rows, 1), BLOCK_LIMITS[0]), BLOCK_LIMITS[1])
    width = -(-vocab // -(-vocab // block_size))  # the blocks' widths evened out
    if width > 128:
        width = min(vocab, -(-width // 128) * 128)
    return -(-vocab // width), width


def blocked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, *,
                          soft_cap: float | None = None, compute_dtype: Any = None, block_size: int | None = None
                          ) -> tuple[jax.Array, jax.Array]:
    """(sum of weights x cross-entropy, sum of weights x [argmax == target]) for logits = cap tanh(x w^T / cap).

    x (N, D) floating (hidden states after the final norm), w (V, D) floating (the LM head: the tied embedding, or
    the head's (D, V) kernel transposed), targets (N,) int in [0, V), weights (N,) (the mask; any real dtype).
    soft_cap: the logit soft cap (None: none). compute_dtype: the matmul operands' dtype (None: x's); accumulation,
    logits and sums in float32 (float64 for float64 inputs). block_size: vocabulary columns per block (None:
    automatic, `vocab_blocks`). Ties of the argmax go to the lowest index, as `jnp.argmax`. Differentiable in x, w
    and weights (not targets); the backward recomputes each block's logits. Returns two scalars.
    """
    for name, value in (("x", x), ("w", w)):
        if np.ndim(value) != 2 or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(f"{name} must be a 2-D floating array, got shape {np.shape(value)} dtype "
                             f"{jnp.result_type(value)}.")
    N, D = np.shape(x)
    if np.shape(w)[1] != D or np.shape(w)[0] < 1:
        raise ValueError(f"w must be (V, D) with D = {D} (x's last axis), got shape {np.shape(w)}.")
    if np.shape(targets) != (N,) or not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(f"targets must be integers of shape ({N},) (x's rows), got shape {np.shape(targets)} dtype "
                         f"{jnp.result_type(targets)}.")
    if np.shape(weights) != (N,) or jnp.issubdtype(jnp.result_type(weights), jnp.complexfloating):
        raise ValueError(f"weights must be real with shape ({N},) (x's rows), got shape {np.shape(weights)}.")
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and 0 < soft_cap < math.inf):
        raise ValueError(f"soft_cap must be a finite number > 0 or None, got {soft_cap!r}.")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}.")
    dtype = jnp.dtype(compute_dtype or jnp.result_type(x))
    acc = jnp.promote_types(jnp.float32, jnp.promote_types(jnp.result_type(x), jnp.result_type(w)))
    blocks = vocab_blocks(np.shape(w)[0], N, block_size)
    cap = None if soft_cap is None else float(soft_cap)
    return _blocked_ce(x, w, jnp.asarray(targets, jnp.int32), jnp.asarray(weights, acc), cap, dtype, blocks)


def _block(k: jax.Array, xc: jax.Array, wc: jax.Array, targets: jax.Array, cap: float | None,
           blocks: tuple[int, int], acc: Any) -> tuple[jax.Array, ...]:
    """Block k: its head rows wb (width, D), logits (N, width) in `acc`, their tanh(z / cap) (None without a cap),
    the columns' indices (width,), which of them are new (not in block k - 1: the last block may overlap it) and
    the target one-hot (N, width) over the new ones."""
    width, vocab = blocks[1], wc.shape[0]
    start = jnp.minimum(k * width, vocab - width)
    wb = jax.lax.dynamic_slice_in_dim(wc, start, width, axis=0)
    z = jnp.einsum("nd,vd->nv", xc, wb, preferred_element_type=acc, precision=matmul_precision(xc.dtype))
    tanh = None if cap is None else jnp.tanh(z / cap)
    logits = z if cap is None else cap * tanh
    cols = start + jnp.arange(width, dtype=jnp.int32)
    fresh = cols >= k * width
    hit = (cols[None, :] == targets[:, None]) & fresh[None, :]
    return wb, logits, tanh, cols, fresh, hit


def _forward(x, w, targets, weights, cap, dtype, blocks):
    """The two sums, and (logsumexp, cross-entropy) per row for the backward."""
    acc, N = weights.dtype, x.shape[0]
    xc, wc = x.astype(dtype), w.astype(dtype)

    def body(carry, k):
        m, s, t, best, arg = carry  # running max, sum of exp(logit - m), target logit, argmax value and index
        _, logits, _, cols, fresh, hit = _block(k, xc, wc, targets, cap, blocks, acc)
        masked = jnp.where(fresh[None, :], logits, -jnp.inf)
        index = jnp.argmax(masked, axis=1)  # one pass over the block for the max and where it is
        top = jnp.take_along_axis(masked, index[:, None], axis=1)[:, 0]
        m_new = jnp.maximum(m, top)
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(masked - m_new[:, None]), axis=1)
        t = t + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        better = top > best  # strictly: a tie keeps the earlier block's (lower) index
        arg = jnp.where(better, cols[0] + index.astype(jnp.int32), arg)
        return (m_new, s, t, jnp.where(better, top, best), arg), None

    lowest = jnp.full((N,), -jnp.inf, acc)
    init = (lowest, jnp.zeros((N,), acc), jnp.zeros((N,), acc), lowest, jnp.zeros((N,), jnp.int32))
    (m, s, t, _, arg), _ = jax.lax.scan(body, init, jnp.arange(blocks[0], dtype=jnp.int32))
    lse = m + jnp.log(s)
    ce = lse - t
    sums = (jnp.sum(weights * ce), jnp.sum(weights * (arg == targets).astype(acc)))
    return sums, (lse, ce)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked_ce(x, w, targets, weights, cap, dtype, blocks):
    return _forward(x, w, targets, weights, cap, dtype, blocks)[0]


def _blocked_ce_fwd(x, w, targets, weights, cap, dtype, blocks):
    sums, (lse, ce) = _forward(x, w, targets, weights, cap, dtype, blocks)
    return sums, (x, w, targets, weights, lse, ce)


def _blocked_ce_bwd(cap, dtype, blocks, residuals, cotangents):
    """d(ce sum) / dlogits = weight x (softmax - one-hot), times 1 - tanh^2 under the cap, recomputed per block;
    the accuracy sum is piecewise constant (no cotangent)."""
    x, w, targets, weights, lse, ce = residuals
    acc, (n, width), vocab = weights.dtype, blocks, w.shape[0]
    xc, wc = x.astype(dtype), w.astype(dtype)
    scale = cotangents[0] * weights
    precision = matmul_precision(dtype)

    def body(dx, k):
        wb, logits, tanh, _, fresh, hit = _block(k, xc, wc, targets, cap, blocks, acc)
        p = jnp.where(fresh[None, :], jnp.exp(logits - lse[:, None]), 0.0)
        dz = (p - hit.astype(acc)) * scale[:, None]
        if cap is not None:
            dz = dz * (1.0 - jnp.square(tanh))
        dz = dz.astype(dtype)
        dx = dx + jnp.einsum("nv,vd->nd", dz, wb, preferred_element_type=acc, precision=precision)
        return dx, jnp.einsum("nv,nd->vd", dz, xc, preferred_element_type=acc, precision=precision)

    dx, dw_blocks = jax.lax.scan(body, jnp.zeros(x.shape, acc), jnp.arange(n, dtype=jnp.int32))
    # the last block ends at `vocab`: its first n * width - vocab rows repeat the block before (and are zero)
    dw = jnp.concatenate([dw_blocks[:-1].reshape(-1, x.shape[1]), dw_blocks[-1, n * width - vocab:]])
    return dx.astype(x.dtype), dw.astype(w.dtype), None, (cotangents[0] * ce).astype(acc)


_blocked_ce.defvjp(_blocked_ce_fwd, _blocked_ce_bwd)
