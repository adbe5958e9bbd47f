"""Forward of the native chunkwise mLSTM (docs/math.md §3) on chunk-aligned inputs, plus the pieces the
backward recomputes (border states, intra-chunk log weights).

Layout: q, k (B, NH, S, DHQK), v (B, NH, S, DHHV) are viewed as (B, NH, NC, L, ·); gates (B, NH, S) as
(B, NH, NC, L); states at chunk borders come out of `lax.scan` chunk-major, C (NC, B, NH, DHQK, DHHV) and
n (NC, B, NH, DHQK). Memory is O(S): border states plus one L x L tile per chunk, never an S x S matrix.
Gate math, stabilizers and states are float32; matmul operands are in the compute dtype `dt` with float32
accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from xlstm_jax.kernels.base import (
    MLSTMShape,
    einsum_in,
    exp_neg,
    initial_states_or_zeros,
    log_forget,
    poison_from,
    qk_scale,
    zero_nonfinite_rows,
)
from xlstm_jax.kernels.native.chunk_math import chunk_gates

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST


def to_chunks(x: jax.Array, L: int) -> jax.Array:
    """(B, NH, S, ...) -> (B, NH, NC, L, ...) with S = NC * L."""
    return x.reshape(*x.shape[:2], x.shape[2] // L, L, *x.shape[3:])


def from_chunks(x: jax.Array) -> jax.Array:
    """(B, NH, NC, L, ...) -> (B, NH, NC * L, ...)."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def chunk_major(x: jax.Array) -> jax.Array:
    """(B, NH, NC, ...) -> (NC, B, NH, ...), the layout `lax.scan` walks over."""
    return jnp.moveaxis(x, 2, 0)


def mm(spec: str, a: jax.Array, b: jax.Array, dt: jnp.dtype) -> jax.Array:
    """einsum with both operands cast to the compute dtype `dt` (float16: scaled into range first), accumulated and
    returned in float32."""
    return einsum_in(spec, a, b, dt, HIGHEST)


def vec(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 einsum for the normalizer-vector products (ñ and its cotangent stay float32, as in the kernels)."""
    return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=HIGHEST)


def border_decay(sca_g: jax.Array, m_border: jax.Array) -> jax.Array:
    """e^{g_k + m_{k-1} - m_k} (B, NH, NC): the factor carrying a state (or its cotangent) across chunk k."""
    return jnp.exp(sca_g + m_border[..., :-1] - m_border[..., 1:])


def border_stabilizers(vec_a: jax.Array, sca_g: jax.Array, m0: jax.Array) -> jax.Array:
    """m_k = max(g_k + m_{k-1}, max_t a_t), k = 1..NC, from m_0 = m0 (B, NH). vec_a (B, NH, NC, L), sca_g
    (B, NH, NC), all float32. Returns (B, NH, NC + 1) float32 with m_0 first; m_NC equals the recurrent m_S."""

    def step(m, xs):
        a_max, g = xs
        m = jnp.maximum(g + m, a_max)
        return m, m

    _, ms = lax.scan(step, m0, (chunk_major(jnp.max(vec_a, axis=-1)), chunk_major(sca_g)))
    return jnp.concatenate([m0[..., None], jnp.moveaxis(ms, 0, -1)], axis=-1)


def border_states(
    k: jax.Array,
    v: jax.Array,
    vec_a: jax.Array,
    sca_g: jax.Array,
    m_border: jax.Array,
    c0: jax.Array,
    n0: jax.Array,
    dt: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Stabilized states at the chunk borders for given border stabilizers (docs/math.md §3.2).

    k (B, NH, NC, L, DHQK), v (B, NH, NC, L, DHHV); vec_a (B, NH, NC, L), sca_g (B, NH, NC), m_border
    (B, NH, NC + 1), c0 (B, NH, DHQK, DHHV), n0 (B, NH, DHQK) float32. Returns the states entering each chunk,
    C (NC, B, NH, DHQK, DHHV) and n (NC, B, NH, DHQK), and the last states C_S, n_S; all float32.
    """
    weight = jnp.exp(vec_a - m_border[..., 1:, None])  # e^{a_t - m_k}, the weight of token t in C̃_k

    def step(carry, xs):
        c, n = carry
        k_c, v_c, w, d = xs
        kbar = k_c.astype(F32) * w[..., None]
        c_next = d[..., None, None] * c + mm("bhld,bhle->bhde", kbar, v_c, dt)
        n_next = d[..., None] * n + jnp.sum(kbar, axis=-2)
        return (c_next, n_next), (c, n)

    xs = (chunk_major(k), chunk_major(v), chunk_major(weight), chunk_major(border_decay(sca_g, m_border)))
    (c_last, n_last), (c_prev, n_prev) = lax.scan(step, (c0, n0), xs)
    return c_prev, n_prev, c_last, n_last


def causal_mask(L: int) -> jax.Array:
    """(L, L) bool: key position s <= query position t."""
    return jnp.tril(jnp.ones((L, L), bool))


def intra_log_weights(i: jax.Array, f: jax.Array, L: int) -> jax.Array:
    """log D̃_{t,s} = sum_{r=s+1..t} logsigmoid(f_r) + i_s for s <= t and -inf above the diagonal, per chunk.

    i, f (B, NH, S) float32. Returns (B, NH, NC, L, L) float32. The decay is a column-wise cumsum of the masked
    log forget gates, so each entry sums only its own terms (no cancellation between long cumsums).
    """
    logf = to_chunks(log_forget(f.astype(F32)), L)
    t = jnp.arange(L)[:, None]
    s = jnp.arange(L)[None, :]
    decay = jnp.cumsum(jnp.where(t > s, logf[..., :, None], 0.0), axis=-2)
    return jnp.where(causal_mask(L), decay + to_chunks(i.astype(F32), L)[..., None, :], -jnp.inf)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c0: jax.Array | None,
    n0: jax.Array | None,
    m0: jax.Array | None,
    *,
    chunk_size: int,
    eps: float,
    dt: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """The chunkwise forward on chunk-aligned inputs (S % chunk_size == 0).

    q, k (B, NH, S, DHQK), v (B, NH, S, DHHV) in one dtype; i, f (B, NH, S) float32; c0 (B, NH, DHQK, DHHV),
    n0 (B, NH, DHQK), m0 (B, NH) float32, or all None (zeros). Returns h (B, NH, S, DHHV) in q's dtype; the signed
    denominator den = q̄·ñ + sum S̄ and the per-token stabilizer m (both (B, NH, S) float32); the border
    stabilizers (B, NH, NC + 1) float32; and the last states (C_S, n_S) float32.
    """
    L = chunk_size
    B, NH, S, DHQK = q.shape
    c0, n0, m0 = initial_states_or_zeros(c0, n0, m0, MLSTMShape(B, NH, S, DHQK, v.shape[-1]), (q, k, v, i, f))
    scale = qk_scale(DHQK)
    qc, kc, vc = to_chunks(q, L), to_chunks(k, L), to_chunks(v, L)
    vec_b, vec_a, sca_g = chunk_gates(i, f, L)
    m_border = border_stabilizers(vec_a, sca_g, m0)
    c_prev, n_prev, c_last, n_last = border_states(kc, vc, vec_a, sca_g, m_border, c0, n0, dt)

    log_d = intra_log_weights(i, f, L)
    m_inter = vec_b + m_border[..., :-1, None]  # log weight of the entering state at token t
    m_tok = jnp.maximum(m_inter, jnp.max(log_d, axis=-1))
    # acausal entries are selected away, not multiplied by 0: a NaN at token s must not reach the tokens before it
    s_bar = jnp.where(causal_mask(L), mm("bhctd,bhcsd->bhcts", qc, kc, dt) * scale * jnp.exp(log_d - m_tok[..., None]),
                      0.0)
    coef = jnp.exp(m_inter - m_tok) * scale  # q̄_t = coef_t * q_t
    v_finite, v_bad = zero_nonfinite_rows(vc)
    num = coef[..., None] * mm("bhctd,cbhde->bhcte", qc, c_prev, dt) + mm("bhcts,bhcse->bhcte", s_bar, v_finite, dt)
    den = coef * vec("bhctd,cbhd->bhct", qc.astype(dt), n_prev) + jnp.sum(s_bar, axis=-1)
    h = from_chunks(num / (jnp.maximum(jnp.abs(den), exp_neg(m_tok)) + eps)[..., None])
    h = poison_from(h, from_chunks(v_bad))
    return h.astype(q.dtype), from_chunks(den), from_chunks(m_tok), m_border, (c_last, n_last)
