"""Several devices and processes: sharding, context parallelism, training on a mesh, multi-host training."""
