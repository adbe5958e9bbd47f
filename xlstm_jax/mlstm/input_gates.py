"""The input gate: "exp" (the mLSTM) or "sigmoid" (the TFLA paper's mLSTMsig), on every backend.

mLSTMsig, per head with s = DHQK^-1/2:
    C_t = σ(f_t) C_{t-1} + σ(i_t) k_t v_tᵀ,   n_t = σ(f_t) n_{t-1} + σ(i_t) k_t,
    h_t = (s q_t)ᵀ C_t / (max(|(s q_t)ᵀ n_t|, 1) + eps).
It is the exponential-gate mLSTM with the input gate pre-activation log σ(i_t), since e^{log σ(i)} = σ(i): that
recurrence carries C̃ = C e^{-m} with its max-state m, and its denominator max(|q̂·ñ|, e^{-m}) + eps is, in true
terms, max(|q̂·n|, 1) + eps·e^{m}. Starting from m = 0 every m stays <= 0 here (all log gates are <= 0), so the
results differ from mLSTMsig's only by eps·(1 - e^{m}) in the denominator (relative 1e-6 at the default eps). The
states of mLSTMsig are the true (C, n), returned with m = 0; a given m_initial is ignored (taken as 0).
Backends are told (MLSTMOptions.max_state False) and may hold m at 0 instead of carrying the running max: every
weight is then <= 1 and nothing overflows. The Triton kernels do (KernelConfig.max_state): no row max in the
output kernels, no max in the state recurrence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import at_zero_stabilizer, log_sigmoid

INPUT_GATES = ("exp", "sigmoid")


def check_input_gate(input_gate: str) -> str:
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate must be one of {list(INPUT_GATES)}, got {input_gate!r}.")
    return input_gate


def as_exp_gate(i: jax.Array, m: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """mLSTMsig's input gate and initial max-state as the exponential-gate cell takes them: the pre-activation
    log σ(i) (whose exponential is σ(i)) and m = 0 (the given states are the true ones; None stays None)."""
    return log_sigmoid(i.astype(jnp.float32)).astype(i.dtype), None if m is None else jnp.zeros_like(m)


def true_states(states: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(C̃, ñ, m) of the exponential-gate recurrence -> mLSTMsig's (C, n, 0)."""
    return at_zero_stabilizer(*states)
