"""TFLA "xl-chunk" Triton mLSTM kernels: tiled chunks of any size (64..2048), states stored only at chunk borders."""

import xlstm_jax.kernels.launch  # noqa: F401  (selects Triton's interpreter before any kernel is defined)
