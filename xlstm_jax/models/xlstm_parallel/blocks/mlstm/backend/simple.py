"""Parallel (quadratic) mLSTM backend (seed 002) and the `native_parallel` implementation of `xlstm_jax.mlstm`.

The log forget-gate matrix is built in the stable form (masked cumsum, no differences of long cumsums); gradients
are plain autodiff, i.e. true derivatives. Memory is O(S^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.mlstm.base import MLSTMShape, initial_states_or_zeros, log_sigmoid, qk_scale, resolve_compute_dtype
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend

F32 = jnp.float32


def _log_forget_matrix(logf: jax.Array) -> jax.Array:
    """F[..., t, s] = sum_{r=s+1..t} logf[..., r] for s <= t (0 on the diagonal), -inf above it. logf (..., S)."""
    S = logf.shape[-1]
    strict = jnp.tril(jnp.ones((S, S), bool), k=-1)
    F = jnp.cumsum(jnp.where(strict, logf[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((S, S), bool)), F, -jnp.inf)


def _resolve(dtype, inputs, names, what):
    if dtype is not None:
        return jnp.dtype(dtype)
    dtypes = {jnp.result_type(x) for x in inputs}
    if len(dtypes) != 1:
        raise TypeError(f"{' and '.join(names)} must share one dtype when {what} is None, got {sorted(map(str, dtypes))}.")
    return dtypes.pop()


def parallel_stabilized_simple(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    igate_preact: jax.Array,
    fgate_preact: jax.Array,
    lower_triangular_matrix: jax.Array | None = None,
    stabilize_rowwise: bool = True,
    eps: float = 1e-6,
    qkv_dtype=None,
    gate_dtype=None,
) -> jax.Array:
    """The mLSTM cell in stabilized parallel form.

    queries, keys (..., S, DHQK); values (..., S, DHHV); igate_preact, fgate_preact (..., S, 1) — e.g. the
    documented (B, NH, S, ·) or per-head (B, S, ·) under vmap. lower_triangular_matrix: boolean (>= S, >= S), its
    leading S x S block is the causal mask. stabilize_rowwise: max per row (True) or over the whole S x S matrix.
    qkv_dtype / gate_dtype: None infers them from the inputs (which must agree). Returns h (..., S, DHHV) in
    qkv_dtype.
    """
    S, DHQK = queries.shape[-2:]
    if keys.shape != queries.shape or values.shape[:-1] != queries.shape[:-1]:
        raise ValueError(f"keys must match queries {queries.shape} and values (..., S, DHHV), got keys {keys.shape}, "
                         f"values {values.shape}.")
    for name, g in (("igate_preact", igate_preact), ("fgate_preact", fgate_preact)):
        if g.shape != (*queries.shape[:-1], 1):
            raise ValueError(f"{name} must have shape {(*queries.shape[:-1], 1)}, got {g.shape}.")
    qkv_dtype = _resolve(qkv_dtype, (queries, keys, values), ("queries", "keys", "values"), "qkv_dtype")
    gate_dtype = _resolve(gate_dtype, (igate_preact, fgate_preact), ("igate_preact", "fgate_preact"), "gate_dtype")
    q, k, v = (x.astype(qkv_dtype) for x in (queries, keys, values))
    i, f = igate_preact.astype(gate_dtype)[..., 0], fgate_preact.astype(gate_dtype)[..., 0]

    log_d = _log_forget_matrix(log_sigmoid(f)) + i[..., None, :]
    if lower_triangular_matrix is not None:
        mask = jnp.asarray(lower_triangular_matrix)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"lower_triangular_matrix must be boolean, got {mask.dtype}.")
        if mask.ndim != 2 or min(mask.shape) < S:
            raise ValueError(f"lower_triangular_matrix must be at least ({S}, {S}), got {mask.shape}.")
        log_d = jnp.where(mask[:S, :S], log_d, -jnp.inf)
    axes = (-1,) if stabilize_rowwise else (-2, -1)
    max_log_d = jnp.max(log_d, axis=axes, keepdims=True)
    d = jnp.exp(log_d - max_log_d).astype(qkv_dtype)
    c = (q @ jnp.swapaxes(k * jnp.asarray(qk_scale(DHQK), qkv_dtype), -1, -2)) * d
    normalizer = jnp.maximum(jnp.abs(jnp.sum(c, axis=-1, keepdims=True)), jnp.exp(-max_log_d).astype(qkv_dtype))
    return (c / (normalizer + eps)) @ v


def mlstm_parallel(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
    return_last_states=False, eps=1e-6, chunk_size=None, autocast_dtype=None,
):
    """`xlstm_jax.mlstm(backend="native_parallel")`: the parallel form with initial and last states.

    The initial state enters as one more column with log weight F_{t,0} + m_0 (m_0 = 0 without initial states),
    so the row stabilizer equals the recurrent m_t. q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S).
    Returns h in q's dtype, or (h, (C, n, m)) with float32 states.
    """
    B, NH, S, DHQK = q.shape
    dt = resolve_compute_dtype(autocast_dtype, q.dtype)

    c0, n0, m0 = initial_states_or_zeros(c_initial, n_initial, m_initial, MLSTMShape(B, NH, S, DHQK, v.shape[-1]))
    logf = log_sigmoid(f.astype(F32))
    log_d = _log_forget_matrix(logf) + i.astype(F32)[..., None, :]
    log_w0 = jnp.cumsum(logf, axis=-1) + m0[..., None]
    m_t = jnp.maximum(jnp.max(log_d, axis=-1), log_w0)
    scale = qk_scale(DHQK)
    s_bar = jnp.einsum("bhtd,bhsd->bhts", q.astype(dt), k.astype(dt), preferred_element_type=F32) * scale
    s_bar = s_bar * jnp.exp(log_d - m_t[..., None])
    w0 = jnp.exp(log_w0 - m_t)
    num = (w0 * scale)[..., None] * jnp.einsum("bhtd,bhde->bhte", q.astype(dt), c0.astype(dt),
                                               preferred_element_type=F32)
    num = num + jnp.einsum("bhts,bhse->bhte", s_bar.astype(dt), v.astype(dt), preferred_element_type=F32)
    den = w0 * scale * jnp.einsum("bhtd,bhd->bht", q.astype(F32), n0) + jnp.sum(s_bar, axis=-1)
    h = (num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t)) + eps)[..., None]).astype(q.dtype)
    if not return_last_states:
        return h
    m_last = m_t[..., -1]
    w = jnp.exp(log_d[..., -1, :] - m_last[..., None])
    w_init = jnp.exp(log_w0[..., -1] - m_last)
    kw = k.astype(F32) * w[..., None]
    c_last = w_init[..., None, None] * c0 + jnp.einsum("bhsd,bhse->bhde", kw.astype(dt), v.astype(dt),
                                                       preferred_element_type=F32)
    n_last = w_init[..., None] * n0 + jnp.sum(kw, axis=-2)
    return h, (c_last, n_last, m_last)


@dataclasses.dataclass
class mLSTMBackendParallelConfig:
    """Configuration of the parallel backend: the longest sequence it builds a mask for (-1: any)."""

    context_length: int = -1

    def assign_model_config_params(self, model_config) -> None:
        """Take `context_length` from the model config when it has one."""
        self.context_length = getattr(model_config, "context_length", self.context_length)


@register_backend("parallel_stabilized")
class mLSTMBackendParallel(mLSTMBackend):
    """Parallel stabilized mLSTM; per-head (B, S, D) inputs (vmapped over heads) or (B, NH, S, D)."""

    config_class = mLSTMBackendParallelConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """Gates (..., S, 1) (or (B, NH, S) with 4-D inputs). Any S <= context_length (any S when it is -1).
        Initial or last states are served by the state-aware parallel form (4-D inputs only)."""
        S = q.shape[-2]
        ctx = self.config.context_length
        if ctx != -1 and S > ctx:
            raise ValueError(f"sequence length S={S} exceeds the backend's context_length={ctx}.")
        if return_last_states or c_initial is not None or n_initial is not None or m_initial is not None:
            if q.ndim != 4:
                raise ValueError(f"initial/last states need 4-D (B, NH, S, DHQK) inputs, got q of shape {q.shape}.")
            from xlstm_jax.mlstm.api import mlstm

            return mlstm(q, k, v, i, f, backend="native_parallel", c_initial=c_initial, n_initial=n_initial,
                         m_initial=m_initial, return_last_states=return_last_states)
        if i.ndim == q.ndim - 1:
            i, f = i[..., None], f[..., None]
        mask = None if ctx == -1 else jnp.asarray(np.tril(np.ones((ctx, ctx), bool)))
        return parallel_stabilized_simple(q, k, v, i, f, lower_triangular_matrix=mask)

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend is written independent of the heads dimension, and thus can be vmapped.

        Returns:
            bool: True
        """
        return True
