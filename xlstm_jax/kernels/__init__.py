"""xlstm_jax.kernels."""
