"""The engine's device functions, each compiled once per shape: the decode step of the whole slot pool, a prefill
chunk of one request, and the copy of a prefilled state into its slot.

States are one (C, n, m) per block: C (B, NH, DHQK, DHV) and n (B, NH, DHQK) in the state dtype, m (B, NH)
float32; B is the number of slots M in the pool and 1 for a request being prefilled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import zero_states
from xlstm_jax.serve.sampling import sample_rows

F32 = jnp.float32
States = list  # [(C, n, m) per block]


def in_dtype(states: States, dtype: str) -> States:
    """C and n cast to `dtype` (m stays float32)."""
    return [(c.astype(dtype), n.astype(dtype), m) for c, n, m in states]


def empty_states(config: xLSTMLargeConfig, batch_size: int, dtype: str) -> States:
    """The states before any token (zeros, m = 0) for `batch_size` rows, C and n in `dtype`."""
    return in_dtype(zero_states(config, batch_size), dtype)


def states_bytes(states: States) -> int:
    return sum(x.nbytes for block in states for x in block)


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "state_dtype"), donate_argnames=("pool",))
def decode_step(params, pool, previous, fresh_tokens, fresh, active, key_data, choice, position, temperature, top_k,
                top_p, *, graphdef, backend, state_dtype):
    """One token for every slot of the pool (M slots).

    Input token per slot: `fresh_tokens` (M,) where `fresh` (M,) (a request's last prompt token), else `previous`
    (M,) (the slot's token from the step before, still on the device). Inactive slots (`active` (M,) False) get
    neutral gates and keep their states exactly. Sampling per slot: key from `key_data` (M, 2) uint32 (the
    request's seed) folded with `choice` (M,) and `position` (M,) (the index of the generated token), so a seeded
    request draws the same tokens in any batch; `temperature` (M,) (0: greedy), `top_k` (M,) in [1, V], `top_p`
    (M,). Returns (tokens (M,) int32, the new pool, bad (M,): active slots whose logits hold NaN or +inf)."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.where(fresh, fresh_tokens, previous)
    logits, states = model(tokens[:, None], states=pool, token_mask=active[:, None], return_states=True,
                           backend=backend)
    logits = logits[:, 0]
    keys = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.fold_in)(keys, choice), position)
    new = sample_rows(logits, keys, temperature, top_k, top_p)
    bad = active & jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
    return new, in_dtype(states, state_dtype), bad


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "chunk_size", "state_dtype"))
def prefill_chunk(params, state, tokens, mask, *, graphdef, backend, chunk_size, state_dtype):
    """The state (B = 1) after `tokens` (1, L), left-padded where `mask` (1, L) is False (neutral gates), starting
    from `state`; the chunkwise pass runs in float32 states and returns them in `state_dtype`."""
    model = nnx.merge(graphdef, params)
    start = [(c.astype(F32), n.astype(F32), m) for c, n, m in state]
    _, states = model(tokens, states=start, token_mask=mask, return_states=True, backend=backend,
                      chunk_size=chunk_size, last_logits_only=True)
    return in_dtype(states, state_dtype)


@functools.partial(jax.jit, donate_argnames=("pool",))
def insert(pool, slot, state):
    """The pool with slot `slot` (a traced int) set to `state` (B = 1)."""
    return jax.tree.map(lambda p, s: jax.lax.dynamic_update_index_in_dim(p, s[0], slot, 0), pool, state)
