"""Public native chunkwise mLSTM: neutral padding to a multiple of the chunk size, and the custom_vjp that joins
`fw.forward` to `bw.backward`.

`chunkwise_native` is the `native_chunkwise` implementation of `xlstm_jax.mlstm`; `mlstm_chunkwise_native` the same
with its own input checks. The XLA reference of the Triton chunkwise kernels. Any S works (padded steps are
neutral, so the last states are exact); memory is O(S).
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    check_chunk_size,
    check_eps,
    checked_inputs,
    pad_to_multiple,
    resolve_compute_dtype,
)
from xlstm_jax.kernels.mlstm_chunkwise.native.bw import backward
from xlstm_jax.kernels.mlstm_chunkwise.native.fw import F32, forward


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

CHUNK_SIZES = (16, 512)


def mlstm_chunkwise_native(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
    return_last_states: bool = False, eps: float = 1e-6, chunk_size: int = 64, autocast_dtype: Any = None,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Chunkwise mLSTM in XLA with an exact hand-written backward.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) (or (B, NH, S, 1)) gate pre-activations; optional
    initial states c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH), all three or none. chunk_size: power of two
    in 16..512. autocast_dtype: matmul operand dtype ("float32" | "bfloat16" | "float16"; None: q's dtype).
    Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) with float32 states if `return_last_states`.
    """
    x, _ = checked_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    L = check_chunk_size(chunk_size, minimum=CHUNK_SIZES[0], maximum=CHUNK_SIZES[1])
    return chunkwise_native(x, MLSTMOptions(bool(return_last_states), check_eps(eps), autocast_dtype), L)


def chunkwise_native(x: MLSTMInputs, o: MLSTMOptions, chunk_size: int):
    """The `native_chunkwise` implementation of `xlstm_jax.mlstm` on checked inputs: pads S to a multiple of the
    chunk size with neutral steps and runs the custom_vjp."""
    dt = resolve_compute_dtype(o.autocast_dtype, x.q.dtype)
    states = x[5:] if x.c_initial is None else tuple(s.astype(F32) for s in x[5:])
    padded = pad_to_multiple(*x[:3], x.i.astype(F32), x.f.astype(F32), chunk_size)
    out = _chunkwise(*padded, *states, chunk_size, o.eps, dt, bool(o.return_last_states))
    S = x.q.shape[2]
    if o.return_last_states:
        h, last = out
        return h[:, :, :S], last
    return out[:, :, :S]
