"""`xlstm_jax.mlstm_step`: one mLSTM time step from given states (decoding), on XLA or a fused Triton kernel
(kernels/mlstm_step/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import check_eps, check_float_array
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.kernels.native.step import step_native
from xlstm_jax.mlstm import input_gates

STEP_BACKENDS = ("auto", "native", "triton")
STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def resolve_step_backend(backend: str) -> str:
    """"auto": triton on a CUDA GPU with Triton, native elsewhere; "triton" where it cannot run raises."""
    if backend not in STEP_BACKENDS:
        raise ValueError(f"unknown mlstm_step backend {backend!r}; expected one of {list(STEP_BACKENDS)}.")
    ok, why = triton_availability()
    if backend == "auto":
        return "triton" if ok and jax.default_backend() == "gpu" else "native"
    if backend == "triton" and not ok:
        raise RuntimeError(f"mlstm_step backend 'triton' cannot run here: {why}. Use backend='native'.")
    return backend


def _check(q, k, v, i, f, c, n, m) -> tuple[jax.Array, jax.Array]:
    """Shapes and dtypes (ValueError / TypeError naming the argument); the gates as (B, NH)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f), ("c", c), ("n", n), ("m", m)):
        check_float_array(x, name)
    if np.ndim(q) != 3:
        raise ValueError(f"q must be (B, NH, DHQK), got shape {np.shape(q)}.")
    B, NH, DHQK = np.shape(q)
    if np.shape(k) != (B, NH, DHQK):
        raise ValueError(f"k must have q's shape {(B, NH, DHQK)}, got {np.shape(k)}.")
    if np.ndim(v) != 3 or np.shape(v)[:2] != (B, NH):
        raise ValueError(f"v must be (B, NH, DHHV) with (B, NH) = {(B, NH)}, got shape {np.shape(v)}.")
    DHHV = np.shape(v)[2]
    gates = []
    for name, g in (("i", i), ("f", f)):
        if np.shape(g) == (B, NH, 1):
            g = jnp.asarray(g)[..., 0]
        if np.shape(g) != (B, NH):
            raise ValueError(f"{name} must be (B, NH) = {(B, NH)} (or (B, NH, 1)), got shape {np.shape(g)}.")
        gates.append(g)
    for name, x, shape in (("c", c, (B, NH, DHQK, DHHV)), ("n", n, (B, NH, DHQK)), ("m", m, (B, NH))):
        if np.shape(x) != shape:
            raise ValueError(f"{name} must be {shape} (from q (B, NH, DHQK) and v (B, NH, DHHV)), got shape "
                             f"{np.shape(x)}.")
        if jnp.dtype(x.dtype) not in STATE_DTYPES:
            raise TypeError(f"{name} must be float32 (the default) or bfloat16 (memory-bound serving), got "
                            f"{x.dtype}.")
    if jnp.dtype(m.dtype) != jnp.float32:
        raise TypeError(f"m must be float32 (the max-state sets the scale of C and n), got {m.dtype}.")
    if jnp.dtype(q.dtype) == jnp.float64:
        raise TypeError("q is float64: the step runs float32 state math; pass float32 or 16-bit inputs.")
    return gates[0], gates[1]


def _zero_states_if_none(q, v, c, n, m) -> tuple:
    """(c, n, m), zeros of the shapes `q` (B, NH, DHQK) and `v` (B, NH, DHHV) give when all three are None."""
    given = [name for name, x in (("c", c), ("n", n), ("m", m)) if x is not None]
    if given and len(given) < 3:
        missing = [name for name in ("c", "n", "m") if name not in given]
        raise ValueError(f"pass the states c, n and m together or none of them; got {given} without {missing}.")
    if given:
        return c, n, m
    for name, x in (("q", q), ("v", v)):
        if np.ndim(x) != 3:
            raise ValueError(f"{name} must be (B, NH, {'DHQK' if name == 'q' else 'DHHV'}), got shape {np.shape(x)}.")
    (B, NH, DHQK), DHHV = np.shape(q), np.shape(v)[2]
    return (jnp.zeros((B, NH, DHQK, DHHV), jnp.float32), jnp.zeros((B, NH, DHQK), jnp.float32),
            jnp.zeros((B, NH), jnp.float32))


def mlstm_step(
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
    """One mLSTM time step: the states after the token and its output.

    q, k (B, NH, DHQK); v (B, NH, DHHV); i, f (B, NH) gate pre-activations; states c (B, NH, DHQK, DHHV),
    n (B, NH, DHQK), m (B, NH) as `mlstm` returns them (`return_last_states=True`), all three or none (None: zero
    states, float32, as `mlstm` starts from; the first step of a sequence). c and n are float32, or bfloat16
    to halve the memory a step streams (serving; less exact); m is float32. Gate and state math run in float32 and
    q is scaled by DHQK**-0.5 inside, as in `mlstm`. backend: "native" (XLA), "triton" (one fused kernel that reads
    and writes C once; C's buffer is reused when the caller does not keep it) or "auto" (triton on a CUDA GPU).
    input_gate "sigmoid": the mLSTMsig step (`xlstm_jax.mlstm.input_gates`; states (C, n) true, m 0 and ignored).
    Returns (h (B, NH, DHHV) in q's dtype, (c, n, m) in the states' dtypes).
    """
    c, n, m = _zero_states_if_none(q, v, c, n, m)
    i, f = _check(q, k, v, i, f, c, n, m)
    eps = check_eps(eps)
    sigmoid = input_gates.check_input_gate(input_gate) == "sigmoid"
    if sigmoid:
        i, m = input_gates.as_exp_gate(i, m)
    if resolve_step_backend(backend) == "triton":
        from xlstm_jax.kernels.triton.step import step_triton

        h, states = step_triton(q, k, v, c, n, m, i, f, eps)
    else:
        h, states = step_native(q, k, v, c, n, m, i, f, eps)
    if sigmoid:
        states = tuple(s.astype(old.dtype) for s, old in zip(input_gates.true_states(states), states))
    return h, states
