"""The XLA form of `x @ w` for decoding: what the Triton skinny matmul (triton_skinny.py) must equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def skinny_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K), w (K, N) in one dtype -> (M, N) float32, float32 accumulation."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32, precision=precision)
