"""xlstm_jax.models.xlstm_parallel.blocks."""
