"""Float64 reference: the literal max-stabilized mLSTM recurrence (docs/math.md §1.2), one time step at a time.

Every backend is tested against this function, and `xlstm-jax doctor` runs it too. Gradients are plain
autodiff through the recurrence (the max, the stabilizer and the denominator included): the true derivative.
Needs 64-bit JAX: call it inside `with jax.enable_x64(True):`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import log_sigmoid


def mlstm_recurrent_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Run the recurrence in float64.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S); optional c (B, NH, DHQK, DHHV), n (B, NH, DHQK),
    m (B, NH). The denominator is max(|q̂·ñ|, norm_val·e^{-m}) + eps, or max(|q̂·ñ|, norm_val) + eps when
    `stabilize_correctly` is False (the m-dependent "stablef" variant). Returns h (B, NH, S, DHHV) and the last
    states (C, n, m), all float64.
    """
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("mlstm_recurrent_reference needs 64-bit JAX: wrap the call in jax.enable_x64(True).")
    f64 = jnp.float64
    q, k, v, i, f = (jnp.asarray(x, f64) for x in (q, k, v, i, f))
    B, NH, S, DHQK = q.shape
    DHHV = v.shape[-1]
    if c_initial is None:
        c0 = jnp.zeros((B, NH, DHQK, DHHV), f64)
        n0 = jnp.zeros((B, NH, DHQK), f64)
        m0 = jnp.zeros((B, NH), f64)
    else:
        c0, n0, m0 = (jnp.asarray(x, f64) for x in (c_initial, n_initial, m_initial))
    qs = q * DHQK**-0.5
    logf = log_sigmoid(f)

    # rematerialized in the backward: autodiff keeps only each step's inputs, not its (B, NH, DHQK, DHHV)
    # intermediates (XLA's temp estimate of the gradient at B=1, NH=2, S=256, DHQK=DHHV=256: 267 against 780 MiB)
    @jax.checkpoint
    def step(state, xs):
        c, n, m = state
        q_t, k_t, v_t, i_t, lf_t = xs
        m_new = jnp.maximum(lf_t + m, i_t)
        fbar = jnp.exp(lf_t + m - m_new)
        ibar = jnp.exp(i_t - m_new)
        c_new = fbar[..., None, None] * c + ibar[..., None, None] * (k_t[..., :, None] * v_t[..., None, :])
        n_new = fbar[..., None] * n + ibar[..., None] * k_t
        num = jnp.einsum("bhd,bhdv->bhv", q_t, c_new)
        # exp(-m) is capped below the float64 overflow: for m < -700 the output and every gradient are ~0 either
        # way, and the cap avoids inf * 0 = NaN in the derivative of the denominator.
        if stabilize_correctly:
            lower = norm_val * jnp.exp(jnp.minimum(-m_new, 700.0))
        else:
            lower = jnp.full_like(m_new, norm_val)
        den = jnp.maximum(jnp.abs(jnp.einsum("bhd,bhd->bh", q_t, n_new)), lower)
        h_t = num / (den[..., None] + eps)
        return (c_new, n_new, m_new), h_t

    time_major = (
        jnp.moveaxis(qs, 2, 0),
        jnp.moveaxis(k, 2, 0),
        jnp.moveaxis(v, 2, 0),
        jnp.moveaxis(i, 2, 0),
        jnp.moveaxis(logf, 2, 0),
    )
    last, h = jax.lax.scan(step, (c0, n0, m0), time_major)
    return jnp.moveaxis(h, 0, 2), last


def mlstm_sig_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The mLSTMsig recurrence in float64 (no max-state): C_t = σ(f_t) C + σ(i_t) k vᵀ, n_t = σ(f_t) n + σ(i_t) k,
    h_t = q̂ᵀC_t / (max(|q̂ᵀn_t|, 1) + eps) with q̂ = q DHQK^-1/2. Shapes as `mlstm_recurrent_reference`; returns
    h (B, NH, S, DHHV) and the last (C, n), float64."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("mlstm_sig_reference needs 64-bit JAX: wrap the call in jax.enable_x64(True).")
    f64 = jnp.float64
    q, k, v, i, f = (jnp.asarray(x, f64) for x in (q, k, v, i, f))
    B, NH, S, DHQK = q.shape
    c0 = jnp.zeros((B, NH, DHQK, v.shape[-1]), f64) if c_initial is None else jnp.asarray(c_initial, f64)
    n0 = jnp.zeros((B, NH, DHQK), f64) if n_initial is None else jnp.asarray(n_initial, f64)

    def step(state, xs):
        c, n = state
        q_t, k_t, v_t, i_t, f_t = xs
        fg, ig = jax.nn.sigmoid(f_t), jax.nn.sigmoid(i_t)
        c = fg[..., None, None] * c + ig[..., None, None] * (k_t[..., :, None] * v_t[..., None, :])
        n = fg[..., None] * n + ig[..., None] * k_t
        den = jnp.maximum(jnp.abs(jnp.einsum("bhd,bhd->bh", q_t, n)), 1.0) + eps
        return (c, n), jnp.einsum("bhd,bhdv->bhv", q_t, c) / den[..., None]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q * DHQK**-0.5, k, v, i, f))
    last, h = jax.lax.scan(step, (c0, n0), xs)
    return jnp.moveaxis(h, 0, 2), last
