"""Recurrent mLSTM: the seed-004 step and sequence functions and backend, and the `native_recurrent`
implementation of `xlstm_jax.mlstm` (docs/math.md §1.2).

Gradients are plain autodiff through the recurrence (true derivatives, the denominator included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.base import (
    check_eps,
    check_inputs,
    einsum_in,
    exp_neg,
    log_forget,
    matmul_precision,
    qk_scale,
    resolve_compute_dtype,
    vary_like,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend

F32 = jnp.float32


def _check_step(matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF) -> None:
    if np.ndim(matC_state) != 4:
        raise ValueError(f"matC_state must be (B, NH, DHQK, DHV), got shape {np.shape(matC_state)}.")
    B, NH, DHQK, DHV = np.shape(matC_state)
    expected = {
        "vecN_state": (vecN_state, (B, NH, DHQK)),
        "scaM_state": (scaM_state, (B, NH, 1)),
        "vecQ": (vecQ, (B, NH, DHQK)),
        "vecK": (vecK, (B, NH, DHQK)),
        "vecV": (vecV, (B, NH, DHV)),
        "scaI": (scaI, (B, NH, 1)),
        "scaF": (scaF, (B, NH, 1)),
    }
    for name, (x, shape) in expected.items():
        if np.shape(x) != shape:
            raise ValueError(f"{name} must have shape {shape} (from matC_state (B, NH, DHQK, DHV)), "
                             f"got {np.shape(x)}.")


def recurrent_step_fw(
    matC_state: jax.Array,
    vecN_state: jax.Array,
    scaM_state: jax.Array,
    vecQ: jax.Array,
    vecK: jax.Array,
    vecV: jax.Array,
    scaI: jax.Array,
    scaF: jax.Array,
    eps: float = 1e-6,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """This is a single step of the mLSTM operation in recurrent form.

    matC_state (B, NH, DHQK, DHV), vecN_state (B, NH, DHQK), scaM_state (B, NH, 1); vecQ, vecK (B, NH, DHQK),
    vecV (B, NH, DHV); scaI, scaF (B, NH, 1) gate pre-activations; eps: the denominator epsilon.
    dtypes: the gates are cast to the state dtype (matC_state's); gate math and state updates run in it (promoted
    with the other states); q·C takes q-dtype operands with float32 (or wider) accumulation, q·n runs in float32
    (or wider); the division runs in the state dtype. Returns (h (B, NH, DHV) in vecQ's dtype,
    (C_new, n_new, m_new (B, NH, 1))), each new state in the dtype of the state passed in.
    """
    _check_step(matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF)
    eps = check_eps(eps)
    sdt, qdt = matC_state.dtype, vecQ.dtype
    acc = jnp.promote_types(qdt, F32)
    log_f = log_forget(scaF.astype(sdt))
    m_new = jnp.maximum(log_f + scaM_state, scaI.astype(sdt))
    f_bar = jnp.exp(log_f + scaM_state - m_new)
    i_bar = jnp.exp(scaI.astype(sdt) - m_new)
    k, v = vecK.astype(sdt), vecV.astype(sdt)
    c_new = f_bar[..., None] * matC_state + i_bar[..., None] * (k[..., :, None] * v[..., None, :])
    n_new = f_bar * vecN_state + i_bar * k
    pdt = m_new.dtype
    scale = qk_scale(vecQ.shape[-1])
    num = einsum_in("bhd,bhdv->bhv", vecQ, c_new, qdt) * scale
    # q·n in float32 (or wider): with n rounded to a 16-bit q dtype the cancellation in this dot product would
    # dominate the error of the denominator and of its gradient.
    ndt = jnp.promote_types(acc, n_new.dtype)
    qn = jnp.einsum("bhd,bhd->bh", vecQ.astype(ndt), n_new.astype(ndt), precision=matmul_precision(ndt))
    qn = qn[..., None] * scale
    den = jnp.maximum(jnp.abs(qn).astype(pdt), exp_neg(m_new)) + eps
    h = (num.astype(pdt) / den).astype(qdt)
    return h, (c_new.astype(sdt), n_new.astype(vecN_state.dtype), m_new.astype(scaM_state.dtype))


def _as_state_dtype(state_dtype: Any) -> jnp.dtype | None:
    if state_dtype is None:
        return None
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError as err:
        raise TypeError(f"state_dtype must be a floating dtype or its name, got {state_dtype!r}.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"state_dtype must be a floating dtype, got {dtype}.")
    return dtype


def recurrent_sequence_fw(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    igate_preact: jax.Array,
    fgate_preact: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
    use_scan: bool = False,
    mlstm_step_fn: Callable = recurrent_step_fw,
):
    """Forward pass of the mLSTM cell in recurrent form on a full sequence.

    queries, keys (B, NH, S, DHQK); values (B, NH, S, DHV); igate_preact, fgate_preact (B, NH, S, 1) or
    (B, NH, S). Initial states c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH): all three or none (zeros, m = 0).
    state_dtype: cast the states to it; None keeps the initial states' dtypes, or makes the zero states in
    fgate_preact's dtype. use_scan: lax.scan over time instead of an unrolled Python loop (S == 1 is one step
    either way). mlstm_step_fn: called with recurrent_step_fw's keyword names.
    Returns h (B, NH, S, DHV) in the qkv dtype, or (h, (C, n, m)) with m (B, NH) and each state cast back to its
    initial state's dtype when initial states were given.
    """
    i3, f3, shape = check_inputs(queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial, m_initial)
    eps = check_eps(eps)
    sdt = _as_state_dtype(state_dtype)
    if c_initial is None:
        zeros_dtype = sdt or jnp.result_type(fgate_preact)
        states = (
            jnp.zeros((shape.B, shape.NH, shape.DHQK, shape.DHHV), zeros_dtype),
            jnp.zeros((shape.B, shape.NH, shape.DHQK), zeros_dtype),
            jnp.zeros((shape.B, shape.NH, 1), zeros_dtype),
        )
    else:
        states = (jnp.asarray(c_initial), jnp.asarray(n_initial), jnp.asarray(m_initial)[..., None])
        if sdt is not None:
            states = tuple(s.astype(sdt) for s in states)
    # under shard_map the carry must vary over the inputs' mesh axes from the first step on
    states = tuple(vary_like(x, queries, keys, values, i3, f3) for x in states)

    def step(carry, xs):
        c, n, m = carry
        q_t, k_t, v_t, i_t, f_t = xs
        h_t, new = mlstm_step_fn(
            matC_state=c, vecN_state=n, scaM_state=m, vecQ=q_t, vecK=k_t, vecV=v_t,
            scaI=i_t[..., None], scaF=f_t[..., None], eps=eps,
        )
        return tuple(new), h_t

    time_major = [jnp.moveaxis(jnp.asarray(x), 2, 0) for x in (queries, keys, values, i3, f3)]
    if shape.S == 1:
        states, h = step(states, [x[0] for x in time_major])
        h = h[:, :, None]
    elif use_scan:
        states, h = jax.lax.scan(step, states, time_major)
        h = jnp.moveaxis(h, 0, 2)
    else:
        hs = []
        for t in range(shape.S):
            states, h_t = step(states, [x[t] for x in time_major])
            hs.append(h_t)
        h = jnp.stack(hs, axis=2)
    if not return_last_states:
        return h
    c, n, m = states
    m = m[..., 0]
    if c_initial is not None:
        c, n, m = (s.astype(jnp.result_type(x)) for s, x in zip((c, n, m), (c_initial, n_initial, m_initial)))
    return h, (c, n, m)


def mlstm_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    *,
    return_last_states: bool = False,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    autocast_dtype: Any = None,
):
    """`xlstm_jax.mlstm(backend="native_recurrent")`: lax.scan over time steps.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S); optional states (inputs already validated;
    chunk_size is unused). States and gate math float32, matmul operands in the autocast dtype (None: q's dtype).
    Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) with float32 states.
    """
    dt = resolve_compute_dtype(autocast_dtype, q.dtype)
    states = {}
    if c_initial is not None:
        states = {"c_initial": c_initial, "n_initial": n_initial, "m_initial": m_initial}
        states = {name: x.astype(F32) for name, x in states.items()}
    out = recurrent_sequence_fw(
        q.astype(dt), k.astype(dt), v.astype(dt), i.astype(F32), f.astype(F32), **states,
        return_last_states=return_last_states, eps=eps, state_dtype=F32, use_scan=True,
    )
    if return_last_states:
        return out[0].astype(q.dtype), out[1]
    return out.astype(q.dtype)


@dataclasses.dataclass
class mLSTMBackendRecurrentConfig:
    """Configuration of the recurrent backend."""

    context_length: int = -1
    """Context length of the model (informational here: any S runs)."""
    eps: float = 1e-6
    """Denominator epsilon."""
    state_dtype: str | None = None
    """dtype of the states (name); None: see `recurrent_sequence_fw`."""
    use_scan: bool = False
    """lax.scan over time instead of an unrolled Python loop."""

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take `context_length` from the model config when it has one."""
        self.context_length = getattr(model_config, "context_length", self.context_length)


@register_backend("recurrent")
class mLSTMBackendRecurrent(mLSTMBackend):
    """Step-by-step mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendRecurrentConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """See `recurrent_sequence_fw`; eps, state_dtype and use_scan come from the config."""
        cfg = self.config
        return recurrent_sequence_fw(
            q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
            return_last_states=return_last_states, eps=cfg.eps, state_dtype=cfg.state_dtype, use_scan=cfg.use_scan,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
