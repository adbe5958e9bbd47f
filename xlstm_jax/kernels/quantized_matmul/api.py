"""`quantized_matmul`: x @ (wq * scale) with weight-only int8 / float8 e4m3 weights, on the dequantizing Triton
kernel (decoding: at most 16 rows, CUDA GPU) or in XLA (dequantize, then the float matmul)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import check_float_array
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.kernels.quantized_matmul.xla import SCHEMES, matmul_xla

BACKENDS = ("auto", "xla", "triton")
MAX_TRITON_ROWS = 16
_WEIGHT_DTYPES = tuple(dtype for dtype, _ in SCHEMES.values())


def resolve_backend(backend: str, rows: int) -> str:
    """The path for x with `rows` rows. The kernel is a GEMV: more than 16 rows (a prefill) always run in XLA.
    Up to 16: "auto" is triton on a CUDA GPU with Triton, xla elsewhere; "triton" where it cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantized_matmul backend {backend!r}; expected one of {list(BACKENDS)}.")
    ok, why = triton_availability()
    if backend == "triton" and not ok:
        raise RuntimeError(f"quantized_matmul backend 'triton' cannot run here: {why}. Use backend='xla'.")
    if backend == "xla" or rows > MAX_TRITON_ROWS or not ok:
        return "xla"
    return "triton" if backend == "triton" or jax.default_backend() == "gpu" else "xla"


def quantized_matmul(x: jax.Array, wq: jax.Array, scale: jax.Array, *, backend: str = "auto",
                     out_dtype: Any = jnp.bfloat16, **launch_options: Any) -> jax.Array:
    """y = x @ (wq * scale[None, :]) with float32 accumulation.

    x (..., K) float32 / bfloat16 / float16 (the product's operand dtype); wq (K, N) int8 or float8_e4m3fn;
    scale (N,) float (`xla.quantize_weight` makes both). backend "auto" (the Triton kernel on a CUDA GPU when x has
    at most 16 rows, else XLA), "xla" or "triton" (the kernel for at most 16 rows, XLA for more; on a CPU through
    the interpreter; `launch_options`: its block_n, block_k, split_k, num_warps, num_stages). Returns y (..., N)
    in out_dtype.
    """
    check_float_array(x, "x")
    if np.ndim(wq) != 2 or jnp.dtype(wq.dtype) not in _WEIGHT_DTYPES:
        raise TypeError(f"wq must be a 2-D int8 or float8_e4m3fn array (K, N), got {getattr(wq, 'dtype', None)} of "
                        f"shape {np.shape(wq)}.")
    K, N = np.shape(wq)
    if np.ndim(x) < 1 or np.shape(x)[-1] != K:
        raise ValueError(f"x must be (..., K) with K = {K} (wq's rows), got shape {np.shape(x)}.")
    if np.shape(scale) != (N,):
        raise ValueError(f"scale must be (N,) = ({N},) (wq's columns), got shape {np.shape(scale)}.")
    lead = np.shape(x)[:-1]
    rows = math.prod(lead)
    if resolve_backend(backend, rows) == "xla" or rows == 0:
        return matmul_xla(x, wq, scale, out_dtype)
    from xlstm_jax.kernels.quantized_matmul.triton_gemv import matmul_triton

    y = matmul_triton(jnp.reshape(x, (rows, K)), wq, scale, out_dtype, **launch_options)
    return y.reshape(*lead, N)
