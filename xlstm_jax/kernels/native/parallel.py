"""Parallel (quadratic) mLSTM in XLA (docs/math.md §2): the documented function `parallel_stabilized_simple` (its
documented home is models/xlstm_parallel/blocks/mlstm/backend/simple.py) and `mlstm_parallel`, the
`native_parallel` implementation of `xlstm_jax.mlstm`.

The log forget-gate matrix is built in the stable form (a masked cumsum, so every entry is a sum of its own terms
only, never a difference of long cumsums). Gradients are plain autodiff, i.e. true derivatives. Memory is O(S^2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    MLSTMShape,
    check_eps,
    check_float_array,
    einsum_in,
    exp_neg,
    floating_dtype,
    initial_states_or_zeros,
    log_forget,
    matmul_precision,
    poison_from,
    qk_scale,
    resolve_compute_dtype,
    zero_nonfinite_rows,
)

F32 = jnp.float32


def log_forget_matrix(logf: jax.Array) -> jax.Array:
    """F[..., t, s] = sum_{r=s+1..t} logf[..., r] for s <= t (0 on the diagonal), -inf above it.

    logf (..., S) -> (..., S, S), same dtype. Stable form: a cumsum down the rows of a strictly lower-triangular
    broadcast of logf, so no entry is a difference of two long sums.
    """
    S = logf.shape[-1]
    strict = jnp.tril(jnp.ones((S, S), bool), k=-1)
    F = jnp.cumsum(jnp.where(strict, logf[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((S, S), bool)), F, -jnp.inf)


def _resolve_dtype(dtype: Any, arrays: dict[str, Any], what: str) -> jnp.dtype:
    """`what` (qkv_dtype / gate_dtype): None -> the one dtype all `arrays` share (TypeError if they differ)."""
    if dtype is not None:
        return floating_dtype(dtype, what)
    dtypes = {name: jnp.result_type(x) for name, x in arrays.items()}
    if len(set(dtypes.values())) != 1:
        found = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise TypeError(f"{' and '.join(dtypes)} must share one dtype when {what} is None, got {found}.")
    return next(iter(dtypes.values()))


def _check_simple_inputs(queries, keys, values, igate_preact, fgate_preact) -> None:
    for name, x in (("queries", queries), ("keys", keys), ("values", values), ("igate_preact", igate_preact),
                    ("fgate_preact", fgate_preact)):
        check_float_array(x, name)
    if np.ndim(queries) < 2:
        raise ValueError(f"queries must be (..., S, DHQK), got shape {np.shape(queries)}.")
    lead = np.shape(queries)[:-1]
    if np.shape(keys) != np.shape(queries):
        raise ValueError(f"keys must have the shape of queries {np.shape(queries)}, got {np.shape(keys)}.")
    if np.ndim(values) != len(lead) + 1 or np.shape(values)[:-1] != lead:
        raise ValueError(f"values must have shape (..., S, DHV) with (..., S) = {lead}, got {np.shape(values)}.")
    for name, g in (("igate_preact", igate_preact), ("fgate_preact", fgate_preact)):
        if np.shape(g) != (*lead, 1):
            raise ValueError(f"{name} must have shape (..., S, 1) = {(*lead, 1)}, got {np.shape(g)}.")


def _leading_mask(mask: Any, S: int) -> jax.Array | None:
    """The leading S x S block of a boolean mask of shape (>= S, >= S)."""
    if mask is None:
        return None
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"lower_triangular_matrix must be boolean, got dtype {jnp.result_type(mask)}.")
    shape = np.shape(mask)
    if len(shape) != 2 or min(shape) < S:
        raise ValueError(f"lower_triangular_matrix must be 2-D and at least ({S}, {S}) for S={S}, got shape {shape}.")
    return jnp.asarray(mask)[:S, :S]


def parallel_stabilized_simple(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    igate_preact: jax.Array,
    fgate_preact: jax.Array,
    lower_triangular_matrix: jax.Array | None = None,
    stabilize_rowwise: bool = True,
    eps: float = 1e-6,
    qkv_dtype: Any = None,
    gate_dtype: Any = None,
) -> jax.Array:
    """This is the mLSTM cell in parallel form, stabilized so that every exp() argument is <= 0.

    queries, keys (..., S, DHQK); values (..., S, DHV); igate_preact, fgate_preact (..., S, 1): the documented
    (B, NH, S, ·) layout, per-head (B, S, ·) under a vmap over heads, or any leading dims.
    lower_triangular_matrix: optional boolean (>= S, >= S) mask; its leading S x S block is used.
    stabilize_rowwise: subtract the maximum of each row (True) or one maximum over the last two axes (False).
    eps: added to the normalizer. qkv_dtype / gate_dtype: None infers them from the inputs (which must agree, else
    TypeError); given, the inputs are cast to them. Gate math runs in float32 (or wider), the QK^T and the value
    products take qkv_dtype operands with float32 accumulation. Returns h (..., S, DHV) in qkv_dtype.
    """
    _check_simple_inputs(queries, keys, values, igate_preact, fgate_preact)
    eps = check_eps(eps)
    S, DHQK = np.shape(queries)[-2:]
    mask = _leading_mask(lower_triangular_matrix, S)
    qkv_dtype = _resolve_dtype(qkv_dtype, {"queries": queries, "keys": keys, "values": values}, "qkv_dtype")
    gate_dtype = _resolve_dtype(gate_dtype, {"igate_preact": igate_preact, "fgate_preact": fgate_preact}, "gate_dtype")
    acc = jnp.promote_types(qkv_dtype, F32)
    gate_math = jnp.promote_types(gate_dtype, F32)
    q, k, v = (jnp.asarray(x).astype(qkv_dtype) for x in (queries, keys, values))
    i, f = (jnp.asarray(g).astype(gate_dtype).astype(gate_math)[..., 0] for g in (igate_preact, fgate_preact))

    allowed = jnp.tril(jnp.ones((S, S), bool)) if mask is None else jnp.tril(mask)
    log_d = jnp.where(allowed, log_forget_matrix(log_forget(f)) + i[..., None, :], -jnp.inf)
    max_log_d = jnp.max(log_d, axis=(-1,) if stabilize_rowwise else (-2, -1), keepdims=True)
    scores = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=acc,
                        precision=matmul_precision(qkv_dtype)) * qk_scale(DHQK)
    # masked entries are selected away, not multiplied by 0: a NaN at position s must not reach earlier positions
    c = jnp.where(allowed, scores * jnp.exp(log_d - max_log_d), 0.0)
    normalizer = jnp.maximum(jnp.abs(jnp.sum(c, axis=-1, keepdims=True)), exp_neg(max_log_d))
    v_finite, v_bad = zero_nonfinite_rows(v)
    h = einsum_in("...ts,...sv->...tv", c / (normalizer + eps), v_finite, qkv_dtype)
    return poison_from(h, v_bad).astype(qkv_dtype)


def mlstm_parallel(x: MLSTMInputs, o: MLSTMOptions, chunk_size: None = None):
    """`xlstm_jax.mlstm(backend="native_parallel")`: the quadratic form with initial and last states.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S); optional states (B, NH, DHQK, DHHV), (B, NH, DHQK),
    (B, NH) (inputs already validated; chunk_size is unused). The initial state is one more column with log weight
    F_{t,0} + m_0 (m_0 = 0 without initial states) and takes part in the row max, so the row stabilizer equals the
    recurrent m_t; the last states are closed-form weighted sums. Matmul operands in the autocast dtype (None: q's),
    gate math float32. Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) with float32 states.
    """
    q, k, v, i, f = x[:5]
    B, NH, S, DHQK = q.shape
    dt = resolve_compute_dtype(o.autocast_dtype, q.dtype)
    scale = qk_scale(DHQK)

    def dot(spec, a, b):
        return einsum_in(spec, a, b, dt)

    c0, n0, m0 = initial_states_or_zeros(*x[5:], MLSTMShape(B, NH, S, DHQK, v.shape[-1]), x[:5])
    logf = log_forget(f.astype(F32))
    causal = jnp.tril(jnp.ones((S, S), bool))
    log_d = jnp.where(causal, log_forget_matrix(logf) + i.astype(F32)[..., None, :], -jnp.inf)  # (B, NH, S, S)
    log_w0 = jnp.cumsum(logf, axis=-1) + m0[..., None]  # F_{t,0} + m_0, (B, NH, S)
    m_t = jnp.maximum(jnp.max(log_d, axis=-1), log_w0)
    # acausal entries are selected away, not multiplied by 0: a NaN at position s must not reach earlier positions
    s_bar = jnp.where(causal, dot("bhtd,bhsd->bhts", q, k) * scale * jnp.exp(log_d - m_t[..., None]), 0.0)
    w0 = jnp.exp(log_w0 - m_t) * scale
    v_finite, v_bad = zero_nonfinite_rows(v)
    num = w0[..., None] * dot("bhtd,bhde->bhte", q, c0) + dot("bhts,bhse->bhte", s_bar, v_finite)
    q_n0 = jnp.einsum("bhtd,bhd->bht", q.astype(F32), n0, precision=jax.lax.Precision.HIGHEST)
    den = w0 * q_n0 + jnp.sum(s_bar, axis=-1)
    h = poison_from(num / (jnp.maximum(jnp.abs(den), exp_neg(m_t)) + o.eps)[..., None], v_bad).astype(q.dtype)
    if not o.return_last_states:
        return h
    m_last = m_t[..., -1]
    k_bar = k.astype(F32) * jnp.exp(log_d[..., -1, :] - m_last[..., None])[..., None]
    decay = jnp.exp(log_w0[..., -1] - m_last)
    c_last = decay[..., None, None] * c0 + dot("bhsd,bhse->bhde", k_bar, v)
    n_last = decay[..., None] * n0 + jnp.sum(k_bar, axis=-2)
    return o.result(h, (c_last, n_last, m_last))
