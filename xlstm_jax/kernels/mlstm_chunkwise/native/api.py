"""Public native chunkwise mLSTM: neutral padding to a multiple of the chunk size, and the custom_vjp that joins
`fw.forward` to `bw.backward`.

This is the `native_chunkwise` implementation of `xlstm_jax.mlstm` (same signature) and the XLA reference of the
Triton chunkwise kernels. Any S works (padded steps are neutral, so the last states are exact); memory is O(S).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.mlstm_chunkwise.native.bw import backward
from xlstm_jax.kernels.mlstm_chunkwise.native.fw import F32, forward
from xlstm_jax.mlstm.base import check_chunk_size, check_eps, check_inputs, pad_to_multiple, resolve_compute_dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _chunkwise(q, k, v, i, f, c0, n0, m0, chunk_size, eps, dt, return_last_states):
    """Chunk-aligned inputs (see `fw.forward`) -> h, or (h, (C, n, m)) with `return_last_states`."""
    return _chunkwise_fwd(q, k, v, i, f, c0, n0, m0, chunk_size, eps, dt, return_last_states)[0]


def _chunkwise_fwd(q, k, v, i, f, c0, n0, m0, chunk_size, eps, dt, return_last_states):
    h, den, m_tok, m_border, (c_last, n_last) = forward(
        q, k, v, i, f, c0, n0, m0, chunk_size=chunk_size, eps=eps, dt=dt
    )
    out = (h, (c_last, n_last, m_border[..., -1])) if return_last_states else h
    return out, (q, k, v, i, f, c0, n0, m0, h, den, m_tok, m_border)


def _chunkwise_bwd(chunk_size, eps, dt, return_last_states, residuals, cotangents):
    return backward(
        residuals, cotangents, chunk_size=chunk_size, eps=eps, dt=dt, return_last_states=return_last_states
    )


_chunkwise.defvjp(_chunkwise_fwd, _chunkwise_bwd)


def mlstm_chunkwise_native(
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
    chunk_size: int = 64,
    autocast_dtype: Any = None,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Chunkwise mLSTM in XLA with an exact hand-written backward.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) (or (B, NH, S, 1)) gate pre-activations; optional
    initial states c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH), all three or none. chunk_size: power of two
    in 16..512. autocast_dtype: matmul operand dtype ("float32" | "bfloat16" | "float16"; None: q's dtype).
    Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) with float32 states if `return_last_states`.
    """
    i, f, shape = check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    L = check_chunk_size(chunk_size, minimum=16, maximum=512)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    dt = resolve_compute_dtype(autocast_dtype, q.dtype)
    if c_initial is not None:
        c_initial, n_initial, m_initial = (jnp.asarray(x).astype(F32) for x in (c_initial, n_initial, m_initial))
    qp, kp, vp, ip, fp = pad_to_multiple(q, k, v, i.astype(F32), f.astype(F32), L)
    out = _chunkwise(
        qp, kp, vp, ip, fp, c_initial, n_initial, m_initial, L, check_eps(eps), dt, bool(return_last_states)
    )
    if return_last_states:
        h, states = out
        return h[:, :, : shape.S], states
    return out[:, :, : shape.S]
