"""The model's projection matmul in mixed precision, with its backward in the compute dtype as well.

Forward: y = x @ w with both operands cast to the compute dtype, float32 accumulation and a float32 result (the
residual stream stays float32). Under plain autodiff the cotangent of that float32 result is float32, so the two
backward matmuls (dx = g @ wᵀ, dw = xᵀ @ g) meet a float32 operand and a bfloat16 one and XLA runs them as float32
(TF32) GEMMs: on an H100 they were 23.5 of the 38 ms of matmul time in a 125M training step (docs/benchmarks.md,
"Training step profile"). Here the backward rounds the cotangent to bfloat16, as mixed-precision training does,
and both matmuls run in bfloat16 with float32 accumulation. float16 keeps the plain backward (a float16 cotangent
could overflow without loss scaling), float32 is exact as before.

`out_dtype` bfloat16 (for projections whose consumer rounds to bfloat16 anyway: q, k, v, the output gate, the FFN's
gate and up) writes the result in bfloat16 from the float32 accumulators: half the bytes for the elementwise work
around the matmul and its backward, which on an H100 were 6 ms of a 64 ms 125M training step in converts alone.

Shapes: x (..., K), w (K, N) (or (N, K), `w_layout="nk"`) -> y (..., N) in `out_dtype` (default float32).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import matmul_precision

F32 = jnp.float32


def _dot(a: jax.Array, b: jax.Array, spec: str, dtype: Any, out_dtype: Any = F32) -> jax.Array:
    """einsum(spec, a, b) with `dtype` operands and float32 accumulation, in `out_dtype`. A bfloat16 result is the
    matmul's own output type (the GEMM rounds its float32 accumulators once in its epilogue; XLA accumulates
    bfloat16 products in float32): as a float32 result and a convert, it was written, read and written again.
    Under a mesh of several devices the result stays float32 until summed: the partitioner may split the
    contraction over devices (it does over fsdp), and bfloat16 partial sums would each be rounded first."""
    direct = jnp.dtype(dtype) == jnp.dtype(out_dtype) == jnp.bfloat16 and not _on_devices()
    y = jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=out_dtype if direct else F32,
                   precision=matmul_precision(dtype))
    return y.astype(out_dtype)


def _on_devices() -> bool:
    """Whether this trace runs under a mesh of more than one device (`jax.set_mesh`, as the training loop's)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


_SPECS = {  # w's layout -> (forward, dx, dw) einsum specs
    "kn": ("...k,kn->...n", "...n,kn->...k", "...k,...n->kn"),
    "nk": ("...k,nk->...n", "...n,nk->...k", "...n,...k->nk"),
}


def mixed_matmul(x: jax.Array, w: jax.Array, dtype: Any, w_layout: str = "kn", out_dtype: Any = F32) -> jax.Array:
    """x (..., K) @ w in `dtype` with float32 accumulation -> (..., N) in `out_dtype`; w (K, N), or (N, K) with
    `w_layout="nk"` (a tied embedding table: each matmul then takes the table as stored, where a transposed view
    gave the CPU runtime a bf16 dot layout it cannot run). Gradients for x and w in their own dtypes (bfloat16:
    computed by bfloat16 matmuls, see the module docstring)."""
    if w_layout not in _SPECS:
        raise ValueError(f"w_layout must be one of {list(_SPECS)}, got {w_layout!r}.")
    out_dtype = jnp.dtype(out_dtype)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return _bf16_matmul(x, w, jnp.dtype(x.dtype), jnp.dtype(w.dtype), w_layout, out_dtype)
    return _dot(x, w, _SPECS[w_layout][0], dtype, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _bf16_matmul(x: jax.Array, w: jax.Array, x_dtype: Any, w_dtype: Any, w_layout: str, out_dtype: Any) -> jax.Array:
    """x_dtype, w_dtype: x's and w's dtypes, which their gradients take."""
    return _dot(x, w, _SPECS[w_layout][0], jnp.bfloat16, out_dtype)


def _forward(x, w, x_dtype, w_dtype, w_layout, out_dtype):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _dot(xb, wb, _SPECS[w_layout][0], jnp.bfloat16, out_dtype), (xb, wb)


def _backward(x_dtype, w_dtype, w_layout, out_dtype, residuals, g):
    xb, wb = residuals
    gb = g.astype(jnp.bfloat16)
    _, dx_spec, dw_spec = _SPECS[w_layout]
    dx = _dot(gb, wb, dx_spec, jnp.bfloat16, x_dtype)
    # no reshape: the leading axes may be sharded apart
    lhs, rhs = (xb, gb) if w_layout == "kn" else (gb, xb)
    return dx, _dot(lhs, rhs, dw_spec, jnp.bfloat16, w_dtype)


_bf16_matmul.defvjp(_forward, _backward)
