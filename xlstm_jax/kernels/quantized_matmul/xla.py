"""Weight-only quantization of a matrix and the XLA matmul with its dequantized form (the reference and the
fallback of `quantized_matmul`).

A weight w (K, N) (N output channels) is stored as wq (K, N) in the scheme's dtype and scale (N,) float32 with
w ≈ wq * scale per column (symmetric, absmax):
- "int8": scale = absmax / 127, wq = round(w / scale) in [-127, 127]; |w - wq * scale| <= scale / 2.
- "fp8": float8 e4m3 (`jnp.float8_e4m3fn`, largest 448), scale = absmax / 448, wq = w / scale rounded to
  e4m3 (3 mantissa bits): relative error <= 2^-4 for normal values, absolute <= 2^-10 * scale below 2^-6 * scale.
A column of zeros gets scale 1 (wq 0).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import check_float_array, matmul_precision

F32 = jnp.float32
SCHEMES = {"int8": (jnp.dtype(jnp.int8), 127.0), "fp8": (jnp.dtype(jnp.float8_e4m3fn), 448.0)}


def check_scheme(scheme: Any) -> str:
    """`scheme` if it names a quantization scheme, else a ValueError listing them."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"unknown weight quantization scheme {scheme!r}; expected one of {list(SCHEMES)}.")
    return scheme


def quantize_weight(w: jax.Array, scheme: str) -> tuple[jax.Array, jax.Array]:
    """w (K, N) float -> (wq (K, N) int8 or float8_e4m3fn, scale (N,) float32), per output channel (column)."""
    check_float_array(w, "w")
    if np.ndim(w) != 2:
        raise ValueError(f"w must be a 2-D weight (K, N), got shape {np.shape(w)}.")
    return _quantize(w, check_scheme(scheme))


@functools.partial(jax.jit, static_argnames="scheme")
def _quantize(w: jax.Array, scheme: str) -> tuple[jax.Array, jax.Array]:
    dtype, top = SCHEMES[scheme]
    w = w.astype(F32)
    absmax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(absmax > 0, absmax / top, 1.0)
    scaled = jnp.clip(w / scale, -top, top)
    if scheme == "int8":
        scaled = jnp.round(scaled)
    return scaled.astype(dtype), scale


def dequantize(wq: jax.Array, scale: jax.Array) -> jax.Array:
    """wq (K, N), scale (N,) -> wq * scale (K, N) float32."""
    return wq.astype(F32) * scale.astype(F32)


def matmul_xla(x: jax.Array, wq: jax.Array, scale: jax.Array, out_dtype: Any) -> jax.Array:
    """x (..., K) @ dequantize(wq, scale) (K, N): the weight rounded to x's dtype, float32 accumulation (the
    product a float layer with that weight computes), (..., N) in out_dtype."""
    w = dequantize(wq, scale).astype(x.dtype)
    y = jnp.einsum("...d,df->...f", x, w, preferred_element_type=F32, precision=matmul_precision(x.dtype))
    return y.astype(out_dtype)
