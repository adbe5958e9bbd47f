"""`mlstm_prefill`: a short sequence from given states, forward only (serving's prefill chunks), on XLA or one fused
Triton kernel (kernels/triton/prefill.py). The result is `mlstm`'s with chunk_size = S and the last states."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import MAX_PREFILL, checked_inputs, check_eps, pad_to_multiple
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.mlstm import input_gates
from xlstm_jax.mlstm.step import STATE_DTYPES

PREFILL_BACKENDS = ("auto", "native", "triton")


def resolve_prefill_backend(backend: str) -> str:
    """"auto": triton on a CUDA GPU with Triton, native elsewhere; "triton" where it cannot run raises."""
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"unknown mlstm_prefill backend {backend!r}; expected one of {list(PREFILL_BACKENDS)}.")
    ok, why = triton_availability()
    if backend == "auto":
        return "triton" if ok and jax.default_backend() == "gpu" else "native"
    if backend == "triton" and not ok:
        raise RuntimeError(f"mlstm_prefill backend 'triton' cannot run here: {why}. Use backend='native'.")
    return backend


def mlstm_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c: jax.Array | None = None,
    n: jax.Array | None = None,
    m: jax.Array | None = None,
    *,
    backend: str = "auto",
    eps: float = 1e-6,
    input_gate: str = "exp",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """S tokens from the states (c, n, m) (None: zeros), forward only: the outputs and the last states.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) gate pre-activations; 1 <= S <= MAX_PREFILL (run
    as the next power of two >= 16, the added steps neutral); states as `mlstm_step` takes them (c, n float32 or
    bfloat16, m float32). Gate and state math run in float32. backend "native" (`mlstm`'s chunkwise XLA form, one
    chunk), "triton" (one fused launch) or "auto". input_gate "sigmoid": the mLSTMsig cell. Not differentiable with
    backend "triton" (serving only).
    Returns (h (B, NH, S, DHHV) in q's dtype, (c, n, m) in the states' dtypes).
    """
    x, _ = checked_inputs(q, k, v, i, f, c, n, m)
    B, NH, S, DHQK = x.q.shape
    DHHV = x.v.shape[-1]
    if not 1 <= S <= MAX_PREFILL:
        raise ValueError(f"mlstm_prefill takes 1 to {MAX_PREFILL} tokens (q.shape[2]), got {S}.")
    eps = check_eps(eps)
    if x.c_initial is None:
        c, n, m = (jnp.zeros((B, NH, DHQK, DHHV), jnp.float32), jnp.zeros((B, NH, DHQK), jnp.float32),
                   jnp.zeros((B, NH), jnp.float32))
    else:
        c, n, m = x.c_initial, x.n_initial, x.m_initial
    for name, state in (("c", c), ("n", n)):
        if jnp.dtype(state.dtype) not in STATE_DTYPES:
            raise TypeError(f"{name} must be float32 or bfloat16, got {state.dtype}.")
    if jnp.dtype(m.dtype) != jnp.float32:
        raise TypeError(f"m must be float32 (the max-state sets the scale of C and n), got {m.dtype}.")
    L = max(16, 1 << (S - 1).bit_length())
    q, k, v, i, f = pad_to_multiple(x.q, x.k, x.v, x.i.astype(jnp.float32), x.f.astype(jnp.float32), L)
    if resolve_prefill_backend(backend) == "native":
        from xlstm_jax.mlstm.api import mlstm

        h, last = mlstm(q, k, v, i, f, backend="native_chunkwise", chunk_size=L, c_initial=c, n_initial=n,
                        m_initial=m, return_last_states=True, eps=eps, input_gate=input_gate)
        return h[:, :, :S], tuple(s.astype(old.dtype) for s, old in zip(last, (c, n, m)))
    from xlstm_jax.kernels.triton.prefill import prefill_triton

    sigmoid = input_gates.check_input_gate(input_gate) == "sigmoid"
    if sigmoid:
        i, m = input_gates.as_exp_gate(i, m)
    h, states = prefill_triton(q, k, v, i, f, c, n, m, eps)
    if sigmoid:
        states = tuple(s.astype(old.dtype) for s, old in zip(input_gates.true_states(states), states))
    return h[:, :, :S], states
