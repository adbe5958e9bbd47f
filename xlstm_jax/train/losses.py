"""The LM head's softmax cross-entropy without the (N, V) logits in memory.

`blocked_cross_entropy` is the training step's loss (`xlstm_jax.train.steps`, `--loss fused`) for the logits the
model forms (`xLSTMLarge.__call__`): `soft_cap(x @ w.T)` with the matmul operands in the compute dtype and float32
accumulation. Evaluated alone it scans over blocks of vocabulary columns with an online logsumexp (and a running
argmax for the accuracy): the memory of one (N, block) float32 tile. Under differentiation (`jax.custom_vjp`) its
forward scans over blocks of rows instead, each with every vocabulary column: a block's logsumexp is then final, so
the same pass forms the logits' cotangent and the gradients of x and w (three matmuls of the head's size in all,
where a backward that recomputed the logits would take four); the backward only scales them by the cotangent.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import matmul_precision
from xlstm_jax.models.xlstm_large.model import soft_cap

BLOCK_ELEMENTS = 2**26  # automatic block width: one block's logits take about 256 MiB of float32
BLOCK_LIMITS = (1024, 8192)  # ... within these widths (a narrower vocabulary is one block)
ROW_ELEMENTS = 2**27  # automatic rows per block of the gradient pass: a block's logits take about 512 MiB of float32


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


def row_blocks(rows: int, vocab: int, row_block: int | None = None) -> tuple[int, int]:
    """(blocks, height) of the gradient pass over `rows` rows of `vocab` logits each: one block when `row_block`
    (None: 2^27 / vocab, at least 8) covers every row, else blocks of the largest power of two <= row_block rows
    (whole matmul tiles), the rows padded to blocks x height."""
    if row_block is None:
        row_block = max(ROW_ELEMENTS // max(vocab, 1), 8)
    if row_block >= rows:
        return 1, rows
    height = 1 << (row_block.bit_length() - 1)
    return -(-rows // height), height


def blocked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, *,
                          soft_cap: float | None = None, compute_dtype: Any = None, block_size: int | None = None,
                          row_block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of weights x cross-entropy, sum of weights x [argmax == target]) for logits = cap tanh(x w^T / cap).

    x (N, D) floating (hidden states after the final norm), w (V, D) floating (the LM head: the tied embedding, or
    the head's (D, V) kernel transposed), targets (N,) int in [0, V), weights (N,) (the mask; any real dtype).
    soft_cap: the logit soft cap (None: none). compute_dtype: the matmul operands' dtype (None: x's); accumulation,
    logits and sums in float32 (float64 for float64 inputs). block_size: vocabulary columns per block (None:
    automatic, `vocab_blocks`) when evaluated alone. row_block: rows per block of the pass that forms the gradients
    under differentiation (None: automatic, `row_blocks`). Ties of the argmax go to the lowest index, as
    `jnp.argmax`. Differentiable in x, w and weights (not targets). Returns two scalars.
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
    for name, value in (("block_size", block_size), ("row_block", row_block)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    dtype = jnp.dtype(compute_dtype or jnp.result_type(x))
    acc = jnp.promote_types(jnp.float32, jnp.promote_types(jnp.result_type(x), jnp.result_type(w)))
    blocks = vocab_blocks(np.shape(w)[0], N, block_size)
    rows = row_blocks(N, np.shape(w)[0], row_block)
    cap = None if soft_cap is None else float(soft_cap)
    return _blocked_ce(x, w, jnp.asarray(targets, jnp.int32), jnp.asarray(weights, acc), cap, dtype, blocks, rows)


def _block(k: jax.Array, xc: jax.Array, wc: jax.Array, targets: jax.Array, cap: float | None,
           blocks: tuple[int, int], acc: Any) -> tuple[jax.Array, ...]:
    """Vocabulary block k: its logits (N, width) in `acc`, the columns' indices (width,), which of them are new (not
    in block k - 1: the last block may overlap it) and each row's target logit where the target is one of the new
    columns, else 0 (N,)."""
    width, vocab = blocks[1], wc.shape[0]
    start = jnp.minimum(k * width, vocab - width)
    wb = jax.lax.dynamic_slice_in_dim(wc, start, width, axis=0)
    z = jnp.einsum("nd,vd->nv", xc, wb, preferred_element_type=acc, precision=matmul_precision(xc.dtype))
    cols = start + jnp.arange(width, dtype=jnp.int32)
    inside = (targets >= k * width) & (targets < start + width)
    target = jnp.where(inside, _target_logit(z, jnp.clip(targets - start, 0, width - 1), cap), 0.0)
    return soft_cap(z, cap), cols, cols >= k * width, target


def _target_logit(z: jax.Array, index: jax.Array, cap: float | None) -> jax.Array:
    """Each row's logit at column index (n,) of z (n, C), capped: a gather, so that the logits' one reduction
    (`_row_statistics`) reads them once. Read through a masked sum as a fourth operand of that reduction, they had
    two uses there, and XLA on the GPU would not fuse the cap's tanh into it: a fusion of its own wrote the capped
    float32 logits for the reduction to read (2.2 ms of the 125M's step on an H100)."""
    return soft_cap(jnp.take_along_axis(z, index[:, None], axis=1)[:, 0], cap)


def _merge(a: tuple, b: tuple) -> tuple:
    """Two partial row statistics (max m, sum s of exp(logit - m), argmax) as one: the online logsumexp's
    rescaling, the argmax of the larger max (the lower index on ties, as `jnp.argmax`). A side with s = 0 holds no
    column and adds nothing (its m may be -inf, where exp(-inf - -inf) would be NaN)."""
    (ma, sa, ia), (mb, sb, ib) = a, b
    m = jnp.maximum(ma, mb)
    s = jnp.where(sa > 0, sa * jnp.exp(ma - m), 0.0) + jnp.where(sb > 0, sb * jnp.exp(mb - m), 0.0)
    index = jnp.where(ma > mb, ia, jnp.where(mb > ma, ib, jnp.minimum(ia, ib)))
    return m, s, index


def _row_statistics(logits: jax.Array, cols: jax.Array, counted: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """logits (n, C), cols (C,) the columns' vocabulary indices, counted (C,) bool (None: all; an uncounted column
    adds nothing) -> per row (max, sum of exp(logit - max), the argmax), each (n,), in one reduction (`_merge`):
    one read of the logits where a max, a sum of exponentials and an argmax took a pass each."""
    ones = jnp.ones_like(logits) if counted is None else jnp.broadcast_to(counted.astype(logits.dtype), logits.shape)
    operands = (logits, ones, jnp.broadcast_to(cols, logits.shape))
    init = (jnp.asarray(-jnp.inf, logits.dtype), jnp.zeros((), logits.dtype),
            jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    return jax.lax.reduce(operands, init, _merge, (1,))


def _forward(x, w, targets, weights, cap, dtype, blocks):
    """The two sums, in one scan over vocabulary blocks (the evaluation's pass): each block's row statistics
    merged into the running ones (an online logsumexp and argmax)."""
    acc, N = weights.dtype, x.shape[0]
    xc, wc = x.astype(dtype), w.astype(dtype)

    def body(carry, k):
        logits, cols, fresh, target = _block(k, xc, wc, targets, cap, blocks, acc)
        return (*_merge(carry[:3], _row_statistics(logits, cols, fresh)), carry[3] + target), None

    init = (jnp.full((N,), -jnp.inf, acc), jnp.zeros((N,), acc), jnp.zeros((N,), jnp.int32), jnp.zeros((N,), acc))
    (m, s, arg, t), _ = jax.lax.scan(body, init, jnp.arange(blocks[0], dtype=jnp.int32))
    ce = m + jnp.log(s) - t
    return jnp.sum(weights * ce), jnp.sum(weights * (arg == targets).astype(acc))


def _with_gradients(x, w, targets, weights, cap, dtype, rows):
    """The two sums, each row's cross-entropy (N,), and its sum's gradients in x (N, D) and w (V, D) (float32 or
    float64, as the sums), in one scan over `rows` = (blocks, height) blocks of rows with every column: per block
    the logits, their logsumexp, argmax and target entry, the cotangent weight x (softmax - one-hot) (x (1 - tanh^2)
    under the cap) in the compute dtype, and its two matmuls with the head and the block's rows."""
    acc, (N, D), V = weights.dtype, x.shape, w.shape[0]
    count, height = rows
    pad = count * height - N
    xc, wc = x.astype(dtype), w.astype(dtype)
    blocked = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(count, height, *a.shape[1:])  # noqa
    precision = matmul_precision(dtype)

    def body(dw, block):
        xb, tb, mb = block  # padded rows have weight 0: no loss, no gradient
        z = jnp.einsum("nd,vd->nv", xb, wc, preferred_element_type=acc, precision=precision)
        cols = jnp.arange(V, dtype=jnp.int32)
        top, total, arg = _row_statistics(soft_cap(z, cap), cols)
        target = _target_logit(z, tb, cap)
        hit = cols[None, :] == tb[:, None]
        lse = top + jnp.log(total)
        ce = lse - target  # as the evaluation's pass forms it
        # Under the cap, the cotangent forms tanh(z / cap) again by another formula, 2 sigmoid(2 z / cap) - 1: XLA
        # merges equal expressions, and one tanh read by the reduction and by this fusion is a fusion of its own
        # that writes the capped logits, two more passes over the (rows, V) float32 tile than each reading z.
        tanh = None if cap is None else 2.0 * jax.nn.sigmoid(z * (2.0 / cap)) - 1.0
        logits = z if cap is None else cap * tanh
        dz = (jnp.exp(logits - lse[:, None]) - hit.astype(acc)) * mb[:, None]
        if cap is not None:
            dz = dz * (1.0 - jnp.square(tanh))
        dz = dz.astype(dtype)
        dx = jnp.einsum("nv,vd->nd", dz, wc, preferred_element_type=acc, precision=precision)
        dw = dw + jnp.einsum("nv,nd->vd", dz, xb, preferred_element_type=acc, precision=precision)
        return dw, (ce, (arg == tb).astype(acc), dx)

    dw, (ce, right, dx) = jax.lax.scan(body, jnp.zeros((V, D), acc), (blocked(xc), blocked(targets), blocked(weights)))
    ce, right, dx = ce.reshape(-1)[:N], right.reshape(-1)[:N], dx.reshape(-1, D)[:N]
    return (jnp.sum(weights * ce), jnp.sum(weights * right)), ce, dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _blocked_ce(x, w, targets, weights, cap, dtype, blocks, rows):
    return _forward(x, w, targets, weights, cap, dtype, blocks)


def _blocked_ce_fwd(x, w, targets, weights, cap, dtype, blocks, rows):
    sums, ce, dx, dw = _with_gradients(x, w, targets, weights, cap, dtype, rows)
    return sums, (ce, dx.astype(x.dtype), dw.astype(w.dtype))


def _blocked_ce_bwd(cap, dtype, blocks, rows, residuals, cotangents):
    """The gradients formed in the forward times the cross-entropy sum's cotangent; the accuracy sum is piecewise
    constant (no cotangent)."""
    ce, dx, dw = residuals
    g = cotangents[0]
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, (g * ce).astype(ce.dtype)


_blocked_ce.defvjp(_blocked_ce_fwd, _blocked_ce_bwd)
