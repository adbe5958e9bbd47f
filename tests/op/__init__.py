"""The public op `xlstm_jax.mlstm`: its contract, the reference, gates, segments, state passing, transforms, edge
inputs, numerics, properties, `mlstm_step` and the one door into the kernels."""
