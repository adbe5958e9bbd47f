"""Multi-query associative recall (MQAR), generated on the fly in JAX.

Vocabulary: token 0 is filler, keys are 1..K and values K+1..V-1 with K = (V - 1) // 2. One sequence of length S:

    k_1 v_1 k_2 v_2 ... k_N v_N | filler ... k_a v_a ... filler ... k_b v_b ... filler

The first 2N tokens bind N distinct random keys to random values. The rest (S - 2N tokens, split into two-token
slots) holds Q queries (default: every slot) in random slots; each repeats a random one of the N pairs (drawn with
replacement, so ruling out values already asked does not help). The model is scored on predicting the value after
each queried key. Chance accuracy is 1 / (V - 1 - K); a model that only knows "one of the N values in the context"
gets about 1 / N. `MQARConfig` (defined in `xlstm_jax.train.config`, importable from here) holds V, S, N and Q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.train.config import MQARConfig

__all__ = ["MQARConfig", "mqar_batch"]


def mqar_batch(key: jax.Array, config: MQARConfig, batch_size: int) -> dict[str, jax.Array]:
    """One batch: inputs (B, S) int32, targets (B, S) int32 (the next token), mask (B, S) float32 (1 at the Q query
    positions, whose target is the recalled value)."""
    B, S, N, Q = batch_size, config.seq_len, config.num_kv_pairs, config.queries
    K = config.num_keys
    k_keys, k_values, k_slots, k_queries = jax.random.split(key, 4)
    keys = jnp.argsort(jax.random.uniform(k_keys, (B, K)), axis=1)[:, :N].astype(jnp.int32) + 1
    values = jax.random.randint(k_values, (B, N), K + 1, config.vocab_size, jnp.int32)
    slots = jnp.argsort(jax.random.uniform(k_slots, (B, config.num_slots)), axis=1)[:, :Q]
    query_pos = 2 * N + 2 * slots  # (B, Q)
    asked = jax.random.randint(k_queries, (B, Q), 0, N)  # which pair each query recalls, with repetition
    rows = jnp.arange(B)[:, None]
    seq = jnp.zeros((B, S), jnp.int32)
    seq = seq.at[:, 0:2 * N:2].set(keys).at[:, 1:2 * N:2].set(values)
    seq = seq.at[rows, query_pos].set(keys[rows, asked]).at[rows, query_pos + 1].set(values[rows, asked])
    mask = jnp.zeros((B, S), jnp.float32).at[rows, query_pos].set(1.0)
    targets = jnp.concatenate([seq[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)
    return {"inputs": seq, "targets": targets, "mask": mask}
