"""The engine's device functions, each compiled once per shape: the decode step of the whole slot pool, a prefill
chunk of one request, both in one pass (`mixed_step`: their tokens share every matmul, so a prefill chunk rides on
the weight reads of the decode step), and the copy of a prefilled state into its slot.

`compiled(fn, **settings)` jits one of them with its settings (the model's graph definition and its parameters'
tree structure, backends, state dtype) bound once: passed as static arguments instead, every call would hash the
graph definition again (about 1.4 ms of host time per call for a 32-block model, more than a GPU decode step leaves
the host). The parameters cross each call as a flat list of arrays (`flat_params`), which jit's dispatch flattens
in C++; an nnx State is flattened in Python, Variable by Variable (0.62 against 0.10 ms a call for the 483
parameters of 32 blocks on the development machine).

States are one (C, n, m) per block: C (B, NH, DHQK, DHV) and n (B, NH, DHQK) in the state dtype, m (B, NH)
float32; B is the number of slots M in the pool and 1 for a request being prefilled.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xlstm_jax.mlstm.api import planned_backend
from xlstm_jax.models.xlstm_large.config import PREFILL_BACKEND, STEP_BACKEND, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import neutral_where_masked, xLSTMLarge, zero_states
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


@jax.named_scope("sample")
def _sample(logits, active, key_data, choice, position, temperature, top_k, top_p):
    """(tokens (M,) int32, bad (M,)) from the decode rows' logits (M, V); see `decode_step`."""
    keys = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.fold_in)(keys, choice), position)
    new = sample_rows(logits, keys, temperature, top_k, top_p)
    bad = active & jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
    return new, bad


def flat_params(params: nnx.State) -> tuple[Any, list]:
    """(tree structure, leaves) of the parameters: the device functions take the leaves and, with the structure
    bound by `compiled` (setting params_tree), rebuild the State inside the trace."""
    leaves, tree = jax.tree.flatten(params)
    return tree, leaves


def _model(graphdef, params_tree, params: list) -> xLSTMLarge:
    return nnx.merge(graphdef, jax.tree.unflatten(params_tree, params))


def compiled(fn, **settings):
    """`fn` (decode_step, mixed_step or prefill_chunk) jitted with its keyword-only `settings` bound: the states
    pool, where `fn` takes one, is donated (updated in place)."""
    donate = ("pool",) if fn in (decode_step, mixed_step) else ()
    return jax.jit(functools.partial(fn, **settings), donate_argnames=donate)


def decode_step(params, pool, previous, fresh_tokens, fresh, active, key_data, choice, position, temperature, top_k,
                top_p, *, graphdef, params_tree, backend, state_dtype):
    """One token for every slot of the pool (M slots).

    Input token per slot: `fresh_tokens` (M,) where `fresh` (M,) (a request's last prompt token), else `previous`
    (M,) (the slot's token from the step before, still on the device). Inactive slots (`active` (M,) False) get
    neutral gates and keep their states exactly. Sampling per slot: key from `key_data` (M, 2) uint32 (the
    request's seed) folded with `choice` (M,) and `position` (M,) (the index of the generated token), so a seeded
    request draws the same tokens in any batch; `temperature` (M,) (0: greedy), `top_k` (M,) in [1, V], `top_p`
    (M,). Returns (tokens (M,) int32, the new pool, bad (M,): active slots whose logits hold NaN or +inf)."""
    model = _model(graphdef, params_tree, params)
    tokens = jnp.where(fresh, fresh_tokens, previous)
    logits, states = model(tokens[:, None], states=pool, token_mask=active[:, None], return_states=True,
                           backend=backend)
    new, bad = _sample(logits[:, 0], active, key_data, choice, position, temperature, top_k, top_p)
    return new, in_dtype(states, state_dtype), bad


def decode_and_prefill(model: xLSTMLarge, tokens, active, pool, chunk, mask, state, *, step_backend: str,
                       backend: str, chunk_size: int | None):
    """The decode rows `tokens` (M,) from `pool` and a prefill chunk `chunk` (1, L) (left-padded where `mask`
    (1, L) is False) from `state` (B = 1) through the model in one pass: the M + L tokens go through each
    projection, norm and FFN together; only the mLSTM cells run apart (the step kernel on the pool, the chunkwise
    backend on the chunk, in float32 states); past the last cell only the decode rows go on. L need not be a power
    of two (M + L can then fill whole matmul tiles). Returns (logits (M, V) float32, the pool's new states, the
    chunk's last state)."""
    M, L = tokens.shape[0], chunk.shape[1]
    if step_backend != STEP_BACKEND:
        step_backend = planned_backend(step_backend, None, 1)[0]
    chunk_backend, chunk_size = ((backend, None) if backend == PREFILL_BACKEND
                                 else planned_backend(backend, chunk_size, L))
    x = model.backbone.embeddings(jnp.concatenate([tokens, chunk[0]]))[None]  # (1, M + L, D)
    keep = jnp.concatenate([active, mask[0]])[None]
    new_pool, new_state = [], []
    last = len(model.backbone.blocks) - 1
    for index, (block, slots, start) in enumerate(zip(model.backbone.blocks, pool, state)):
        layer = block.mlstm_layer
        q, k, v, o, i, f = layer.project(block.norm_mlstm(x))
        i, f = neutral_where_masked(i, f, keep)
        rows = [a[0, :M, None] for a in (q, k, v, i, f)]  # (M, 1, ...): one token per slot
        h_slots, slots = layer.cell(*rows, slots, backend=step_backend, chunk_size=None)
        h_chunk, start = layer.cell(*(a[:, M:] for a in (q, k, v, i, f)), in_dtype([start], "float32")[0],
                                    backend=chunk_backend, chunk_size=chunk_size)
        h_slots = jnp.swapaxes(h_slots[:, :, 0], 0, 1)[None]  # (M, NH, 1, DHV) -> (1, NH, M, DHV): the slots as tokens
        if index == last:  # past the last cell the chunk's rows feed nothing: only the decode rows go on
            x, o, h = x[:, :M], o[:, :M], h_slots
        else:
            h = jnp.concatenate([h_slots, h_chunk.astype(h_slots.dtype)], axis=2)
        x = x + layer.output(h, o)
        x = x + block.ffn(block.norm_ffn(x))
        new_pool.append(slots)
        new_state.append(start)
    return model.head(x[0]), new_pool, new_state  # x holds the decode rows alone after the last block


def mixed_step(params, pool, previous, fresh_tokens, fresh, active, key_data, choice, position, temperature, top_k,
               top_p, state, chunk, mask, *, graphdef, params_tree, step_backend, backend, chunk_size, state_dtype):
    """`decode_step` for the pool and `prefill_chunk` of `chunk` (1, L) / `mask` from `state` in one pass
    (`decode_and_prefill`). Returns (tokens (M,), the new pool, bad (M,), the chunk's last state)."""
    model = _model(graphdef, params_tree, params)
    tokens = jnp.where(fresh, fresh_tokens, previous)
    logits, slots, state = decode_and_prefill(model, tokens, active, pool, chunk, mask, state,
                                              step_backend=step_backend, backend=backend, chunk_size=chunk_size)
    new, bad = _sample(logits, active, key_data, choice, position, temperature, top_k, top_p)
    return new, in_dtype(slots, state_dtype), bad, in_dtype(state, state_dtype)


def prefill_chunk(params, state, tokens, mask, *, graphdef, params_tree, backend, chunk_size, state_dtype):
    """The state (B = 1) after `tokens` (1, L), left-padded where `mask` (1, L) is False (neutral gates), starting
    from `state`; the chunkwise pass runs in float32 states and returns them in `state_dtype`."""
    model = _model(graphdef, params_tree, params)
    start = [(c.astype(F32), n.astype(F32), m) for c, n, m in state]
    _, states = model(tokens, states=start, token_mask=mask, return_states=True, backend=backend,
                      chunk_size=chunk_size, last_logits_only=True)
    return in_dtype(states, state_dtype)


@functools.partial(jax.jit, donate_argnames=("pool",))
def insert(pool, slot, state):
    """The pool with slot `slot` (a traced int) set to `state` (B = 1)."""
    return jax.tree.map(lambda p, s: jax.lax.dynamic_update_index_in_dim(p, s[0], slot, 0), pool, state)
