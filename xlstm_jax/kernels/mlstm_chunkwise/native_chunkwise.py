"""Native (XLA) chunkwise mLSTM with a hand-written custom_vjp backward — the CPU/TPU backend and the readable
reference of the Triton kernels (the same math, in jnp, one chunk axis NC instead of a grid).

Memory is O(S): chunk-border states only (recomputed in the backward), intra-chunk L x L tiles. Any S (neutral
padding), initial states in, last states out, true derivatives for every input (DESIGN.md §2; common.py).
Shapes: q, k (B, NH, S, DHQK), v (B, NH, S, DHHV), gates (B, NH, S); inside, (B, NH, NC, L, ·).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.mlstm_chunkwise.common import chunk_gates, denominator_cotangent, gate_gradients
from xlstm_jax.mlstm.base import (
    check_chunk_size,
    check_inputs,
    initial_states_or_zeros,
    pad_to_multiple,
    qk_scale,
    resolve_compute_dtype,
)

F32 = jnp.float32


def _chunked(x: jax.Array, L: int) -> jax.Array:
    """(B, NH, S, ...) -> (B, NH, NC, L, ...)."""
    return x.reshape(*x.shape[:2], x.shape[2] // L, L, *x.shape[3:])


def _dot(spec: str, a: jax.Array, b: jax.Array, dt) -> jax.Array:
    return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=F32)


def _chunk_states(k, v, vec_a, sca_g, c0, n0, m0, dt):
    """States before every chunk and the last: C (NC+1, B, NH, DHQK, DHHV), n (NC+1, B, NH, DHQK), m (NC+1, B, NH)."""

    def step(carry, xs):
        c, n, m = carry
        k_c, v_c, a, g = xs
        m_new = jnp.maximum(g + m, jnp.max(a, axis=-1))
        kbar = k_c.astype(F32) * jnp.exp(a - m_new[..., None])[..., None]
        decay = jnp.exp(g + m - m_new)
        c_new = decay[..., None, None] * c + _dot("bhld,bhle->bhde", kbar, v_c, dt)
        n_new = decay[..., None] * n + jnp.sum(kbar, axis=-2)
        return (c_new, n_new, m_new), (c, n, m)

    xs = (jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0), jnp.moveaxis(vec_a, 2, 0), jnp.moveaxis(sca_g, 2, 0))
    last, before = jax.lax.scan(step, (c0, n0, m0), xs)
    return tuple(jnp.concatenate([b, l[None]], axis=0) for b, l in zip(before, last))


def _intra(vec_b, i, m_prev):
    """log D (B, NH, NC, L, L) with -inf above the diagonal, and the per-token stabilizer m_t (B, NH, NC, L)."""
    L = vec_b.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), bool))
    log_d = jnp.where(causal, vec_b[..., :, None] - vec_b[..., None, :] + i[..., None, :], -jnp.inf)
    m_t = jnp.maximum(vec_b + m_prev[..., None], jnp.max(log_d, axis=-1))
    return log_d, m_t


def _forward(q, k, v, i, f, c0, n0, m0, L, eps, dt):
    """Padded inputs -> h (B, NH, NC, L, DHHV) f32, den, m_t (B, NH, NC, L) f32, and the states."""
    scale = qk_scale(q.shape[-1])
    q, k, v = _chunked(q, L), _chunked(k, L), _chunked(v, L)
    vec_b, vec_a, sca_g = chunk_gates(i, f, L)
    c_all, n_all, m_all = _chunk_states(k, v, vec_a, sca_g, c0, n0, m0, dt)
    c_prev, n_prev, m_prev = (jnp.moveaxis(x[:-1], 0, 2) for x in (c_all, n_all, m_all))
    log_d, m_t = _intra(vec_b, _chunked(i, L), m_prev)
    s_bar = _dot("bhctd,bhcsd->bhcts", q, k, dt) * scale * jnp.exp(log_d - m_t[..., None])
    inter = jnp.exp(vec_b + m_prev[..., None] - m_t) * scale
    num = inter[..., None] * _dot("bhctd,bhcde->bhcte", q, c_prev, dt) + _dot("bhcts,bhcse->bhcte", s_bar, v, dt)
    den = inter * jnp.einsum("bhctd,bhcd->bhct", q.astype(F32), n_prev) + jnp.sum(s_bar, axis=-1)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t)) + eps)[..., None]
    return h, den, m_t, (c_all, n_all, m_all)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _core(q, k, v, i, f, c0, n0, m0, L, eps, dt_name):
    return _core_fwd(q, k, v, i, f, c0, n0, m0, L, eps, dt_name)[0]


def _core_fwd(q, k, v, i, f, c0, n0, m0, L, eps, dt_name):
    B, NH, S, _ = q.shape
    qp, kp, vp, ip, fp = pad_to_multiple(q, k, v, i, f, L)
    h, den, m_t, (c_all, n_all, m_all) = _forward(qp, kp, vp, ip, fp, c0, n0, m0, L, eps, jnp.dtype(dt_name))
    h = h.reshape(B, NH, -1, h.shape[-1]).astype(q.dtype)
    out = (h[:, :, :S], c_all[-1], n_all[-1], m_all[-1])
    return out, (q, k, v, i, f, c0, n0, m0, h, den, m_t)


def _core_bwd(L, eps, dt_name, res, cts):
    q, k, v, i, f, c0, n0, m0, h, den, m_t = res
    dh, dc_last, dn_last, dm_last = cts
    dt = jnp.dtype(dt_name)
    B, NH, S, DHQK = q.shape
    scale = qk_scale(DHQK)
    qp, kp, vp, ip, fp = pad_to_multiple(q, k, v, i, f, L)
    dh = jnp.pad(dh, ((0, 0), (0, 0), (0, qp.shape[2] - S), (0, 0)))
    vec_b, vec_a, sca_g = chunk_gates(ip, fp, L)
    qc, kc, vc, ic = _chunked(qp, L), _chunked(kp, L), _chunked(vp, L), _chunked(ip, L)
    c_all, n_all, m_all = _chunk_states(kc, vc, vec_a, sca_g, c0, n0, m0, dt)
    norm, dden = denominator_cotangent(_chunked(dh, L), h.reshape(*dh.shape[:2], -1, L, dh.shape[-1]), den,
                                       jnp.exp(-m_t), eps)
    delta_h = _chunked(dh, L).astype(F32) / norm[..., None]
    m_prev, m_next = jnp.moveaxis(m_all[:-1], 0, 2), jnp.moveaxis(m_all[1:], 0, 2)
    qbar = qc.astype(F32) * (jnp.exp(vec_b + m_prev[..., None] - m_t) * scale)[..., None]

    def step(carry, xs):  # backwards over chunks: carry = gradient w.r.t. the state after the chunk
        dc, dn = carry
        qb, dhc, ddc, g, mp, mn = xs
        decay = jnp.exp(g + mp - mn)
        dc_new = decay[..., None, None] * dc + _dot("bhld,bhle->bhde", qb, dhc, dt)
        dn_new = decay[..., None] * dn + jnp.einsum("bhld,bhl->bhd", qb, ddc)
        return (dc_new, dn_new), (dc, dn)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (qbar, delta_h, dden, sca_g, m_prev, m_next))
    (dc0, dn0), (dc_next, dn_next) = jax.lax.scan(step, (dc_last.astype(F32), dn_last.astype(F32)), xs, reverse=True)
    dc_next, dn_next = jnp.moveaxis(dc_next, 0, 2), jnp.moveaxis(dn_next, 0, 2)
    c_prev, n_prev = jnp.moveaxis(c_all[:-1], 0, 2), jnp.moveaxis(n_all[:-1], 0, 2)

    log_d, _ = _intra(vec_b, ic, m_prev)
    d_bar = jnp.exp(log_d - m_t[..., None])
    ds = (_dot("bhcte,bhcse->bhcts", delta_h, vc, dt) + dden[..., None]) * d_bar
    inter = jnp.exp(vec_b + m_prev[..., None] - m_t) * scale
    abar = jnp.exp(vec_a - m_next[..., None])
    dq = _dot("bhcts,bhcsd->bhctd", ds, kc, dt) * scale + inter[..., None] * (
        _dot("bhcte,bhcde->bhctd", delta_h, c_prev, dt) + dden[..., None] * n_prev[..., None, :])
    dk = _dot("bhcts,bhctd->bhcsd", ds, qc, dt) * scale + abar[..., None] * (
        _dot("bhcse,bhcde->bhcsd", vc, dc_next, dt) + dn_next[..., None, :])
    sd = _dot("bhctd,bhcsd->bhcts", qc, kc, dt) * scale * d_bar
    dv = _dot("bhcts,bhcte->bhcse", sd, delta_h, dt) + abar[..., None] * _dot("bhcsd,bhcde->bhcse", kc, dc_next, dt)

    flat = lambda x: x.reshape(B, NH, -1, *x.shape[4:])  # noqa: E731
    dq, dk, dv = flat(dq), flat(dk), flat(dv)
    first_dot = jnp.sum(c0 * dc0, axis=(-2, -1)) + jnp.sum(n0 * dn0, axis=-1)
    last_dot = jnp.sum(c_all[-1] * dc_last, axis=(-2, -1)) + jnp.sum(n_all[-1] * dn_last, axis=-1)
    di, df, dm0 = gate_gradients(qp, dq, kp, dk, ip, fp, m0, first_state_dot=first_dot, last_state_dot=last_dot,
                                 dm_last=dm_last)
    cut = lambda x, like: x[:, :, :S].astype(like.dtype)  # noqa: E731
    return (cut(dq, q), cut(dk, k), cut(dv, v), cut(di, i), cut(df, f), dc0, dn0, dm0)


_core.defvjp(_core_fwd, _core_bwd)


def mlstm_chunkwise_native(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
    return_last_states=False, eps=1e-6, chunk_size=64, autocast_dtype=None,
):
    """Chunkwise mLSTM in XLA. q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1);
    optional initial states (all three). chunk_size: power of two in 16..512. Returns h (B, NH, S, DHHV) in q's
    dtype, or (h, (C, n, m)) float32 with `return_last_states`."""
    i, f, shape = check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    L = check_chunk_size(chunk_size, minimum=16, maximum=512)
    dt = resolve_compute_dtype(autocast_dtype, q.dtype)
    c0, n0, m0 = initial_states_or_zeros(c_initial, n_initial, m_initial, shape)
    h, c, n, m = _core(q, k, v, i.astype(F32), f.astype(F32), c0, n0, m0, L, float(eps), dt.name)
    return (h, (c, n, m)) if return_last_states else h
