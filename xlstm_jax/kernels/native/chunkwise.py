"""The `native_chunkwise` implementation of `xlstm_jax.mlstm` (`chunkwise_native`), the XLA reference of the Triton
chunkwise kernels: neutral padding to a multiple of the chunk size and the custom_vjp that joins
`chunkwise_fw.forward` to `chunkwise_bw.backward`. Any S works (padded steps are neutral, so the last states are
exact); memory is O(S).
"""

from __future__ import annotations

import functools

import jax

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    pad_to_multiple,
    resolve_compute_dtype,
)
from xlstm_jax.kernels.native.chunkwise_bw import backward
from xlstm_jax.kernels.native.chunkwise_fw import F32, forward


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
