"""The associative combine of mLSTM state summaries (docs/design.md, "Context parallelism").

Over a stretch of the sequence, with G its total log forget decay and M = max_s (i_s + sum_{r>s} log f_r) its
largest input weight, the state after the stretch is an affine map of the state (C, n, m) before it:

    m' = max(G + m, M),   C' = e^{G + m - m'} C + e^{M - m'} C_b,   n' = e^{G + m - m'} n + e^{M - m'} n_b,

where (C_b, n_b) is what the stretch writes, scaled by e^{-M}: its "summary" (G, C_b, n_b, M). m' is the
recurrence's own stabilizer, so a stretch run from the combined state gives the one-pass result up to rounding. Two
summaries compose into one. Context parallelism combines the summaries of devices (mlstm/context_parallel.py), the
Triton core those of groups of chunks on one device (mlstm_chunkwise/sequence_groups.py).

Shapes: G, M (...,); C_b (..., DHQK, DHHV); n_b (..., DHQK); float32. A stretch's summary is one matmul over its
tokens (`summary`), not a pass of a kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import log_forget

F32 = jnp.float32
NO_INPUT = -1e30  # M of a stretch whose every input gate is -inf: it writes nothing


def apply(summary, state):
    """The state (C, n, m) after a stretch with `summary` (G, C_b, n_b, M), from `state` (C, n, m) before it."""
    G, C_b, n_b, M = summary
    C, n, m = state
    m_new = jnp.maximum(G + m, M)
    a, b = jnp.exp(G + m - m_new), jnp.exp(M - m_new)
    return a[..., None, None] * C + b[..., None, None] * C_b, a[..., None] * n + b[..., None] * n_b, m_new


def compose(first, second):
    """The summary of `first` followed by `second`."""
    return (first[0] + second[0], *apply(second, first[1:]))


def identity_like(summary):
    """The summary of an empty stretch."""
    G, C_b, n_b, _ = summary
    return jnp.zeros_like(G), jnp.zeros_like(C_b), jnp.zeros_like(n_b), jnp.full_like(G, NO_INPUT)


def floor_no_input(M):
    """M with stretches that write nothing (M = -inf or below NO_INPUT) at NO_INPUT, so that e^{M - m} is 0 and
    never NaN."""
    return jnp.where(M > NO_INPUT, M, NO_INPUT)


def shifted(x: jax.Array) -> jax.Array:
    """x moved one place along the last axis, 0 in front: an exclusive sum from an inclusive one without a
    difference, which a floored log forget gate (base.LOG_FORGET_FLOOR, a document start) in the sum would wipe out."""
    return jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1)


def weighted_summary(k: jax.Array, v: jax.Array, log_w: jax.Array, M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(C_b, n_b) = (sum_t w_t k_t v_tᵀ, sum_t w_t k_t) with w_t = e^{log_w_t - M} over the token axis T of
    k (..., T, DHQK), v (..., T, DHHV), log_w (..., T); M (...,) floored (floor_no_input): a stretch at NO_INPUT
    writes nothing. k·w is a matmul operand in k's dtype, as in the kernels; float32 accumulation and results."""
    w = jnp.where(M[..., None] > NO_INPUT, jnp.exp(log_w - M[..., None]), 0.0)
    kbar = k.astype(F32) * w[..., None]
    return token_matmul(kbar.astype(k.dtype), v), jnp.sum(kbar, axis=-2)


def token_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum_t a[..., t, :]ᵀ b[..., t, :] over the token axis: (..., T, X), (..., T, Y) -> (..., X, Y) float32 (full
    float32 precision for float32 operands)."""
    return jnp.einsum("...tx,...ty->...xy", a, b, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)


def summary(k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array):
    """The summary (G, C_b, n_b, M) of the stretch k (..., T, DHQK), v (..., T, DHHV), gate pre-activations
    i, f (..., T): G = sum_t log f_t, M = max_t (i_t + sum_{r>t} log f_r)."""
    logf = log_forget(f.astype(F32))
    after = jnp.flip(shifted(jnp.cumsum(jnp.flip(logf, -1), -1)), -1)  # sum over r > t
    log_w = i.astype(F32) + after
    M = floor_no_input(jnp.max(log_w, axis=-1))
    return (jnp.sum(logf, axis=-1), *weighted_summary(k, v, log_w, M), M)
