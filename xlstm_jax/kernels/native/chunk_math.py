"""XLA pieces every chunkwise implementation (native and Triton) shares: gate cumsums, the output cotangents of the
normalized output, and the gate / stabilizer gradient epilogue.

Backward convention (docs/math.md §5): the kernels differentiate with every stabilizer m held
constant, but *through* the denominator N_t = max(|q̂·ñ_t|, e^{-m_t}): the denominator behaves like an extra value
column of ones, whose output cotangent is `dden`. The dependence of the returned last stabilizer m_S on the gates
is added here exactly (m_S is a max over a chain of sums, so its derivative follows the argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import log_forget


def reverse_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Inclusive cumulative sum from the end: out[t] = sum_{r >= t} x[r]."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


def split_cumsum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumsum along the last axis as a two-float sum (hi, lo), hi = the float32 cumsum.

    Differences hi_t - hi_s of nearby positions are exact, and lo carries what each addition rounded away, so
    (hi_t - hi_s) + (lo_t - lo_s) is the sum of x over (s, t] even after a huge term (a forget gate at the floor)
    swallowed the small ones in hi. Every term of x has one sign (log forget gates are <= 0), so hi never cancels.
    """
    hi = jnp.cumsum(x, axis=-1)
    prev = jnp.concatenate([jnp.zeros_like(hi[..., :1]), hi[..., :-1]], axis=-1)
    total = prev + x  # two-sum: total + err == prev + x exactly
    back = total - prev
    err = (prev - (total - back)) + (x - back)
    return hi, jnp.cumsum((total - hi) + err, axis=-1)


def chunk_log_forget(f: jax.Array, chunk_size: int) -> jax.Array:
    """The floored log forget gates (base.log_forget) of f (B, NH, S) as (B, NH, NC, L) float32."""
    B, NH, S = f.shape
    return log_forget(f.astype(jnp.float32)).reshape(B, NH, S // chunk_size, chunk_size)


def chunk_gates(i: jax.Array, f: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-chunk gate quantities (docs/math.md §3.1), float32.

    i, f: (B, NH, S) pre-activations with S % chunk_size == 0. Returns
    vecB (B, NH, NC, L): inclusive within-chunk cumsum of log forget gates (the high part of `split_cumsum`),
    vecA (B, NH, NC, L): log weight of each token in its end-of-chunk state, sum_{r>t} logf_r + i_t (stable form),
    scaG (B, NH, NC): total log decay over each chunk.
    """
    logf = chunk_log_forget(f, chunk_size)
    suffix = reverse_cumsum(logf)
    vec_a = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
    return jnp.cumsum(logf, axis=-1), vec_a + i.astype(jnp.float32).reshape(logf.shape), suffix[..., 0]


def nonfinite_chunks(c_all: jax.Array, n_all: jax.Array) -> jax.Array:
    """(BH, NC) int32: 1 for the chunks whose end state holds a NaN or inf, i.e. whose k or v do (or an earlier
    chunk's). c_all (BH, NC + 1, DHQK, DHHV) and n_all (BH, NC + 1, DHQK) are the chunk-border states. A
    non-finite k_s makes n non-finite, a non-finite v_s[j] the whole column j of C, so row 0 of C and n suffice."""
    finite = jnp.isfinite(c_all[:, 1:, 0, :]).all(axis=-1) & jnp.isfinite(n_all[:, 1:]).all(axis=-1)
    return (~finite).astype(jnp.int32)


def denominator_cotangent(
    dh: jax.Array, h: jax.Array, den: jax.Array, lower: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """The normalizer and the cotangent of the signed denominator q̂·ñ of h = num / (max(|den|, lower) + eps).

    dh, h: (B, NH, S, DHHV); den, lower: (B, NH, S) float32 (lower is e^{-m} in the standard form). Returns
    norm = max(|den|, lower) + eps and dden, both (B, NH, S) float32.
    """
    norm = jnp.maximum(jnp.abs(den), lower) + eps
    dnorm = -jnp.sum(dh.astype(jnp.float32) * h.astype(jnp.float32), axis=-1) / norm
    dden = jnp.where(jnp.abs(den) >= lower, dnorm * jnp.sign(den), 0.0)
    return norm, dden


def output_cotangents(
    dh: jax.Array, h: jax.Array, den: jax.Array, lower: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """Cotangents of the numerator (deltaH = dh / norm, float32, shaped like dh) and of the signed denominator
    (dden (B, NH, S) float32); see `denominator_cotangent`."""
    norm, dden = denominator_cotangent(dh, h, den, lower, eps)
    return dh.astype(jnp.float32) / norm[..., None], dden


def row_dot(x: jax.Array, dx: jax.Array) -> jax.Array:
    """sum_d x[..., d] * dx[..., d] in float32: the per-token products q_t·dq_t, k_t·dk_t `gate_gradients` needs."""
    return jnp.sum(x.astype(jnp.float32) * dx.astype(jnp.float32), axis=-1)


def gate_gradients(
    qdq: jax.Array,
    kdk: jax.Array,
    i: jax.Array,
    f: jax.Array,
    m_initial: jax.Array,
    *,
    first_state_dot: jax.Array,
    last_state_dot: jax.Array,
    dm_last: jax.Array | None,
    max_state: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of i, f and m_initial from the complete dq, dk (docs/math.md §5.5, the m_S path included).

    qdq, kdk: row_dot(q, dq), row_dot(k, dk) (B, NH, S) float32; i, f: (B, NH, S); m_initial: (B, NH) (zeros if
    none was given).
    first_state_dot = <C̃_0, dC̃_0> + <ñ_0, dñ_0>, last_state_dot = <C̃_S, dC̃_S> + <ñ_S, dñ_S> with dC̃_S, dñ_S the
    cotangents of the returned last states; dm_last: cotangent of the returned m_S or None. All (B, NH) float32.
    max_state False: the stabilizer was held at 0 and m_0 not used (KernelConfig.max_state): m_S is no function of
    the gates or m_0, and dm_initial is 0.
    Returns di, df (B, NH, S) and dm_initial (B, NH), float32.
    """
    f32 = jnp.float32
    di = kdk
    dlogf = reverse_cumsum(qdq - kdk) + last_state_dot[..., None]
    dm_initial = first_state_dot

    logf, logf_vjp = jax.vjp(log_forget, f.astype(f32))
    if max_state:
        # m_S = max(m_0 + sum_r logf_r, max_t (i_t + sum_{r>t} logf_r)): its derivative follows the argmax. The
        # returned C̃_S = C_S e^{-m_S} depends on m_S too, hence -last_state_dot.
        tau = -last_state_dot if dm_last is None else dm_last.astype(f32) - last_state_dot
        suffix = reverse_cumsum(logf)
        after_t = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
        candidates = jnp.concatenate([(m_initial + suffix[..., 0])[..., None], i.astype(f32) + after_t], axis=-1)
        source = jax.nn.one_hot(jnp.argmax(candidates, axis=-1), candidates.shape[-1], dtype=f32)
        di = di + tau[..., None] * source[..., 1:]
        dlogf = dlogf + tau[..., None] * jnp.cumsum(source, axis=-1)[..., :-1]
        dm_initial = dm_initial + tau * source[..., 0]
    else:
        dm_initial = jnp.zeros_like(dm_initial)

    (df,) = logf_vjp(dlogf)
    return di, df, dm_initial
