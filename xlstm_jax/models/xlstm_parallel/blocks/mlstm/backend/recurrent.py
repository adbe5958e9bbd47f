"""Recurrent mLSTM backend (seed 004): one step at a time, and the `native_recurrent` implementation.

Gradients are plain autodiff through the recurrence (true derivatives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.base import check_inputs, log_sigmoid, qk_scale, resolve_compute_dtype
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend

F32 = jnp.float32


def recurrent_step_fw(matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF, eps=1e-6):
    """This is a single step of the mLSTM operation in recurrent form.

    matC_state (B, NH, DHQK, DHV), vecN_state (B, NH, DHQK), scaM_state (B, NH, 1); vecQ, vecK (B, NH, DHQK),
    vecV (B, NH, DHV); scaI, scaF (B, NH, 1) gate pre-activations; eps: denominator epsilon. Gate math and the
    state update run in the state dtype; products accumulate in float32. Returns (h (B, NH, DHV) in q's dtype,
    (matC_state_new, vecN_state_new, scaM_state_new)).
    """
    sdt, qdt = matC_state.dtype, vecQ.dtype
    log_f = log_sigmoid(scaF.astype(sdt))
    i = scaI.astype(sdt)
    m_new = jnp.maximum(log_f + scaM_state, i)
    f_bar = jnp.exp(log_f + scaM_state - m_new)
    i_bar = jnp.exp(i - m_new)
    c_new = f_bar[..., None] * matC_state + i_bar[..., None] * (
        vecK.astype(sdt)[..., :, None] * vecV.astype(sdt)[..., None, :])
    n_new = f_bar * vecN_state + i_bar * vecK.astype(sdt)
    q = vecQ * jnp.asarray(qk_scale(vecQ.shape[-1]), qdt)
    num = jnp.einsum("bhd,bhdv->bhv", q, c_new.astype(qdt), preferred_element_type=F32).astype(sdt)
    qn = jnp.einsum("bhd,bhd->bh", q, n_new.astype(qdt), preferred_element_type=F32).astype(sdt)
    den = jnp.maximum(jnp.abs(qn)[..., None], jnp.exp(-m_new)) + eps
    return (num / den).astype(qdt), (c_new, n_new, m_new)


def recurrent_sequence_fw(
    queries, keys, values, igate_preact, fgate_preact, c_initial=None, n_initial=None, m_initial=None,
    return_last_states=False, eps=1e-6, state_dtype=None, use_scan=False,
    mlstm_step_fn: Callable = recurrent_step_fw,
):
    """Forward pass of the mLSTM cell in recurrent form on a full sequence.

    queries, keys (B, NH, S, DHQK); values (B, NH, S, DHV); gates (B, NH, S, 1) or (B, NH, S); optional initial
    states (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH) — all three or none (zeros otherwise, in state_dtype or the
    forget gate's dtype). state_dtype: cast the states to it. use_scan: lax.scan instead of an unrolled loop.
    Returns h (B, NH, S, DHV), or (h, (C, n, m)) with m (B, NH), each state cast back to its initial state's dtype.
    """
    i3, f3, shape = check_inputs(queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial, m_initial)
    sdt = jnp.dtype(state_dtype) if state_dtype is not None else None
    if c_initial is None:
        sdt = sdt or jnp.result_type(fgate_preact)
        states = (jnp.zeros((shape.B, shape.NH, shape.DHQK, shape.DHHV), sdt),
                  jnp.zeros((shape.B, shape.NH, shape.DHQK), sdt), jnp.zeros((shape.B, shape.NH, 1), sdt))
    else:
        states = (c_initial, n_initial, m_initial[..., None])
        if sdt is not None:
            states = tuple(s.astype(sdt) for s in states)

    def step(carry, xs):
        q, k, v, i, f = xs
        h, carry = mlstm_step_fn(*carry, q, k, v, i[..., None], f[..., None], eps=eps)
        return carry, h

    seq = [jnp.moveaxis(x, 2, 0) for x in (queries, keys, values, i3, f3)]
    if shape.S == 1:
        states, h = step(states, [x[0] for x in seq])
        h = h[:, :, None]
    elif use_scan:
        states, h = jax.lax.scan(step, states, seq)
        h = jnp.moveaxis(h, 0, 2)
    else:
        hs = []
        for t in range(shape.S):
            states, h_t = step(states, [x[t] for x in seq])
            hs.append(h_t)
        h = jnp.stack(hs, axis=2)
    if not return_last_states:
        return h
    c, n, m = states
    m = m[..., 0]
    if c_initial is not None:
        c, n, m = c.astype(c_initial.dtype), n.astype(n_initial.dtype), m.astype(m_initial.dtype)
    return h, (c, n, m)


def mlstm_recurrent(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
    return_last_states=False, eps=1e-6, chunk_size=None, autocast_dtype=None,
):
    """`xlstm_jax.mlstm(backend="native_recurrent")`: lax.scan over steps, float32 states, matmul operands in the
    compute dtype; h in q's dtype."""
    dt = resolve_compute_dtype(autocast_dtype, q.dtype)
    states = {}
    if c_initial is not None:
        states = dict(c_initial=c_initial.astype(F32), n_initial=n_initial.astype(F32),
                      m_initial=m_initial.astype(F32))
    out = recurrent_sequence_fw(
        q.astype(dt), k.astype(dt), v.astype(dt), i.astype(F32), f.astype(F32), **states,
        return_last_states=return_last_states, eps=eps, state_dtype="float32", use_scan=True,
    )
    if return_last_states:
        return out[0].astype(q.dtype), out[1]
    return out.astype(q.dtype)


@dataclasses.dataclass
class mLSTMBackendRecurrentConfig:
    """Configuration of the recurrent backend."""

    context_length: int = -1
    eps: float = 1e-6
    state_dtype: str | None = None
    use_scan: bool = False

    def assign_model_config_params(self, model_config) -> None:
        """Take `context_length` from the model config when it has one."""
        self.context_length = getattr(model_config, "context_length", self.context_length)


@register_backend("recurrent")
class mLSTMBackendRecurrent(mLSTMBackend):
    """Step-by-step mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendRecurrentConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """See `recurrent_sequence_fw`; eps, state_dtype and use_scan come from the config."""
        cfg = self.config
        return recurrent_sequence_fw(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states,
                                     eps=cfg.eps, state_dtype=cfg.state_dtype, use_scan=cfg.use_scan)

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
