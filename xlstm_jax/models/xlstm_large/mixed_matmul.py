"""The model's projection matmul in mixed precision, with its backward in the compute dtype as well.

Forward: y = x @ w with both operands cast to the compute dtype, float32 accumulation and a float32 result (the
residual stream stays float32). Under plain autodiff the cotangent of that float32 result is float32, so the two
backward matmuls (dx = g @ wᵀ, dw = xᵀ @ g) meet a float32 operand and a bfloat16 one and XLA runs them as float32
(TF32) GEMMs: on an H100 they were 23.5 of the 38 ms of matmul time in a 125M training step (docs/benchmarks.md,
"Training step profile"). Here the backward rounds the cotangent to bfloat16, as mixed-precision training does,
and both matmuls run in bfloat16 with float32 accumulation. float16 keeps the plain backward (a float16 cotangent
could overflow without loss scaling), float32 is exact as before.

Shapes: x (..., K), w (K, N) -> y (..., N) float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import matmul_precision

F32 = jnp.float32


def _dot(a: jax.Array, b: jax.Array, spec: str, dtype: Any) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=F32,
                      precision=matmul_precision(dtype))


def mixed_matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x (..., K) @ w (K, N) in `dtype` with float32 accumulation -> (..., N) float32; gradients for x and w in
    their own dtypes (bfloat16: computed by bfloat16 matmuls, see the module docstring)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return _bf16_matmul(x, w, jnp.dtype(x.dtype), jnp.dtype(w.dtype))
    return _dot(x, w, "...k,kn->...n", dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_matmul(x: jax.Array, w: jax.Array, x_dtype: Any, w_dtype: Any) -> jax.Array:
    """x_dtype, w_dtype: x's and w's dtypes, which their gradients take."""
    return _dot(x, w, "...k,kn->...n", jnp.bfloat16)


def _forward(x, w, x_dtype, w_dtype):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _dot(xb, wb, "...k,kn->...n", jnp.bfloat16), (xb, wb)


def _backward(x_dtype, w_dtype, residuals, g):
    xb, wb = residuals
    gb = g.astype(jnp.bfloat16)
    dx = _dot(gb, wb, "...n,kn->...k", jnp.bfloat16)
    dw = _dot(xb, gb, "...k,...n->kn", jnp.bfloat16)  # no reshape: the leading axes may be sharded apart
    return dx.astype(x_dtype), dw.astype(w_dtype)


_bf16_matmul.defvjp(_forward, _backward)
