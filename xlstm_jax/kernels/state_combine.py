"""The associative combine of mLSTM state summaries (docs/design.md, "Context parallelism").

Over a stretch of the sequence, with G its total log forget decay and M = max_s (i_s + sum_{r>s} log f_r) its
largest input weight, the state after the stretch is an affine map of the state (C, n, m) before it:

    m' = max(G + m, M),   C' = e^{G + m - m'} C + e^{M - m'} C_b,   n' = e^{G + m - m'} n + e^{M - m'} n_b,

where (C_b, n_b) is what the stretch writes, scaled by e^{-M}: its "summary" (G, C_b, n_b, M). m' is the
recurrence's own stabilizer, so a stretch run from the combined state gives the one-pass result up to rounding. Two
summaries compose into one. Context parallelism combines the summaries of devices (mlstm/context_parallel.py), the
Triton core those of groups of chunks on one device (mlstm_chunkwise/sequence_groups.py).

Shapes: G, M (...,); C_b (..., DHQK, DHHV); n_b (..., DHQK); float32.
"""

from __future__ import annotations

import jax.numpy as jnp

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


def summary_start(G, M):
    """The initial stabilizer m_0 of a summary run from C = n = 0: its last m is max(G + m_0, M) = M for any
    m_0 <= M - G; the smallest such |m_0| keeps the sums exact when G is very negative (a long stretch, or a
    document start's floored forget gate: G ~ -1e30)."""
    return jnp.where(M > NO_INPUT, jnp.minimum(M - G, 0.0), 0.0)
