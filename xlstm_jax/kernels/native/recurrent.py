"""Recurrent mLSTM in XLA (docs/math.md §1.2): the documented functions `recurrent_step_fw` and
`recurrent_sequence_fw` (documented home: models/xlstm_parallel/blocks/mlstm/backend/recurrent.py) and
`mlstm_recurrent`, the `native_recurrent` implementation of `xlstm_jax.mlstm`.

Gradients are plain autodiff through the recurrence (true derivatives, the denominator included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    check_eps,
    checked_inputs,
    einsum_in,
    exp_neg,
    floating_dtype,
    log_forget,
    matmul_precision,
    qk_scale,
    resolve_compute_dtype,
    vary_like,
)

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
    x, _ = checked_inputs(queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial, m_initial)
    sdt = None if state_dtype is None else floating_dtype(state_dtype, "state_dtype")
    h, (c, n, m) = _scan(x, check_eps(eps), sdt, use_scan, mlstm_step_fn)
    if not return_last_states:
        return h
    if c_initial is not None:
        c, n, m = (s.astype(jnp.result_type(x)) for s, x in zip((c, n, m), (c_initial, n_initial, m_initial)))
    return h, (c, n, m)


def _scan(x: MLSTMInputs, eps: float, sdt: Any, use_scan: bool, step_fn: Callable):
    """Checked inputs -> (h (B, NH, S, DHV), (C, n, m (B, NH))): the states in `sdt` (None: the initial states'
    dtypes, or f's dtype for the zero states), time steps unrolled or under lax.scan."""
    B, NH, S, DHQK = x.q.shape
    if x.c_initial is None:
        zeros_dtype = sdt or x.f.dtype
        states = (
            jnp.zeros((B, NH, DHQK, x.v.shape[-1]), zeros_dtype),
            jnp.zeros((B, NH, DHQK), zeros_dtype),
            jnp.zeros((B, NH, 1), zeros_dtype),
        )
    else:
        states = (x.c_initial, x.n_initial, x.m_initial[..., None])
        if sdt is not None:
            states = tuple(s.astype(sdt) for s in states)
    # under shard_map the carry must vary over the inputs' mesh axes from the first step on
    states = tuple(vary_like(s, *x[:5]) for s in states)

    def step(carry, xs):
        c, n, m = carry
        q_t, k_t, v_t, i_t, f_t = xs
        h_t, new = step_fn(
            matC_state=c, vecN_state=n, scaM_state=m, vecQ=q_t, vecK=k_t, vecV=v_t,
            scaI=i_t[..., None], scaF=f_t[..., None], eps=eps,
        )
        return tuple(new), h_t

    time_major = [jnp.moveaxis(a, 2, 0) for a in x[:5]]
    if S == 1:
        states, h = step(states, [a[0] for a in time_major])
        h = h[:, :, None]
    elif use_scan:
        states, h = jax.lax.scan(step, states, time_major)
        h = jnp.moveaxis(h, 0, 2)
    else:
        hs = []
        for t in range(S):
            states, h_t = step(states, [a[t] for a in time_major])
            hs.append(h_t)
        h = jnp.stack(hs, axis=2)
    c, n, m = states
    return h, (c, n, m[..., 0])


@dataclasses.dataclass(frozen=True)
class RecurrentTuning:
    """Knobs of `native_recurrent`: state_dtype (a name; None: each initial state's dtype, f's dtype for zero
    states, as `recurrent_sequence_fw` keeps them) and use_scan (lax.scan over time, or a Python loop)."""

    state_dtype: str | None = "float32"
    use_scan: bool = True


def mlstm_recurrent(x: MLSTMInputs, o: MLSTMOptions, chunk_size: None = None, tuning: RecurrentTuning | None = None):
    """`xlstm_jax.mlstm(backend="native_recurrent")`: one step at a time (chunk_size is unused). Matmul operands in
    the autocast dtype (None: q's dtype), gate pre-activations float32, states float32 under lax.scan unless
    `tuning` says otherwise. Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) in the state dtype."""
    t = tuning or RecurrentTuning()
    if not isinstance(t, RecurrentTuning):
        raise TypeError(f"native_recurrent takes a RecurrentTuning, got {type(t).__name__}.")
    dt = resolve_compute_dtype(o.autocast_dtype, x.q.dtype)
    sdt = None if t.state_dtype is None else floating_dtype(t.state_dtype, "state_dtype")
    cast = MLSTMInputs(*(a.astype(dt) for a in x[:3]), x.i.astype(F32), x.f.astype(F32), *x[5:])
    h, last = _scan(cast, o.eps, sdt, t.use_scan, recurrent_step_fw)
    return o.result(h.astype(x.q.dtype), last)
