"""Models for measurements that need every weight to matter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig


def random_weights(config: xLSTMLargeConfig, seed: int) -> xLSTMLarge:
    """The initialisation in float32, every all-zero matrix column drawn N(0, 2 / 5D) instead (the output gate and
    the i / f gate projections then depend on the input, as a trained model's do)."""
    model = xLSTMLarge(config, rngs=nnx.Rngs(seed))
    std = float(np.sqrt(2.0 / (5.0 * config.embedding_dim)))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    for _, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        w = param[...]
        if w.ndim == 2 and not bool(jnp.all(jnp.any(w != 0, axis=0))):
            param[...] = jnp.where(jnp.any(w != 0, axis=0), w, std * jax.random.normal(next(keys), w.shape))
    return model
