"""Backward of the native chunkwise mLSTM: the true derivative of `fw.forward` (docs/math.md §5).

Stabilizers m are held constant (the output depends on them only through eps); the denominator
max(|den|, e^{-m}) is differentiated. `output_cotangents` turns dh into the numerator cotangent δH and the signed
denominator cotangent dden; since den is the numerator of an extra value column of ones, the backward of
docs/math.md §5.3-5.4 runs on the augmented value V' = [V, 1] with δH' = [δH, dden]: next to dC̃ (DHQK x DHHV) a
vector dñ (DHQK) follows the same recurrence over chunk borders, driven by dden. Border states C̃, ñ are recomputed
from the saved border stabilizers; `gate_gradients` finishes di, df and dm_initial (including the exact m_S path).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from xlstm_jax.kernels.base import MLSTMShape, exp_neg, initial_states_or_zeros, qk_scale
from xlstm_jax.kernels.native.chunk_math import chunk_gates, gate_gradients, output_cotangents, row_dot
from xlstm_jax.kernels.native.chunkwise_fw import (
    F32,
    border_decay,
    border_states,
    chunk_major,
    from_chunks,
    intra_log_weights,
    mm,
    to_chunks,
    vec,
)


def _state_cotangents(qc, coef, delta_h, dden, decay, dc_last, dn_last, dt):
    """Reverse recurrence over chunk borders: dC̃_{k-1} = decay_k dC̃_k + sum_t q̄_t δH_tᵀ and
    dñ_{k-1} = decay_k dñ_k + sum_t q̄_t dden_t, from (dc_last, dn_last).

    qc (B, NH, NC, L, DHQK); coef (B, NH, NC, L) with q̄ = coef * q; delta_h (B, NH, NC, L, DHHV), dden (B, NH, NC, L),
    decay (B, NH, NC) float32. Returns dC̃_k, dñ_k for k = 1..NC (the cotangent of the state leaving each chunk),
    chunk-major (NC, B, NH, ...), and dC̃_0, dñ_0; all float32.
    """

    def step(carry, xs):
        dc, dn = carry
        q_c, w, dh_c, dd_c, d = xs
        qbar = q_c.astype(F32) * w[..., None]
        dc_prev = d[..., None, None] * dc + mm("bhld,bhle->bhde", qbar, dh_c, dt)
        dn_prev = d[..., None] * dn + vec("bhld,bhl->bhd", qbar, dd_c)
        return (dc_prev, dn_prev), (dc, dn)

    xs = tuple(chunk_major(x) for x in (qc, coef, delta_h, dden, decay))
    (dc0, dn0), (dc_next, dn_next) = lax.scan(step, (dc_last, dn_last), xs, reverse=True)
    return dc_next, dn_next, dc0, dn0


def backward(residuals, cotangents, *, chunk_size: int, eps: float, dt: jnp.dtype, return_last_states: bool):
    """Gradients of (q, k, v, i, f, c0, n0, m0) of `fw.forward`, in the input dtypes (None for absent states).

    residuals: (q, k, v, i, f, c0, n0, m0, h, den, m_tok, m_border) as saved by the forward (states None when
    none were given). cotangents: dh (B, NH, S, DHHV), or (dh, (dC_S, dn_S, dm_S)) with `return_last_states`.
    """
    q, k, v, i, f, c0, n0, m0, h, den, m_tok, m_border = residuals
    L = chunk_size
    B, NH, S, DHQK = q.shape
    DHHV = v.shape[-1]
    scale = qk_scale(DHQK)
    c0z, n0z, m0z = initial_states_or_zeros(c0, n0, m0, MLSTMShape(B, NH, S, DHQK, DHHV), (q, k, v, i, f))
    if return_last_states:
        dh, (dc_last, dn_last, dm_last) = cotangents
        dc_last, dn_last = dc_last.astype(F32), dn_last.astype(F32)
    else:
        dh, dm_last = cotangents, None
        dc_last, dn_last = jnp.zeros_like(c0z), jnp.zeros_like(n0z)

    qc, kc, vc = to_chunks(q, L), to_chunks(k, L), to_chunks(v, L)
    vec_b, vec_a, sca_g = chunk_gates(i, f, L)
    c_prev, n_prev, c_last, n_last = border_states(kc, vc, vec_a, sca_g, m_border, c0z, n0z, dt)
    delta_h, dden = output_cotangents(dh, h, den, exp_neg(m_tok), eps)
    delta_h, dden, m_tok = to_chunks(delta_h, L), to_chunks(dden, L), to_chunks(m_tok, L)
    coef = jnp.exp(vec_b + m_border[..., :-1, None] - m_tok) * scale
    dc_next, dn_next, dc0, dn0 = _state_cotangents(
        qc, coef, delta_h, dden, border_decay(sca_g, m_border), dc_last, dn_last, dt
    )

    # Intra-chunk part: dS̄_{t,s} = δH_t·v_s + dden_t (the ones column), masked and weighted by D̄.
    d_bar = jnp.exp(intra_log_weights(i, f, L) - m_tok[..., None])
    ds = (mm("bhcte,bhcse->bhcts", delta_h, vc, dt) + dden[..., None]) * d_bar
    s_bar = mm("bhctd,bhcsd->bhcts", qc, kc, dt) * scale * d_bar
    weight = jnp.exp(vec_a - m_border[..., 1:, None])  # e^{a_s - m_k}
    n_prev_b, dn_next_b = jnp.moveaxis(n_prev, 0, 2), jnp.moveaxis(dn_next, 0, 2)  # (B, NH, NC, DHQK)

    dq = mm("bhcts,bhcsd->bhctd", ds, kc, dt) * scale + coef[..., None] * (
        mm("bhcte,cbhde->bhctd", delta_h, c_prev, dt) + dden[..., None] * n_prev_b[..., None, :]
    )
    dk = mm("bhcts,bhctd->bhcsd", ds, qc, dt) * scale + weight[..., None] * (
        mm("bhcse,cbhde->bhcsd", vc, dc_next, dt) + dn_next_b[..., None, :]
    )
    dv = mm("bhcts,bhcte->bhcse", s_bar, delta_h, dt) + weight[..., None] * mm(
        "bhcsd,cbhde->bhcse", kc, dc_next, dt
    )
    dq, dk, dv = from_chunks(dq), from_chunks(dk), from_chunks(dv)

    first_dot = jnp.sum(c0z * dc0, axis=(-2, -1)) + jnp.sum(n0z * dn0, axis=-1)
    if return_last_states:
        last_dot = jnp.sum(c_last * dc_last, axis=(-2, -1)) + jnp.sum(n_last * dn_last, axis=-1)
    else:
        last_dot = jnp.zeros((B, NH), F32)
    di, df, dm0 = gate_gradients(
        row_dot(q, dq), row_dot(k, dk), i, f, m0z, first_state_dot=first_dot, last_state_dot=last_dot, dm_last=dm_last
    )
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), di.astype(i.dtype), df.astype(f.dtype))
    if c0 is None:
        return (*grads, None, None, None)
    return (*grads, dc0.astype(c0.dtype), dn0.astype(n0.dtype), dm0.astype(m0.dtype))
