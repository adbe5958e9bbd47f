"""Triton limit-chunk ("stablef") mLSTM kernels: one L x L tile per chunk, chunk sizes 16..128."""

import xlstm_jax.kernels.launch  # noqa: F401  (selects Triton's interpreter before any kernel is defined)
