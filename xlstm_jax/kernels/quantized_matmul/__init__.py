"""Weight-only quantized matmuls for decoding: `quantize_weight` (int8 / float8 e4m3, per output channel),
`dequantize`, and `quantized_matmul` (the dequantizing Triton GEMV for at most 16 rows on a CUDA GPU, XLA
elsewhere; `triton_gemv.py`, `xla.py`)."""

from xlstm_jax.kernels.quantized_matmul.api import BACKENDS, quantized_matmul
from xlstm_jax.kernels.quantized_matmul.xla import SCHEMES, check_scheme, dequantize, quantize_weight

__all__ = ["BACKENDS", "SCHEMES", "check_scheme", "dequantize", "quantize_weight", "quantized_matmul"]
