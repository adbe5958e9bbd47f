"""xlstm_jax.models."""
