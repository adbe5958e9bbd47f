"""One mLSTM time step (decoding) in XLA, and its gate factors (the Triton step forms the same ones in its kernel;
the float64 reference is one step of `xlstm_jax.mlstm.reference`).

Per (b, h), s = DHQK^-1/2, gates and states in float32:
    m' = max(log σ(f) + m, i),  f̄ = exp(log σ(f) + m - m'),  ī = exp(i - m')
    C' = f̄ C + ī k vᵀ,  n' = f̄ n + ī k,  h = (s q)ᵀC' / (max(|(s q)ᵀ n'|, e^{-m'}) + eps).
Shapes: q, k (B, NH, DHQK); v (B, NH, DHHV); C (B, NH, DHQK, DHHV); n (B, NH, DHQK); m and the gates (B, NH).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import exp_neg, log_forget, matmul_precision, qk_scale

F32 = jnp.float32


def step_gates(i: jax.Array, f: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(f̄, ī, m') float32 (B, NH) from the gate pre-activations and the max-state."""
    i, m = i.astype(F32), m.astype(F32)
    log_f = log_forget(f.astype(F32))
    m_new = jnp.maximum(log_f + m, i)
    return jnp.exp(log_f + m - m_new), jnp.exp(i - m_new), m_new


def step_native(q, k, v, c, n, m, i, f, eps: float):
    """The step in XLA: float32 gate and state math, states returned in their own dtypes, h in q's dtype."""
    f_bar, i_bar, m_new = step_gates(i, f, m)
    k32, v32, q32 = k.astype(F32), v.astype(F32), q.astype(F32) * qk_scale(q.shape[-1])
    c_new = f_bar[..., None, None] * c.astype(F32) + i_bar[..., None, None] * (k32[..., :, None] * v32[..., None, :])
    n_new = f_bar[..., None] * n.astype(F32) + i_bar[..., None] * k32
    num = jnp.einsum("bhd,bhdv->bhv", q32, c_new, precision=matmul_precision(F32))
    qn = jnp.einsum("bhd,bhd->bh", q32, n_new, precision=matmul_precision(F32))
    h = num / (jnp.maximum(jnp.abs(qn), exp_neg(m_new)) + eps)[..., None]
    return h.astype(q.dtype), (c_new.astype(c.dtype), n_new.astype(n.dtype), m_new.astype(m.dtype))
