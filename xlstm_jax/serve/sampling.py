"""Per-row sampling for a batch whose rows belong to different requests: each row has its own temperature, top-k,
top-p and PRNG key (traced arrays, so one compilation serves every mix of settings). Row by row the same filter as
`generation.filter_logits`, which takes one setting for the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def filter_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits (B, V) with what lies outside each row's top-k / top-p set at -inf.

    temperature (B,) > 0; top_k (B,) int32 in [1, V] (V: all tokens); top_p (B,) in (0, 1] (1: all tokens). Ties
    at the k-th logit are kept, as `lax.top_k`'s threshold keeps them in `filter_logits`."""
    logits = logits.astype(F32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature[:, None]
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, top_k[:, None] - 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    threshold = jnp.min(jnp.where(before < top_p[:, None], descending, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.where(top_p[:, None] < 1.0, threshold, -jnp.inf)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One token (B,) int32 per row of logits (B, V): the argmax where temperature == 0, else a draw with the row's
    key (B,) from its filtered softmax. A batch of greedy rows only skips the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        filtered = filter_rows(logits, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
        sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
